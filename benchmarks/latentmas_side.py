"""gcache's latent-mas beside the LatentMAS reference implementation, on the same GSM8K questions.

    python benchmarks/latentmas_side.py --reference-dir ~/LatentMAS           # 5 questions, 2 reps, 2 threads
    python benchmarks/latentmas_side.py --smoke --reference-dir ~/LatentMAS   # tiny random model, 1 question (CI)

The reference is the authors' code (https://github.com/Gen-Verse/LatentMAS), imported from a
checkout the user names with ``--reference-dir``; nothing of it is copied into gcache. Without
a checkout the script prints one line and exits 0 (as decode.py's vLLM section does without
vLLM). The reference's HF path runs as it is written, in this process, on the very model and
tokenizer gcache loaded (``load_model``: no download), with the runtime patches below.

Equal work. Both sides run LatentMAS's sequential method: planner -> critic -> refiner, each
reading its prompt on top of the full KV-cache of the agents before it (nothing truncated) and
running ``--latent-steps`` latent steps with the realignment matrix (the reference's
``latent_space_realign``, gcache's default), then a judger that reads the whole cache and
decodes greedily, float32. gcache's side is the pipeline that ``benchmarks/e2e.py`` builds for
its "latent-mas" method (``common.base_flags``), timed around ``Pipeline.evaluate``; the
reference's is ``LatentMASMethod.run_batch`` on one question. Per question gcache runs first;
its judger's decoded tokens (end-of-sequence token included, as transformers' ``generate``
counts it) become the reference judger's ``max_new_tokens`` for that question, so both decode
the same number of tokens unless the reference reaches its end-of-sequence token sooner (then
its count is recorded too). What still differs, recorded in the JSON: the prompts (each side's
own wording, chat-templated; the reference's are written for Qwen and ask for ``\\boxed{}``,
gcache's for a ``#### <number>`` line), so the prompt token counts differ (both recorded);
gcache's ``evaluate`` also scores the gold answer's log-probability on the judger's cache; the
reference's ``generate`` runs transformers' generation loop, gcache its own decoder.

Runtime patches of the reference (this script only, while it runs; the checkout is not edited):

- ``vllm``: ``methods/latent_mas.py`` imports ``vllm.SamplingParams`` at module level although
  the HF path only builds one and never uses it; without vLLM installed a stand-in module is
  registered.
- ``_past_length`` (``models``, ``methods.latent_mas``): it indexes ``past_key_values[0][0]``,
  and transformers 5's ``DynamicCache`` is not subscriptable; the patched function asks a
  ``Cache`` for ``get_seq_length()`` and leaves tuples to the original.
- the model handed to ``ModelWrapper`` (through stand-ins for ``AutoModelForCausalLM`` and
  ``AutoTokenizer`` in its module while it is built) is a thin proxy whose ``generate`` drops
  ``cache_position`` (transformers 5's ``generate`` rejects it as an unused model argument and
  derives the positions from the cache itself), decodes greedily (the reference hard-codes
  ``do_sample=True``) and records the new tokens; every other call goes to the model unchanged.
- the prompt builders assert that the model name contains "qwen": the reference's
  ``model_name`` is set to a name that does (only the assert reads it).

Per method: wall seconds per question (per rep), total and median per rep; gcache / reference
total per rep and its median over reps, and the median of the paired per-question ratios;
tokens per question on both sides; whether the two final answers agree (reported only).
Writes <out>/latentmas_side.json (after every question; ``complete`` says whether it finished).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import _common as common

REFERENCE_URL = "https://github.com/Gen-Verse/LatentMAS"
REFERENCE_FILES = ("models.py", "prompts.py", "utils.py", "methods/__init__.py", "methods/latent_mas.py")
REFERENCE_MODULES = ("models", "prompts", "utils", "methods", "methods.latent_mas")
WARMUP_TOKENS = 8


# --------------------------------------------------------------------------- the reference


def reference_missing(folder: Path | None) -> str | None:
    """Why ``folder`` is not a usable LatentMAS checkout (None when it is)."""
    if folder is None:
        return "no --reference-dir given"
    if not folder.is_dir():
        return f"no LatentMAS checkout at {folder}"
    missing = [f for f in REFERENCE_FILES if not (folder / f).is_file()]
    if missing:
        return f"{folder} is not a LatentMAS checkout (no {', '.join(missing)})"
    return None


def reference_commit(folder: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def import_reference(folder: Path) -> tuple[Any, Any]:
    """The reference's ``models`` and ``methods.latent_mas`` modules, imported from ``folder`` (its
    top-level names are generic: refuse when a module of one of them is already loaded)."""
    taken = [m for m in REFERENCE_MODULES if m in sys.modules]
    if taken:
        raise SystemExit(f"latentmas_side: modules {taken} are already loaded; the reference's would clash")
    if importlib.util.find_spec("vllm") is None:
        # Patch 1: the HF path builds a SamplingParams it never uses; a stand-in keeps the import working.
        stand_in = types.ModuleType("vllm")
        stand_in.SamplingParams = lambda **kwargs: dict(kwargs)  # type: ignore[attr-defined]
        stand_in.LLM = None  # type: ignore[attr-defined]
        sys.modules["vllm"] = stand_in
    sys.path.insert(0, str(folder))
    try:
        import methods.latent_mas as latent_mas  # type: ignore[import-not-found]
        import models  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(folder))
    for module in (models, latent_mas):
        if not Path(module.__file__).resolve().is_relative_to(folder.resolve()):
            raise SystemExit(f"latentmas_side: {module.__name__} came from {module.__file__}, not {folder}")
    # Patch 2: transformers 5's DynamicCache is not subscriptable; ask it for its length.
    from transformers.cache_utils import Cache

    original = models._past_length

    def past_length(past_key_values: Any) -> int:
        if isinstance(past_key_values, Cache):
            return int(past_key_values.get_seq_length())
        return original(past_key_values)

    models._past_length = past_length
    latent_mas._past_length = past_length
    return models, latent_mas


class GreedyModel:
    """The transformers model as the reference's ModelWrapper holds it (patch 3): every attribute and
    call go to the model, except ``generate``, which decodes greedily, drops ``cache_position`` and
    records how many tokens it generated (end-of-sequence token included)."""

    def __init__(self, model: Any) -> None:
        self.__dict__["_model"] = model
        self.__dict__["last_new_tokens"] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def generate(self, *, input_ids: Any, **kwargs: Any) -> Any:
        kwargs.pop("cache_position", None)
        for sampling in ("do_sample", "temperature", "top_p", "top_k"):
            kwargs.pop(sampling, None)
        out = self._model.generate(input_ids=input_ids, do_sample=False, temperature=None, top_p=None, top_k=None,
                                   **kwargs)  # fmt: skip
        self.__dict__["last_new_tokens"] = int(out.sequences.shape[1] - input_ids.shape[1])
        return out


class Reference:
    """LatentMAS's ``LatentMASMethod`` (sequential prompts, HF path) around gcache's loaded model."""

    def __init__(self, folder: Path, local: Any, *, latent_steps: int, max_new_tokens: int) -> None:
        import torch

        models, latent_mas = import_reference(folder)
        self.folder = folder
        self.commit = reference_commit(folder)
        self.args = argparse.Namespace(
            # Patch 4: the prompt builders assert a Qwen model name; this one passes and names the real model.
            model_name=f"{local.name} (named qwen for the reference's prompt check)",
            method="latent_mas", task="gsm8k", prompt="sequential", think=False,
            latent_space_realign=True, latent_only=False, sequential_info_only=False,
            max_new_tokens=max_new_tokens, latent_steps=latent_steps, temperature=0.0, top_p=1.0,
            device=str(local.device), device2=str(local.device), use_vllm=False,
        )  # fmt: skip
        self.greedy = GreedyModel(local.model)
        model_loader = types.SimpleNamespace(from_pretrained=lambda *a, **k: self.greedy)
        tokenizer_loader = types.SimpleNamespace(from_pretrained=lambda *a, **k: local.tokenizer)
        with common.patched(models, "AutoModelForCausalLM", model_loader), \
                common.patched(models, "AutoTokenizer", tokenizer_loader):  # fmt: skip
            self.wrapper = models.ModelWrapper(self.args.model_name, torch.device(local.device), use_vllm=False,
                                               args=self.args)  # fmt: skip
        self.method = latent_mas.LatentMASMethod(
            self.wrapper, latent_steps=latent_steps, judger_max_new_tokens=max_new_tokens,
            temperature=0.0, top_p=1.0, generate_bs=1, args=self.args,
        )  # fmt: skip

    def run(self, item: Any, max_new_tokens: int) -> tuple[dict, int | None]:
        """One question with the judger capped at ``max_new_tokens``: the reference's result and the
        tokens its judger generated."""
        self.method.judger_max_new_tokens = max_new_tokens
        self.greedy.__dict__["last_new_tokens"] = None
        result = self.method.run_batch([{"question": item.question, "gold": item.gold, "solution": ""}])[0]
        return result, self.greedy.last_new_tokens


# --------------------------------------------------------------------------- gcache's side


class DecodedTokens:
    """Records the width of every Generation the pipeline's local decoding returns (tokens decoded,
    end-of-sequence token included): instrumentation of ``gcache.io.models.generation.generate``."""

    def __init__(self) -> None:
        self.widths: list[int] = []

    @contextlib.contextmanager
    def recording(self):
        from gcache.io.models import generation

        original = generation.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            gen = original(*args, **kwargs)
            self.widths.append(int(gen.tokens.shape[1]))
            return gen

        self.widths = []
        with common.patched(generation, "generate", generate):
            yield self


def same_answer(a: str | None, b: str | None) -> bool | None:
    """Whether two extracted answers name the same number (None when either is missing)."""
    if not a or not b:
        return None
    try:
        return float(str(a).replace(",", "")) == float(str(b).replace(",", ""))
    except ValueError:
        return str(a).strip().lower() == str(b).strip().lower()


def run_question(pipeline: Any, reference: Reference, item: Any, recorder: DecodedTokens) -> dict:
    """gcache then the reference on ``item``, the reference's judger capped at gcache's decoded tokens."""
    with recorder.recording():
        t0 = time.perf_counter()
        record = pipeline.evaluate([item])[0]
        g_seconds = time.perf_counter() - t0
    if record["error"] is not None:
        raise RuntimeError(f"gcache failed on {item.id}: {record['error']}")
    if len(recorder.widths) != 1:
        raise RuntimeError(f"expected one local decoding per question (the judger's), got {len(recorder.widths)}")
    cap = recorder.widths[0]
    t0 = time.perf_counter()
    result, r_generated = reference.run(item, cap)
    r_seconds = time.perf_counter() - t0
    r_prompt = sum(len(a.get("input_ids", [])) for a in result["agents"])
    return {
        "id": item.id,
        "gold": item.gold,
        "gcache": {
            "seconds": round(g_seconds, 4),
            "decoded_tokens": cap,
            "answer_tokens": record["tokens"]["generated"],
            "prompt_tokens": record["tokens"]["prompt"],
            "latent_tokens": record["tokens"]["latent"],
            "prediction": record["prediction"],
            "correct": record["correct"],
            "answer": (record["answer"] or "")[:300],
        },
        "reference": {
            "seconds": round(r_seconds, 4),
            "max_new_tokens": cap,
            "decoded_tokens": r_generated,
            "stopped_early": r_generated is not None and r_generated < cap,
            "prompt_tokens": r_prompt,
            "latent_tokens": 3 * reference.method.latent_steps,
            "prediction": result["prediction"],
            "correct": bool(result["correct"]),
            "answer": (result["raw_prediction"] or "")[:300],
        },
        "ratio": round(g_seconds / r_seconds, 4),
        "answers_agree": same_answer(record["prediction"], result["prediction"]),
    }


# --------------------------------------------------------------------------- report


def side_summary(rows: list[dict], side: str) -> dict:
    seconds = [r[side]["seconds"] for r in rows]
    return {
        "seconds": seconds,
        "seconds_total": round(sum(seconds), 3),
        "seconds_median": round(common.median(seconds), 3),
        "decoded_tokens": [r[side]["decoded_tokens"] for r in rows],
        "prompt_tokens": [r[side]["prompt_tokens"] for r in rows],
        "correct": sum(bool(r[side]["correct"]) for r in rows),
    }


def build_report(reps: list[list[dict]], *, n: int, complete: bool, args, local, reference: Reference, machine,
                 load_before, started) -> dict:  # fmt: skip
    per_rep = []
    for i, rows in enumerate(reps):
        g, r = side_summary(rows, "gcache"), side_summary(rows, "reference")
        done = len(rows) == n
        ratio = sum(g["seconds"]) / sum(r["seconds"]) if done else None
        per_rep.append({"rep": i + 1, "questions": len(rows), "gcache": g, "reference": r,
                        "ratio_total": None if ratio is None else round(ratio, 4)})  # fmt: skip
    totals = [p["ratio_total"] for p in per_rep if p["ratio_total"] is not None]
    paired = [row["ratio"] for rows in reps for row in rows]
    first = reps[0] if reps else []  # greedy: every rep decodes the same answers
    return {
        **common.report_header(local, args, machine, load_before),
        "n": n,
        "reps": args.reps,
        "complete": complete,
        "settings": {
            "task": "gsm8k",
            "split": "test",
            "seed": args.seed,
            "latent_steps": args.latent_steps,
            "thinking_agents": 3,
            "kv_passed": "full (every agent's cache accumulates; the judger reads all of it)",
            "realignment": "least-squares realignment matrix and norm rescaling on both sides",
            "decoding": "greedy, float32; the reference's judger capped at gcache's decoded tokens per question",
            "gcache_max_new_tokens": args.max_new_tokens,
            "gcache_stop_at_answer": args.stop_at_answer,
            "order": "per question: gcache, then the reference (the reference's cap comes from gcache's run); "
                     f"one warm-up question each first ({WARMUP_TOKENS} tokens)",
            "ratio": "gcache seconds / reference seconds (below 1: gcache is faster)",
        },
        "reference": {
            "repository": REFERENCE_URL,
            "dir": str(reference.folder),
            "commit": reference.commit,
            "entry": "methods.latent_mas.LatentMASMethod.run_batch (HF path, prompt 'sequential', think off, "
                     "latent_space_realign on)",
            "runtime_patches": [
                "vllm: stand-in module when vLLM is not installed (methods/latent_mas.py imports SamplingParams "
                "at module level; the HF path never uses it)",
                "_past_length: transformers 5 DynamicCache is not subscriptable; get_seq_length() for a Cache",
                "generate: cache_position dropped (transformers 5 rejects it; positions come from the cache), "
                "greedy instead of the hard-coded sampling, new tokens recorded",
                "model_name: contains 'qwen' so the prompt builders' assert passes",
                "ModelWrapper built around gcache's loaded model and tokenizer (no download)",
            ],
        },
        "differences": [
            "prompts: each side's own (the reference's name Qwen in the system message and ask for \\boxed{}; "
            "gcache's ask for a '#### <number>' line); prompt_tokens differ and are recorded per question",
            "gcache's evaluate also scores the gold answer's log-probability on the judger's cache and "
            "checks after each line break whether the answer is complete (stop_at_answer)",
            "decoding loop: transformers' generate on the reference's side, gcache's decoder on its own",
        ],
        "ratio_total_per_rep": totals,
        "ratio_total_median": round(common.median(totals), 4) if totals else None,
        "ratio_per_question_median": round(common.median(paired), 4) if paired else None,
        "answers_agree": sum(bool(r["answers_agree"]) for r in first),
        "reference_stopped_early": sum(bool(r["reference"]["stopped_early"]) for r in first),
        "per_rep": per_rep,
        "per_question": [dict(r, rep=i + 1) for i, rows in enumerate(reps) for r in rows],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, max_new_tokens=256)
    for action in parser._actions:
        if action.dest == "threads":
            action.help = "torch threads (default: 2; 1 with --smoke)"
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help=f"a checkout of {REFERENCE_URL} (without one the script prints a line and exits 0)")
    parser.add_argument("-n", "--n", type=int, default=5, help="GSM8K test questions (the first n of the seeded split)")
    parser.add_argument("--latent-steps", type=int, default=10, help="latent steps per thinking agent")
    parser.add_argument("--reps", type=int, default=2, help="times the whole set of questions is run")
    args = parser.parse_args(argv)
    why = reference_missing(args.reference_dir)
    if why is not None:
        print(f"latentmas_side: skipped: {why} (clone {REFERENCE_URL} and pass --reference-dir)")
        return 0
    if args.threads is None:
        args.threads = 1 if args.smoke else 2
    common.setup(args)
    if args.smoke:
        args.n, args.latent_steps, args.reps = 1, min(args.latent_steps, 2), 1
    for flag in ("n", "reps", "latent_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected a value >= 1, got {getattr(args, flag)}")
    warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
    load_before = common.load_average()
    machine = common.machine_info()  # before the library is imported: the code measured is the code recorded
    started = time.perf_counter()

    from gcache.io.tasks.datasets import load_items

    items = load_items("gsm8k", "test", limit=args.n + 1, seed=args.seed)
    warm_item, items = items[-1], items[: args.n]
    flags = dict(common.base_flags(args), method="latent-mas", latent_steps=args.latent_steps)
    pipelines, local = common.build_pipelines({"latent-mas": flags})
    pipeline = pipelines["latent-mas"]
    reference = Reference(args.reference_dir.resolve(), local, latent_steps=args.latent_steps,
                          max_new_tokens=args.max_new_tokens)  # fmt: skip
    recorder = DecodedTokens()
    with common.short_decoding(pipeline, WARMUP_TOKENS):
        run_question(pipeline, reference, warm_item, recorder)

    out = args.out / "latentmas_side.json"
    context = dict(n=len(items), args=args, local=local, reference=reference, machine=machine,
                   load_before=load_before, started=started)  # fmt: skip
    reps: list[list[dict]] = []
    with common.progress() as bar:
        task = bar.add_task("latentmas_side", total=args.reps * len(items), status="")
        for rep in range(args.reps):
            reps.append([])
            for item in items:
                bar.update(task, status=f"rep {rep + 1} {item.id}")
                reps[-1].append(run_question(pipeline, reference, item, recorder))
                bar.advance(task)
                complete = rep + 1 == args.reps and len(reps[-1]) == len(items)
                common.write_json(out, build_report(reps, complete=complete, **context))

    report = build_report(reps, complete=True, **context)
    rows = []
    for p in report["per_rep"]:
        for side in ("gcache", "reference"):
            s = p[side]
            rows.append([f"rep {p['rep']} {side}", s["seconds_median"], s["seconds_total"], sum(s["decoded_tokens"]),
                         sum(s["prompt_tokens"]), f"{s['correct']}/{p['questions']}",
                         p["ratio_total"] if side == "gcache" else None])  # fmt: skip
    common.print_table(
        f"latent-mas: gcache vs LatentMAS reference, GSM8K x{len(items)}, {local.name} {report['dtype']}, "
        f"{report['threads']} threads, {args.latent_steps} latent steps",
        ["side", "s/q median", "s total", "decoded tokens", "prompt tokens", "correct", "gcache/ref total"], rows,
    )
    print(f"gcache / reference: total per rep {report['ratio_total_per_rep']}, median {report['ratio_total_median']}; "
          f"paired per question median {report['ratio_per_question_median']}; answers agree "
          f"{report['answers_agree']}/{len(items)}; reference stopped early {report['reference_stopped_early']}")
    common.write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
