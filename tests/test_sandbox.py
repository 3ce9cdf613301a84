"""Hostile candidates are contained, reported as failures, and leave the test process unharmed."""

import os
import time

import pytest

from gcache.io.sandbox import Limits, child_environment, landlock_available, run_many, run_tests

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
    import gcache.io.sandbox as sandbox

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
