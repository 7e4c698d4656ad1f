"""One fresh sandbox per submission: the command that starts the student's process, and its environment.

On Linux with bubblewrap (``bwrap``, from the distribution's packages: ``apt-get install bubblewrap``)
the student's process sees only what it needs, read-only: the system's ``/usr``, the Python
installation, the virtual environment, the ``mmalign`` package and the data cache; its own folder
(holding only the submission) is the one writable place, and it is ``HOME``, ``IPYTHONDIR``,
``TMPDIR`` and the working directory. It has no network, its own process and IPC namespaces (it cannot
see the grader or other submissions' processes, and ``/proc`` shows only its own), no capabilities,
and it dies with the grader. Without bubblewrap (other systems, or a container where user namespaces
are off) the process runs with the reduced environment and the private folder only, and the grader
says so: grade inside a container then (see the instructors' page).

A memory limit per submission: ``RLIMIT_AS`` breaks torch (it reserves large virtual ranges) and a cgroup
needs a delegated hierarchy that graders rarely have, so :class:`MemoryWatch`, a thread in the grader,
polls the resident memory (RSS, from ``/proc``) of every process of the submission's sandboxes and kills
them when together they hold more than the limit; the test that was running says "memory limit N MiB
exceeded". It polls every 0.2 s, so a burst can overshoot the limit for that long.

This module wires an existing sandbox; it does not implement one.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

#: Environment variables the student's process keeps from the grader's (everything else is dropped).
KEPT_ENV = ("MMALIGN_PROFILE", "MMALIGN_DEPRECATIONS", "MMALIGN_CACHE", "MMALIGN_ENCODE_THREADS", "MMALIGN_CHECKS",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LANG", "LC_ALL")
NO_SANDBOX = ("bubblewrap (bwrap) is not available here, so the submission's code ran without a sandbox: "
              "solutions/ and every other file of the grading user were readable, and processes it detached "
              "survive grading. Install it (apt-get install bubblewrap) or grade each submission in its own "
              "container (see the instructors' page, 'Grading safely').")
#: The default memory limit of one submission (all its processes together), in MiB.
DEFAULT_MEMORY_LIMIT_MIB = 4096


def _system_paths() -> list[tuple[str, str]]:
    """``(option, path)`` for the system folders: ``/usr`` bound, ``/bin`` & co. as their symlinks."""
    out = [("--ro-bind", "/usr")]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        path = Path(name)
        if path.is_symlink():
            out.append(("--symlink", f"{os.readlink(path)}:{name}"))
        elif path.is_dir():
            out.append(("--ro-bind", name))
    for name in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/passwd",
                 "/etc/group", "/etc/nsswitch.conf", "/etc/hosts"):
        if Path(name).exists():
            out.append(("--ro-bind", name))
    return out


def _python_paths() -> list[str]:
    """The folders the student's Python needs: installation, environment, mmalign, the data cache."""
    import mmalign

    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), sys.prefix,
             os.path.realpath(os.path.dirname(sys.executable)), str(Path(mmalign.__file__).resolve().parent)}
    cache = _cache()
    if cache is not None:
        paths.add(str(cache))
    # remove folders inside other bound folders
    ordered = sorted(p for p in paths if p and Path(p).exists())
    return [p for p in ordered if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in ordered)]


def _cache() -> Path | None:
    """The course's data and feature cache (read-only for the student), when it exists."""
    try:
        from mmalign.config import cache_dir

        cache = Path(cache_dir()).resolve()
    except Exception:  # noqa: BLE001 - no cache configured: nothing to bind
        return None
    return cache if cache.is_dir() else None


@functools.lru_cache(maxsize=None)
def bubblewrap() -> str | None:
    """The path of a working ``bwrap``, or None (absent, or refused by the kernel / container)."""
    if os.environ.get("MMALIGN_GRADING_SANDBOX", "").lower() in ("none", "off", "0"):
        return None
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = [path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return path if ok else None


def environment(workdir: Path, profile: str) -> dict[str, str]:
    """The student's reduced environment: paths inside ``workdir``, a few course settings, nothing else."""
    env = {name: os.environ[name] for name in KEPT_ENV if name in os.environ}
    env.update(
        HOME=str(workdir), IPYTHONDIR=str(workdir / ".ipython"), TMPDIR=str(workdir / "tmp"),
        MPLCONFIGDIR=str(workdir / ".matplotlib"), MPLBACKEND="Agg", MMALIGN_PROFILE=profile,
        PATH=os.pathsep.join([os.path.dirname(os.path.abspath(sys.executable)), "/usr/local/bin", "/usr/bin", "/bin"]),
        PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
    )
    env.setdefault("LANG", "C.UTF-8")
    cache = _cache()
    if cache is not None:
        env["MMALIGN_CACHE"] = str(cache)
    return env


def command(argv: list[str], workdir: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str] | None, bool]:
    """``(command, env for Popen, sandboxed)``: ``argv`` run inside bubblewrap when it works here."""
    bwrap = bubblewrap()
    if bwrap is None:
        return argv, env, False
    cmd = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    if os.geteuid() == 0:
        cmd += ["--cap-drop", "ALL"]
    for option, path in _system_paths():
        cmd += [option, *path.split(":", 1)] if option == "--symlink" else [option, path, path]
    # the empty /tmp first: bubblewrap mounts in order, so a later tmpfs would hide a Python or a course
    # checked out under /tmp (its .venv, the library) that the binds below bring in
    cmd += ["--tmpfs", "/tmp"]
    for path in _python_paths():
        cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--bind", str(workdir), str(workdir), "--chdir", str(workdir)]
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    return cmd + argv, None, True


def _process_table() -> dict[int, list[int]]:
    """``parent pid -> [child pids]`` of every process visible in ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(roots) -> list[int]:
    """The pids of ``roots`` and all their descendants (children, grandchildren, ...)."""
    children, out, todo = _process_table(), [], list(roots)
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo += children.get(pid, [])
    return out


def resident_bytes(pid: int) -> int:
    """Resident memory of one process (``/proc/PID/statm``), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def kill_processes(groups, pids) -> None:
    """SIGKILL the process groups ``groups``, then every process in ``pids`` (a child that left its group
    with setsid is still in the tree); processes already gone are skipped."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class MemoryWatch:
    """Kill a submission's processes when together they hold more than ``limit_mib`` MiB resident.

    ``add(pid)`` registers the root of a sandbox (the process the grader started); every descendant
    counts. Over the limit, every process of every registered tree is killed (``SIGKILL``, their
    process groups too) and :meth:`killed` names the reason for the roots it stopped. ``limit_mib``
    None or 0 watches nothing. Works where ``/proc`` exists (Linux); elsewhere :attr:`available` is
    False and nothing is limited.
    """

    def __init__(self, limit_mib: float | None, interval: float = 0.2):
        self.limit_mib = limit_mib or 0
        self.interval = interval
        self.available = os.path.exists("/proc/self/statm")
        self.reason = f"memory limit {self.limit_mib:g} MiB exceeded"
        self.kills = 0
        self.peak_bytes = 0
        self._roots: set[int] = set()
        self._killed: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.limit_mib and self.available:
            self._thread = threading.Thread(target=self._run, name="mmalign-memory-watch", daemon=True)
            self._thread.start()

    def add(self, pid: int) -> None:
        with self._lock:
            self._roots.add(pid)

    def remove(self, pid: int) -> None:
        with self._lock:
            self._roots.discard(pid)

    def killed(self, pid: int) -> str | None:
        """The reason when the watch stopped the tree of ``pid``, else None."""
        with self._lock:
            return self.reason if pid in self._killed else None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> None:
        """One poll: measure the trees and kill them when over the limit."""
        with self._lock:
            roots = sorted(self._roots)
        if not roots:
            return
        pids = process_tree(roots)
        total = sum(resident_bytes(pid) for pid in pids)
        self.peak_bytes = max(self.peak_bytes, total)
        if total <= self.limit_mib * 2**20:
            return
        with self._lock:
            self._killed.update(roots)
            self._roots.difference_update(roots)
            self.kills += 1
        kill_processes(roots, pids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watch must never stop grading
                time.sleep(self.interval)
