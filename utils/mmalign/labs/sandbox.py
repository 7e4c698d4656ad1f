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

This module wires an existing sandbox; it does not implement one.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Environment variables the student's process keeps from the grader's (everything else is dropped).
KEPT_ENV = ("MMALIGN_PROFILE", "MMALIGN_DEPRECATIONS", "MMALIGN_CACHE", "MMALIGN_ENCODE_THREADS", "MMALIGN_CHECKS",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LANG", "LC_ALL")
NO_SANDBOX = ("bubblewrap (bwrap) is not available here, so the submission's code ran without a sandbox: "
              "it could read solutions/ and other files of the grading user. Install it "
              "(apt-get install bubblewrap) or grade inside a container (see the instructors' page).")


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
        PATH=os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
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
    for path in _python_paths():
        cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", str(workdir), str(workdir),
            "--chdir", str(workdir)]
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    return cmd + argv, None, True
