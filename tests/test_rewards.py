"""The policy's rewards (gcache.core.rewards): finite and bounded whatever the log-probability,
ordered as documented, and refused with a clear message for a bad kind."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcache.core.rewards import LOGPROB_FLOOR, MARGIN_BOUND, REWARDS, clip_logprob, reward
from gcache.io.models.local import tiny_model
from gcache.io.runner.answers import answer_logprobs
from gcache.io.runner.prompts import decision_messages
from gcache.io.tasks.datasets import Item
from gcache.io.tasks.scoring import score

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
BOUNDS = {"accuracy": (0.0, 1.0), "likelihood": (LOGPROB_FLOOR, 0.0), "mixed": (0.0, 2.0), "margin": (-MARGIN_BOUND, MARGIN_BOUND)}


@given(kind=st.sampled_from(REWARDS), correct=st.booleans(), logprob=ANY_FLOAT, margin=ANY_FLOAT)
def test_every_reward_is_finite_and_within_its_bounds(kind, correct, logprob, margin):
    r = reward(kind, correct, logprob, margin=margin)
    low, high = BOUNDS[kind]
    assert math.isfinite(r) and low <= r <= high


@given(a=ANY_FLOAT, b=ANY_FLOAT, correct=st.booleans())
def test_likelihood_and_mixed_rise_with_the_logprob(a, b, correct):
    lo, hi = sorted((clip_logprob(a), clip_logprob(b)))
    for kind in ("likelihood", "mixed"):
        assert reward(kind, correct, lo) <= reward(kind, correct, hi)


@given(a=ANY_FLOAT, b=ANY_FLOAT)
def test_mixed_ranks_a_correct_answer_above_any_wrong_one(a, b):
    assert reward("mixed", True, a) > reward("mixed", False, b)


def test_documented_values():
    assert reward("accuracy", True, None) == 1.0 and reward("accuracy", False, -3.0) == 0.0
    assert reward("likelihood", None, -2.5) == -2.5
    assert reward("likelihood", True, -2.5) == reward("likelihood", False, -2.5)
    assert reward("likelihood", None, float("nan")) == LOGPROB_FLOOR
    assert reward("likelihood", None, float("-inf")) == LOGPROB_FLOOR
    assert reward("likelihood", None, 0.3) == 0.0  # a mean log-probability is <= 0; round-off is clipped
    assert math.isclose(reward("mixed", True, math.log(0.25)), 1.25)
    assert math.isclose(reward("mixed", False, math.log(0.25)), 0.25)
    assert reward("margin", None, None, margin=0.7) == 0.7 and reward("margin", False, -3.0, margin=-0.2) == -0.2
    assert reward("margin", None, None, margin=float("nan")) == -MARGIN_BOUND
    assert reward("margin", None, None, margin=float("inf")) == MARGIN_BOUND


@given(a=ANY_FLOAT, b=ANY_FLOAT)
def test_the_margin_reward_rises_with_the_margin(a, b):
    ra, rb = reward("margin", None, None, margin=a), reward("margin", None, None, margin=b)
    if not (math.isnan(a) or math.isnan(b)) and a <= b:
        assert ra <= rb


@pytest.mark.parametrize(
    "kind, correct, logprob, error, match",
    [
        ("accuarcy", True, -1.0, ValueError, "reward: expected one of accuracy, likelihood, mixed, margin, got 'accuarcy'"),
        ("margin", None, -1.0, ValueError, "margin: the margin reward needs the question's contrastive margin"),
        ("accuracy", None, -1.0, ValueError, "correct: the accuracy reward needs a decoded answer"),
        ("mixed", True, None, ValueError, "answer_logprob: the mixed reward needs"),
        ("likelihood", None, None, ValueError, "answer_logprob: the likelihood reward needs"),
        ("accuracy", 1, -1.0, TypeError, "correct: expected a bool, got int"),
        ("likelihood", None, "-1", TypeError, "answer_logprob: expected a float, got str"),
    ],
)
def test_bad_inputs_are_refused_with_a_message_naming_them(kind, correct, logprob, error, match):
    with pytest.raises(error, match=match):
        reward(kind, correct, logprob)


def test_rewards_of_an_empty_and_an_overlong_answer_are_finite_and_bounded():
    """An empty decoded reply scores wrong; a reference far over the token cap is still measured
    (on its capped tokens); every reward of both stays within its bounds."""
    lm = tiny_model("llama", seed=0)
    items = [
        Item("gsm8k/x", "gsm8k", 0, "What is 6 times 7?", "42"),
        Item("mbpp/long", "mbppplus", 0, "Write f.", "def f():\n" + "    x = 1\n" * 3000),
    ]
    convs = [decision_messages(it.task, it.question) for it in items]
    with torch.no_grad():
        lps = answer_logprobs(lm, convs, [None, None], items).tolist()
    correct = score(items[0], "").correct
    assert correct is False
    for lp in lps:
        assert math.isfinite(lp)
        for kind in REWARDS:
            r = reward(kind, correct, lp, margin=lp)
            low, high = BOUNDS[kind]
            assert math.isfinite(r) and low <= r <= high
