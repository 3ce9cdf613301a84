"""Agent roles and chat prompts, per task family (math, science, medicine, code).

A `Role` carries the name, the profile text the topology embeds as a node feature, and the
instruction the agent receives. `agent_roles` builds the `diverse` set (the family's distinct
roles cycled to N agents) or the `uniform` set (N copies of the family's main solver).
`agent_messages` / `decision_messages` build chat messages that state the exact answer format
read by gcache.io.tasks.extract; with ``system_role=False`` the system text is folded into the first
user message, for chat templates without a system role. With ``latent=True`` the agent is
told that the earlier agents' thoughts reach it in latent form (their KV-caches precede
the prompt) instead of as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from gcache.core.checks import check_int
from gcache.io.tasks.contracts import contract
from gcache.io.tasks.datasets import Item, task_family

__all__ = ["Role", "ROLES", "MAIN_ROLE", "AGENT_SETS", "agent_roles", "item_roles", "latent_mas_roles", "answer_format", "agent_messages", "decision_messages"]


@dataclass(frozen=True)
class Role:
    """An agent role: name, profile (text embedded as the node feature), instruction."""

    name: str
    profile: str
    instruction: str


def _role(name: str, profile: str, instruction: str) -> Role:
    return Role(name=name, profile=f"{name}: {profile}", instruction=instruction)


ROLES: dict[str, tuple[Role, ...]] = {
    "math": (
        _role("Math Solver", "solves grade-school word problems step by step with careful arithmetic.",
              "You are a Math Solver. Work out the problem step by step, writing every calculation."),
        _role("Mathematical Analyst", "analyses the structure of a problem, defines the quantities and the relations between them.",
              "You are a Mathematical Analyst. Name the known and unknown quantities, write the equations that link them, then solve them."),
        _role("Programming Expert", "turns a word problem into a short computation and evaluates it exactly.",
              "You are a Programming Expert. Express the solution as a short exact computation (as you would in Python) and evaluate it by hand."),
        _role("Inspector", "checks other solutions for misread facts, wrong operations and arithmetic slips.",
              "You are an Inspector. Re-read the problem, check each step of the reasoning you have received for misread facts and arithmetic errors, and fix them."),
    ),
    "science": (
        _role("Science Expert", "answers graduate-level multiple-choice questions across physics, chemistry and biology.",
              "You are a Science Expert. Reason from first principles, eliminate wrong options, and choose one."),
        _role("Physicist", "applies physical laws, units and orders of magnitude.",
              "You are a Physicist. Apply the relevant physical laws, check units and orders of magnitude."),
        _role("Chemist", "reasons about reactions, mechanisms, structures and spectra.",
              "You are a Chemist. Reason about the reactions, structures and quantities involved."),
        _role("Biologist", "reasons about molecular biology, genetics and physiology.",
              "You are a Biologist. Reason about the biological mechanisms involved."),
        _role("Critic", "looks for flaws in proposed answers and argues for the best-supported option.",
              "You are a Critic. Look for flaws in the reasoning you have received and say which option is best supported."),
    ),
    "medicine": (
        _role("Medical Expert", "answers USMLE-style clinical questions from the history, findings and tests.",
              "You are a Medical Expert. Read the vignette, form a diagnosis, and choose the best option."),
        _role("Internist", "builds a differential diagnosis from symptoms, signs and laboratory results.",
              "You are an Internist. Build a differential diagnosis from the findings and narrow it down."),
        _role("Pathologist", "explains disease mechanisms and their consequences.",
              "You are a Pathologist. Explain the mechanism of the disease and what follows from it."),
        _role("Pharmacologist", "knows drug mechanisms, indications, side effects and interactions.",
              "You are a Pharmacologist. Consider drug mechanisms, indications and adverse effects."),
        _role("Critic", "checks proposed answers against the vignette and rules out distractors.",
              "You are a Critic. Check the reasoning you have received against every detail of the vignette and rule out distractors."),
    ),
    "code": (
        _role("Project Manager", "breaks a programming task into requirements, edge cases and an interface.",
              "You are a Project Manager. State the requirements, the function signature, and the edge cases the code must handle."),
        _role("Algorithm Designer", "chooses the algorithm and data structures and explains them.",
              "You are an Algorithm Designer. Choose an algorithm and data structures and describe the steps precisely."),
        _role("Programming Expert", "writes correct, complete and efficient Python functions.",
              "You are a Programming Expert. Write a correct, complete Python implementation."),
        _role("Test Analyst", "designs test cases, including edge cases, and predicts the expected outputs.",
              "You are a Test Analyst. Write test cases with expected outputs, including edge cases, and check the proposed code against them."),
        _role("Bug Fixer", "finds and fixes bugs in proposed code.",
              "You are a Bug Fixer. Find the bugs in the code you have received and give a corrected version."),
    ),
}

MAIN_ROLE = {"math": "Math Solver", "science": "Science Expert", "medicine": "Medical Expert", "code": "Programming Expert"}
AGENT_SETS = ("diverse", "uniform")


def agent_roles(task: str, agents: str = "diverse", n: int = 4) -> list[Role]:
    """`n` roles for `task`'s family: "diverse" cycles the family's distinct roles, "uniform"
    repeats its main solver. Raises ValueError for an unknown task or set, or n < 1."""
    family = task_family(task)
    if agents not in AGENT_SETS:
        raise ValueError(f"agents must be one of {AGENT_SETS}, got {agents!r}")
    check_int(n, "n")
    roles = ROLES[family]
    if agents == "uniform":
        main = next(r for r in roles if r.name == MAIN_ROLE[family])
        return [main] * n
    return [roles[i % len(roles)] for i in range(n)]


def item_roles(item: Item, roles: Sequence[Role]) -> Sequence[Role]:
    """The roles of ``item``'s agents: its own (``meta["roles"]``, as a routing world gives every
    question its keepers) or else the run's ``roles``. Raises ValueError when the item's roles are
    not one per agent."""
    own = (item.meta or {}).get("roles")
    if own is None:
        return roles
    if len(own) != len(roles):
        raise ValueError(f"item {item.id}: its world has {len(own)} agents but the run has {len(roles)} (--agent-nums)")
    return own


LATENT_MAS_ROLES: tuple[Role, ...] = (
    _role("Planner", "lays out a step-by-step plan to solve the question.",
          "You are the Planner. Think about how to solve the question and lay out a clear step-by-step plan."),
    _role("Critic", "checks the plan it received for errors, gaps and misread facts.",
          "You are the Critic. Check the plan you have received for mistakes, gaps and misread facts."),
    _role("Refiner", "turns the plan and the critique into a corrected solution.",
          "You are the Refiner. Combine the plan and the critique you have received into a corrected solution."),
)


def latent_mas_roles() -> list[Role]:
    """LatentMAS's sequential thinkers (planner -> critic -> refiner); its judger is the decision node."""
    return list(LATENT_MAS_ROLES)


def answer_format(task: str, *, entry_point: str | None = None) -> str:
    """The sentence that tells the model how to write its final answer for `task` (its family's
    answer contract, gcache.io.tasks.contracts)."""
    return contract(task).instruction(entry_point)


def _entry_point(task: str, question: str, entry_point: str | None) -> str | None:
    if entry_point is not None or not contract(task).runs_programs:
        return entry_point
    names = re.findall(r"(?m)^def\s+(\w+)\s*\(", question)
    if names:
        return names[-1]
    named = re.findall(r"function `(\w+)`", question)
    return named[-1] if named else None


def _context(predecessor_texts: Sequence[tuple[str, str]], latent: bool) -> str:
    parts = []
    if latent:
        parts.append("The earlier agents' reasoning has been passed to you in latent form: it is already in your "
                     "working memory, before this message. Build on it rather than starting over.")
    if predecessor_texts:
        parts.append("Here is what the earlier agents wrote:")
        for name, text in predecessor_texts:
            parts.append(f"[{name}]\n{text.strip()}")
    return "\n\n".join(parts)


def _user(question: str, predecessor_texts: Sequence[tuple[str, str]], latent: bool, closing: str) -> str:
    """The user turn: the question, what the earlier agents passed on, then the closing request."""
    context = _context(predecessor_texts, latent)
    parts = [f"Question:\n{question.strip()}"] + ([context] if context else []) + [closing]
    return "\n\n".join(parts)


def _messages(system: str, user: str, system_role: bool) -> list[dict[str, str]]:
    if system_role:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": system + "\n\n" + user}]


def _check_predecessors(predecessor_texts: Sequence[tuple[str, str]]) -> None:
    for i, pair in enumerate(predecessor_texts):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TypeError(f"predecessor_texts[{i}] must be a (role name, text) pair of str, got {pair!r:.60}")


def agent_messages(
    task: str,
    role: Role,
    question: str,
    *,
    predecessor_texts: Sequence[tuple[str, str]] = (),
    latent: bool = False,
    system_role: bool = True,
    entry_point: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for one agent of `task` in `role` answering `question`.

    predecessor_texts: (role name, text) of earlier agents, for text communication; latent:
    the earlier agents' caches precede the prompt; system_role: False folds the system text
    into the user message. Raises ValueError for an unknown task, TypeError for bad pairs."""
    if not isinstance(role, Role):
        raise TypeError(f"role must be a Role, got {type(role).__name__}")
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    _check_predecessors(predecessor_texts)
    fmt = answer_format(task, entry_point=_entry_point(task, question, entry_point))
    system = f"{role.instruction} You are one agent in a team that answers the question together. {fmt}"
    user = _user(question, predecessor_texts, latent, f"Give your reasoning, then your answer. {fmt}")
    return _messages(system, user, system_role)


def decision_messages(
    task: str,
    question: str,
    *,
    predecessor_texts: Sequence[tuple[str, str]] = (),
    latent: bool = False,
    system_role: bool = True,
    entry_point: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for the decision node, which writes the team's final answer in the format
    the extractor reads. Arguments as in `agent_messages`."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    _check_predecessors(predecessor_texts)
    fmt = answer_format(task, entry_point=_entry_point(task, question, entry_point))
    what = "the final program" if contract(task).runs_programs else "the final answer"
    system = (f"You are the decision maker of a team of agents. Weigh the team's work, correct any mistakes, "
              f"and give {what}. {fmt}")
    user = _user(question, predecessor_texts, latent, f"Now give {what}. {fmt}")
    return _messages(system, user, system_role)
