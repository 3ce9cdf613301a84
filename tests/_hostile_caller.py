"""Score hostile completions one after another from one fresh process, as a user's run would;
print, per completion, what the hostile-candidate tests check (JSON lines): the verdict, the
seconds it took against the scorer's wall limit, the growth of this process's peak memory,
the processes of the candidate's uids still alive afterwards.

    python tests/_hostile_caller.py VICTIM_DIR UID_BASE COMPLETION_FILE...
"""

import json
import os
import resource
import sys
import time

from gcache.io.tasks import datasets, programs, sandbox, scoring

_UIDS_PER_FILE = 1000


def live_processes(uids: range) -> list[int]:
    """Pids of live (non-zombie) processes whose real uid is in `uids`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        if int(fields.get("Uid", "-1").split()[0]) in uids and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(entry))
    return found


def item_for(item_id: str) -> datasets.Item:
    task = "humaneval" if item_id.startswith("HumanEval/") else "mbppplus"
    return next(it for split in ("test", "train") for it in datasets.load_items(task, split) if it.id == item_id)


def main(victim: str, uid_base: int, paths: list[str]) -> None:
    for k, path in enumerate(paths):
        # Each completion's candidates get uids no other run uses, so their processes can be found.
        uids = range(uid_base + k * _UIDS_PER_FILE, uid_base + (k + 1) * _UIDS_PER_FILE)
        sandbox._UIDS = (uids.start, uids.stop)
        text = open(path).read()
        item = item_for(text.splitlines()[0].removeprefix("# target: ").strip())
        text = text.replace("__VICTIM__", victim).replace("__GCACHE_PACKAGE__", sandbox.PACKAGE_DIR)
        # Imports, datasets and expected outputs load once per process: not the candidate's doing.
        warm = scoring.score(item, scoring.gold_replies(item)[0])
        limit = programs.limits_for(item, programs.code_job(item, "")).wall_s
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        verdict = scoring.score(item, text)
        seconds = time.monotonic() - start
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"path": path, "correct": verdict.correct, "error": verdict.error, "seconds": seconds,
                          "limit_s": limit, "grown_mib": grown_kib / 1024, "warm_correct": warm.correct,
                          "alive": live_processes(uids)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
