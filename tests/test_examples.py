"""Every script in examples/ runs under --smoke (tiny model or short runs) and shows what it claims."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def _run(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--smoke"], capture_output=True, text=True, timeout=600, cwd=EXAMPLES
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def check_latent_agents(out: str) -> None:
    shapes = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(
        r"(planner|critic): (\d+) prompt tokens \+ (\d+) latent steps, cache \[L, B, H, T, D\] = \[\d+, 1, \d+, (\d+), \d+\]",
        out)}
    (p_prompt, p_steps, p_len), (c_prompt, c_steps, c_len) = shapes["planner"], shapes["critic"]
    # the chain: the critic's cache is the planner's plus its own prompt and latent steps
    assert p_len == p_prompt + p_steps and c_len == p_len + c_prompt + c_steps
    assert f"judger reads {c_len} cached positions" in out
    assert "judger after the latent agents" in out and "judger alone" in out


def check_train_topology(out: str) -> None:
    result = _last_json(out)
    assert result["reward_after"] > result["reward_before"] + 0.5, result
    assert "most likely graph for question 0:" in out


def check_property_test_transform(out: str) -> None:
    assert "[holds]   round trip" in out
    assert "[refuted] quantization keeps every key's sign" in out
    assert "Failing test case: signs_survive(" in out and "signs differ" in out


def check_bench_latent(out: str) -> None:
    medians = _last_json(out)["median_ms"]
    for step in ("latent_step", "decode_step"):
        for dtype in ("float32", "bfloat16"):
            for threads in (1, 2):
                assert medians[f"{step}/{dtype}/{threads}t"] > 0
    assert "Times are in" in out


CHECKS = {
    "latent_agents.py": check_latent_agents,
    "train_topology.py": check_train_topology,
    "property_test_transform.py": check_property_test_transform,
    "bench_latent.py": check_bench_latent,
}


def test_every_example_has_a_check():
    assert sorted(CHECKS) == SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_under_smoke(name):
    CHECKS[name](_run(name))
