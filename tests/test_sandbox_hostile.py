"""Hostile completions (tests/hostile/*.py) scored through `tasks.score` from fresh calling processes.

Every file is a small program that answers its target item wrongly and attacks the scorer
(its first lines say which item and how). The completions of each target task are scored in
sequence by one fresh process (tests/_hostile_caller.py), the two tasks side by side. For
each completion: the verdict is not correct, the call returns within the wall limit + 5 s,
the caller's peak memory grows by less than 64 MiB, no process the candidate started is alive
afterwards, no file outside the sandbox changed, and no secret of the caller's environment
shows in anything that comes back.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gcache.io.tasks import sandbox

HERE = Path(__file__).resolve().parent
HOSTILE = sorted((HERE / "hostile").glob("*.py"))
SECRET = "sk-hostile-test-7f3a9c"


def _target(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# target: "), f"{path.name}: the first line must name the target item"
    return first.removeprefix("# target: ").strip()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """Every hostile completion scored; per file its report, plus the caller's output and the
    watched folders before and after."""
    victim = tmp_path_factory.mktemp("hostile") / "victim"
    (victim / "folder").mkdir(parents=True)
    (victim / "keep.txt").write_text("keep me")
    (victim / "folder" / "inner.txt").write_text("keep me too")
    watched = {"victim": victim, "package": Path(sandbox.PACKAGE_DIR) / "data"}
    before = {name: _snapshot(folder) for name, folder in watched.items()}
    env = dict(os.environ, GCACHE_HOSTILE_API_KEY=SECRET, HF_TOKEN=SECRET, MY_PASSWORD=SECRET)
    groups: dict[str, list[str]] = {}
    for path in HOSTILE:
        groups.setdefault(_target(path).split("/")[0], []).append(str(path))
    procs = []
    for n, paths in enumerate(groups.values()):
        uid_base = 3_000_000 + random.randrange(100) * 100_000 + n * 50_000
        cmd = [sys.executable, str(HERE / "_hostile_caller.py"), str(victim), str(uid_base), *paths]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    reports, output = {}, ""
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, stderr[-3000:]
        output += stdout + stderr
        for line in stdout.splitlines():
            report = json.loads(line)
            reports[report["path"]] = report
    after = {name: _snapshot(folder) for name, folder in watched.items()}
    return {"reports": reports, "output": output, "before": before, "after": after}


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="finding the candidate's processes by uid needs the root sandbox")
@pytest.mark.parametrize("path", HOSTILE, ids=[p.stem for p in HOSTILE])
def test_hostile_completion_is_contained(path, scored):
    report = scored["reports"][str(path)]
    assert report["warm_correct"], "the canonical solution of the target must pass first"
    assert report["correct"] is False, report
    assert report["seconds"] < report["limit_s"] + 5, report
    assert report["grown_mib"] < 64, report
    assert report["alive"] == [], report


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="finding the candidate's processes by uid needs the root sandbox")
def test_hostile_completions_leave_files_and_secrets_alone(scored):
    assert scored["after"] == scored["before"]
    assert SECRET not in scored["output"]
    assert len(scored["reports"]) == len(HOSTILE)
