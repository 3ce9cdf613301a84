"""Hostile candidates are contained, reported as failures, and leave the test process unharmed;
the plain-data codec round-trips exactly and refuses everything else. (More attacks, each scored
through `tasks.score` from a fresh caller: tests/test_sandbox_hostile.py.)"""

import math
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcache.io.tasks import sandbox_child as wire
from gcache.io.tasks.sandbox import (
    CandidateFailure,
    Child,
    Limits,
    child_environment,
    landlock_available,
    outputs_match,
    run_many,
    run_tests,
)

TEST = "def check(candidate):\n    assert candidate(2) == 3\n"
GOOD = "def f(x):\n    return x + 1\n"
FAST = Limits(wall_s=8.0, cpu_s=8.0, test_s=4.0)


def check_job(program, test=TEST, **extra):
    return {"mode": "check", "program": program, "test": test, "entry_point": "f", **extra}


def test_good_program_passes_and_wrong_one_fails():
    ok, bad = run_many([check_job(GOOD), check_job("def f(x):\n    return x\n")], FAST)
    assert ok.passed and ok.error is None
    assert not bad.passed and "AssertionError" in bad.error


@pytest.mark.parametrize(
    "prefix",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit(0)\n",
        "raise KeyboardInterrupt\n",
        "import os\nos._exit(0)\n",
        "def check(candidate):\n    return True\n",
        "import builtins\nbuiltins.exit = lambda *a: None\nexit()\nimport sys\nsys.exit(0)\n",
    ],
)
def test_escaping_before_the_asserts_fails(prefix):
    # a wrong function plus an attempt to end (or short-circuit) the run before the asserts
    res = run_tests(check_job(prefix + "def f(x):\n    return 0\n"), FAST)
    assert not res.passed


def test_exit_inside_the_function_fails():
    program = "import sys\ndef f(x):\n    sys.exit(0)\n"
    assert not run_tests(check_job(program), FAST).passed
    program = "import os\ndef f(x):\n    os._exit(0)\n"
    assert not run_tests(check_job(program), FAST).passed


def test_infinite_loop_is_stopped_by_the_limits():
    start = time.perf_counter()
    res = run_tests(check_job("def f(x):\n    while True:\n        pass\n"), Limits(wall_s=3.0, cpu_s=3.0, test_s=1.0))
    assert not res.passed
    assert time.perf_counter() - start < 6.0
    # a loop that swallows the per-test timeout is ended by the wall clock / CPU limit
    sneaky = "def f(x):\n    while True:\n        try:\n            while True:\n                pass\n        except BaseException:\n            pass\n"
    start = time.perf_counter()
    res = run_tests(check_job(sneaky), Limits(wall_s=3.0, cpu_s=3.0, test_s=1.0))
    assert not res.passed
    assert time.perf_counter() - start < 6.0


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n",
        "import multiprocessing\nps = [multiprocessing.Process(target=print) for _ in range(100)]\n[p.start() for p in ps]\n",
        "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 100'], {})\n",
        "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n",
    ],
)
def test_fork_bombs_are_contained(bomb, monkeypatch):
    # Every process the candidate could start inherits the sandbox's fresh working directory;
    # none may outlive the run. (Counting processes in the test's session is racy: the other
    # xdist worker shares that session and starts processes of its own.)
    import gcache.io.tasks.sandbox as sandbox

    workdirs = []

    def mkdtemp(*args, **kwargs):
        workdirs.append(real_mkdtemp(*args, **kwargs))
        return workdirs[-1]

    real_mkdtemp = sandbox.tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    res = run_tests(check_job(bomb + GOOD), FAST)
    assert not res.passed
    assert len(workdirs) == 1
    assert _live_processes_in(workdirs[0]) == []
    assert os.getpid() > 0  # still here


def _live_processes_in(workdir):
    """Pids of running (not zombie) processes whose working directory is ``workdir``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cwd.removesuffix(" (deleted)") == workdir:
            found.append(int(entry))
    return found


def test_killing_the_parent_is_refused():
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD
    res = run_tests(check_job(program), FAST)
    assert not res.passed and "os.kill" in res.error


@pytest.mark.parametrize(
    "bomb",
    [
        "x = bytearray(8 << 30)\n",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n",
    ],
)
def test_memory_bombs_fail_fast(bomb):
    start = time.perf_counter()
    res = run_tests(check_job(bomb + GOOD), Limits(wall_s=10.0, cpu_s=10.0, memory_bytes=512 << 20))
    assert not res.passed
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize("without_landlock", [False, True])
def test_files_outside_the_work_directory_are_safe(tmp_path, without_landlock):
    if not without_landlock and not landlock_available():
        pytest.skip("Landlock is not available on this kernel")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("keep me too")
    new_file = tmp_path / "created.txt"
    attacks = [
        f"import os\nos.remove({str(victim)!r})\n",
        f"import shutil\nshutil.rmtree({str(folder)!r})\n",
        f"open({str(victim)!r}, 'w').write('owned')\n",
        f"open({str(new_file)!r}, 'w').write('owned')\n",
        f"import os\nos.rename({str(victim)!r}, {str(victim) + '.moved'!r})\n",
        f"import os\nfd = os.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)\n",
    ]
    jobs = [check_job(a + GOOD, without_landlock=without_landlock) for a in attacks]
    results = run_many(jobs, FAST)
    assert not any(r.passed for r in results)
    assert all(r.landlock is (not without_landlock) for r in results)
    assert victim.read_text() == "keep me"
    assert (folder / "inner.txt").read_text() == "keep me too"
    assert not new_file.exists()
    # writing inside the temporary work directory works
    inside = "open('scratch.txt', 'w').write('fine')\nimport os\nos.remove('scratch.txt')\n" + GOOD
    assert run_tests(check_job(inside, without_landlock=without_landlock), FAST).passed


def test_child_environment_has_no_secrets(monkeypatch):
    secrets = {
        "OPENAI_API_KEY": "sk-test-1",
        "OPENAI_BASE_URL": "http://secret.example",
        "HF_TOKEN": "hf-test-2",
        "MY_PASSWORD": "pw-test-3",
        "AWS_SECRET_ACCESS_KEY": "aws-test-4",
        "API_KEY": "plain-test-5",
        "BASE_URL": "http://base.example",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    env = child_environment(workdir="/tmp/x")
    assert not set(secrets) & set(env)
    assert not any(v in env.values() for v in secrets.values())
    # and the child really sees none of them
    test = (
        "def check(candidate):\n"
        "    env = candidate(0)\n"
        f"    assert not any(v in str(env) for v in {list(secrets.values())!r})\n"
        "    assert 'PATH' in env\n"
    )
    program = "import os\ndef f(x):\n    with open('/proc/self/environ', 'rb') as fh:\n        raw = fh.read().decode()\n    return dict(os.environ, raw=raw)\n"
    res = run_tests(check_job(program, test=test), FAST)
    assert res.passed, res.error


@pytest.mark.parametrize("without_landlock", [False, True])
def test_parent_environment_is_not_readable(monkeypatch, without_landlock):
    monkeypatch.setenv("GCACHE_TEST_API_KEY", "sk-parent-secret")
    for path in ("f'/proc/{os.getppid()}/environ'", "'/proc/1/environ'", f"'/proc/{os.getpid()}/environ'"):
        program = f"import os\ndef f(x):\n    return open({path}, 'rb').read().decode(errors='replace')\n"
        test = "def check(candidate):\n    assert 'sk-parent-secret' in candidate(0)\n"
        res = run_tests(check_job(program, test=test, without_landlock=without_landlock), FAST)
        assert not res.passed and "ermission" in res.error, res.error


def test_tests_are_bound_before_the_candidate_runs():
    # the candidate defines its own `check` and a helper the real test also defines
    program = "def check(candidate):\n    pass\ndef f(x):\n    return 0\n"
    assert not run_tests(check_job(program), FAST).passed


def test_compare_mode_rejects_objects_that_equal_everything():
    program = "class Any:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Any()\n"
    job = {"mode": "compare", "program": program, "entry_point": "f", "inputs": [[1], [2]],
           "expected": [2, 3], "time_limits": [1.0, 1.0], "atol": 0.0, "oracle": None}
    res = run_tests(job, FAST)
    assert not res.passed
    job["program"] = "def f(x):\n    return x + 1\n"
    assert run_tests(job, FAST).passed


def test_compare_mode_float_tolerance_and_time_limit():
    base = {"mode": "compare", "entry_point": "f", "inputs": [[1.0]], "expected": [0.3], "time_limits": [1.0],
            "oracle": None}
    close = dict(base, program="def f(x):\n    return 0.1 + 0.2\n", atol=0.0)
    assert run_tests(close, FAST).passed  # 1e-6 default tolerance for floats, as EvalPlus
    far = dict(base, program="def f(x):\n    return 0.31\n", atol=0.0)
    assert not run_tests(far, FAST).passed
    assert run_tests(dict(far, atol=0.05), FAST).passed
    slow = dict(base, program="import time\ndef f(x):\n    time.sleep(5)\n    return 0.3\n", atol=0.0)
    res = run_tests(slow, FAST)
    assert not res.passed and "timed out" in res.error


def test_bad_job_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        run_tests({"mode": "nope", "program": ""})
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)


# ------------------------------------------------------------------ the plain-data codec


_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(1 << 14000), max_value=1 << 14000)
            | st.floats(allow_nan=True) | st.complex_numbers(allow_nan=True) | st.text() | st.binary())
# (NaN is left out of set elements and keys: two NaNs there make the same set compare unequal to itself.)
_keys = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
         | st.complex_numbers(allow_nan=False))
_hashable = st.recursive(_keys, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=8)
_plain = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(_hashable, inner, max_size=3) | st.sets(_hashable, max_size=3),
    max_leaves=20,
)


def _same_exactly(a, b):
    """Equal with the same types all the way down (NaN equal to NaN, -0.0 apart from 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is complex:
        return _same_exactly(a.real, b.real) and _same_exactly(a.imag, b.imag)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same_exactly(x, y) for x, y in zip(a, b))
    if type(a) is dict:  # the codec keeps the order; NaN keys only match by position
        return len(a) == len(b) and all(_same_exactly(x, y) for x, y in zip(a.items(), b.items()))
    if type(a) in (set, frozenset):
        return a == b and sorted(type(x).__name__ for x in a) == sorted(type(x).__name__ for x in b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(_plain)
def test_codec_round_trips_plain_values_with_their_types(value):
    frame = wire.dumps(wire.encode(value))
    (n,) = wire.HEADER.unpack(frame[:4])
    assert n == len(frame) - 4
    assert _same_exactly(wire.decode(wire.loads(frame[4:])), value)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3)
                    | st.sampled_from(["t", "s", "S", "d", "i", "f", "c", "b", "nan", "0x1f", "AA=="]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("tsSdifcbx"), inner, max_size=2),
                    max_leaves=10))
def test_decoder_gives_a_plain_value_or_value_error(obj):
    try:
        value = wire.decode(obj)
    except ValueError:
        return
    wire.encode(value)  # whatever it accepts is plain data again


@pytest.mark.parametrize("bad", [
    {"t": 1}, {"d": [[1]]}, {"d": [[[1], 2]]}, {"s": [[1]]}, {"x": 1}, {"t": [], "s": []}, {"i": "zz"},
    {"f": "1.5"}, {"c": ["a", 1]}, {"c": [1, 2]}, {"b": "%%%"}, {"b": 5}, [1, {"q": 2}],
])
def test_decoder_rejects_what_encode_cannot_produce(bad):
    with pytest.raises(ValueError):
        wire.decode(bad)


def test_decoder_rejects_deep_nesting_and_constants():
    deep = [True]
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError):
        wire.decode(deep)
    for text in (b"NaN", b"[Infinity]", b"[" * 100000 + b"]" * 100000, "[\u00e9]".encode()):
        with pytest.raises(ValueError):
            wire.loads(text)


@pytest.mark.parametrize("value", [object(), type("Eq", (int,), {"__eq__": lambda s, o: True})(1),
                                   type("S", (str,), {})("x"), [1, print], {1: bytearray(b"x")}])
def test_encoder_refuses_what_is_not_plain(value):
    with pytest.raises(wire.NotPlain):
        wire.encode(value)


def test_outputs_match_follows_evalplus():
    assert outputs_match([1, 2], [1, 2], 0.0) and not outputs_match((1, 2), [1, 2], 0.0)
    assert outputs_match(0.1 + 0.2, 0.3, 0.0) and not outputs_match(0.31, 0.3, 0.0) and outputs_match(0.31, 0.3, 0.05)
    assert outputs_match([1.0, 2.0 + 1e-9], [1.0, 2.0], 0.0)
    assert outputs_match(float("nan"), float("nan"), 1e-6)
    assert outputs_match([3, 1], [1, 3], 0.0, "set_eq") and not outputs_match(5, [5], 0.0, "set_eq")
    assert outputs_match(0, 17, 0.0, "zero_ok") and outputs_match("anything", 1, 0.0, "always")
    assert outputs_match(True, True, 0.0, "not_none") and not outputs_match(1, True, 0.0, "not_none")
    big = list(range(300000))
    assert outputs_match(wire.digest(big), wire.digest(big), 0.0)
    assert not outputs_match(big, wire.digest(big), 0.0)


# ------------------------------------------------------------------ the trusted/child split


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and a fresh uid need root")
def test_child_runs_isolated_under_a_fresh_uid():
    with Child(FAST) as child:
        assert child.isolated is True and child.landlock is (True if landlock_available() else False)
        child.load("import os\ndef f(x):\n    return [os.getuid(), os.getgid(), os.getgroups(), os.getpid()]\n", "f")
        (uid, gid, groups, pid), _ = child.call([0], limit=2.0)
    assert uid >= 1_000_000 and gid == uid and groups == [] and pid == 1


def test_child_calls_return_plain_values_and_failures_raise():
    with Child(FAST) as child:
        child.load("def f(x, y=1):\n    return object() if x == 'obj' else (x, {y}, b'z', 1j, None)\n", "f")
        assert child.call([[1]], {"y": 2}, limit=2.0)[0] == ([1], {2}, b"z", 1j, None)
        with pytest.raises(CandidateFailure, match="not plain"):
            child.call(["obj"], limit=2.0)
        with pytest.raises(CandidateFailure, match="unhashable"):
            child.call([1], {"y": []}, limit=2.0)
        assert child.call([2], limit=2.0)[0][0] == 2  # a failed call leaves the child usable
    with Child(FAST) as child:
        child.load("import time\ndef f():\n    time.sleep(30)\n", "f")
        start = time.monotonic()
        with pytest.raises(CandidateFailure, match="timed out"):
            child.call([], limit=0.5)
        assert time.monotonic() - start < 0.5 + 3
    with Child(FAST) as child:
        with pytest.raises(CandidateFailure, match="defines no function"):
            child.load("g = 1\n", "f")


def test_humaneval_check_runs_in_the_trusted_process():
    # the check reads a file only the trusted process can see and calls a helper of the prelude
    test = "def check(candidate):\n    assert candidate(2) == helper(2)\n    assert trusted_only() == 'here'\n"
    prelude = "import os\ndef helper(x):\n    return x + 1\ndef trusted_only():\n    return 'here' if os.getpid() > 1 else 'child'\n"
    assert run_tests(check_job(GOOD, test=test, prelude=prelude), FAST).passed
    res = run_tests(check_job("def f(x):\n    return {'x'}\n", test=test, prelude=prelude), FAST)
    assert not res.passed and "AssertionError" in res.error


@pytest.mark.skipif(not landlock_available(), reason="Landlock is not available on this kernel")
def test_the_gcache_package_is_hidden_but_other_files_read():
    import gcache.io.tasks.sandbox as sandbox

    data = os.path.join(sandbox.PACKAGE_DIR, "data")
    readme = os.path.join(os.path.dirname(sandbox.PACKAGE_DIR), "README.md")
    program = ("def f(path):\n    try:\n        with open(path, 'rb') as fh:\n            fh.read(1)\n"
               "        return 'read'\n    except PermissionError:\n        return 'denied'\n")
    test = (f"def check(candidate):\n    assert candidate({os.path.join(data, 'HumanEval.jsonl.gz')!r}) == 'denied'\n"
            f"    assert candidate({readme!r}) == 'read'\n    assert candidate('/etc/passwd') == 'read'\n")
    res = run_tests(check_job(program, test=test), FAST)
    assert res.passed, res.error
