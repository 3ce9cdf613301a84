"""Run untrusted Python programs (model-written code) and their tests in a contained child process.

One child process per candidate program runs all of that program's tests. The layers:

- a separate process in its own session/process group, started with ``python -I`` in a fresh
  temporary directory, with an environment built from an allow-list (no API keys, tokens,
  passwords, base URLs), killed as a whole group (SIGKILL) when it ends or overruns its
  wall-clock limit;
- rlimits set in the child before the candidate runs: CPU seconds, address space, file size,
  no core files, and a process count (RLIMIT_NPROC binds for ordinary users only: the kernel
  exempts uid 0, so as root the next layer is what stops a fork bomb);
- a Python audit hook, installed before the candidate runs and impossible to remove from
  Python, that refuses process creation (fork, exec, spawn, system, subprocess), signals to
  other processes, ctypes and sockets;
- Landlock (PyPI ``landlock``): writes, truncations, creations, renames and deletions outside
  the temporary directory fail with PermissionError; reads work everywhere except under
  /proc (so other processes' environments, the parent's API keys included, stay unreadable;
  the audit hook refuses them too). Where Landlock is
  missing, a warning is logged once and the audit hook refuses writing opens and deletions
  outside the temporary directory instead (a weaker wall);
- per-test time limits (SIGALRM in the child) inside the wall-clock limit.

A candidate passes only if the harness itself reports success: the harness binds the tests
before the candidate runs (the tests are executed in their own namespace after the
candidate's, so redefining ``check`` has no effect), catches every BaseException (SystemExit,
KeyboardInterrupt) as a failure, and writes a random nonce to a private copy of stdout only
after the last test returned; ``os._exit`` therefore leaves no nonce and fails. A candidate
that deliberately searches the interpreter's memory for the nonce could forge a pass: this
is a guard against careless or overfitted model code, not against a targeted exploit of
the harness.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Limits",
    "RunResult",
    "child_environment",
    "run_tests",
    "run_many",
    "landlock_available",
    "SECRET_MARKERS",
    "trusted_unpickle",
]

log = logging.getLogger(__name__)

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "BASE_URL")
_ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed child.

    wall_s: wall-clock seconds for the whole child (then its process group is killed);
    cpu_s: CPU seconds (RLIMIT_CPU); memory_bytes: address space (RLIMIT_AS);
    nproc: extra processes allowed for a non-root user (RLIMIT_NPROC);
    fsize_bytes: largest file the child may write (RLIMIT_FSIZE);
    test_s: default per-test time limit.
    """

    wall_s: float = 20.0
    cpu_s: float = 20.0
    memory_bytes: int = 1 << 30
    nproc: int = 16
    fsize_bytes: int = 16 << 20
    test_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "test_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        for name in ("memory_bytes", "nproc", "fsize_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed program.

    passed: every test ran to the end and passed; error: why not (None when passed);
    details: per-test pass flags, in order, for the tests that ran; landlock: whether the
    filesystem wall was in force (None when the child sent no report); wall_s: seconds the child took; value: what a trusted run
    (mode "outputs") returned, else None.
    """

    passed: bool
    error: str | None = None
    details: tuple[bool, ...] = ()
    landlock: bool | None = None
    wall_s: float = 0.0
    value: Any = field(default=None, compare=False, repr=False)


def child_environment(environ: Mapping[str, str] | None = None, *, workdir: str = "/tmp") -> dict[str, str]:
    """The environment of a sandboxed child: the allow-listed variables of `environ` (PATH,
    LANG, LC_*, TZ) minus anything whose name looks secret, plus HOME/TMPDIR = `workdir`."""
    environ = os.environ if environ is None else environ
    env = {}
    for name in _ENV_ALLOW:
        if name in environ and not _looks_secret(name):
            env[name] = environ[name]
    env.update(
        HOME=workdir,
        TMPDIR=workdir,
        PYTHONHASHSEED="0",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONIOENCODING="utf-8",
        OMP_NUM_THREADS="1",
    )
    return env


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS) or upper.startswith("OPENAI_")


# The harness runs in the child. It is plain stdlib code (the child starts with `python -I`)
# kept as a string so that no file of the package has to be importable from the sandbox.
_HARNESS = r'''
import os, sys, pickle, json, signal, resource, time, math, traceback

def _limits(spec):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = int(math.ceil(spec["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory_bytes"], spec["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize_bytes"], spec["fsize_bytes"]))
    if os.geteuid() != 0:
        uid = os.getuid()
        mine = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat("/proc/" + entry).st_uid == uid:
                        mine += 1
                except OSError:
                    pass
        cap = mine + spec["nproc"]
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
        except (ValueError, OSError):
            pass

def _landlock(workdir):
    try:
        import landlock
        from landlock.plumbing import FSAccess, landlock_abi_version
        abi = landlock_abi_version()
        file_rights = FSAccess.WRITE_FILE
        if abi >= 3:
            file_rights |= FSAccess.TRUNCATE
        dir_rights = (FSAccess.REMOVE_DIR | FSAccess.REMOVE_FILE | FSAccess.MAKE_CHAR | FSAccess.MAKE_DIR
                      | FSAccess.MAKE_REG | FSAccess.MAKE_SOCK | FSAccess.MAKE_FIFO | FSAccess.MAKE_BLOCK
                      | FSAccess.MAKE_SYM)
        if abi >= 2:
            dir_rights |= FSAccess.REFER
        read_file = FSAccess.READ_FILE | FSAccess.EXECUTE
        read_dir = read_file | FSAccess.READ_DIR
        ruleset = landlock.Ruleset(restrict_rules=file_rights | dir_rights | read_dir)
        ruleset.allow(workdir, rules=file_rights | dir_rights | read_dir)
        # Reads everywhere except /proc (other processes' environments), own /proc entry kept.
        for entry in os.listdir("/"):
            if entry == "proc":
                continue
            path = "/" + entry
            try:
                ruleset.allow(path, rules=read_dir if os.path.isdir(path) else read_file)
            except Exception:
                pass
        ruleset.allow("/proc/%d" % os.getpid(), rules=read_dir)
        ruleset.allow("/dev/null", rules=file_rights | read_file)
        ruleset.apply()
        return True, None
    except Exception as exc:
        return False, type(exc).__name__ + ": " + str(exc)

_BLOCKED = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
    "socket.__new__", "socket.connect", "socket.bind", "os.setuid", "os.setgid", "os.chroot",
})
_FS_EVENTS = frozenset({"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
                        "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move"})

def _install_hook(workdir, landlock_ok):
    root = os.path.realpath(workdir) + os.sep
    def inside(path):
        try:
            if isinstance(path, int):
                return True
            p = os.fsdecode(path)
            return (os.path.realpath(p) + os.sep).startswith(root)
        except Exception:
            return False
    own = "/proc/%d" % os.getpid()
    def foreign_proc(path):
        try:
            if isinstance(path, int):
                return False
            p = os.path.realpath(os.fsdecode(path))
            return p.startswith("/proc/") and p.split("/")[2].isdigit() and not (p + "/").startswith(own + "/")
        except Exception:
            return True
    def hook(event, args):
        if event in _BLOCKED or event.startswith("ctypes."):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open" and args and foreign_proc(args[0]):
            raise PermissionError("sandbox: other processes' /proc entries are not readable")
        if not landlock_ok:
            if event == "open" and len(args) >= 3:
                mode = args[1] or ""
                flags = args[2] or 0
                writing = any(c in mode for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
                if writing and not inside(args[0]):
                    raise PermissionError("sandbox: writing outside the work directory")
            elif event in _FS_EVENTS and args and not inside(args[0]):
                raise PermissionError("sandbox: " + event + " outside the work directory")
    sys.addaudithook(hook)

class _Timeout(BaseException):
    pass

def _alarm(signum, frame):
    raise _Timeout()

def _timed(seconds, fn, *args):
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

_PLAIN = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)

def _plain(value, depth=0):
    # Only values whose equality the harness trusts: built-in types and the stdlib
    # containers, never a candidate-defined class with its own __eq__.
    if depth > 200:
        return False
    t = type(value)
    if t not in _PLAIN and t.__module__ not in ("collections",):
        return False
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)) or t.__module__ == "collections":
        try:
            return all(_plain(v, depth + 1) for v in value)
        except TypeError:
            return False
    return True

def _is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False

def _close(out, exp, atol):
    if isinstance(exp, float) or isinstance(out, float):
        if not isinstance(out, (int, float)) or isinstance(out, bool) != isinstance(exp, bool):
            return False
        if math.isnan(exp) and math.isnan(out):
            return True
        return abs(out - exp) <= atol + 1e-7 * abs(exp)
    if isinstance(exp, (list, tuple)) and isinstance(out, (list, tuple)) and len(exp) == len(out):
        return all(_close(o, e, atol) for o, e in zip(out, exp))
    return False

_DIGEST = "__gcache_sha256__"
_DIGEST_OVER = 1 << 20

def _digestable(value, depth=0):
    # Exact, order-stable values only: no floats (tolerance) and no sets (hash order).
    if depth > 200:
        return False
    t = type(value)
    if t in (int, str, bytes, bool, type(None)):
        return True
    if t in (list, tuple):
        return all(_digestable(v, depth + 1) for v in value)
    if t is dict:
        return all(_digestable(k, depth + 1) and _digestable(v, depth + 1) for k, v in value.items())
    return False

def _maybe_digest(out):
    # Huge exact outputs (one MBPP+ task returns ~300 MB of combinations) travel as a digest.
    if isinstance(out, (list, tuple, dict, str, bytes)) and len(out) > 10000 and _digestable(out):
        text = repr(out)
        if len(text) > _DIGEST_OVER:
            import hashlib
            return (_DIGEST, type(out).__name__, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    return out

def _same(out, exp, atol, oracle):
    if type(exp) is tuple and len(exp) == 3 and exp[0] == _DIGEST:
        if type(out).__name__ != exp[1] or not _digestable(out):
            return False
        import hashlib
        return hashlib.sha256(repr(out).encode("utf-8", "surrogatepass")).hexdigest() == exp[2]
    if oracle == "not_none":
        return exp == (out is not None)
    if oracle == "always":
        return True
    if not _plain(out):
        return False
    if oracle == "zero_ok" and out == 0:
        return True
    if oracle == "set_eq":
        try:
            return set(out) == set(exp)
        except TypeError:
            return False
    if exp == out:
        return True
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    return atol != 0 and _is_floats(exp) and _close(out, exp, atol)

def _run(job):
    mode = job["mode"]
    cand = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(job["program"], "candidate.py", "exec"), cand)
    if mode == "check":
        tests = dict(cand)
        exec(compile(job["test"], "tests.py", "exec"), tests)
        check = tests["check"]
        fn = cand[job["entry_point"]]
        _timed(job["test_s"], check, fn)
        return {"passed": True, "details": [True]}
    if mode == "asserts":
        details = []
        for stmt in job["asserts"]:
            tests = dict(cand)
            exec("import math", tests)
            code = compile(stmt, "tests.py", "exec")
            try:
                _timed(job["test_s"], exec, code, tests)
                details.append(True)
            except Exception:
                details.append(False)
        return {"passed": bool(details) and all(details), "details": details}
    fn = cand[job["entry_point"]]
    inputs = job["inputs"]
    if mode == "outputs":
        import copy
        outs, times = [], []
        for args in inputs:
            start = time.perf_counter()
            out = _timed(job["test_s"], fn, *copy.deepcopy(args))
            times.append(time.perf_counter() - start)
            if job.get("oracle") == "not_none":
                out = out is not None
            outs.append(_maybe_digest(out))
        return {"passed": True, "outputs": outs, "times": times}
    # mode == "compare": stop at the first failing test, as EvalPlus does.
    import copy
    details = []
    error = None
    for i, args in enumerate(inputs):
        try:
            out = _timed(job["time_limits"][i], fn, *copy.deepcopy(args))
            ok = _same(out, job["expected"][i], job["atol"], job.get("oracle"))
        except _Timeout:
            ok, error = False, "test %d timed out" % i
        except Exception as exc:
            ok, error = False, "test %d raised %s" % (i, type(exc).__name__)
        details.append(ok)
        if not ok:
            if error is None:
                error = "test %d: wrong output" % i
            break
    return {"passed": all(details) and len(details) == len(inputs), "details": details, "error": error}

def _main():
    raw = sys.stdin.buffer.read()
    job = pickle.loads(raw)
    del raw
    nonce = job.pop("nonce")
    result_fd = os.dup(1)
    sink = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    workdir = os.getcwd()
    _limits(job.pop("limits"))
    if job.pop("without_landlock", False):
        landlock_ok, landlock_error = False, "disabled by the caller"
    else:
        landlock_ok, landlock_error = _landlock(workdir)
    signal.signal(signal.SIGALRM, _alarm)
    _install_hook(workdir, landlock_ok)
    try:
        report = _run(job)
    except _Timeout:
        report = {"passed": False, "error": "timed out"}
    except BaseException as exc:
        report = {"passed": False, "error": "%s: %s" % (type(exc).__name__, str(exc)[:300])}
    report["landlock"] = landlock_ok
    report["landlock_error"] = landlock_error
    if job["mode"] == "outputs":
        import base64
        data = base64.b64encode(pickle.dumps(report, protocol=4)).decode()
        line = nonce + " P " + data + "\n"
    else:
        report.pop("outputs", None)
        line = nonce + " J " + json.dumps(report) + "\n"
    view = memoryview(line.encode())
    while view:
        view = view[os.write(result_fd, view):]
    os._exit(0)

_main()
'''

_landlock_warned = False


def landlock_available() -> bool:
    """Whether this kernel and Python offer Landlock (the `landlock` package imports and the
    ABI version is at least 1)."""
    try:
        from landlock.plumbing import landlock_abi_version

        return landlock_abi_version() >= 1
    except Exception:
        return False


class _TrustedUnpickler(pickle.Unpickler):
    """Unpickles the outputs of trusted code (canonical solutions): built-in types only."""

    _ALLOWED = {("builtins", n) for n in ("complex", "set", "frozenset", "slice", "range", "bytearray")}
    _ALLOWED |= {("collections", n) for n in ("OrderedDict", "defaultdict", "Counter", "deque")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"type {module}.{name} is not allowed in sandbox outputs")


def trusted_unpickle(data: bytes) -> Any:
    """Unpickle data that may only hold built-in values (and the stdlib containers);
    raises pickle.UnpicklingError for any other type."""
    import io

    return _TrustedUnpickler(io.BytesIO(data)).load()


def run_tests(job: Mapping[str, Any], limits: Limits = Limits()) -> RunResult:
    """Run one program and its tests in a sandboxed child; never raises for candidate failures.

    `job` holds ``mode`` and ``program`` plus, by mode:
    "check" (HumanEval): ``test`` (defines check(candidate)), ``entry_point``, ``test_s``;
    "asserts": ``asserts`` (statements), ``test_s``;
    "compare" (MBPP+): ``entry_point``, ``inputs``, ``expected``, ``time_limits``, ``atol``,
    ``oracle`` (None | "not_none" | "always" | "zero_ok" | "set_eq");
    "outputs" (trusted code only): ``entry_point``, ``inputs``, ``test_s``; the outputs and
    per-test seconds come back in RunResult.value as ``(outputs, times)``.
    ``without_landlock=True`` skips Landlock (to exercise the fallback guard in tests).
    Raises ValueError for an unknown mode (a caller bug, not a candidate failure).
    """
    global _landlock_warned
    mode = job.get("mode")
    if mode not in ("check", "asserts", "compare", "outputs"):
        raise ValueError(f"run_tests: job['mode'] must be check|asserts|compare|outputs, got {mode!r}")
    if not isinstance(job.get("program"), str):
        return RunResult(False, error="no program (expected a str)")
    nonce = secrets.token_hex(16)
    payload = dict(job)
    payload["nonce"] = nonce
    payload.setdefault("test_s", limits.test_s)
    payload["limits"] = {
        "cpu_s": limits.cpu_s,
        "memory_bytes": limits.memory_bytes,
        "nproc": limits.nproc,
        "fsize_bytes": limits.fsize_bytes,
    }
    try:
        data = pickle.dumps(payload, protocol=4)
    except Exception as exc:
        return RunResult(False, error=f"cannot send the job to the sandbox: {exc}")
    workdir = tempfile.mkdtemp(prefix="gcache-sandbox-")
    start = time.perf_counter()
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env=child_environment(workdir=workdir),
            start_new_session=True,
            close_fds=True,
        )
        try:
            stdout, _ = proc.communicate(input=data, timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            stdout, _ = proc.communicate()
            timed_out = True
        elapsed = time.perf_counter() - start
        result = _parse_report(stdout, nonce, elapsed, timed_out, proc.returncode, workdir, mode)
    except OSError as exc:
        result = RunResult(False, error=f"sandbox failed to start: {exc}", wall_s=time.perf_counter() - start)
    finally:
        if proc is not None:
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    if result.landlock is False and not _landlock_warned:
        _landlock_warned = True
        log.warning("Landlock is not in force in the sandbox; falling back to an audit-hook file guard (weaker)")
    return result


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group; repeat until none is left (a fork race)."""
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.002)


def _tail(workdir: str, limit: int = 600) -> str:
    try:
        with open(os.path.join(workdir, "output.txt"), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _parse_report(
    stdout: bytes, nonce: str, elapsed: float, timed_out: bool, returncode: int | None, workdir: str, mode: str
) -> RunResult:
    report = None
    prefix = nonce.encode() + b" "
    for line in stdout.splitlines():
        if line.startswith(prefix):
            kind, _, body = line[len(prefix) :].partition(b" ")
            try:
                if kind == b"J" and mode != "outputs":
                    report = json.loads(body)
                elif kind == b"P" and mode == "outputs":
                    import base64
                    import io

                    report = _TrustedUnpickler(io.BytesIO(base64.b64decode(body))).load()
            except Exception as exc:
                return RunResult(False, error=f"unreadable sandbox report: {exc}", wall_s=elapsed)
    if report is None:
        if timed_out:
            return RunResult(False, error="timed out (wall clock)", wall_s=elapsed)
        why = "killed by signal %d" % -returncode if returncode is not None and returncode < 0 else f"exit code {returncode}"
        tail = _tail(workdir)
        return RunResult(
            False,
            error=f"the program ended before its tests finished ({why})" + (f": {tail[-300:]}" if tail else ""),
            wall_s=elapsed,
        )
    error = report.get("error")
    passed = bool(report.get("passed")) and error is None
    if not passed and error is None:
        error = "a test failed"
    value = None
    if mode == "outputs" and passed:
        value = (report.get("outputs"), report.get("times"))
    return RunResult(
        passed,
        error=None if passed else str(error),
        details=tuple(bool(x) for x in report.get("details", ())),
        landlock=bool(report.get("landlock")),
        wall_s=elapsed,
        value=value,
    )


def run_many(
    jobs: Sequence[Mapping[str, Any]],
    limits: Limits | Sequence[Limits] = Limits(),
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """`run_tests` over many jobs with `workers` children at a time (default: CPU count),
    results in the order of `jobs`; `progress(i)` is called after each finished job."""
    if isinstance(limits, Limits):
        limits = [limits] * len(jobs)
    if len(limits) != len(jobs):
        raise ValueError(f"run_many: limits must be one Limits or one per job ({len(jobs)}), got {len(limits)}")
    workers = max(1, workers or os.cpu_count() or 1)
    results: list[RunResult | None] = [None] * len(jobs)

    def one(i: int) -> None:
        try:
            results[i] = run_tests(jobs[i], limits[i])
        except ValueError as exc:
            results[i] = RunResult(False, error=str(exc))
        if progress is not None:
            progress(i)

    if workers == 1 or len(jobs) <= 1:
        for i in range(len(jobs)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(jobs))))
    return [r for r in results if r is not None]
