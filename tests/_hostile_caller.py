"""Score one hostile completion from a fresh process, as a user's run would; print what the
hostile-candidate tests check, as JSON: the verdict, the seconds it took, the growth of this
process's peak memory, and the limit the scorer used.

    python tests/_hostile_caller.py ITEM_ID COMPLETION_FILE VICTIM_DIR UID_BASE
"""

import json
import resource
import sys
import time

from gcache.io import sandbox, tasks


def main(item_id: str, path: str, victim: str, uid_base: int) -> None:
    # Candidates of this run get uids no other run uses, so the test can find their processes.
    sandbox._UIDS = (uid_base, uid_base + 1000)
    task = "humaneval" if item_id.startswith("HumanEval/") else "mbppplus"
    item = next(it for split in ("test", "train") for it in tasks.load_items(task, split) if it.id == item_id)
    text = open(path).read().replace("__VICTIM__", victim).replace("__GCACHE_PACKAGE__", sandbox.PACKAGE_DIR)
    # Imports, datasets and expected outputs load once per process: not the candidate's doing.
    warm = tasks.score(item, tasks.gold_replies(item)[0])
    limit = tasks._limits_for(item, tasks._code_job(item, "")).wall_s
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    verdict = tasks.score(item, text)
    seconds = time.monotonic() - start
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"correct": verdict.correct, "error": verdict.error, "seconds": seconds, "limit_s": limit,
                      "grown_mib": grown_kib / 1024, "warm_correct": warm.correct}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
