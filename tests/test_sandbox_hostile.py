"""Hostile completions (tests/hostile/*.py), each scored from a fresh calling process.

Every file is a small program that answers its target item wrongly and attacks the scorer
(its first lines say which item and how). For each: the verdict is not correct, the caller
returns within the wall limit + 5 s, its peak memory grows by less than 64 MiB, no process
the candidate started is alive afterwards, no file outside the sandbox changed, and no
secret of the caller's environment shows in what comes back.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcache.io import sandbox

HERE = Path(__file__).resolve().parent
HOSTILE = sorted((HERE / "hostile").glob("*.py"))
SECRET = "sk-hostile-test-7f3a9c"


def _target(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# target: "), f"{path.name}: the first line must name the target item"
    return first.removeprefix("# target: ").strip()


def _processes_of(uids: range) -> list[tuple[int, int]]:
    """(pid, uid) of live (non-zombie) processes whose real uid is in `uids`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "-1 0").split()[0])
        if uid in uids and not fields.get("State", "").strip().startswith("Z"):
            found.append((int(entry), uid))
    return found


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="process accounting by uid needs the root sandbox (fresh uids)")
@pytest.mark.parametrize("path", HOSTILE, ids=[p.stem for p in HOSTILE])
def test_hostile_completion_is_contained(path, tmp_path):
    victim = tmp_path / "victim"
    (victim / "folder").mkdir(parents=True)
    (victim / "keep.txt").write_text("keep me")
    (victim / "folder" / "inner.txt").write_text("keep me too")
    watched = {"victim": victim, "package": Path(sandbox.PACKAGE_DIR) / "data"}
    before = {name: _snapshot(folder) for name, folder in watched.items()}
    uid_base = 3_000_000 + random.randrange(1000) * 1000
    env = dict(os.environ, GCACHE_HOSTILE_API_KEY=SECRET, HF_TOKEN=SECRET, MY_PASSWORD=SECRET)
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(HERE / "_hostile_caller.py"), _target(path), str(path), str(victim),
                           str(uid_base)], capture_output=True, text=True, env=env, timeout=900)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["warm_correct"], "the canonical solution of the target must pass first"
    assert report["correct"] is False, report
    assert report["seconds"] < report["limit_s"] + 5, report
    assert report["grown_mib"] < 64, report
    assert SECRET not in done.stdout + done.stderr
    assert _processes_of(range(uid_base, uid_base + 1000)) == []
    assert {name: _snapshot(folder) for name, folder in watched.items()} == before
    assert elapsed < 900
