import json

import pytest

from gcache.io.runlog import RESULTS, RunLog, read_records, summarize


def _record(i, phase="eval", correct=True):
    return {
        "id": str(i), "phase": phase, "gold": "1", "prediction": "1", "correct": correct,
        "tokens": {"prompt": 3, "latent": 2, "generated": 1}, "seconds": 0.5,
        "edges": [], "trace": [], "error": None,
    }


def test_append_then_reopen_knows_what_is_done(tmp_path):
    run = RunLog.open(tmp_path, resume=False)
    run.append(_record(0))
    run.append(_record(1, correct=False))
    again = RunLog.open(tmp_path, resume=True)
    assert again.is_done("eval", "0") and again.is_done("eval", "1")
    assert not again.is_done("train", "0")
    with pytest.raises(ValueError, match="already"):
        again.append(_record(0))


def test_existing_results_need_resume(tmp_path):
    RunLog.open(tmp_path, resume=False).append(_record(0))
    with pytest.raises(ValueError, match="--resume"):
        RunLog.open(tmp_path, resume=False)


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    run = RunLog.open(tmp_path, resume=False)
    run.append(_record(0))
    with (tmp_path / RESULTS).open("ab") as f:
        f.write(json.dumps(_record(1)).encode()[:20])  # a kill -9 in the middle of a write
    again = RunLog.open(tmp_path, resume=True)
    assert [r["id"] for r in again.records] == ["0"]
    again.append(_record(1))
    assert [r["id"] for r in read_records(tmp_path / RESULTS)] == ["0", "1"]


def test_missing_fields_are_refused(tmp_path):
    run = RunLog.open(tmp_path, resume=False)
    bad = _record(0)
    del bad["trace"]
    with pytest.raises(ValueError, match="trace"):
        run.append(bad)


def test_summarize_counts():
    s = summarize([_record(0), _record(1, correct=False)])
    assert s["n"] == 2 and s["accuracy"] == 0.5
    assert s["tokens"] == {"prompt": 6, "latent": 4, "generated": 2}
