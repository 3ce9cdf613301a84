"""The learned parts of a run between steps: their training state, the step's inputs, checkpoints.

The step itself is the core's pure ``train_step``; this module gathers its inputs from a
batch's plans and decision contexts, keeps the returned ``TrainState``, and saves or
restores it (``params.safetensors``, ``train_state.safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from gcache.core.fusion import FuserConfig, FuserParams, init_fuser
from gcache.core.objectives import AnswerBatch, answer_batch
from gcache.core.optim import adam
from gcache.core.policy import init_policy
from gcache.core.reinforce import init_baseline
from gcache.core.train import FuserBatch, FuserExample, MeasuredRewards, PolicyBatch, Shard, TrainState, train_step
from gcache.io.models.local import LocalModel, encode_chat
from gcache.io.records.params import load_params, save_params
from gcache.io.records.runlog import PARAMS, STATE
from gcache.io.runner.answers import answer_inputs
from gcache.io.runner.communication import Context
from gcache.io.runner.planner import GraphSpec, Plan
from gcache.io.tasks.datasets import Item

REFERENCE_TOKENS = 256
# What the fuser learns to make likely: the worked reference (GSM8K's solution, a program, an
# option) after the decision prompt, or the answer line the likelihood reward measures.
FUSER_TARGETS = ("reference", "answer")  # the reference answer is cut here, so one long solution cannot dominate a step


def reference_text(item: Item) -> str:
    """The reference answer the fuser learns to make likely: a worked solution, a program, an option."""
    meta = item.meta or {}
    for key in ("reference", "solution", "canonical_solution", "answer_text"):
        if meta.get(key):
            return str(meta[key])
    return str(item.gold)


class Team(Protocol):
    """Processes that answer each batch together (gcache.io.runner.distributed.Team)."""

    def share(self, rewards: Tensor, num_examples: int, failed: bool) -> tuple[Tensor, Shard, bool]:
        """The whole batch's rewards, this process's ``Shard`` of it, and whether any process failed."""
        ...


class Step(NamedTuple):
    """What one update reports."""

    stats: dict[str, float]  # the loss parts ({} when no step was taken)
    answer_logprobs: dict[int, float]  # batch row -> the answer log-probability the step's own forward read
    rewards: dict[int, float]  # batch row -> the reward the step made of it (the same rows)


def _summed(stats: dict[str, Any], shard: Shard) -> dict[str, float]:
    """A team step's loss parts over every process (each holds its share; a part that no
    process took stays out, as in one process)."""
    parts = ("policy_loss", "fuser_loss")
    local = torch.tensor([stats.get(k, 0.0) for k in parts] + [float(k in stats) for k in parts])
    total = shard.reduce(local)
    return {k: float(total[i]) for i, k in enumerate(parts) if float(total[len(parts) + i]) > 0}


class Learner:
    """Holds a run's ``TrainState`` between steps: ``{"policy": ..., "fuser": ...}`` (the parts
    the method learns), the optimizer's state and the reward baseline."""

    def __init__(
        self, *, lr: float, seed: int, graph: GraphSpec | None, fuser: FuserConfig | None, local: LocalModel | None,
        fuser_target: str = "reference",
        team: Team | None = None,
    ) -> None:  # fmt: skip
        params: dict[str, Any] = {}
        if graph is not None:
            params["policy"] = init_policy(graph.config, graph.feature_dim, torch.Generator().manual_seed(seed))
        if fuser is not None:
            params["fuser"] = init_fuser(fuser)
        if fuser_target not in FUSER_TARGETS:
            raise ValueError(f"fuser_target: expected one of {', '.join(FUSER_TARGETS)}, got {fuser_target!r}")
        self.graph, self.local, self.fuser_config, self.fuser_target = graph, local, fuser, fuser_target
        self.team = team
        self.optimizer = adam(lr)
        self.state = TrainState(params, self.optimizer.init(params), init_baseline())

    @property
    def params(self) -> dict[str, Any]:
        return self.state.params

    @property
    def fuser(self) -> FuserParams | None:
        """The fuser's current parameters (None when the run's fusion learns nothing)."""
        return self.state.params.get("fuser")

    @property
    def policy(self) -> Any:
        return self.state.params.get("policy")

    # ------------------------------------------------------------ the step

    @property
    def measures_answers(self) -> bool:
        """Whether a step's fuser forward measures the likelihood reward's answer log-probabilities
        itself (a learned fuser on the answer line, in one process), so the runner need not."""
        return self.fuser is not None and self.fuser_target == "answer" and self.team is None

    @staticmethod
    def fused_rows(judged: Sequence[Context | None]) -> list[int]:
        """The rows whose decision context fuses caches: the fuser's examples, in order."""
        return [q for q, c in enumerate(judged) if c is not None and c.fusion is not None]

    def _fuser_example(self, item: Item, context: Context) -> FuserExample:
        assert self.local is not None and context.fusion is not None
        if self.fuser_target == "answer":
            # The answer line the likelihood reward measures (gcache.io.runner.answers), so the fuser
            # learns what the policy is rewarded for.
            batch = answer_inputs(self.local, [context.conversation], [item])
        else:
            tok = self.local.tokenizer
            ids, mask = encode_chat(self.local, [context.conversation])
            prompt = ids[0][mask[0].bool()].tolist()
            answer = tok.encode(reference_text(item), add_special_tokens=False)[:REFERENCE_TOKENS]
            answer += list(self.local.eos_token_ids[:1])
            batch = answer_batch([prompt], [answer], pad_token_id=tok.pad_token_id or 0)
            batch = AnswerBatch(*(t.to(self.local.device) for t in batch))  # built on the CPU, read on the model's
        return FuserExample(context.fusion.caches, context.fusion.weights, context.fusion.sources, batch)

    def update(
        self, plans: Sequence[Plan], judged: Sequence[Context | None], rewards: Tensor, *, failed: bool = False,
        measure: str | None = None, correct: Sequence[bool | None] | None = None,
    ) -> Step:  # fmt: skip
        """One training step on a scored batch: REINFORCE on the plans' graphs (policy) and the
        reference answers' likelihood on the judged questions' fused caches (fuser).

        With ``measure``, a reward kind (when ``measures_answers``), the rows with a fused decision
        context take their reward of that kind from the fuser's forward (with the row's verdict
        in ``correct``, one per row, for the kinds that read it) and their entries in ``rewards``
        are ignored; the returned ``Step`` holds those rows' answer log-probabilities and rewards.
        A batch that ``failed`` makes no step. Under a team, ``plans`` and
        ``rewards`` are this process's share; the processes agree on the batch's rewards and on
        skipping a step that failed anywhere, and sum their gradients, so every one takes the same step.
        """
        if measure is not None and not self.measures_answers:
            raise ValueError("measure: this learner's fuser forward does not measure the likelihood reward's answers")
        policy = None
        if self.graph is not None:
            policy = PolicyBatch(
                tuple(p.features for p in plans), tuple(p.topology for p in plans),
                self.graph.role_adjacency, self.graph.mask, self.graph.config,
            )  # fmt: skip
        fuser, rows = None, []
        if self.fuser is not None:
            rows = self.fused_rows(judged)
            examples = tuple(self._fuser_example(plans[q].item, judged[q]) for q in rows)
            fuser = FuserBatch(self.local.fns, self.fuser_config.mode, examples)
        shard = measured = None
        if self.team is not None:
            rewards, shard, failed = self.team.share(rewards, len(fuser.examples) if fuser else 0, failed)
        if failed:
            return Step({}, {}, {})
        if measure is not None and rows:
            verdicts = None if correct is None else tuple(correct[q] for q in rows)
            measured = MeasuredRewards(torch.tensor(rows, dtype=torch.long), measure, verdicts)
        self.state, stats = train_step(
            self.state, self.optimizer, rewards, policy=policy, fuser=fuser, shard=shard, measured=measured
        )  # fmt: skip
        if shard is not None:
            stats = _summed(stats, shard)
        logprobs, used = stats.pop("answer_logprobs", None), stats.pop("rewards", None)
        if logprobs is None:
            return Step(stats, {}, {})
        return Step(stats, {q: float(logprobs[e]) for e, q in enumerate(rows)}, {q: float(used[q]) for q in rows})

    # ------------------------------------------------------------ persistence

    def save(self, out: Path, step: int) -> None:
        """Write params.safetensors, then the optimizer/baseline state with the finished step count."""
        save_params(Path(out) / PARAMS, self.state.params)
        state = {"opt_state": self.state.opt_state, "baseline": self.state.baseline, "step": torch.tensor(step)}
        save_params(Path(out) / STATE, state)

    def restore(self, out: Path) -> int:
        """Reload the last checkpoint of a run folder; returns the number of finished steps (0: none)."""
        path, state_path = Path(out) / PARAMS, Path(out) / STATE
        if not path.exists() or not state_path.exists():
            return 0
        like = {"opt_state": self.state.opt_state, "baseline": self.state.baseline, "step": torch.tensor(0)}
        saved = load_params(state_path, like)
        params = load_params(path, self.state.params)
        self.state = TrainState(params, saved["opt_state"], saved["baseline"])
        return int(saved["step"])

    def load(self, path: Path) -> None:
        """Replace the parameters by saved ones (``--params``); the optimizer state is kept."""
        self.state = self.state._replace(params=load_params(Path(path), self.state.params))


__all__ = ["Learner", "REFERENCE_TOKENS", "Step", "reference_text"]
