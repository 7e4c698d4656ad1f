"""The student's side of grading: runs one submission's code and answers the grader with *values*.

The grader (:mod:`mmalign.labs.remote`) starts this file as a script (``python -I runner.py``) inside
the submission's sandbox. Nothing it says decides a grade: it runs the student's cells, then serves
requests ("call ``my_info_nce`` on these tensors", "the vector-Jacobian product of that call", "attribute
``ids`` of object 3", "value and gradient of that call") and replies with plain values (tensors, numbers,
strings, lists, tuples, dicts of those) that the grader loads with ``torch.load(weights_only=True)``,
checks and compares in its own process. Before any student code runs, the library functions that the lab
asks the student to write are replaced by stubs (their code objects are swapped, so no alias, closure,
default argument or thread reaches the originals).

Started with ``--ranks N`` it is instead the launcher of a group's sandbox: it starts N runners, each on
its own pipes from the grader and with torchrun's environment, which join one torch.distributed group
(gloo on the sandbox's loopback) before the student's cells run.

Messages are frames: an 8-byte big-endian length, then ``torch.save`` bytes. Requests come from the
grader (trusted); replies hold plain values only. This file imports nothing from :mod:`mmalign.labs`
except through the standard library, so a student who reads it learns only the protocol.
"""

import io
import os
import resource
import signal
import struct
import sys
import traceback
import types

_HEADER = struct.Struct(">Q")
_MAX_REPLY_ITEMS = 100_000


# -- helpers shared with the grader (pure functions, no state) -----------------------------------------


def tensors_in(obj, torch):
    """The tensors of a nested list / tuple / dict structure, in a fixed traversal order."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)
        elif isinstance(x, dict):
            for item in x.values():
                walk(item)

    walk(obj)
    return out


def write_frame(stream, payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def read_exact(stream, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError("the grader closed the channel")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# -- the student's process ----------------------------------------------------------------------------


class _Runner:
    def __init__(self, channel_in, channel_out):
        import torch

        self.torch = torch
        self.channel_in, self.channel_out = channel_in, channel_out
        self.shell = None
        self.handles = {}
        self.cell_timeout = 300

    # plain values ------------------------------------------------------------------------------------
    def plain(self, value, depth=0, count=None):
        """The reply form of a value; anything that is not plain is described, never sent."""
        torch = self.torch
        count = count if count is not None else [0]
        count[0] += 1
        if count[0] > _MAX_REPLY_ITEMS or depth > 20:
            return {"t": "bad", "type": "a structure too large or too deep"}
        if value is None or type(value) in (bool, int, float, str):
            return value
        if type(value) in (torch.Tensor, torch.nn.Parameter):
            tensor = value.detach().cpu()
            if tensor.layout != torch.strided:
                tensor = tensor.to_dense()
            return {"t": "tensor", "v": tensor.clone().contiguous(), "rg": bool(value.requires_grad)}
        if type(value) is torch.Size:
            return {"t": "tuple", "v": [int(v) for v in value]}
        if type(value) in (list, tuple):
            return {"t": type(value).__name__, "v": [self.plain(v, depth + 1, count) for v in value]}
        if type(value) is dict:
            if not all(type(k) in (str, int) for k in value):
                return {"t": "bad", "type": "a dict whose keys are not strings or integers"}
            return {"t": "dict", "k": list(value), "v": [self.plain(v, depth + 1, count) for v in value.values()]}
        numpy = sys.modules.get("numpy")
        if numpy is not None and type(value) is numpy.ndarray:
            if value.dtype.hasobject:
                return {"t": "bad", "type": "a numpy array of Python objects"}
            buffer = io.BytesIO()
            numpy.save(buffer, value, allow_pickle=False)
            return {"t": "ndarray", "v": buffer.getvalue()}
        if numpy is not None and isinstance(value, numpy.generic) and type(value.item()) in (bool, int, float):
            return value.item()
        return {"t": "bad", "type": type(value).__name__}

    # arguments from the grader ------------------------------------------------------------------------
    def resolve(self, value):
        if isinstance(value, dict) and set(value) == {"__student__"}:
            return self.lookup(value["__student__"])
        if isinstance(value, dict) and set(value) == {"__handle__"}:
            return self.handles[value["__handle__"]]
        if type(value) in (list, tuple):
            return type(value)(self.resolve(v) for v in value)
        if type(value) is dict:
            return {k: self.resolve(v) for k, v in value.items()}
        return value

    def lookup(self, name):
        namespace = self.shell.user_ns if self.shell is not None else {}
        if name not in namespace:
            raise NameError(f"your notebook does not define {name!r}")
        return namespace[name]

    def target(self, spec):
        kind = spec[0]
        if kind == "global":
            return self.lookup(spec[1])
        if kind == "handle":
            return getattr(self.handles[spec[1]], spec[2])
        raise ValueError(f"unknown target {spec!r}")

    def prepared(self, request, grad_flags):
        args, kwargs = self.resolve(request["args"]), self.resolve(request["kwargs"])
        inputs = tensors_in((args, kwargs), self.torch)
        for tensor, flag in zip(inputs, grad_flags):
            if flag and tensor.is_floating_point():
                tensor.requires_grad_(True)
        return args, kwargs, inputs

    # operations ---------------------------------------------------------------------------------------
    def op_setup(self, request):
        errors = []
        for module, name in request.get("stubs", []):
            self.stub(module, name)
        self.cell_timeout = request.get("cell_timeout", 300)
        if request.get("distributed"):  # a rank started by launch_ranks: join the group before any cell
            import datetime

            import torch.distributed

            torch.distributed.init_process_group(
                "gloo", timeout=datetime.timedelta(seconds=max(30, int(self.cell_timeout))))
        from IPython.core.interactiveshell import InteractiveShell

        self.shell = InteractiveShell.instance()
        for index, source in request.get("cells", []):
            signal.alarm(max(1, int(self.cell_timeout)))
            try:
                result = self.shell.run_cell(source, store_history=True)
            finally:
                signal.alarm(0)
            error = result.error_in_exec or result.error_before_exec
            if error is not None:
                errors.append([index, f"{type(error).__name__}: {str(error)[:200]}"])
        return {"errors": errors}

    def stub(self, module_name, name):
        """Make ``module.name`` absent: its code (and every function it wraps) raises."""
        import importlib

        module = importlib.import_module(module_name)
        original = getattr(module, name)
        label = f"{module_name}.{name}"
        message = (f"this lab asks you to write {label} yourself: the library's version is not available "
                   "while your work is graded")
        functions = []
        if isinstance(original, type):
            for value in vars(original).values():
                value = getattr(value, "__func__", value)
                if isinstance(value, types.FunctionType):
                    functions.append(value)
        elif isinstance(original, types.FunctionType):
            functions.append(original)
        else:  # a callable object or a partial: take the name away from every library module
            def absent(*args, **kwargs):
                raise NotImplementedError(message)

            for mod_name, mod in list(sys.modules.items()):
                if mod is not None and (mod_name == "mmalign" or mod_name.startswith("mmalign.")):
                    for attr, value in list(vars(mod).items()):
                        if value is original:
                            setattr(mod, attr, absent)
        seen = set()
        while functions:
            function = functions.pop()
            if id(function) in seen:
                continue
            seen.add(id(function))
            wrapped = getattr(function, "__wrapped__", None)
            if isinstance(wrapped, types.FunctionType):
                functions.append(wrapped)
            for cell in function.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(content, types.FunctionType) and str(content.__module__).startswith("mmalign"):
                    functions.append(content)
            function.__code__ = _stub_code(len(function.__code__.co_freevars), message)
            function.__defaults__, function.__kwdefaults__ = None, None

    def op_call(self, request):
        torch = self.torch
        flags = request.get("rg", [])
        with torch.enable_grad() if any(flags) else torch.no_grad():
            args, kwargs, _ = self.prepared(request, flags)
            target = self.target(request["target"])
            value = target(*args, **kwargs)
        reply = {"mutated": self.module_states(args, kwargs)}
        if request["target"][0] == "global" and isinstance(target, type) and isinstance(value, target):
            handle = len(self.handles) + 1
            self.handles[handle] = value
            reply["value"] = {"t": "handle", "id": handle, "type": type(value).__name__}
        else:
            reply["value"] = self.plain(value)
        return reply

    def op_vjp(self, request):
        torch = self.torch
        flags = request["rg"]
        with torch.enable_grad():
            args, kwargs, inputs = self.prepared(request, flags)
            outputs = tensors_in(self.target(request["target"])(*args, **kwargs), torch)
            chosen = [outputs[i] for i in request["outputs"]]
            wrt = [t for t, flag in zip(inputs, flags) if flag and t.is_floating_point()]
            grads = torch.autograd.grad(chosen, wrt, request["grad_outputs"], allow_unused=True)
        return {"value": self.plain(list(grads))}

    def op_value_and_grad(self, request):
        """The value of a call and the gradient of the sum of its tensors with respect to the inputs flagged
        in ``rg`` (on several ranks at once, the backward's collectives included)."""
        torch = self.torch
        flags = request["rg"]
        with torch.enable_grad():
            args, kwargs, inputs = self.prepared(request, flags)
            value = self.target(request["target"])(*args, **kwargs)
            outputs = [t for t in tensors_in(value, torch) if t.requires_grad]
            wrt = [t for t, flag in zip(inputs, flags) if flag and t.is_floating_point()]
            grads = [None] * len(wrt)
            if outputs and wrt:
                grads = torch.autograd.grad(outputs, wrt, [torch.ones_like(t) for t in outputs], allow_unused=True)
        return {"value": self.plain([value, list(grads)])}

    def op_getattr(self, request):
        value = getattr(self.handles[request["handle"]], request["name"])
        if callable(value) and not isinstance(value, self.torch.Tensor):
            return {"value": {"t": "method"}}
        return {"value": self.plain(value)}

    def module_states(self, args, kwargs):
        torch = self.torch
        states = []
        for where, value in [(["args", i], v) for i, v in enumerate(args)] + [(["kwargs", k], v)
                                                                            for k, v in kwargs.items()]:
            if isinstance(value, torch.nn.Module):
                states.append([where, {
                    "state": {k: self.plain(v) for k, v in value.state_dict().items()},
                    "grads": {k: self.plain(p.grad) for k, p in value.named_parameters()},
                }])
        return states

    # the loop -----------------------------------------------------------------------------------------
    def serve(self):
        torch = self.torch
        while True:
            try:
                (length,) = _HEADER.unpack(read_exact(self.channel_in, _HEADER.size))
                request = torch.load(io.BytesIO(read_exact(self.channel_in, length)), weights_only=False)
            except EOFError:
                return
            try:
                reply = getattr(self, "op_" + request["op"])(request)
                reply["ok"] = True
            except BaseException as exc:  # noqa: BLE001 - the student's code may raise anything
                if isinstance(exc, KeyboardInterrupt) and request.get("op") == "stop":
                    return
                import builtins

                bases = [k.__name__ for k in type(exc).__mro__ if getattr(builtins, k.__name__, None) is k]
                reply = {"ok": False, "error": {"type": type(exc).__name__, "bases": bases,
                                                 "message": str(exc)[:500]}}
                traceback.print_exc()
            buffer = io.BytesIO()
            try:
                torch.save(reply, buffer)
            except Exception as exc:  # noqa: BLE001
                buffer = io.BytesIO()
                torch.save({"ok": False, "error": {"type": "TypeError", "bases": ["TypeError"],
                                                    "message": f"the reply could not be written: {exc}"[:300]}},
                           buffer)
            write_frame(self.channel_out, buffer.getvalue())


def _stub_code(n_free: int, message: str):
    names = [f"_v{i}" for i in range(n_free)]
    body = "".join(f"    {n} = None\n" for n in names)
    uses = "; ".join(names) or "pass"
    source = (f"def _outer():\n{body}    def stub(*args, **kwargs):\n        {uses}\n"
              f"        raise NotImplementedError({message!r})\n    return stub\n")
    namespace = {}
    exec(compile(source, "<mmalign lab stub>", "exec"), namespace)
    return namespace["_outer"]().__code__


def _timeout(signum, frame):
    raise TimeoutError("the cell ran longer than the grader's limit per cell")


def launch_ranks(nproc: int) -> None:
    """Inside a group's sandbox: start one runner per rank on the pipes the grader passed
    (``MMALIGN_GRADING_CHANNELS`` = ``in,out;in,out;...``) with torchrun's environment, and wait for them."""
    import socket
    import subprocess

    channels = [tuple(int(fd) for fd in pair.split(","))
                for pair in os.environ.pop("MMALIGN_GRADING_CHANNELS").split(";")]
    if len(channels) != nproc:
        raise SystemExit(f"expected {nproc} channels, got {len(channels)}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for rank, (fd_in, fd_out) in enumerate(channels):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   MMALIGN_GRADING_LOG=f"student.{rank}.log")
        children.append(subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=fd_in,
                                         stdout=fd_out, stderr=subprocess.DEVNULL, env=env))
    for fd_in, fd_out in channels:
        os.close(fd_in)
        os.close(fd_out)
    for child in children:
        child.wait()
    os._exit(0)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ranks":
        launch_ranks(int(sys.argv[2]))
    output_limit = int(os.environ.pop("MMALIGN_GRADING_OUTPUT_LIMIT", str(64 * 2**20)))
    log = os.environ.pop("MMALIGN_GRADING_LOG", "student.log")
    channel_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the output limit writes fail instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_limit, output_limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGALRM, _timeout)
    _Runner(channel_in, channel_out).serve()
    os._exit(0)


if __name__ == "__main__":
    main()
