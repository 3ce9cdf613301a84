"""A run's folder: results.jsonl (one line per attempt at a question), summary.json, config.json.

results.jsonl is append-only. Each line is written with one `write` of the whole
line and fsync'ed before `append` returns, so a run stopped by Ctrl-C or kill -9
leaves at most one torn last line; `RunLog` drops such a line when it opens the
file again.

A question may have several lines: one whose ``error`` is set (the API was down,
say) and, after ``--resume`` retried it, a later one. The *latest* line of each
(phase, id) is the question's result: summaries count those, and ``retries`` says
how many earlier lines they replaced. A question whose latest line holds no error
is answered and is never appended again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from gcache.io.records.stats import mean_ci

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
PARAMS = "params.safetensors"
STATE = "train_state.safetensors"

RECORD_FIELDS = (
    "id",
    "phase",
    "gold",
    "prediction",
    "correct",
    "tokens",
    "seconds",
    "edges",
    "trace",
    "error",
)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path`` (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_records(path: Path) -> list[dict]:
    """The complete lines of a results.jsonl; a torn last line (an interrupted write) is skipped."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s: dropping an incomplete last line %d (the run was interrupted)", path, n)
                break
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e})") from None
    return records


def _key(record: dict) -> tuple[str, str]:
    return record["phase"], str(record["id"])


def latest_records(records: Iterable[dict]) -> list[dict]:
    """The latest line of each (phase, id), in the order the questions first appeared."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        latest[_key(r)] = r  # a re-assigned key keeps its first position
    return list(latest.values())


@dataclass
class RunLog:
    """Appends question records to ``folder/results.jsonl``; knows each question's latest line."""

    folder: Path
    records: list[dict] = field(default_factory=list)  # every line, in file order
    latest: dict[tuple[str, str], dict] = field(default_factory=dict)  # (phase, id) -> its latest line

    @classmethod
    def open(cls, folder: Path | str, *, resume: bool) -> "RunLog":
        """Open a run folder. Without ``resume`` an existing results.jsonl is an error
        (nothing already computed is overwritten)."""
        folder = Path(folder)
        path = folder / RESULTS
        if path.exists() and path.stat().st_size and not resume:
            raise ValueError(
                f"out: {folder} already holds results; pass --resume to continue it or choose another --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        records = read_records(path)
        _truncate_to_complete_lines(path)
        return cls(folder, records, {_key(r): r for r in records})

    @property
    def path(self) -> Path:
        return self.folder / RESULTS

    def has(self, phase: str, qid: str) -> bool:
        """Whether the question has a line (answered or errored)."""
        return (phase, str(qid)) in self.latest

    def is_done(self, phase: str, qid: str) -> bool:
        """Whether the question's latest line holds an answer without error."""
        latest = self.latest.get((phase, str(qid)))
        return latest is not None and latest["error"] is None

    def append(self, record: dict) -> None:
        """Append one record as one line and make it durable (one write, then fsync) before returning.

        Raises ValueError when a field is missing, or when the question already has an
        answer without error (a question is answered at most once after its last error);
        OSError when the line could not be written whole.
        """
        missing = [k for k in RECORD_FIELDS if k not in record]
        if missing:
            raise ValueError(f"record: missing fields {missing}")
        key = _key(record)
        if self.is_done(*key):
            raise ValueError(f"record: question {key[1]} of phase {key[0]} is already answered in {self.path}")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # One write: with O_APPEND the line lands whole at the end, never interleaved. A short
            # write (a full disk) leaves a torn line, which the next open cuts: fail loudly here.
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes); the disk may be full")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)
        self.latest[key] = record

    def phase_records(self, phase: str) -> list[dict]:
        """Every line of a phase, retried questions' earlier lines included (``summarize`` keeps the latest)."""
        return [r for r in self.records if r["phase"] == phase]


def _truncate_to_complete_lines(path: Path) -> None:
    """Cut a torn last line so the next append starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)


def summarize(records: Iterable[dict]) -> dict:
    """Accuracy, token totals, seconds and errors over the lines of one phase, and the mean
    answer log-probability with its 95% bootstrap interval (gcache.io.records.stats.mean_ci) over the
    questions that carry a finite ``answer_logprob`` (None when none does), and likewise the mean
    contrastive ``margin`` (routing questions; None when none carries one).

    Each question counts once, by its latest line; ``retries`` is the number of earlier
    lines (errored attempts that a later line replaced).
    """
    lines = list(records)
    records = latest_records(lines)
    n = len(records)
    tokens = {"prompt": 0, "latent": 0, "generated": 0}
    for r in records:
        for k in tokens:
            tokens[k] += int((r.get("tokens") or {}).get(k, 0))
    decoded = [r for r in records if r.get("correct") is not None]  # correct is None: not decoded
    correct = sum(bool(r["correct"]) for r in decoded)
    logprobs = [float(v) for v in (r.get("answer_logprob") for r in records) if _finite(v)]
    margins = [float(v) for v in (r.get("margin") for r in records) if _finite(v)]
    return {
        "n": n,
        "accuracy": correct / len(decoded) if decoded else None,
        "correct": correct,
        "tokens": tokens,
        "seconds": sum(float(r.get("seconds") or 0.0) for r in records),
        "errors": sum(r.get("error") is not None for r in records),
        "retries": len(lines) - n,
        "answer_logprob": mean_ci(logprobs).as_dict() if logprobs else None,
        "margin": mean_ci(margins).as_dict() if margins else None,
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
