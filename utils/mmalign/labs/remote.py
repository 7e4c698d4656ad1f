"""The grader's side of a submission: a sandboxed student process, asked for values through proxies.

:class:`StudentProcess` starts :mod:`mmalign.labs.runner` in a fresh sandbox (:mod:`mmalign.labs.sandbox`),
sends it the submission's cells and the names of the library functions to take away, then serves
calls. In the grader's test namespace each answer name (``my_info_nce``, ``MyQueue``) is a proxy:
calling it sends the arguments to the student's process, which applies the student's function and
replies with plain values. The grader loads the reply with ``torch.load(weights_only=True)`` (numpy
arrays with ``allow_pickle=False``), checks every tensor's type, dtype and size, and hands the values to
the instructor's test, which compares them in the grader's process. A reply that is not a plain value is
a wrong answer with a message; the student's process never reports success or failure.

Gradients cross too: when a test differentiates through a student's function, the result is attached
to the grader's autograd graph and its backward asks the student's process for the vector-Jacobian
product. A ``torch.nn.Module`` passed to a student's function comes back updated (state and
gradients, as values), so in-place updates such as a momentum step can be tested.

Several processes: :class:`StudentGroup` starts ``N`` more processes of the submission in one fresh
sandbox, ranks of one torch.distributed group, and :func:`on_processes` sends each rank its inputs at
once and loads the value and gradient that the student's function gave there; the test compares them
with its own reference (lab 9's two-process check). Every process of a submission is under its
:class:`~mmalign.labs.sandbox.MemoryWatch`.
"""

from __future__ import annotations

import builtins
import io
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import sandbox
from .runner import _HEADER, tensors_in

RUNNER = Path(__file__).with_name("runner.py")
PYTHON = os.path.abspath(sys.executable)  # a path like tests/../.venv/bin/python does not exist in the sandbox
MAX_FRAME = 256 * 2**20
MAX_ELEMENTS = 50_000_000
PLAIN_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
                torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}


class StudentError(Exception):
    """Something the student's process did wrong (a bad value, a crash, a timeout); a wrong answer."""


class ProcessGone(StudentError):
    """The student's process is gone or unusable (crashed, timed out, garbled the channel)."""


def _student_exception(name: str, error: dict) -> Exception:
    """The exception the student's function raised, rebuilt as a builtin type (so ``except ValueError``
    in a test works); the message says it came from the student's code."""
    text = str(error.get("message", ""))[:500]
    kind = str(error.get("type", "Exception"))[:80]
    message = f"{kind} in your {name}: {text}" if text else f"{kind} in your {name}"
    for base in error.get("bases", []):
        cls = getattr(builtins, str(base), None)
        if (isinstance(cls, type) and issubclass(cls, Exception) and cls is not Exception
                and not issubclass(cls, (StopIteration, StopAsyncIteration))):
            try:
                exc = cls(message)
            except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs 5 arguments
                continue
            exc.mmalign_student = True
            return exc
    exc = StudentError(message)
    exc.mmalign_student = True
    return exc


def _load_plain(node, what: str):
    """A reply node as grader objects; anything unexpected is a :class:`StudentError`."""
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is not dict or not isinstance(node.get("t"), str):
        raise StudentError(f"{what} sent something that is not a plain value")
    kind = node["t"]
    if kind == "tensor":
        tensor = node.get("v")
        if isinstance(tensor, torch.nn.Parameter):
            tensor = tensor.data
        if type(tensor) is not torch.Tensor:
            raise StudentError(f"{what} sent a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in PLAIN_DTYPES or tensor.layout != torch.strided or tensor.device.type != "cpu":
            raise StudentError(f"{what} returned a tensor of dtype {tensor.dtype} / layout {tensor.layout}, "
                               "not a plain CPU tensor")
        if tensor.numel() > MAX_ELEMENTS:
            raise StudentError(f"{what} returned a tensor of {tensor.numel()} elements, more than the grader takes")
        tensor = tensor.detach().clone()
        if node.get("rg") is True and (tensor.is_floating_point() or tensor.is_complex()):
            tensor.requires_grad_(True)
        return tensor
    if kind in ("list", "tuple"):
        items = node.get("v")
        if type(items) not in (list, tuple):
            raise StudentError(f"{what} sent a malformed {kind}")
        values = [_load_plain(item, what) for item in items]
        return values if kind == "list" else tuple(values)
    if kind == "dict":
        keys, values = node.get("k"), node.get("v")
        if type(keys) not in (list, tuple) or type(values) not in (list, tuple) or len(keys) != len(values) \
                or not all(type(k) in (str, int) for k in keys):
            raise StudentError(f"{what} sent a malformed dict")
        return {k: _load_plain(v, what) for k, v in zip(keys, values)}
    if kind == "ndarray":
        import numpy

        data = node.get("v")
        if type(data) is not bytes:
            raise StudentError(f"{what} sent a malformed numpy array")
        try:
            array = numpy.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise StudentError(f"{what} sent an unreadable numpy array ({exc})") from None
        if type(array) is not numpy.ndarray or array.dtype.hasobject or array.size > MAX_ELEMENTS:
            raise StudentError(f"{what} sent a numpy array the grader does not take")
        return array
    if kind == "bad":
        raise StudentError(f"{what} returned {str(node.get('type'))[:80]}, not a plain tensor, array or number "
                           "(return torch tensors, numbers, or tuples / lists / dicts of them)")
    raise StudentError(f"{what} sent something that is not a plain value")


class StudentProcess:
    """One submission's sandboxed process, started lazily and restarted once per test after a crash.

    ``cells`` are ``(index, source)`` of the student's code cells to run; ``stubs`` are the
    ``(module, name)`` library objects taken away before they run; ``timeout`` bounds one cell or one
    call; ``deadline`` (``time.monotonic()`` value) bounds the whole submission.
    """

    def __init__(self, workdir: Path, cells, stubs, *, timeout: float, deadline: float, profile: str,
                 output_limit: int = 64 * 2**20, memory: sandbox.MemoryWatch | None = None):
        self.workdir, self.cells, self.stubs = Path(workdir), list(cells), list(stubs)
        self.timeout, self.deadline, self.profile, self.output_limit = timeout, deadline, profile, output_limit
        self.memory = memory
        self.proc = None
        self.sandboxed = None
        self.cell_errors: list = []
        self.starts = 0
        self.broken: str | None = None
        self.groups: dict[int, StudentGroup] = {}
        self._writer = None
        self._reader = None

    # lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.stop()
        self.starts += 1
        self.handles_epoch = self.starts
        for sub in ("tmp", ".ipython", ".matplotlib"):
            (self.workdir / sub).mkdir(exist_ok=True)
        env = sandbox.environment(self.workdir, self.profile)
        env["MMALIGN_GRADING_OUTPUT_LIMIT"] = str(self.output_limit)
        env["MMALIGN_GRADING_LOG"] = str(self.workdir / "student.log")
        argv = [PYTHON, "-I", str(RUNNER)]
        cmd, popen_env, self.sandboxed = sandbox.command(argv, self.workdir, env)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=self.workdir, env=popen_env if popen_env is not None else None,
                                     start_new_session=True)
        if self.memory is not None:
            self.memory.add(self.proc.pid)
        self._writer, self._reader = self.proc.stdin, self.proc.stdout.fileno()
        self.broken = None
        budget = self.timeout * max(1, len(self.cells)) + 120
        reply = self._request({"op": "setup", "stubs": self.stubs, "cells": self.cells,
                               "cell_timeout": self.timeout}, timeout=budget)
        errors = reply.get("errors") if reply.get("ok") else None
        self.cell_errors = [e for e in errors if type(e) in (list, tuple) and len(e) == 2] if type(errors) is list \
            else []

    def ensure(self) -> None:
        """Start the process when it is not running (at most once per test after the first start)."""
        if self.proc is None or self.proc.poll() is not None or self.broken:
            self.start()

    def stop(self) -> None:
        """Kill the process group (and with bubblewrap the whole sandbox), and the submission's groups of
        processes (:meth:`group`): nothing outlives grading."""
        groups, self.groups = list(self.groups.values()), {}
        for group in groups:
            group.stop()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _kill(proc, self.memory)
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        _reap(proc)

    def group(self, nproc: int) -> "StudentGroup":
        """``nproc`` more processes of this submission in one fresh sandbox, joined by torch.distributed
        (started on first use, kept for the next test)."""
        group = self.groups.get(nproc)
        if group is None:
            group = self.groups[nproc] = StudentGroup(self, nproc)
        group.ensure()
        return group

    # the channel --------------------------------------------------------------------------------------
    def _fail(self, message: str):
        self.broken = message
        self.stop()
        raise ProcessGone(message)

    def _stopped(self) -> str:
        """Why the process stopped: the memory limit when the watch killed it, else its exit status."""
        reason = self.memory.killed(self.proc.pid) if self.memory is not None else None
        return reason or f"your notebook's process stopped (exit status {self.proc.poll()}) before answering"

    def _read(self, n: int, until: float) -> bytes:
        fd = self._reader
        chunks, got = [], 0
        while got < n:
            left = until - time.monotonic()
            if left <= 0:
                self._fail("your code ran longer than the grader's time limit; the process was stopped")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                try:
                    self.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
                self._fail(self._stopped())
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _request(self, request: dict, timeout: float | None = None) -> dict:
        self._send(request)
        return self._receive(min(time.monotonic() + (timeout or self.timeout), self.deadline))

    def _send(self, request: dict) -> None:
        if self.proc is None or self.broken:
            raise ProcessGone(self.broken or "the notebook's process is not running")
        buffer = io.BytesIO()
        torch.save(request, buffer)
        payload = buffer.getvalue()
        try:
            self._writer.write(_HEADER.pack(len(payload)) + payload)
            self._writer.flush()
        except (BrokenPipeError, OSError, ValueError):
            reason = self.memory.killed(self.proc.pid) if self.memory is not None else None
            self._fail(reason or "your notebook's process stopped before it could be asked anything")

    def _receive(self, until: float) -> dict:
        (length,) = _HEADER.unpack(self._read(_HEADER.size, until))
        if length > MAX_FRAME:
            self._fail(f"your notebook's process sent {length} bytes, more than the grader reads")
        data = self._read(length, until)
        try:
            reply = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is the student's problem
            self._fail(f"your notebook's process sent something that is not plain data ({type(exc).__name__})")
        if type(reply) is not dict:
            self._fail("your notebook's process sent something that is not plain data")
        return reply

    # calls --------------------------------------------------------------------------------------------
    def call(self, name: str, target, args, kwargs, *, handles=True):
        """Apply the student's ``target`` to ``args``; the plain result (proxies for new objects)."""
        self.ensure()
        grad = torch.is_grad_enabled()
        inputs = tensors_in((args, kwargs), torch)
        flags = [bool(grad and t.requires_grad) for t in inputs]
        request = {"op": "call", "target": target, "args": self._encode(args), "kwargs": self._encode(kwargs),
                   "rg": flags}
        reply = self._request(request)
        if reply.get("ok") is not True:
            raise _student_exception(name, reply.get("error") if type(reply.get("error")) is dict else {})
        node = reply.get("value")
        if type(node) is dict and node.get("t") == "handle":
            if not handles or type(node.get("id")) is not int:
                raise StudentError(f"your {name} returned an object, not a plain value")
            value = StudentObject(self, node["id"], str(node.get("type"))[:80], name)
        else:
            value = _load_plain(node, f"your {name}")
        self._apply_module_states(name, args, kwargs, reply.get("mutated"))
        if any(flags):
            value = self._attach(name, request, inputs, flags, value)
        return value

    def getattr(self, obj: "StudentObject", attribute: str):
        self.ensure_same(obj)
        reply = self._request({"op": "getattr", "handle": obj._id, "name": attribute})
        label = f"{obj._name}(...).{attribute}"
        if reply.get("ok") is not True:
            raise _student_exception(label, reply.get("error") if type(reply.get("error")) is dict else {})
        node = reply.get("value")
        if type(node) is dict and node.get("t") == "method":
            return StudentMethod(self, obj, attribute)
        return _load_plain(node, f"your {label}")

    def ensure_same(self, obj: "StudentObject") -> None:
        if obj._epoch != self.starts or self.proc is None or self.broken:
            raise ProcessGone(self.broken or f"your {obj._name} object was lost when the notebook's process stopped")

    def _encode(self, value):
        if isinstance(value, StudentFunction):
            return {"__student__": value._name}
        if isinstance(value, StudentObject):
            self.ensure_same(value)
            return {"__handle__": value._id}
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if type(value) in (list, tuple):
            return type(value)(self._encode(v) for v in value)
        if type(value) is dict:
            return {k: self._encode(v) for k, v in value.items()}
        return value

    def _apply_module_states(self, name, args, kwargs, mutated) -> None:
        """Copy the student's in-place updates of nn.Module arguments back (values only, shapes checked)."""
        if type(mutated) is not list:
            return
        for item in mutated:
            if type(item) not in (list, tuple) or len(item) != 2 or type(item[0]) not in (list, tuple) \
                    or len(item[0]) != 2 or type(item[1]) is not dict:
                raise StudentError(f"your {name} sent a malformed module update")
            (where, key), update = item
            if where == "args" and type(key) is int and 0 <= key < len(args):
                module = args[key]
            elif where == "kwargs" and type(key) is str and key in kwargs:
                module = kwargs[key]
            else:
                raise StudentError(f"your {name} sent a malformed module update")
            if not isinstance(module, torch.nn.Module):
                raise StudentError(f"your {name} sent a module update for an argument that is not a module")
            state = module.state_dict()
            new_state = update.get("state")
            if type(new_state) is not dict or set(new_state) != set(state):
                raise StudentError(f"your {name} changed which parameters and buffers a module has")
            with torch.no_grad():
                for k, tensor in state.items():
                    new = _load_plain(new_state[k], f"your {name}")
                    if not isinstance(new, torch.Tensor) or new.shape != tensor.shape or new.dtype != tensor.dtype:
                        raise StudentError(f"your {name} changed the shape or dtype of {k}")
                    tensor.copy_(new)
            grads = update.get("grads")
            if type(grads) is dict:
                for k, p in module.named_parameters():
                    if k in grads:
                        g = _load_plain(grads[k], f"your {name}")
                        if g is None:
                            p.grad = None
                        elif isinstance(g, torch.Tensor) and g.shape == p.shape:
                            p.grad = g.to(p.dtype).detach()
                        else:
                            raise StudentError(f"your {name} left a gradient of the wrong shape on {k}")

    def _attach(self, name, request, inputs, flags, value):
        """Hook the student's result into the grader's autograd graph (backward = a remote VJP)."""
        outputs = tensors_in(value, torch)
        chosen = [i for i, t in enumerate(outputs) if t.requires_grad]
        if not chosen:
            return value
        wrt = [t for t, flag in zip(inputs, flags) if flag]
        process = self

        def backward(grad_outputs):
            reply = process._request({"op": "vjp", "target": request["target"], "args": request["args"],
                                      "kwargs": request["kwargs"], "rg": flags, "outputs": chosen,
                                      "grad_outputs": [g.detach().clone() for g in grad_outputs]})
            if reply.get("ok") is not True:
                raise _student_exception(name, reply.get("error") if type(reply.get("error")) is dict else {})
            grads = _load_plain(reply.get("value"), f"the gradient of your {name}")
            if type(grads) is not list or len(grads) != len(wrt):
                raise StudentError(f"the gradient of your {name} has the wrong structure")
            checked = []
            for g, t in zip(grads, wrt):
                if g is not None and (not isinstance(g, torch.Tensor) or g.shape != t.shape):
                    raise StudentError(f"the gradient of your {name} has the wrong shape")
                checked.append(None if g is None else g.to(t.dtype))
            return checked

        attached = _Attach.apply(backward, len(chosen), *[outputs[i].detach() for i in chosen], *wrt)
        attached = attached if isinstance(attached, tuple) else (attached,)
        replacements = dict(zip((id(outputs[i]) for i in chosen), attached))
        return _replace_tensors(value, replacements)


def _holds(value, types) -> bool:
    if isinstance(value, types):
        return True
    if type(value) in (list, tuple):
        return any(_holds(v, types) for v in value)
    if type(value) is dict:
        return any(_holds(v, types) for v in value.values())
    return False


def _replace_tensors(value, replacements):
    if isinstance(value, torch.Tensor):
        return replacements.get(id(value), value)
    if type(value) in (list, tuple):
        return type(value)(_replace_tensors(v, replacements) for v in value)
    if type(value) is dict:
        return {k: _replace_tensors(v, replacements) for k, v in value.items()}
    return value


class _Attach(torch.autograd.Function):
    """Outputs computed elsewhere, differentiable with respect to ``inputs`` through ``backward_fn``."""

    @staticmethod
    def forward(ctx, backward_fn, n_outputs, *tensors):
        ctx.backward_fn, ctx.n_outputs = backward_fn, n_outputs
        return tuple(t.clone() for t in tensors[:n_outputs])

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads = ctx.backward_fn(grad_outputs)
        return (None, None) + (None,) * ctx.n_outputs + tuple(grads)


def _kill(proc: subprocess.Popen, memory: "sandbox.MemoryWatch | None") -> None:
    """SIGKILL a started sandbox: its process group, and every process of its tree (a child that left the
    group with setsid is still a descendant; with bubblewrap the whole namespace dies with its init)."""
    pids = sandbox.process_tree([proc.pid]) if os.path.isdir("/proc") else [proc.pid]
    if memory is not None:
        memory.remove(proc.pid)
    sandbox.kill_processes([proc.pid], pids)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class _Rank(StudentProcess):
    """Rank ``rank`` of a :class:`StudentGroup`: the same requests as a lone process, on its own channel."""

    def __init__(self, group: "StudentGroup", rank: int, writer, reader: int):
        main = group.main
        super().__init__(group.workdir, main.cells, main.stubs, timeout=main.timeout, deadline=main.deadline,
                         profile=main.profile, output_limit=main.output_limit, memory=main.memory)
        self.group, self.rank = group, rank
        self.proc, self.starts, self.sandboxed = group.proc, group.starts, group.sandboxed
        self._writer, self._reader = writer, reader

    def _stopped(self) -> str:
        reason = self.memory.killed(self.proc.pid) if self.memory is not None else None
        return reason or f"process {self.rank} of {self.group.nproc} of your notebook stopped before answering"

    def ensure(self) -> None:
        self.group.ensure()

    def stop(self) -> None:
        self.group.stop()


class StudentGroup:
    """``nproc`` processes of one submission in one fresh sandbox, ranks of one torch.distributed group.

    The sandbox runs :mod:`mmalign.labs.runner` as a launcher that starts one runner per rank, each on its
    own pair of pipes from the grader and with torchrun's environment (gloo on the sandbox's own loopback).
    Every rank runs the submission's cells after the same stubs; :meth:`value_and_grad` then sends each
    rank its inputs at once and loads what the student's function returned there, as values.
    """

    def __init__(self, main: StudentProcess, nproc: int):
        if type(nproc) is not int or not 2 <= nproc <= 8:
            raise ValueError(f"nproc must be an integer from 2 to 8, got {nproc!r}")
        self.main, self.nproc = main, nproc
        self.proc = None
        self.workdir = None
        self.ranks: list[_Rank] = []
        self.starts = 0
        self.sandboxed = None
        self.broken: str | None = None

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None or self.broken or any(r.broken for r in self.ranks):
            self.start()

    def start(self) -> None:
        self.stop()
        main = self.main
        if time.monotonic() > main.deadline:
            raise ProcessGone("the submission's time limit was reached")
        self.starts += 1
        # a folder of its own, outside the first process's (which the student's code can write)
        self.workdir = Path(tempfile.mkdtemp(prefix="mmalign-grade-ranks-"))
        os.chmod(self.workdir, 0o700)
        for sub in ("tmp", ".ipython", ".matplotlib"):
            (self.workdir / sub).mkdir()
        pipes = [(os.pipe(), os.pipe()) for _ in range(self.nproc)]  # (grader -> rank), (rank -> grader)
        child_fds = [fd for (to_rank, from_rank) in pipes for fd in (to_rank[0], from_rank[1])]
        env = sandbox.environment(self.workdir, main.profile)
        env["MMALIGN_GRADING_OUTPUT_LIMIT"] = str(main.output_limit)
        env["MMALIGN_GRADING_CHANNELS"] = ";".join(f"{to_rank[0]},{from_rank[1]}" for to_rank, from_rank in pipes)
        argv = [PYTHON, "-I", str(RUNNER), "--ranks", str(self.nproc)]
        cmd, popen_env, self.sandboxed = sandbox.command(argv, self.workdir, env)
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, cwd=self.workdir, env=popen_env,
                                         start_new_session=True, pass_fds=child_fds)
        finally:
            for fd in child_fds:
                os.close(fd)
        if main.memory is not None:
            main.memory.add(self.proc.pid)
        self.broken = None
        self.ranks = [_Rank(self, r, os.fdopen(to_rank[1], "wb", buffering=0), from_rank[0])
                      for r, (to_rank, from_rank) in enumerate(pipes)]
        budget = main.timeout * max(1, len(main.cells)) + 120
        replies = self._all([{"op": "setup", "stubs": main.stubs, "cells": main.cells, "cell_timeout": main.timeout,
                              "distributed": True} for _ in self.ranks], budget)
        for r, reply in enumerate(replies):
            if reply is not None and reply.get("ok") is not True:
                error = reply.get("error") if type(reply.get("error")) is dict else {}
                self._fail(f"process {r} of {self.nproc} could not start: "
                           f"{str(error.get('type'))[:80]}: {str(error.get('message'))[:200]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        ranks, self.ranks = self.ranks, []
        if proc is not None:
            _kill(proc, self.main.memory)
        for rank in ranks:
            for close in (rank._writer.close, lambda fd=rank._reader: os.close(fd)):
                try:
                    close()
                except OSError:
                    pass
        if proc is not None:
            _reap(proc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _fail(self, message: str):
        self.broken = message
        self.stop()
        raise ProcessGone(message)

    def _all(self, requests: list[dict], timeout: float | None = None) -> list[dict | None]:
        """Send every rank its request, then collect the replies in the order they come. The first error
        reply stops the group at once (the other ranks may be waiting for that one inside a collective)
        and the ranks that had not answered get None; a crash or the time limit raises."""
        ranks = list(self.ranks)
        for rank, request in zip(ranks, requests):
            rank._send(request)
        until = min(time.monotonic() + (timeout or self.main.timeout), self.main.deadline)
        replies: dict[int, dict] = {}
        while len(replies) < len(ranks):
            waiting = {rank._reader: rank for rank in ranks if rank.rank not in replies}
            left = until - time.monotonic()
            if left <= 0:
                self._fail("your code ran longer than the grader's time limit on several processes; "
                           "they were stopped")
            ready, _, _ = select.select(list(waiting), [], [], min(left, 1.0))
            for fd in ready:
                rank = waiting[fd]
                try:
                    reply = rank._receive(until)
                except ProcessGone as exc:
                    self._fail(str(exc))
                replies[rank.rank] = reply
                if reply.get("ok") is not True and len(replies) < len(ranks):
                    self.stop()
                    return [replies.get(r.rank) for r in ranks]
        return [replies[r.rank] for r in ranks]

    def value_and_grad(self, name: str, inputs) -> list[tuple]:
        """``[(value, grads)]`` per rank: the student's ``name(*inputs[r])`` evaluated on rank ``r`` (all ranks
        at once) and the gradient of the sum of its tensors with respect to every input tensor that
        requires grad (in order; None where it does not reach)."""
        if len(inputs) != self.nproc:
            raise ValueError(f"expected inputs for {self.nproc} processes, got {len(inputs)}")
        requests, wanted = [], []
        for args in inputs:
            args = tuple(args)
            if _holds(args, (StudentObject, StudentMethod)):
                raise TypeError("on_processes sends tensors, numbers and the student's functions, not objects "
                                "of the first process")
            tensors = tensors_in(args, torch)
            flags = [bool(t.requires_grad and (t.is_floating_point() or t.is_complex())) for t in tensors]
            wanted.append([t for t, flag in zip(tensors, flags) if flag])
            requests.append({"op": "value_and_grad", "target": ("global", name), "args": self.ranks[0]._encode(args),
                             "kwargs": {}, "rg": flags})
        replies = self._all(requests)
        for r, reply in enumerate(replies):
            if reply is not None and reply.get("ok") is not True:
                raise _student_exception(f"{name} on process {r} of {self.nproc}",
                                         reply.get("error") if type(reply.get("error")) is dict else {})
        out = []
        for r, (reply, wrt) in enumerate(zip(replies, wanted)):
            label = f"{name} on process {r} of {self.nproc}"
            node = reply.get("value")
            loaded = _load_plain(node, f"your {label}")
            if type(loaded) is not list or len(loaded) != 2 or type(loaded[1]) is not list \
                    or len(loaded[1]) != len(wrt):
                raise StudentError(f"your {label} sent a malformed reply")
            value, grads = loaded
            value = _replace_tensors(value, {id(t): t.detach() for t in tensors_in(value, torch)})
            for g, t in zip(grads, wrt):
                if g is not None and (not isinstance(g, torch.Tensor) or g.shape != t.shape):
                    raise StudentError(f"the gradient of your {label} has the wrong shape")
            out.append((value, [None if g is None else g.to(t.dtype).detach() for g, t in zip(grads, wrt)]))
        return out


class StudentFunction:
    """A name of the student's notebook, seen from the grader: calling it asks the student's process."""

    def __init__(self, process: StudentProcess, name: str):
        self._process, self._name = process, name

    def __call__(self, *args, **kwargs):
        return self._process.call(self._name, ("global", self._name), args, kwargs)

    def __repr__(self):
        return f"<the student's {self._name}>"

    def __getattr__(self, attribute):
        raise AttributeError(f"the tests can only call the student's {self._name}, not read .{attribute}")


class StudentObject:
    """An object living in the student's process (an instance of the student's class)."""

    def __init__(self, process: StudentProcess, handle: int, type_name: str, name: str):
        object.__setattr__(self, "_process", process)
        object.__setattr__(self, "_id", handle)
        object.__setattr__(self, "_type", type_name)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_epoch", process.starts)

    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return self._process.getattr(self, attribute)

    def __setattr__(self, attribute, value):
        raise AttributeError("the tests cannot set attributes of the student's objects")

    def __repr__(self):
        return f"<the student's {self._type} object>"


class StudentMethod:
    def __init__(self, process: StudentProcess, obj: StudentObject, attribute: str):
        self._process, self._obj, self._attribute = process, obj, attribute

    def __call__(self, *args, **kwargs):
        self._process.ensure_same(self._obj)
        label = f"{self._obj._name}(...).{self._attribute}"
        return self._process.call(label, ("handle", self._obj._id, self._attribute), args, kwargs, handles=False)


def on_processes(process: StudentProcess, function, inputs) -> list[tuple]:
    """The student's ``function`` on ``len(inputs)`` processes of the submission started by the grader
    (:class:`StudentGroup`), rank ``r`` called on ``inputs[r]``; see :meth:`StudentGroup.value_and_grad`."""
    if not isinstance(function, StudentFunction):
        raise TypeError(f"on_processes runs one of the student's functions, not {function!r}")
    inputs = list(inputs)
    group = process.group(len(inputs))
    return group.value_and_grad(function._name, inputs)
