"""Shared pieces of the end-to-end benchmarks (e2e, batching, overhead).

Machine description, command-line flags every benchmark takes, one embedded model
shared by several pipelines, resident-memory sampling, nested exclusive timers,
medians, atomic JSON writing and rich tables. Benchmarks are run as scripts
(``python benchmarks/<name>.py``), so this module is imported as ``_common``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SMOKE_MODEL = "tiny-llama"


# --------------------------------------------------------------------------- machine


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_info() -> dict:
    """The CPU's model name and the vector extensions that choose float32/bf16 kernels (AVX2,
    AVX-512, AMX): results differ in the last bits, and speeds by several times, between kinds."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return {"model": fields.get("model name") or platform.processor(), "family": fields.get("cpu family"),
            "isa": [f for f in wanted if f in flags]}  # fmt: skip


def machine_info() -> dict:
    """Platform, CPU, Python, torch/transformers versions, torch threads and the load average now."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["source"] = source_info()
    return info


def source_info() -> dict | None:
    """The git commit of the code measured and the tracked files that differed from it (None outside git)."""
    import subprocess

    repo = ROOT.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": sorted(line[3:] for line in status.splitlines() if line.strip())}


# --------------------------------------------------------------------------- flags


def add_common_args(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """Flags every end-to-end benchmark takes (names as in `gcache run` where they exist)."""
    parser.add_argument("--model", default="smollm2-135m", help="local model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the loader's, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="cap for every decoding agent")
    parser.add_argument("--seed", type=int, default=0, help="question selection and run seed")
    parser.add_argument("--no-stop-at-answer", dest="stop_at_answer", action="store_false",
                        help="decode to EOS or --max-new-tokens even after the final answer line (gcache run's default stops)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CI check: model {SMOKE_MODEL!r} (tiny, random), two questions, few tokens")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the JSON (and tables) are written to")


def setup(args: argparse.Namespace) -> None:
    """Apply --threads and logging; in --smoke mode switch to the tiny model with few tokens."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a value >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif args.smoke:
        # A tiny model gains nothing from threads, and on a busy machine spinning threads slow it tenfold.
        torch.set_num_threads(1)
    if args.smoke:
        if args.out == RESULTS:  # never overwrite the measured results with a smoke run's
            args.out = Path(tempfile.gettempdir()) / "gcache_benchmarks_smoke"
        args.model = SMOKE_MODEL
        args.max_new_tokens = min(args.max_new_tokens, 6)


def add_micro_args(parser: argparse.ArgumentParser, *, reps: int) -> None:
    """Flags of the microbenchmarks (latent_step, fusion): model and where it runs, repetitions, seed, smoke."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the loader's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions per side (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 3 repetitions")


def micro_setup(args: argparse.Namespace) -> tuple[Any, int, int]:
    """Logging and --threads applied; the model (tiny and random in --smoke) with the repetitions
    and warm-up calls to run."""
    import logging

    from gcache.io.models.local import load_model, tiny_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.smoke:
        return tiny_model("llama", seed=args.seed), 3, 1
    return load_model(args.model, device=args.device, dtype=args.dtype), args.reps, args.warmup


# --------------------------------------------------------------------------- pipelines


def base_flags(args: argparse.Namespace) -> dict:
    """The `gcache run` flags shared by every method of a benchmark."""
    flags = {"task": "gsm8k", "model": args.model, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
             "temperature": 0.0, "stop_at_answer": args.stop_at_answer}
    if args.dtype is not None:
        flags["dtype"] = args.dtype
    return flags


def load_shared_model(config) -> Any:
    """The LocalModel every pipeline of the benchmark shares (loaded once)."""
    from gcache.io.runner.pipeline import load_local

    return load_local(config)


@contextlib.contextmanager
def sharing(local) -> Iterator[None]:
    """While active, build_pipeline gets ``local`` instead of loading the model again.

    build_pipeline stays the one place that decides what a method needs; only its model
    loading is short-circuited, and only for configs that name this very model.
    """
    from gcache.io.runner import pipeline as pipeline_module

    original = pipeline_module.load_local

    def shared(config):
        if config.model != local.name:
            return original(config)
        return local

    pipeline_module.load_local = shared
    try:
        yield
    finally:
        pipeline_module.load_local = original


def build_pipelines(flag_sets: dict[str, dict], local=None, rollouts=None) -> tuple[dict, Any]:
    """One Pipeline per named flag set (build_config rules apply), all sharing one local model (and the
    ``rollouts`` memo, when given: gcache.io.runner.communication.Rollouts)."""
    from gcache.io.runner.config import build_config
    from gcache.io.runner.pipeline import build_pipeline

    configs = {name: build_config(flags) for name, flags in flag_sets.items()}
    if local is None:
        local = load_shared_model(next(iter(configs.values())))
    with sharing(local):
        pipelines = {name: build_pipeline(c, rollouts=rollouts) for name, c in configs.items()}
    return pipelines, local


@contextlib.contextmanager
def short_decoding(pipeline, max_new_tokens: int) -> Iterator[None]:
    """Temporarily cap the pipeline's decoding (warm-up runs), restoring it afterwards."""
    decoding = pipeline.speaker.decoding
    pipeline.speaker.decoding = replace(decoding, max_new_tokens=max_new_tokens)
    try:
        yield
    finally:
        pipeline.speaker.decoding = decoding


def warm_up(pipelines: dict, item, max_new_tokens: int = 8) -> None:
    """Run every pipeline once on ``item`` with short decoding (first calls allocate and compile kernels)."""
    for pipeline in pipelines.values():
        with short_decoding(pipeline, max_new_tokens):
            pipeline.evaluate([item])


def dtype_name(local) -> str:
    return str(local.dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- memory


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - memory is reported as unknown
        return None


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the next RSS baseline is low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class MemoryWindow:
    """RSS seen while a block ran: at its start, and the highest sample during it (bytes)."""

    start: int | None
    peak: int | None = None

    @property
    def delta(self) -> int | None:
        return None if self.start is None or self.peak is None else max(self.peak - self.start, 0)


class RssSampler:
    """A daemon thread that samples the RSS every ``interval`` seconds; ``window()`` reports the peak of a block.

    In-process sampling keeps the methods interleaved question by question; the price is
    that the absolute RSS includes whatever the process already holds (the shared model,
    the other pipelines), so the per-method figure that isolates a method is the peak
    increase over the RSS at the start of its block, taken after releasing free heap pages.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._peak: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is None:
                return
            with self._lock:
                if self._peak is None or rss > self._peak:
                    self._peak = rss

    @contextlib.contextmanager
    def window(self) -> Iterator[MemoryWindow]:
        release_free_memory()
        start = current_rss()
        with self._lock:
            self._peak = start
        win = MemoryWindow(start)
        try:
            yield win
        finally:
            end = current_rss()
            with self._lock:
                peak = self._peak
            candidates = [x for x in (peak, end, start) if x is not None]
            win.peak = max(candidates) if candidates else None


def mb(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# --------------------------------------------------------------------------- timing


@dataclass
class Timers:
    """Exclusive wall time per category, for nested timed calls (a profiler's self time, by category).

    ``timed(cat)`` around a call adds its duration to ``cat`` minus the time of timed calls
    nested inside it, so categories never count the same second twice.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _stack: list[list] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, category: str) -> Iterator[None]:
        frame = [category, time.perf_counter(), 0.0]  # category, start, time of nested timed calls
        self._stack.append(frame)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - frame[1]
            self._stack.pop()
            self.seconds[category] = self.seconds.get(category, 0.0) + elapsed - frame[2]
            self.calls[category] = self.calls.get(category, 0) + 1
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, fn: Callable, category: str) -> Callable:
        def timed_call(*a, **k):
            with self.timed(category):
                return fn(*a, **k)

        timed_call.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed_call

    def inside(self, category: str) -> bool:
        return any(frame[0] == category for frame in self._stack)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


@contextlib.contextmanager
def patched(target: Any, name: str, replacement: Any) -> Iterator[None]:
    """Set ``target.name`` to ``replacement`` for the block (benchmark instrumentation only)."""
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# --------------------------------------------------------------------------- output


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def report_header(local: Any, args: Any, machine: dict, load_before: Any) -> dict:
    """The fields every benchmark JSON starts with: model, dtype, threads, torch, smoke, date, machine, loads."""
    import datetime as dt

    return {
        "model": local.name,
        "dtype": dtype_name(local),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "stop_at_answer": args.stop_at_answer,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table to stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    # Piped output (CI logs, tee) gets a wide table instead of 80 columns of wrapped headers.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def progress():
    """A rich progress bar on stderr for the benchmark's long loops."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=Console(stderr=True))
