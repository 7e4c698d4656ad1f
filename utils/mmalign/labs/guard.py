"""The grading guard: code that runs *inside the student's kernel* around every test cell.

The grader (:mod:`mmalign.labs.grading`) does not import this module in the kernel (a student could
import it too); it sends its source in the first cell of the graded notebook, executes it in a
private namespace and keeps one object under a random name. Then, around each autograder test
cell it runs ``<guard>.before(grade_id)`` and ``<guard>.after(grade_id)``; each prints a token (an
HMAC of the grade_id with a per-run secret) that the grader checks, so a cell that was skipped or
rewritten does not count as passed.

What it catches (the test scores 0 and the report says why):

* replaced comparison functions and builtins: ``torch.allclose = lambda *a, **k: True``,
  ``math.isclose``, ``builtins.abs``, ``torch.Tensor.tolist``, library functions the tests compare
  with... Every protected attribute is captured when grading starts, before any student code; the
  guard compares, restores the original and reports the change (``before``: a change made by the
  answer cells; ``after``: a change made while the test ran, e.g. by the student's function);
* IPython hooks that could rewrite or silence a test cell (input/AST transformers, custom exception
  handlers, a replaced ``run_cell``, a trace function): restored and reported;
* answers that call the library's reference implementation of the exercise: the references (the
  ``mmalign`` functions and classes that the test cells use but the instructor's answer does not)
  are wrapped when grading starts; a call made while one of the student's answer functions is on
  the stack raises :class:`GradingError` and fails the test. An answer that *is* a library object
  (an alias, a ``functools.partial``, a subclass of the reference) is rejected as well.

Limits: the guard runs in the same process as the student's code, so a student who studies it can
still defeat it (e.g. by digging the originals out of its closures). It stops the easy and the
accidental gaming; instructors should still read the answers that score suspiciously well.
"""

import builtins
import functools
import hashlib
import hmac
import importlib
import json
import sys
import types

_TORCH = ("allclose", "isclose", "equal", "eq", "ne", "all", "any", "abs", "isfinite", "isnan", "count_nonzero",
          "tensor", "as_tensor", "from_numpy", "zeros", "ones", "full", "arange", "where", "stack", "cat",
          "logsumexp", "sum", "mean", "max", "min", "sort", "argmax", "argsort", "topk", "randn", "rand")
_TENSOR = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__", "__int__",
           "__index__", "__abs__", "__sub__", "__rsub__", "__neg__", "__len__", "__iter__", "__getitem__", "item",
           "tolist", "all", "any", "allclose", "isclose", "equal", "eq", "ne", "abs", "max", "min", "sum", "mean",
           "float", "double", "long", "clone", "detach", "numpy", "dim", "size", "norm", "isfinite")
_FUNCTIONAL = ("normalize", "cross_entropy", "cosine_similarity", "log_softmax", "softmax", "relu",
               "cosine_embedding_loss", "mse_loss", "margin_ranking_loss", "triplet_margin_loss")
_NUMPY = ("allclose", "isclose", "array_equal", "equal", "all", "any", "abs", "isfinite", "asarray", "array")
_SHELL_METHODS = ("run_cell", "run_cell_async", "run_ast_nodes", "run_code", "transform_cell",
                  "should_run_async", "showtraceback", "_showtraceback", "ex", "ev")


class GradingError(Exception):
    """Raised by the guard; its message is what the student reads in the grade report."""


def _callables(obj, names=None):
    """{name: value} of the callables (or the given names) in ``vars(obj)``."""
    items = vars(obj).items() if names is None else ((n, vars(obj).get(n)) for n in names)
    return {name: value for name, value in items if value is not None and callable(value)}


def _codes(obj, seen=None):
    """Every code object reachable from a function, method, lambda or class (nested functions too)."""
    seen = set() if seen is None else seen
    if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for part in (obj.fget, obj.fset, obj.fdel):
            if part is not None:
                _codes(part, seen)
        return seen
    if isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
                _codes(value, seen)
        return seen
    code = getattr(obj, "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        code = stack.pop()
        if code in seen:
            continue
        seen.add(code)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return seen


class Guard:
    """Snapshot of what the tests rely on, checked and restored around every test cell."""

    def __init__(self, config: dict):
        self._secret = config["secret"].encode()
        self._answers = list(config.get("answers", []))
        self._student_codes: set = set()
        self._violations: list[str] = []
        self._shell = _shell()
        self._references = {}  # id(wrapper or original) -> "module.name"
        self._originals = set()
        for module in config.get("modules", []):
            try:
                importlib.import_module(module)
            except Exception:  # a module the lab cannot import fails in the lab's own cell, with its message
                pass
        for module, name in config.get("references", []):
            self._wrap_reference(module, name)
        self._snapshot = self._take_snapshot()
        self._hooks = self._take_hooks()

    # -- references --------------------------------------------------------------------------------
    def _student_on_stack(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self._student_codes:
                return True
            frame = frame.f_back
        return False

    def _wrapper(self, label, original):
        guard = self

        def reference(*args, **kwargs):
            if guard._student_on_stack():
                message = (f"your answer calls {label}, the library's reference implementation that the "
                           "tests compare with; write the computation yourself")
                guard._violations.append(message)
                raise GradingError(message)
            return original(*args, **kwargs)

        for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
            try:
                setattr(reference, attribute, getattr(original, attribute))
            except (AttributeError, TypeError):
                pass
        return reference

    def _wrap_reference(self, module_name, name):
        module = sys.modules.get(module_name)
        original = getattr(module, name, None) if module is not None else None
        if original is None or not str(getattr(original, "__module__", "")).startswith("mmalign"):
            return
        label = f"{module_name}.{name}"
        self._originals.add(id(original))
        self._references[id(original)] = label
        if isinstance(original, type):
            for attr, value in list(vars(original).items()):
                if isinstance(value, types.FunctionType):
                    setattr(original, attr, self._wrapper(f"{label}.{attr}", value))
            return
        if not isinstance(original, types.FunctionType):
            return
        wrapper = self._wrapper(label, original)
        self._references[id(wrapper)] = label
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "mmalign" or mod_name.startswith("mmalign.")):
                continue
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, wrapper)
        namespace = self._shell.user_ns if self._shell is not None else {}
        for attr, value in list(namespace.items()):
            if value is original:
                namespace[attr] = wrapper

    def _check_answers(self) -> list[str]:
        """Register the answers' code; report answers that are library objects."""
        problems = []
        namespace = self._shell.user_ns if self._shell is not None else {}
        for name in self._answers:
            obj = namespace.get(name)
            if obj is None:
                continue
            target = obj.func if isinstance(obj, functools.partial) else obj
            label = self._references.get(id(target))
            mro = getattr(target, "__mro__", ()) if isinstance(target, type) else ()
            from_library = (isinstance(target, (types.FunctionType, type))
                            and str(getattr(target, "__module__", "") or "").startswith("mmalign"))
            if label or any(id(base) in self._originals for base in mro) or from_library:
                what = label or getattr(target, "__qualname__", type(target).__name__)
                problems.append(f"`{name}` is the library's {what} (or built on it); write the computation yourself")
                continue
            self._student_codes |= _codes(target)
        return problems

    # -- snapshot of protected attributes ----------------------------------------------------------
    def _take_snapshot(self) -> dict:
        owners = {"builtins": (builtins, [n for n, v in vars(builtins).items()
                                          if isinstance(v, (types.BuiltinFunctionType, type))])}
        for name in ("math", "operator", "functools"):
            module = sys.modules.get(name) or importlib.import_module(name)
            owners[name] = (module, None)
        torch = sys.modules.get("torch")
        if torch is not None:
            owners["torch"] = (torch, _TORCH)
            owners["torch.Tensor"] = (torch.Tensor, _TENSOR)
            owners["torch._C.TensorBase"] = (torch._C.TensorBase, _TENSOR)
            owners["torch.nn.functional"] = (torch.nn.functional, _FUNCTIONAL)
            owners["torch.testing"] = (torch.testing, None)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            owners["numpy"] = (numpy, _NUMPY)
            owners["numpy.testing"] = (numpy.testing, None)
        for mod_name, mod in list(sys.modules.items()):
            if mod is not None and (mod_name == "mmalign" or mod_name.startswith("mmalign.")):
                if mod_name.startswith("mmalign.labs"):
                    continue
                names = [n for n, v in vars(mod).items()
                         if callable(v) and str(getattr(v, "__module__", "")).startswith("mmalign")]
                owners[mod_name] = (mod, names)
                for value in (vars(mod)[n] for n in names):
                    if isinstance(value, type) and value.__module__ == mod_name:
                        owners[f"{mod_name}.{value.__qualname__}"] = (value, [
                            n for n, v in vars(value).items() if isinstance(v, types.FunctionType)])
        snapshot = {}
        for label, (owner, names) in owners.items():
            for name, value in _callables(owner, names).items():
                snapshot[(label, name)] = (owner, value)
        self._modules = {name: sys.modules.get(name) for name in owners if name in sys.modules}
        return snapshot

    def _restore_snapshot(self) -> list[str]:
        changed = []
        for key, (owner, value) in list(self._snapshot.items()):
            label, name = key
            current = vars(owner).get(name, None)
            if _library_wrapper_of(current, value):  # e.g. torch's Optimizer hooks around `step`
                self._snapshot[key] = (owner, current)
                continue
            if current is not value:
                changed.append(f"{label}.{name}")
                try:
                    setattr(owner, name, value)
                except (AttributeError, TypeError):
                    pass
        for name, module in self._modules.items():
            if sys.modules.get(name) is not module:
                changed.append(f"sys.modules[{name!r}]")
                sys.modules[name] = module
        return changed

    # -- IPython hooks -----------------------------------------------------------------------------
    def _take_hooks(self) -> dict:
        shell = self._shell
        hooks = {"trace": sys.gettrace(), "profile": sys.getprofile()}
        if shell is not None:
            hooks.update(
                cleanup=list(shell.input_transformers_cleanup), post=list(shell.input_transformers_post),
                ast=list(shell.ast_transformers), custom_exceptions=tuple(shell.custom_exceptions),
                methods={name: vars(type(shell)).get(name) for name in _SHELL_METHODS},
                instance={name: vars(shell).get(name) for name in _SHELL_METHODS},
            )
        return hooks

    def _restore_hooks(self) -> list[str]:
        changed, hooks, shell = [], self._hooks, self._shell
        if sys.gettrace() is not hooks["trace"]:
            changed.append("sys.settrace")
            sys.settrace(hooks["trace"])
        if sys.getprofile() is not hooks["profile"]:
            changed.append("sys.setprofile")
            sys.setprofile(hooks["profile"])
        if shell is None:
            return changed
        for key, attribute in (("cleanup", "input_transformers_cleanup"), ("post", "input_transformers_post"),
                               ("ast", "ast_transformers")):
            if list(getattr(shell, attribute)) != hooks[key]:
                changed.append(f"get_ipython().{attribute}")
                getattr(shell, attribute)[:] = hooks[key]
        if tuple(shell.custom_exceptions) != hooks["custom_exceptions"]:
            changed.append("get_ipython().set_custom_exc")
            shell.custom_exceptions = hooks["custom_exceptions"]
        for name, method in hooks["methods"].items():
            if vars(shell).get(name) is not hooks["instance"][name]:
                changed.append(f"get_ipython().{name}")
                if hooks["instance"][name] is None:
                    delattr(shell, name)
                else:
                    setattr(shell, name, hooks["instance"][name])
            if vars(type(shell)).get(name) is not method:
                changed.append(f"{type(shell).__name__}.{name}")
                setattr(type(shell), name, method)
        return changed

    # -- around a test cell ------------------------------------------------------------------------
    def _token(self, stage: str, grade_id: str) -> str:
        digest = hmac.new(self._secret, f"{stage}:{grade_id}".encode(), hashlib.sha256).hexdigest()
        return f"mmalign-guard {stage} {grade_id} {digest[:32]}"

    def _verdict(self, stage: str, grade_id: str, problems: list[str]) -> None:
        if problems:
            raise GradingError("; ".join(dict.fromkeys(problems)))
        print(self._token(stage, grade_id))

    def before(self, grade_id: str) -> None:
        """Before a test cell: restore and report what the answer cells changed."""
        problems = []
        changed = self._restore_snapshot() + self._restore_hooks()
        if changed:
            problems.append("your code replaced " + ", ".join(changed[:5])
                            + (" ..." if len(changed) > 5 else "") + ", which the tests rely on; "
                            "the originals were put back and this test scores 0")
        problems += self._check_answers()
        problems += self._violations
        self._violations.clear()
        self._verdict("before", grade_id, problems)

    def after(self, grade_id: str) -> None:
        """After a test cell: report what changed, or which reference was called, while it ran."""
        problems = list(self._violations)
        self._violations.clear()
        changed = self._restore_snapshot() + self._restore_hooks()
        if changed:
            problems.append("your code replaced " + ", ".join(changed[:5])
                            + (" ..." if len(changed) > 5 else "") + " while the test ran; "
                            "the originals were put back and this test scores 0")
        self._verdict("after", grade_id, problems)


def _library_wrapper_of(current, original) -> bool:
    """True when torch replaced a method by a wrapper of it (``Optimizer`` patches ``step`` once)."""
    code = getattr(current, "__code__", None)
    filename = code.co_filename.replace("\\", "/") if code is not None else ""
    return (current is not original and getattr(current, "__wrapped__", None) is original
            and "/torch/" in filename and getattr(current, "hooked", False) is True)


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def install(config_json: str) -> Guard:
    """Start guarding (called by the first cell of the graded notebook)."""
    return Guard(json.loads(config_json))


def token(secret: str, stage: str, grade_id: str) -> str:
    """The line that ``stage`` ('before' / 'after') prints for ``grade_id`` when it passes."""
    digest = hmac.new(secret.encode(), f"{stage}:{grade_id}".encode(), hashlib.sha256).hexdigest()
    return f"mmalign-guard {stage} {grade_id} {digest[:32]}"
