"""The child side of the code sandbox, and the plain-data codec both sides share.

Run as a script (``python -I sandbox_child.py``) by `gcache.io.tasks.sandbox`; it imports the
standard library only (Landlock through ctypes), so it works whatever the installation of
gcache. Its life:

1. read the setup frame from stdin (limits, uid/gid, work directory, paths to hide);
2. as root: enter new PID, network, IPC, UTS and mount namespaces, fork once (the parent
   stays behind as the *keeper*, the child is PID 1 of the new PID namespace and dies with
   the keeper), mount a size-limited tmpfs on the work directory, make the Python
   installation reachable to the unprivileged uid, drop to that uid/gid;
3. set rlimits, Landlock, the audit hook, per-call alarms; answer "ready";
4. serve requests: ``load`` (exec the candidate program, find its entry point) and
   ``call`` (call it on decoded arguments; reply with the encoded result).

The child computes values only: every verdict is decided by the trusted process, which
decodes the replies with `loads` (strict: plain data or an error, never pickle). Nothing
in this module is trusted once the candidate ran: the candidate shares the interpreter and
may rewrite any of it. Frames are a 4-byte big-endian length and a JSON document.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import signal
import struct
import sys
import time
from typing import Any

MAX_DEPTH = 100
MAX_INT_BITS = 1 << 20
HEADER = struct.Struct(">I")
_JSON_INT_DIGITS = 4000  # below Python's int/str conversion limit (4300 digits)

# Containers of the collections module compare like the built-in type they are mapped to.
_AS_DICT = ("Counter", "OrderedDict", "defaultdict")


class NotPlain(TypeError):
    """A value outside the plain data the codec carries (a class of the candidate's, a function...)."""


def encode(value: Any, depth: int = 0) -> Any:
    """A JSON-able form of a plain value: None, bool, int, float, complex, str, bytes, and
    list/tuple/set/frozenset/dict of those (exact types; Counter/OrderedDict/defaultdict as
    dict). Raises NotPlain naming the first other type."""
    if depth > MAX_DEPTH:
        raise NotPlain("nested too deeply")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        if value.bit_length() > MAX_INT_BITS:
            raise NotPlain("int too large")
        return value if value.bit_length() < 3 * _JSON_INT_DIGITS else {"i": hex(value)}
    if t is float:
        return value if math.isfinite(value) else {"f": repr(value)}
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple:
        return {"t": [encode(v, depth + 1) for v in value]}
    if t is dict or (t.__module__ == "collections" and t.__name__ in _AS_DICT):
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    if t is set or t is frozenset:
        return {"s" if t is set else "S": [encode(v, depth + 1) for v in value]}
    if t is complex:
        return {"c": [encode(value.real), encode(value.imag)]}
    if t is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    raise NotPlain(f"{t.__module__}.{t.__qualname__}")


def decode(obj: Any, depth: int = 0) -> Any:
    """The value `encode` made `obj` from; ValueError for anything `encode` cannot produce."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(obj)
    if obj is None or t is bool or t is str or t is float:
        return obj
    if t is int:
        if obj.bit_length() > MAX_INT_BITS:
            raise ValueError("int too large")
        return obj
    if t is list:
        return [decode(v, depth + 1) for v in obj]
    if t is not dict or len(obj) != 1:
        raise ValueError(f"not an encoded value: {t.__name__}")
    (tag, body), = obj.items()
    if tag in ("t", "s", "S", "d") and type(body) is not list:
        raise ValueError(f"tag {tag!r} needs a list")
    if tag == "t":
        return tuple(decode(v, depth + 1) for v in body)
    if tag in ("s", "S"):
        try:
            items = (set if tag == "s" else frozenset)(decode(v, depth + 1) for v in body)
        except TypeError as exc:
            raise ValueError(f"unhashable set element: {exc}") from None
        return items
    if tag == "d":
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("a dict entry must be [key, value]")
            try:
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            except TypeError as exc:
                raise ValueError(f"unhashable dict key: {exc}") from None
        return out
    if tag == "i" and type(body) is str and len(body) <= MAX_INT_BITS // 4 + 3:
        return int(body, 16)
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(x) in (int, float, dict) for x in body):
        real, imag = decode(body[0], depth + 1), decode(body[1], depth + 1)
        if type(real) is not float or type(imag) is not float:
            raise ValueError("a complex needs two floats")
        return complex(real, imag)
    if tag == "b" and type(body) is str:
        return base64.b64decode(body.encode("ascii"), validate=True)
    raise ValueError(f"unknown tag {tag!r}")


def dumps(message: Any) -> bytes:
    """One frame: the length header and the JSON text of `message` (already encoded)."""
    data = json.dumps(message, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
    return HEADER.pack(len(data)) + data


def loads(data: bytes) -> Any:
    """The JSON document of a frame body (no header); ValueError when it is not strict JSON."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"JSON constant {name} is not allowed")

    try:
        return json.loads(data.decode("ascii"), parse_constant=no_constant)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


DIGEST = "__gcache_sha256__"
DIGEST_OVER = 1 << 20


def digestable(value: Any, depth: int = 0) -> bool:
    """Exact, order-stable values only (no floats, whose match has a tolerance, no sets)."""
    if depth > 200:
        return False
    t = type(value)
    if t in (int, str, bytes, bool, type(None)):
        return True
    if t in (list, tuple):
        return all(digestable(v, depth + 1) for v in value)
    if t is dict:
        return all(digestable(k, depth + 1) and digestable(v, depth + 1) for k, v in value.items())
    return False


def digest(value: Any) -> tuple[str, str, str]:
    """(DIGEST, type name, sha256 of the repr): how a huge exact output travels."""
    return (DIGEST, type(value).__name__, hashlib.sha256(repr(value).encode("utf-8", "surrogatepass")).hexdigest())


def _transform(value: Any, how: str | None) -> Any:
    if how == "not_none":
        return value is not None
    if how == "digest":
        # The expected output is a digest: only an identical repr can match it, and producing
        # one needs the right answer, so any container may travel as its digest.
        return digest(value) if type(value) in (list, tuple, dict, str, bytes) else value
    if how == "maybe_digest":
        # Huge exact outputs (one MBPP+ task returns ~300 MB of combinations) travel as a digest.
        if isinstance(value, (list, tuple, dict, str, bytes)) and len(value) > 10000 and digestable(value):
            if len(repr(value)) > DIGEST_OVER:
                return digest(value)
    return value


# ---------------------------------------------------------------------------------- setup

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4


def _libc() -> Any:
    import ctypes  # only before the audit hook, which refuses ctypes to the candidate

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_namespaces(libc: Any, pipes: tuple[int, int]) -> None:
    """New PID/net/IPC/UTS/mount namespaces; this process forks, stays as the keeper and
    returns only in the child (PID 1 of the new namespace). Raises OSError when refused."""
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET), "unshare")
    pid = os.fork()
    if pid == 0:
        # (getppid() is 0 here: the keeper lives outside the namespace. Should it die before
        # this line, the trusted side's process-group kill still reaches this process.)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        return
    _keep(pid, pipes)


def _keep(pid: int, pipes: tuple[int, int]) -> None:
    """The keeper: wait for the namespace's PID 1; on SIGTERM kill it, which kills every
    process of the namespace, and exit only once the kernel has reaped them all."""
    for fd in (0, 1, *pipes):
        os.close(fd)

    def stop(signum: int, frame: Any) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _mount_workdir(libc: Any, workdir: str, uid: int, gid: int, size: int) -> None:
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    options = f"size={size},mode=0700,uid={uid},gid={gid}".encode()
    _check(libc.mount(b"tmpfs", os.fsencode(workdir), b"tmpfs", MS_NOSUID | MS_NODEV, options), "mount tmpfs")


def _expose(libc: Any, needed: list[str], staging: str) -> None:
    """Make every path in `needed` reachable to an unprivileged uid: an ancestor directory
    that others may not traverse (e.g. /root, mode 0700) is covered by an empty tmpfs into
    which only the needed child is bound back (the rest of it stays hidden)."""
    count = 0
    for path in needed:
        parts = os.path.realpath(path).split(os.sep)[1:]
        for i in range(len(parts) - 1):
            ancestor = os.sep + os.sep.join(parts[: i + 1])
            if os.stat(ancestor).st_mode & 0o001:
                continue
            child = os.path.join(ancestor, parts[i + 1])
            hold = os.path.join(staging, str(count))
            count += 1
            os.mkdir(hold, 0o700)
            _check(libc.mount(os.fsencode(child), os.fsencode(hold), None, MS_BIND | MS_REC, None), "bind")
            _check(libc.mount(b"tmpfs", os.fsencode(ancestor), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"), "tmpfs")
            os.mkdir(child, 0o755)
            _check(libc.mount(os.fsencode(hold), os.fsencode(child), None, MS_MOVE, None), "move")


def _drop_privileges(libc: Any, uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("setuid did not take")
    # setuid made the process non-dumpable, so its own /proc entries turned root-owned;
    # the fresh uid runs nothing else, and RLIMIT_CORE is 0.
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def _limits(spec: dict) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = int(math.ceil(spec["cpu_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory_bytes"], spec["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize_bytes"], spec["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    if os.geteuid() != 0:
        # A fresh uid owns no other process; an ordinary user's own uid does, so count them.
        cap = spec["nproc"] + (_processes_of(os.getuid()) if spec.get("shared_uid") else 1)
        resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))


def _processes_of(uid: int) -> int:
    mine = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                mine += os.stat("/proc/" + entry).st_uid == uid
            except OSError:
                pass
    return mine


# Landlock through its three system calls (the same numbers on every architecture); the
# `landlock` package would cost ~0.2 s of imports in every child.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1, 2, 4, 8
_WRITE_DIR = 16 | 32 | 64 | 128 | 256 | 512 | 1024 | 2048 | 4096  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
_REFER, _TRUNCATE = 8192, 16384
PR_SET_NO_NEW_PRIVS = 38


def landlock_abi(libc: Any = None) -> int:
    """The kernel's Landlock ABI version (0 when Landlock is unavailable)."""
    import ctypes

    libc = libc or _libc()
    version = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, version)


class _Ruleset:
    """A Landlock ruleset under construction: path-beneath rules, then `apply` to this process."""

    def __init__(self, libc: Any, handled: int):
        import ctypes

        self._libc, self._ctypes = libc, ctypes
        attr = ctypes.c_uint64(handled)
        fd = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(8), ctypes.c_uint32(0))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "landlock_create_ruleset: " + os.strerror(ctypes.get_errno()))
        self.fd = fd

    def allow(self, path: str, rights: int) -> None:
        ctypes = self._ctypes

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            attr = PathBeneath(rights, target)
            result = self._libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(self.fd), ctypes.c_int(1),
                                        ctypes.byref(attr), ctypes.c_uint32(0))
            if result != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: " + os.strerror(ctypes.get_errno()))
        finally:
            os.close(target)

    def apply(self) -> None:
        ctypes = self._ctypes
        _check(self._libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(self._libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(self.fd), ctypes.c_uint32(0)),
               "landlock_restrict_self")
        os.close(self.fd)


def _landlock(libc: Any, workdir: str, hidden: list[str]) -> str | None:
    """Writes only inside `workdir`; reads everywhere except /proc (other processes) and
    `hidden`. Returns None when in force, else why not."""
    try:
        abi = landlock_abi(libc)
        if abi < 1:
            return "Landlock is not available in this kernel"
        write_file = _WRITE_FILE | (_TRUNCATE if abi >= 3 else 0)
        write_dir = _WRITE_DIR | (_REFER if abi >= 2 else 0)
        read_file = _READ_FILE | _EXECUTE
        read_dir = read_file | _READ_DIR
        ruleset = _Ruleset(libc, write_file | write_dir | read_dir)
        ruleset.allow(workdir, write_file | write_dir | read_dir)
        hide = {os.path.realpath(p) for p in hidden} | {"/proc"}
        _allow_reads_except(ruleset, "/", hide, read_file, read_dir)
        ruleset.allow("/proc/self/", read_dir)
        ruleset.allow("/dev/null", write_file | read_file)
        ruleset.apply()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _allow_reads_except(ruleset: Any, folder: str, hide: set[str], read_file: Any, read_dir: Any) -> None:
    """Allow reads under `folder` except below the paths of `hide`: entries on the way to a
    hidden path are descended into (and not listable), every other entry is allowed whole."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if path in hide:
            continue
        try:
            if any(h.startswith(path + os.sep) for h in hide) and os.path.isdir(path) and not os.path.islink(path):
                _allow_reads_except(ruleset, path, hide, read_file, read_dir)
            else:
                ruleset.allow(path, read_dir if os.path.isdir(path) else read_file)
        except Exception:
            pass


_BLOCKED = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile", "sys.remote_exec",
    "socket.__new__", "socket.connect", "socket.bind", "os.setuid", "os.setgid", "os.chroot",
})
_FS_EVENTS = frozenset({"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown",
                        "os.link", "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move"})


def _install_hook(workdir: str, landlock_ok: bool) -> None:
    """Audit hook (defence in depth): no processes, signals, sockets, ctypes, other /proc
    entries; without Landlock also no writes outside `workdir`."""
    root = os.path.realpath(workdir) + os.sep
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def inside(path: Any) -> bool:
        try:
            return isinstance(path, int) or (realpath(fsdecode(path)) + os.sep).startswith(root)
        except Exception:
            return False

    own = os.path.realpath("/proc/self") + "/"  # this process as the mounted /proc names it

    def foreign_proc(path: Any) -> bool:
        try:
            if isinstance(path, int):
                return False
            p = realpath(fsdecode(path)) + "/"
            return p.startswith("/proc/") and p.split("/")[2].isdigit() and not p.startswith(own)
        except Exception:
            return True

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED or event.startswith("ctypes."):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open" and args and foreign_proc(args[0]):
            raise PermissionError("sandbox: other processes' /proc entries are not readable")
        if not landlock_ok:
            if event == "open" and len(args) >= 3:
                mode, flags = args[1] or "", args[2] or 0
                writing = any(c in mode for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
                if writing and not inside(args[0]):
                    raise PermissionError("sandbox: writing outside the work directory")
            elif event in _FS_EVENTS and args and not inside(args[0]):
                raise PermissionError("sandbox: " + event + " outside the work directory")

    sys.addaudithook(hook)


# ---------------------------------------------------------------------------------- serving


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> Any:
    (n,) = HEADER.unpack(_read_exact(fd, HEADER.size))
    return loads(_read_exact(fd, n))


def _send(fd: int, message: Any) -> None:
    view = memoryview(dumps(message))
    while view:
        view = view[os.write(fd, view):]


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    except BaseException:
        return type(exc).__name__


def _serve(requests: int, replies: int) -> None:
    fn = None
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        op, limit = request["op"], request["limit"]
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            if op == "load":
                namespace = {"__name__": "__main__", "__builtins__": __builtins__}
                exec(compile(request["program"], "candidate.py", "exec"), namespace)
                fn = namespace.get(request["entry_point"])
                reply = {"ok": True} if callable(fn) else {"error": f"the program defines no function {request['entry_point']}"}
            else:
                args = decode(request["args"])
                kwargs = decode(request["kwargs"])
                start = time.perf_counter()
                value = fn(*args, **kwargs)
                seconds = time.perf_counter() - start
                signal.setitimer(signal.ITIMER_REAL, 0)
                try:
                    reply = {"value": encode(_transform(value, request.get("transform"))), "seconds": seconds}
                except NotPlain as exc:
                    reply = {"nonplain": str(exc)}
                value = None  # a huge output must not stay alive through the next call
        except _Timeout:
            reply = {"timeout": True}
        except BaseException as exc:
            reply = {"error": _describe(exc)}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _send(replies, reply)


def main() -> None:
    """The child's life, from the setup frame to the end of the requests."""
    requests, replies = os.dup(0), os.dup(1)
    setup = _receive(requests)
    workdir = setup["workdir"]
    notes: dict[str, Any] = {"namespace": None, "uid": None, "landlock": None}
    # The child runs with -S (site's start-up costs ~0.2 s): the interpreter's packages are
    # added to the path plainly, without .pth files (editable installs are the caller's business).
    sys.path.extend(p for p in setup.get("site", []) if p not in sys.path)
    libc = _libc()
    if os.geteuid() == 0 and setup.get("isolate"):
        try:
            _enter_namespaces(libc, (requests, replies))
            _mount_workdir(libc, workdir, setup["uid"], setup["gid"], setup["limits"]["disk_bytes"])
            staging = os.path.join(workdir, ".expose")
            os.mkdir(staging, 0o700)
            _expose(libc, setup["needed"], staging)
            notes["namespace"] = True
        except OSError as exc:
            notes["namespace"] = f"unavailable: {exc}"
        if notes["namespace"] is True:
            _drop_privileges(libc, setup["uid"], setup["gid"])
    os.chdir(workdir)
    sink = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(sink, fd)
    os.close(sink)
    notes["uid"] = os.getuid()
    _limits(setup["limits"])
    error = None if setup.get("landlock", True) else "disabled by the caller"
    if error is None:
        error = _landlock(libc, workdir, setup.get("hidden", []))
    notes["landlock"] = True if error is None else error
    signal.signal(signal.SIGALRM, _alarm)
    _install_hook(workdir, error is None)
    _send(replies, {"ready": notes})
    _serve(requests, replies)
    os._exit(0)


if __name__ == "__main__":
    main()
