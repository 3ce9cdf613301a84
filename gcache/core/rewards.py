"""The policy's reward for one question, from what a run measured of its answer.

Three kinds (``REWARDS``), chosen with ``--reward``:

- ``accuracy``: 1.0 when the decoded answer is correct, else 0.0.
- ``likelihood``: the reference answer's mean log-probability per token under the decision
  node's context (``gcache.io.runner.answers``), clipped to ``[LOGPROB_FLOOR, 0]``. It needs no
  decoded answer: a small model that never answers right still ranks graphs by how much
  closer they bring it to the right answer.
- ``mixed``: ``correct + exp(clipped log-probability)``, in [0, 2]. The exponential is the
  geometric-mean probability per answer token, in (0, 1], so a correct answer always scores
  above a wrong one (1 + p > p'), and among answers equally right or wrong, the graph that
  makes the reference more likely wins. Accuracy alone is 0 for almost every question of a
  small model; the likelihood term keeps those questions' advantages non-zero.
- ``margin``: the contrastive margin (the gold answer's mean log-probability per token minus the
  highest of the question's distractors', ``gcache.io.runner.margin``), clipped to
  ``[-MARGIN_BOUND, MARGIN_BOUND]``. It needs questions that name their wrong answers (the
  routing task's): it rewards a graph for favouring the right answer over the wrong ones the
  agents state, where the likelihood also rewards contexts that merely prime the answer format.

REINFORCE subtracts a baseline (a mean of other rewards), so only differences between rewards
matter, not their scale or offset. Every reward is finite and bounded, whatever the measured
log-probability (NaN and -inf, as from an answer the model cannot produce, map to the floor).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

REWARDS = ("accuracy", "likelihood", "mixed", "margin")

# A mean log-probability per token of -20 is far below a uniform guess over any real
# vocabulary (log(1 / 49152) = -10.8 for SmolLM2): values under it carry no ranking worth a
# gradient, and clipping keeps one pathological row from dominating a batch.
LOGPROB_FLOOR = -20.0
# The margin is a difference of two such means: the same bound on either side.
MARGIN_BOUND = 20.0


def clip_logprob(answer_logprob: float) -> float:
    """The log-probability clipped to ``[LOGPROB_FLOOR, 0]``; NaN maps to the floor.

    Raises TypeError when it is not a real number."""
    if isinstance(answer_logprob, bool) or not isinstance(answer_logprob, (int, float)):
        raise TypeError(f"answer_logprob: expected a float, got {type(answer_logprob).__name__}")
    value = float(answer_logprob)
    if math.isnan(value):
        return LOGPROB_FLOOR
    return min(0.0, max(LOGPROB_FLOOR, value))


def reward(kind: str, correct: bool | None, answer_logprob: float | None, *, margin: float | None = None) -> float:
    """The reward of one question under ``kind`` (one of ``REWARDS``; see the module docstring).

    correct: whether the decoded answer was right (None when nothing was decoded: only the
    likelihood reward does without it); answer_logprob: the reference answer's mean
    log-probability per token (None when it was not measured: only the accuracy reward does
    without it); margin: the contrastive margin (only the margin reward reads it, and needs it).
    Bounds: accuracy in {0, 1}, likelihood in [LOGPROB_FLOOR, 0], mixed in [0, 2], margin in
    [-MARGIN_BOUND, MARGIN_BOUND] (NaN maps to the lower bound).
    Raises ValueError for an unknown kind or a missing input the kind needs, TypeError for
    inputs of the wrong type.
    """
    if kind not in REWARDS:
        raise ValueError(f"reward: expected one of {', '.join(REWARDS)}, got {kind!r}")
    if kind == "margin":
        if margin is None:
            raise ValueError("margin: the margin reward needs the question's contrastive margin (a question with distractors), got None")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise TypeError(f"margin: expected a float, got {type(margin).__name__}")
        value = float(margin)
        return -MARGIN_BOUND if math.isnan(value) else min(MARGIN_BOUND, max(-MARGIN_BOUND, value))
    if kind != "likelihood":
        if correct is None:
            raise ValueError(f"correct: the {kind} reward needs a decoded answer's verdict, got None")
        if not isinstance(correct, bool):
            raise TypeError(f"correct: expected a bool, got {type(correct).__name__}")
        if kind == "accuracy":
            return float(correct)
    if answer_logprob is None:
        raise ValueError(f"answer_logprob: the {kind} reward needs the answer's log-probability, got None")
    clipped = clip_logprob(answer_logprob)
    if kind == "likelihood":
        return clipped
    return float(correct) + math.exp(clipped)



def rewards_of(kind: str, correct: Sequence[bool | None] | None, answer_logprobs: Tensor) -> Tensor:
    """``reward`` row by row: [E] float32 rewards from [E] answer log-probabilities and, for the
    kinds that need them, the rows' verdicts (``correct``; None stands for a row per value of None).
    Raises ValueError when ``correct`` holds a different number of rows, and ``reward``'s errors."""
    values = [float(v) for v in answer_logprobs.detach().reshape(-1).tolist()]
    verdicts = [None] * len(values) if correct is None else list(correct)
    if len(verdicts) != len(values):
        raise ValueError(f"correct: expected one verdict per answer log-probability ({len(values)}), got {len(verdicts)}")
    return torch.tensor([reward(kind, c, lp) for c, lp in zip(verdicts, values)], dtype=torch.float32)


__all__ = ["LOGPROB_FLOOR", "MARGIN_BOUND", "REWARDS", "clip_logprob", "reward", "rewards_of"]
