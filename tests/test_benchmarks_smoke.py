"""Smoke runs of the end-to-end benchmarks: each script, as a user runs it, on the tiny model.

The three scripts run concurrently in subprocesses (``--smoke --out <tmp>``); the tests
check that their JSON holds what the README and the issue promise, and that the figures
agree with each other (token totals with the settings, ratios with the totals, time
shares with the parts). Speed targets are not checked here: that is what the full
benchmarks are for.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("e2e", "batching", "overhead", "distributed")
METHODS = ("single", "text-mas", "latent-mas", "gcache")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict[str, dict]:
    """Run every benchmark with --smoke at once; their JSON reports by name (and the output folders)."""
    out = {}
    procs = {}
    for name in SCRIPTS:
        folder = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--out", str(folder)]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                       folder)
    for name, (proc, folder) in procs.items():
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}.py --smoke failed:\n{stdout[-4000:]}"
        report = json.loads((folder / f"{name}.json").read_text())
        out[name] = {"report": report, "folder": folder, "stdout": stdout}
    return out


def _recorded_environment(report: dict) -> None:
    assert report["smoke"] is True
    assert report["model"] == "tiny-llama"
    assert report["dtype"] == "float32"
    assert isinstance(report["threads"], int) and report["threads"] >= 1
    assert report["torch"]
    machine = report["machine"]
    for key in ("platform", "processor", "cpu_count", "python", "torch", "torch_threads"):
        assert key in machine


def test_e2e_schema_and_consistency(smoke):
    report = smoke["e2e"]["report"]
    _recorded_environment(report)
    assert report["n"] == 2
    settings = report["settings"]
    assert set(report["methods"]) == set(METHODS)
    for name, m in report["methods"].items():
        for key in ("accuracy", "seconds_total", "seconds_median", "generated_tokens", "processed_tokens", "peak_rss_mb"):
            assert key in m, (name, key)
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["seconds_total"] >= m["seconds_median"] > 0
        assert m["processed_tokens"] == m["prompt_tokens"] + m["latent_tokens"]
        # every decoding agent stops at max_new_tokens
        cap = m["decoding_agents_per_question"] * report["n"] * settings["max_new_tokens"]
        assert 0 < m["generated_tokens"] <= cap
        assert m["peak_rss_mb"] > 0 and m["peak_rss_delta_mb"] >= 0
    # latent tokens: latent_steps per thinking agent (3 for latent-mas, num_agents for gcache), none for text methods
    steps, n = settings["latent_steps"], report["n"]
    assert report["methods"]["latent-mas"]["latent_tokens"] == 3 * steps * n
    assert report["methods"]["gcache"]["latent_tokens"] == settings["num_agents"] * steps * n
    assert report["methods"]["single"]["latent_tokens"] == report["methods"]["text-mas"]["latent_tokens"] == 0
    # text-mas and gcache evaluate the same untrained policy: the same graph
    assert settings["edges"]["text-mas"] == settings["edges"]["gcache"]
    base = report["methods"]["text-mas"]
    for name, m in report["methods"].items():
        assert math.isclose(report["token_reduction_vs_text_mas"][name],
                            1 - m["generated_tokens"] / base["generated_tokens"], abs_tol=1e-4)
        assert report["speedup_vs_text_mas"][name] > 0
    assert report["speedup_vs_text_mas"]["text-mas"] == 1.0
    table = (smoke["e2e"]["folder"] / "e2e.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in table
    assert "speed-up" in smoke["e2e"]["stdout"]


def test_batching_schema(smoke):
    report = smoke["batching"]["report"]
    _recorded_environment(report)
    results = report["results"]
    assert [r["batch"] for r in results] == sorted(r["batch"] for r in results) and results[0]["batch"] == 1
    assert len(results) >= 2
    for r in results:
        assert r["questions_per_s"] > 0
        assert isinstance(r["equal_to_unbatched"], bool)
        assert math.isclose(r["questions_per_s"], report["settings"]["questions"] / r["seconds_median"], rel_tol=1e-2)
        equal, total = map(int, r["equal_answers"].split("/"))
        assert r["equal_to_unbatched"] == (equal == total)
        # the core's split was measured, and a batch's decoding loop runs at most max_new_tokens per batch
        core, n = r["core"], report["settings"]["questions"]
        assert core["prefill_seconds"] > 0 and core["latent_steps_seconds"] > 0 and core["decode_seconds"] > 0
        assert 1 <= core["decode_loop_steps"] <= -(-n // r["batch"]) * report["settings"]["max_new_tokens"]


def test_overhead_schema_and_shares(smoke):
    report = smoke["overhead"]["report"]
    _recorded_environment(report)
    for key in ("policy_ms", "fusion_ms", "model_ms", "fraction"):
        assert key in report
    # every instrumented part was actually reached
    assert report["policy_ms"] > 0 and report["fusion_ms"] > 0 and report["model_ms"] > 0
    assert report["phases"]["train"]["update_ms"] > 0
    assert report["phases"]["eval"]["update_ms"] == 0  # evaluation makes no optimizer step
    learned = report["policy_ms"] + report["fusion_ms"] + report["update_ms"]
    assert math.isclose(report["fraction"], learned / report["total_ms"], rel_tol=2e-2)
    parts = learned + report["model_ms"] + report["other_ms"]
    assert math.isclose(parts, report["total_ms"], rel_tol=2e-2)


def test_distributed_schema_and_same_answers(smoke):
    report = smoke["distributed"]["report"]
    assert report["smoke"] is True and report["model"] == "tiny-llama" and report["questions"] == 4
    assert report["same_answers"] is True, "2 ranks answer as 1 process"
    runs = report["runs"]
    assert set(runs) == {"1 process x 2 threads", "2 ranks x 1 thread"}
    for r in runs.values():
        assert r["questions_per_second"] > 0 and len(r["wall_seconds"]) == report["settings"]["reps"]
    one, two = runs["1 process x 2 threads"], runs["2 ranks x 1 thread"]
    assert report["speedup_two_ranks"]["questions_per_second"] == pytest.approx(
        two["questions_per_second"] / one["questions_per_second"], rel=1e-2
    )
    step = report["allreduce_per_training_step"]
    assert step["bytes_per_step"] == 4 * sum(step["parameters"].values()) > 0
    assert "on_gpus" in report


def test_smoke_never_overwrites_measured_results(tmp_path):
    """--smoke without --out writes to a temporary folder, not benchmarks/results/."""
    code = ("import sys, argparse; sys.path.insert(0, 'benchmarks'); import _common as c; "
            "p = argparse.ArgumentParser(); c.add_common_args(p, max_new_tokens=8); "
            "a = p.parse_args(['--smoke']); c.setup(a); print(a.out, a.model, a.max_new_tokens)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    folder, model, tokens = out.split()
    assert Path(folder).resolve() != (ROOT / "benchmarks" / "results").resolve()
    assert model == "tiny-llama" and int(tokens) <= 8


def _run_smoke(script: str, out: Path, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--smoke", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_decode_run_of_some_sections_keeps_every_section_it_wrote_and_the_earlier_ones(tmp_path):
    out = tmp_path / "decode.json"
    out.write_text(json.dumps({"equal_work": {"kept": True}, "answers": {"stale": True}}))
    report = _run_smoke("decode", out, "--sections", "answers", "vllm", "--variants", "bf16-model")
    assert report["equal_work"] == {"kept": True}  # a section not run stays as it was
    assert set(report["answers"]) >= {"fp32", "bf16-model"} and "stale" not in report["answers"]
    assert set(report["side_by_side"]["gcache"]) == {"fp32", "bf16-model"}  # written after answers: both kept
    assert set(report["sections_run"]) == {"answers", "side_by_side"}


def test_latentmas_side_without_a_checkout_skips_in_one_line(tmp_path):
    """benchmarks/latentmas_side.py times the LatentMAS reference from a checkout; without one (CI) its
    smoke run says so in one line, exits 0 and writes nothing."""
    missing = tmp_path / "no-latentmas-checkout"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "latentmas_side.py"), "--smoke", "--out", str(tmp_path),
         "--reference-dir", str(missing)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and str(missing) in lines[0], done.stdout
    assert not list(tmp_path.glob("*.json"))


def test_topology_learning_smoke_writes_its_schema(tmp_path):
    report = _run_smoke("topology_learning", tmp_path / "topology_learning.json")
    for variant in ("with_baseline", "without_baseline"):
        rewards = report[variant]["final_expected_reward"]
        assert len(rewards) == len(report["seeds"]) and all(0.0 <= r <= 1.0 for r in rewards)
        assert report[variant]["grad_variance"] >= 0
    assert report["steps"] >= 1 and "machine" in report


def test_fusion_smoke_writes_its_schema(tmp_path):
    report = _run_smoke("fusion", tmp_path / "fusion.json")
    rows = report["results"]
    assert {r["mode"] for r in rows} == {"concat", "weighted", "learned"}
    for r in rows:
        assert r["fuse_ms"] > 0 and r["decode_step_ms"] > 0 and r["k"] in (2, 4, 8)


def test_sandbox_smoke_writes_its_schema(tmp_path):
    report = _run_smoke("sandbox", tmp_path / "sandbox.json")
    current = report["results"]["current"]
    assert report["candidates"] == 4 == len(current["per_candidate_s"])
    assert all(s > 0 for s in current["per_candidate_s"].values())
    assert current["median_s"] > 0 and current["humaneval_median_s"] > 0 and current["mbppplus_median_s"] > 0
    assert current["total_s"] >= current["median_s"] and "machine" in report


def test_decode_smoke_writes_its_schema(tmp_path):
    report = _run_smoke("decode", tmp_path / "decode.json")
    rows = report["results"]
    assert {r["variant"] for r in rows} == {"fp32", "bf16", "int8", "int8-decode", "static", "bf16-model"}  # compiled: only when asked
    for r in rows:
        assert {"variant", "rows", "cache_len", "ms_per_token", "roofline_ms", "fraction_of_roofline"} <= set(r)
        assert r["ms_per_token"] > 0 and r["roofline_ms"] > 0
        assert math.isclose(r["fraction_of_roofline"], r["roofline_ms"] / r["ms_per_token"], rel_tol=1e-9)
    # the roofline counts the weights as stored: reduced variants read fewer bytes
    weights = report["weight_bytes"]
    assert weights["int8"] < weights["bf16"] < weights["fp32"] and weights["bf16-model"] < weights["fp32"]
    work = report["equal_work"]
    assert {"eager_s", "best_s", "ratio", "variant"} <= set(work) and work["variant"] in ("bf16", "int8", "int8-decode", "static", "bf16-model")
    assert math.isclose(work["ratio"], work["best_s"] / work["eager_s"], rel_tol=1e-9)
    assert report["answers"]["fp32"]["greedy_token_agreement"] == 1.0  # fp32 agrees with itself
    # the static step decodes float32's greedy answers (a tiny model's logits leave no near ties)
    assert report["answers"]["static"]["decoded_token_agreement"] == 1.0
    assert 0 <= report["answers"]["int8-decode"]["decoded_token_agreement"] <= 1
    assert all(r["first_call_ms"] > 0 for r in rows)
    ops = report["profile"]["ops"]
    assert ops and all(0 < o["share"] <= 1 and o["ms_per_step"] >= 0 for o in ops)
    assert sum(o["share"] for o in ops) <= 1 + 1e-9
    assert report["read_bandwidth_gb_s"] > 0 and "machine" in report and "load_average_before" in report
    side = report["side_by_side"]  # smoke: gcache's side only, vLLM's skipped with its reason
    assert side["rows"] == [1, 2] and set(side["gcache"]) == {"fp32", "bf16", "int8", "int8-decode", "static", "bf16-model"}
    for variant, rows in side["gcache"].items():
        for n, r in rows.items():
            assert math.isclose(r["tokens_per_s"], int(n) * side["new_tokens"] / statistics.median(r["seconds"]))
    assert all(len(t) == side["new_tokens"] for t in side["gcache"]["fp32"]["2"]["token_ids"])
    assert "skipped" in side["vllm"]


def test_seed_studies_smoke_writes_rates_and_worst_values(tmp_path):
    """benchmarks/seed_studies.py on its cheapest study and two seeds: each threshold's rate and worst value."""
    out = tmp_path / "seed_studies.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "seed_studies.py"), "--only", "stats_levels", "--seeds", "100", "101",
         "--out", str(out)], capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    got = report["studies"]["stats_levels"]
    assert list(report["studies"]) == ["stats_levels"] and report["machine"]["cpu"]["model"]
    assert got["seeds"] == [r["seed"] for r in got["runs"]] == [100, 101]
    for check in got["checks"]:
        values = [r[check["statistic"]] for r in got["runs"]]
        assert check["of"] == 2 and 0 <= check["held"] <= 2
        assert check["worst"] == min(values) and check["worst_seed"] in (100, 101)


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --cpu: the accuracy checks hold (the 'device' is the CPU again, so float32
    agrees exactly) and every part of the Qwen3-8B section reports, at tiny sizes (~30-60 s)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    report = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert report["cpu_mode"] is True and report["accuracy_ok"] is True
    checks = report["accuracy"]["float32"]["checks"]
    assert all(c["value"] == 0 for c in checks.values()), "the same kernels on the same weights agree exactly"
    assert report["accuracy"]["bfloat16"]["checks"]["answer_logprob"]["ok"] is True
    section = report["qwen3_8b"]
    assert set(section["latent_step"]) >= {"64", "256", "memory"}
    decode = section["decode"]
    for rows in ("1", "8"):
        for variant in ("eager", "static", "compiled"):
            step = decode[rows][variant]
            ratio = decode[rows]["roofline_ms"] / step["ms_per_token"]
            # the share is rounded to 3 decimals
            assert step["ms_per_token"] > 0 and math.isclose(step["roofline_share"], ratio, rel_tol=0.01, abs_tol=6e-4)
    assert section["e2e"]["agents"] == 4 and section["e2e"]["seconds"] > 0
    for part in ("load", "latent_step", "decode", "e2e"):
        memory = section[part] if part == "load" else section[part]["memory"]
        assert memory["estimate_gib"] > 0 and memory["peak_allocated_gib"] is None  # no allocator to ask on the CPU
    assert "[memory] e2e: estimate" in proc.stdout, "the estimate is printed before the part runs"


def test_routing_smoke_writes_its_schema(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "routing_unreliable.json").read_text())
    assert report["smoke"] is True and report["model"] == "tiny-llama"
    names = {"learned", "chain", "star", "mesh", "layered", "random", "full (untrained)", "oracle", "latent-mas"}
    assert set(report["methods"]) == names
    for name, row in report["methods"].items():
        assert row["n"] == report["settings"]["test_size"]
        assert math.isfinite(row["margin"]["mean"]) and math.isfinite(row["answer_logprob"]["mean"])
        assert (name == "learned") == ("learned_minus_margin" not in row)
    assert report["methods"]["oracle"]["decision_inputs"] == 1 and report["methods"]["oracle"]["agent_edges"] == 0
    # Only the learned method chooses its decision inputs; the fixed graphs and latent-mas read their sinks
    # (gcache's routing default would give them an untrained policy's choice).
    assert [n for n, f in report["flags"].items() if f.get("learn_decision_inputs", True)] == ["learned"]
    for name in ("chain", "latent-mas"):  # a chain has one sink: its decision node reads one agent
        assert report["methods"][name]["decision_inputs"] == 1, name
    assert 0.0 <= report["routing_accuracy"]["accuracy"] <= 1.0
    # Each train step records the policy after it (decision-input probabilities by agent kind, scalars).
    for point in report["curve"]["train"]:
        snap = point["policy"]
        assert all(0.0 <= snap[k] <= 1.0 for k in ("p_informed", "p_unreliable", "p_other_keepers", "edge_prob"))
        assert math.isfinite(snap["decision_similarity"]) and math.isfinite(snap["decision_bias"])
    assert (tmp_path / "routing_unreliable.md").exists() and (tmp_path / "routing_unreliable.png").exists()
    # routing_baselines.py evaluates the baselines again on the same worlds and keeps the learned values.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "routing_baselines.py"), str(tmp_path / "routing_unreliable.json"),
         "--smoke", "--out", str(tmp_path / "again")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    redone = json.loads((tmp_path / "again" / "routing_unreliable_baselines.json").read_text())
    assert set(redone["methods"]) == names
    first = list(report["per_question"]["learned"])[:2]
    assert redone["methods"]["learned"]["margin"]["mean"] == pytest.approx(
        sum(report["per_question"]["learned"][q]["margin"] for q in first) / 2)
    for name in names - {"learned"}:  # same worlds, same settings: the baselines' values come back
        for q in first:
            assert redone["per_question"][name][q]["margin"] == pytest.approx(report["per_question"][name][q]["margin"], abs=1e-4)
    # routing_seeds.py summarizes results (no model): one row each, its goals recomputed from the report.
    seeds = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "routing_seeds.py"), str(tmp_path / "routing_unreliable.json"),
         "--out", str(tmp_path / "seeds"), "--name", "study"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert seeds.returncode == 0, seeds.stderr[-2000:]
    (row,) = json.loads((tmp_path / "seeds" / "study.json").read_text())["rows"]
    minus = {m: report["methods"][m]["learned_minus_margin"] for m in names - {"learned", "oracle"}}
    assert row["beats_fixed"] == all(d["low"] > 0 for d in minus.values())
    assert row["near_oracle"] == (report["methods"]["oracle"]["learned_minus_margin"]["mean"] >= -0.1)
    assert row["routes"] == (report["routing_accuracy"]["accuracy"] >= 0.9)
    assert row["learned"] == report["methods"]["learned"]["margin"] and (tmp_path / "seeds" / "study.md").exists()


def test_answer_read_smoke_times_both_reads_and_finds_them_equal(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "answer_read.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "answer_read.json").read_text())
    assert set(report["methods"]) == {"latent-mas", "gcache"}
    for name, m in report["methods"].items():
        assert m["fresh_s_median"] > 0 and m["read_s_median"] > 0 and m["max_difference"] < 1e-4
        assert len(report["per_question"][name]) == report["settings"]["n"] == 2
    assert report["machine"]["cpu"]["isa"] is not None
