import json
import os

import pytest

from gcache.io.records.runlog import RESULTS, RunLog, latest_records, read_records, summarize


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


def _failed(i, phase="eval"):
    return {**_record(i, phase, correct=False), "prediction": None, "error": "ApiConnectionError: API down"}


def test_an_errored_question_takes_a_new_line_and_the_latest_line_counts(tmp_path):
    run = RunLog.open(tmp_path, resume=False)
    run.append(_failed(0))
    run.append(_record(1))
    assert run.has("eval", "0") and not run.is_done("eval", "0")
    run.append(_failed(0))  # a retry that failed again
    again = RunLog.open(tmp_path, resume=True)
    again.append(_record(0))
    assert again.is_done("eval", "0")
    with pytest.raises(ValueError, match="already answered"):
        again.append(_failed(0))  # an answered question is never appended again
    lines = read_records(tmp_path / RESULTS)
    assert [(r["id"], r["error"] is None) for r in lines] == [("0", False), ("1", True), ("0", False), ("0", True)]
    s = summarize(lines)
    assert (s["n"], s["correct"], s["errors"], s["retries"]) == (2, 2, 0, 2)
    assert [r["id"] for r in latest_records(lines)] == ["0", "1"]


def test_summarize_counts_an_errored_latest_line_as_an_error():
    s = summarize([_record(0), _failed(1), _record(2), _failed(2)])
    assert (s["n"], s["errors"], s["retries"], s["correct"]) == (3, 2, 1, 1)


def test_the_same_id_in_two_phases_is_two_questions(tmp_path):
    run = RunLog.open(tmp_path, resume=False)
    run.append(_record(0, phase="train"))
    run.append(_record(0, phase="eval"))
    assert summarize(run.records)["retries"] == 0


def _spy_on_the_file_calls(monkeypatch, short_by: int = 0) -> list[tuple]:
    """Record os.open/write/fsync/close as RunLog.append makes them (they still happen)."""
    calls: list[tuple] = []
    real = {name: getattr(os, name) for name in ("open", "write", "fsync", "close")}

    def spy(name):
        def call(*args, **kwargs):
            if name == "write":
                fd, data = args
                calls.append(("write", fd, bytes(data)))
                return real["write"](fd, data[: len(data) - short_by])
            result = real[name](*args, **kwargs)
            calls.append((name, result if name == "open" else args[0]))
            return result

        return call

    for name in real:
        monkeypatch.setattr(os, name, spy(name))
    return calls


def test_append_is_one_write_of_the_whole_line_then_an_fsync_before_it_returns(tmp_path, monkeypatch):
    run = RunLog.open(tmp_path, resume=False)
    record = _record(7)
    calls = _spy_on_the_file_calls(monkeypatch)
    run.append(record)
    seen = list(calls)  # what had happened when append returned
    monkeypatch.undo()
    (_, fd), *middle, last = seen
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    assert middle == [("write", fd, line), ("fsync", fd)], "one write of the whole line, then fsync"
    assert last == ("close", fd)
    assert (tmp_path / RESULTS).read_bytes() == line


def test_a_short_write_is_an_error_not_a_silently_torn_line(tmp_path, monkeypatch):
    run = RunLog.open(tmp_path, resume=False)
    _spy_on_the_file_calls(monkeypatch, short_by=5)
    with pytest.raises(OSError, match="short write"):
        run.append(_record(0))
    monkeypatch.undo()
    assert not run.is_done("eval", "0")
    again = RunLog.open(tmp_path, resume=True)  # the torn line is cut on the next open
    assert again.records == [] and (tmp_path / RESULTS).read_bytes() == b""
