"""Answer extraction: the parsing traps of the seed systems, as properties where natural."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcache.io.tasks.extract import (
    extract_choice,
    extract_code,
    extract_number,
    format_number,
    numbers_equal,
    parse_number,
)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("#### 1,000", "1000"),
        ("The answer is 18.00", "18"),
        ("so we get -5", "-5"),
        ("Answer: -$5", "-5"),
        ("The answer is \\boxed{\\frac{3}{4}}", "0.75"),
        ("She has 3-5 = 2 left", "2"),
        ("#### 7 apples\nlater text 99", "7"),
        ("First 12, then \\boxed{45} and more text 3", "45"),
        ("It costs $1,234,567.50 in total.", "1234567.5"),
        ("ratio 1/3", "1/3"),
        ("values 1,2,3", "3"),
        ("no digits here", None),
    ],
)
def test_extract_number_cases(reply, expected):
    assert extract_number(reply) == expected


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("#### 3\nThe answer is 5", "3"),  # the kind decides before the position
        ("The answer is 5\n#### 3", "3"),
        ("#### 3\nWait, I made an error.\n#### 5", "5"),  # among one kind, the last (the correction)
        ("\\boxed{3}, no: \\boxed{5}", "5"),
        ("\\boxed{3}\n#### 5", "5"),
        ("#### 5\n\\boxed{3}", "5"),
        ("The answer is 3. No, the answer is 5.", "5"),
        ("The answer is 5.\n\\boxed{3}", "5"),
        ("\\boxed{3}\nThe answer is 5.", "5"),
        ("#### 3\n#### unsure", "3"),  # a last marker without a number falls through
    ],
)
def test_extract_number_with_two_markers(reply, expected):
    assert extract_number(reply) == expected


_MARKERS = {"hashes": "#### {}", "answer_is": "The answer is {}.", "boxed": "\\boxed{{{}}}"}
_RANK = ["hashes", "answer_is", "boxed"]  # extract_number's precedence


@given(
    first=st.sampled_from(_RANK), second=st.sampled_from(_RANK),
    a=st.integers(0, 10**6), b=st.integers(0, 10**6), filler=st.sampled_from(["\n", " then ", "\nso 17 + 4 = 21\n"]),
)
@settings(max_examples=200, deadline=None)
def test_of_two_markers_the_higher_kind_then_the_later_one_counts(first, second, a, b, filler):
    reply = _MARKERS[first].format(a) + filler + _MARKERS[second].format(b)
    if first == second:
        expected = b
    else:
        expected = a if _RANK.index(first) < _RANK.index(second) else b
    assert extract_number(reply) == str(expected)


def test_numbers_compare_numerically_and_keep_signs():
    assert numbers_equal("18.00", "18")
    assert numbers_equal("1,000", "1000")
    assert not numbers_equal("-5", "5")
    assert not numbers_equal(None, "5")
    assert numbers_equal("0.5", "1/2")


def _formats(n: int, zeros: int, currency: str) -> str:
    body = f"{abs(n):,}" + ("." + "0" * zeros if zeros else "")
    return ("-" if n < 0 else "") + currency + body


@given(
    n=st.integers(-10**12, 10**12),
    zeros=st.integers(0, 3),
    currency=st.sampled_from(["", "$", "€"]),
    style=st.sampled_from(["#### {}", "The answer is {}.", "\\boxed{{{}}}", "so the total is {} dollars", "Answer: {} units"]),
)
@settings(max_examples=300, deadline=None)
def test_any_integer_formatted_round_trips(n, zeros, currency, style):
    reply = "Some work: 2 + 2 = 4.\n" + style.format(_formats(n, zeros, currency))
    assert parse_number(extract_number(reply)) == n


@given(num=st.integers(-10**6, 10**6), den=st.integers(1, 10**4))
@settings(max_examples=200, deadline=None)
def test_format_number_is_exact(num, den):
    value = Fraction(num, den)
    assert parse_number(format_number(value)) == value


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_extractors_never_raise_on_text(text):
    extract_number(text)
    extract_choice(text, ["alpha", "beta", "gamma", "delta"])
    assert isinstance(extract_code(text), str)


OPTIONS = ["Hemolytic uremic syndrome", "Oral ulcers", "Colorectal cancer", "Pancreatic cancer"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("The answer is (B)", "B"),
        ("B. Oral ulcers", "B"),
        ("Answer: C", "C"),
        ("answer: c", "C"),
        ("Final: \\boxed{D}", "D"),
        ("\\boxed{\\text{(A)}}", "A"),
        ("The patient is at risk of colorectal cancer.", "C"),
        ("**Answer:** **B**", "B"),
        ("D", "D"),
        ("the answer is a cat", None),
        ("I cannot tell.", None),
    ],
)
def test_extract_choice_cases(reply, expected):
    assert extract_choice(reply, OPTIONS) == expected


def test_option_text_with_symbols_matches_as_written():
    options = ["(1+n*v)/(n+v)", "1", "(1-n*v)/(n+v)", "(1+n*v)/(n-v)"]
    assert extract_choice("so it is (1-n*v)/(n+v)", options) == "C"
    # an option that contains another ("1" inside the fraction) does not steal the match
    assert extract_choice("so it is (1+n*v)/(n-v)", options) == "D"


@pytest.mark.parametrize("lang", ["python", "py", "Python3", ""])
@pytest.mark.parametrize("first", ["print(1)", "python_version = 3", "yield_value = 2", "type(x)", "hello()"])
def test_code_fence_keeps_code_starting_with_tag_letters(lang, first):
    # lstrip("```python") would eat the leading "p", "y", "t" ... of such code
    reply = f"Here:\n```{lang}\n{first}\nx = 1\n```\nDone."
    assert extract_code(reply) == f"{first}\nx = 1\n"


def test_extract_code_takes_last_block_or_whole_reply():
    reply = "```python\ndef f():\n    return 1\n```\nthen fixed:\n```python\ndef f():\n    return 2\n```"
    assert extract_code(reply) == "def f():\n    return 2\n"
    assert extract_code("def g():\n    return 3\n") == "def g():\n    return 3\n"
    assert extract_code("```python\ndef h():\n    return 4\n") == "def h():\n    return 4\n"
    assert extract_code("````python\nx = '```'\n````") == "x = '```'\n"


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="reply"):
        extract_number(None)
    with pytest.raises(TypeError, match="reply"):
        extract_code(3)


# --------------------------------------------------------------------------- a finished answer

from gcache.io.tasks.contracts import answer_complete  # noqa: E402


@pytest.mark.parametrize(
    "family, text, complete",
    [
        ("math", "3 + 4 = 7\n#### 7\n", True),
        ("math", "#### 1,000 dollars\nand more", True),
        ("math", "#### 7", False),  # the number may go on: 7 -> 75
        ("math", "#### \n", False),  # no number on the line
        ("math", "So the answer is 7 eggs.\n", True),
        ("math", "\\boxed{7}\n", True),
        ("math", "The answer is\n", False),
        ("math", "She has 7 eggs.\nThe answer is clear\n", False),
        ("science", "Reasoning.\nAnswer: B\n", True),
        ("medicine", "The answer is (D).\n", True),
        ("science", "Answer: B", False),
        ("science", "The answer is a tricky one\n", False),  # lower-case 'a' is a word, not a choice
        ("science", "Answer: Both are wrong\n", False),
        ("code", "```python\ndef f(x):\n    return x\n```\n", True),
        ("code", "```python\ndef f(x):\n    return x\n```", False),  # the fence line is not ended yet
        ("code", "```python\ndef f(x):\n    return x\n", False),
        ("code", "```\nprint(f(2))\n```\n", False),  # a closed block without a def
        ("code", "```\nprint(f(2))\n```\nNow:\n```python\nasync def g():\n    pass\n```\n", True),
    ],
)
def test_answer_complete_cases(family, text, complete):
    assert answer_complete(family, text) is complete


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["#", "0", "7", " ", "\n", "Answer", " is", ":", "B", "C", "(", ")", "```", "python",
                                  "def ", "\\boxed{", "}"]), max_size=40).map("".join))
def test_a_complete_answer_stays_complete_as_text_is_appended(text):
    # Decoding only appends: once complete, always complete (so stopping never comes too late).
    for family in ("math", "science", "code"):
        for cut in range(len(text) + 1):
            if answer_complete(family, text[:cut]):
                assert answer_complete(family, text)
                break


def test_answer_complete_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="family"):
        answer_complete("poetry", "#### 1\n")
