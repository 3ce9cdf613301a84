"""Roles and prompts: the agent sets, both chat-template shapes, and the answer format the extractor reads."""

import pytest

from gcache.io.runner.prompts import ROLES, agent_messages, agent_roles, answer_format, decision_messages
from gcache.io.tasks.datasets import TASKS, load_items, task_family
from gcache.io.tasks.extract import extract_choice, extract_number
from gcache.io.tasks.scoring import score


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_diverse_cycles_the_family_roles_and_uniform_repeats_the_main_solver(task, n):
    family_roles = ROLES[task_family(task)]
    diverse = agent_roles(task, "diverse", n)
    assert [r.name for r in diverse] == [family_roles[i % len(family_roles)].name for i in range(n)]
    uniform = agent_roles(task, "uniform", n)
    assert len(uniform) == n and len({r.name for r in uniform}) == 1
    assert uniform[0] in family_roles


def test_families_have_the_issue_roles():
    assert [r.name for r in ROLES["math"]] == ["Math Solver", "Mathematical Analyst", "Programming Expert", "Inspector"]
    assert [r.name for r in ROLES["code"]] == ["Project Manager", "Algorithm Designer", "Programming Expert", "Test Analyst", "Bug Fixer"]
    assert "Critic" in [r.name for r in ROLES["science"]] and "Critic" in [r.name for r in ROLES["medicine"]]
    # each profile (the text the policy embeds) names its role, then describes it
    for role in (r for roles in ROLES.values() for r in roles):
        assert role.profile.startswith(f"{role.name}: "), role
        assert len(role.profile) > len(role.name) + 30, role


def test_bad_arguments():
    with pytest.raises(ValueError, match="agents"):
        agent_roles("gsm8k", "random", 3)
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        agent_roles("gsm8k", "diverse", 0)
    with pytest.raises(ValueError, match="unknown task"):
        agent_roles("mmlu")
    with pytest.raises(TypeError, match="predecessor_texts"):
        agent_messages("gsm8k", ROLES["math"][0], "q", predecessor_texts=[("only one",)])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("system_role", [True, False])
def test_messages_shape_with_and_without_system_role(task, system_role):
    item = load_items(task, limit=1)[0]
    role = agent_roles(task, "diverse", 2)[1]
    msgs = agent_messages(task, role, item.question, predecessor_texts=[("Inspector", "I think 4.")], system_role=system_role)
    assert [m["role"] for m in msgs] == (["system", "user"] if system_role else ["user"])
    text = "\n".join(m["content"] for m in msgs)
    assert item.question.strip() in text and "I think 4." in text and role.instruction in text
    assert answer_format(task, entry_point=item.meta.get("entry_point")) in text
    dec = decision_messages(task, item.question, latent=True, system_role=system_role)
    assert "latent" in "\n".join(m["content"] for m in dec)
    if task_family(task) == "code":
        assert f"`{item.meta['entry_point']}`" in text


def test_latent_flag_changes_only_the_context():
    role = ROLES["math"][0]
    plain = agent_messages("gsm8k", role, "What is 2+2?")
    latent = agent_messages("gsm8k", role, "What is 2+2?", latent=True)
    assert plain[0] == latent[0]
    assert "latent" in latent[1]["content"] and "latent" not in plain[1]["content"]


def test_the_format_the_prompt_asks_for_is_what_the_extractor_reads():
    # replies written exactly as the prompt instructs
    assert extract_number("work...\n#### 42") == "42"
    assert extract_choice("work...\nAnswer: C") == "C"
    he = load_items("humaneval", limit=1)[0]
    assert score(he, f"Here it is:\n```python\n{he.gold}\n```").correct
    assert "#### <number>" in answer_format("gsm8k") and "Answer: X" in answer_format("gpqa")
