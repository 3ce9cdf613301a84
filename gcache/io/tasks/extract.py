"""Answer extraction and normalisation: from a model's reply to a comparable prediction.

Three families:

- numbers (GSM8K): the final number after ``####``, "The answer is", ``\\boxed{}``, or else the
  last number in the reply; thousands separators, currency, units, signs, decimals and
  fractions are normalised and answers are compared exactly as rationals
  (``18.00 == 18``, ``1,000 == 1000``, ``-5 != 5``).
- choices (GPQA, MedQA): the chosen letter from ``\\boxed{B}``, "Answer: B", "(B)", "B.",
  or the text of one option.
- code (HumanEval, MBPP+): the program in the last fenced block, or the whole reply.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Iterator, Sequence

__all__ = [
    "extract_number",
    "parse_number",
    "numbers_equal",
    "extract_choice",
    "extract_code",
    "format_number",
    "number_line_complete",
    "choice_line_complete",
    "closed_block_with_def",
]

# A number as people write it: optional sign, optional currency, either digits grouped by
# commas in threes (so "1,2,3" stays three numbers) or plain digits, an optional decimal
# part, an optional "/denominator".
_NUMBER = re.compile(
    r"""
    (?P<sign>[-+\u2212]?)
    (?:[$\u20ac\u00a3\u00a5]\s*)?
    (?P<sign2>[-+\u2212]?)
    (?=\d|\.\d)
    (?P<int>\d{1,3}(?:,\d{3})+|\d+)?
    (?P<frac>\.\d+)?
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?
    """,
    re.VERBOSE,
)
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_HASHES = re.compile(r"####\s*")


def _numbers_in(text: str) -> list[tuple[int, str]]:
    """(start, normalised string) of every number in `text`, in order."""
    found = []
    for m in _NUMBER.finditer(text):
        if m.group("int") is None and m.group("frac") is None:
            continue
        # A word character glued before the digits ("x2", "v3") is not a quantity.
        start = m.start("int") if m.group("int") is not None else m.start("frac")
        if start > 0 and (text[start - 1].isalpha() or text[start - 1] == "_"):
            continue
        negative = "-" in (m.group("sign") + m.group("sign2")) or "\u2212" in (m.group("sign") + m.group("sign2"))
        # "3-5" is a range or a subtraction, not "minus five".
        if m.group("sign") and m.start("sign") > 0 and text[m.start("sign") - 1].isdigit():
            negative = False
        digits = (m.group("int") or "0").replace(",", "") + (m.group("frac") or "")
        value = ("-" if negative else "") + digits
        if m.group("den") is not None:
            value += "/" + m.group("den")
        found.append((m.start(), value))
    return found


def parse_number(text: str) -> Fraction | None:
    """The exact rational value of one number written as text (commas, currency, units, sign,
    decimals and fractions allowed), or None when `text` holds no number.

    Only the first number of `text` is read: "1,000 dollars" -> 1000, "-$5" -> -5, "3/4" -> 3/4.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_number: text must be a str, got {type(text).__name__}")
    numbers = _numbers_in(text.strip())
    if not numbers:
        return None
    return _to_fraction(numbers[0][1])


def _to_fraction(value: str) -> Fraction | None:
    try:
        if "/" in value:
            num, den = value.split("/", 1)
            den_f = Fraction(den)
            if den_f == 0:
                return None
            return Fraction(num) / den_f
        return Fraction(value)
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a rational: "18", "-5", "2.5", "1/3"."""
    if value.denominator == 1:
        return str(value.numerator)
    # Terminating decimals print as decimals, others as fractions.
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1:
        text = f"{float(value):.12f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"


def _balanced_brace(text: str, open_at: int) -> str | None:
    """Content of the brace group whose "{" is at `open_at` (nested braces allowed)."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    last = None
    for m in _BOXED.finditer(text):
        content = _balanced_brace(text, m.end() - 1)
        if content is not None:
            last = content
    return last


def _strip_latex(text: str) -> str:
    text = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("\\,", ",")
    text = text.replace("(", "").replace(")", "")
    return text


def extract_number(reply: str) -> str | None:
    """The final numeric answer of `reply`, normalised ("1,000.00" -> "1000"), or None.

    Order: the text after the last "####", after the last "The answer is"/"Answer:", the last
    ``\\boxed{...}``, and else the last number anywhere in the reply.

    With several markers, the kind decides before the position: a "####" line (the format
    the prompts ask for) wins over any "The answer is" and ``\\boxed{}``, wherever they stand
    ("#### 3 ... The answer is 5" -> "3"), then "The answer is"/"Answer:" over ``\\boxed{}``.
    Among markers of one kind the last counts, so a model that corrects itself is read at its
    correction ("#### 3\\n#### 5" -> "5"). A last marker without a number on its line falls
    through to the next kind. (The decoder's stop rule, ``number_line_complete``, ends a reply at
    its first complete marker line, so two markers come from replies decoded without it.)
    """
    if not isinstance(reply, str):
        raise TypeError(f"extract_number: reply must be a str, got {type(reply).__name__}")
    candidates: list[str] = []
    hashes = list(_HASHES.finditer(reply))
    if hashes:
        candidates.append(reply[hashes[-1].end() :])
    answer_is = list(_ANSWER_IS.finditer(reply))
    if answer_is:
        candidates.append(reply[answer_is[-1].end() :])
    boxed = _last_boxed(reply)
    if boxed is not None:
        candidates.append(boxed)
    for segment in candidates:
        # The answer is the first number after the marker, within its line.
        line = _strip_latex(segment.strip()).split("\n", 1)[0]
        numbers = _numbers_in(line)
        if numbers:
            value = _to_fraction(numbers[0][1])
            if value is not None:
                return format_number(value)
    numbers = _numbers_in(_strip_latex(reply))
    for _, text in reversed(numbers):
        value = _to_fraction(text)
        if value is not None:
            return format_number(value)
    return None


def numbers_equal(prediction: str | None, gold: str) -> bool:
    """Whether two answers denote the same rational number (False when either has none)."""
    if prediction is None:
        return False
    a = parse_number(prediction)
    b = parse_number(gold)
    return a is not None and b is not None and a == b


_LETTER_PATTERNS = (
    # "answer is (B)", "Answer: B", "correct option is B", "final answer: **B**"
    r"(?:answer|option|choice)[\s\*]*(?:is|:|=)?[\s\*]*(?:option|choice)?[\s\*]*[:\-]?[\s\*\(\[]*({L})\b",
    # a line that starts with the letter: "(B)", "B.", "B)", "**B**"
    r"(?m)^\s*[\*\(\[]*({L})\s*[\)\]\.:\*](?:\s|$)",
    # "(B)" anywhere
    r"\(({L})\)",
)


def extract_choice(reply: str, options: Sequence[str] = (), letters: str = "ABCD") -> str | None:
    """The letter chosen in `reply` (one of `letters`), or None.

    Tried in order, the last match of each rule winning: ``\\boxed{B}``; "answer is B" /
    "Answer: (B)"; a line starting "(B)" / "B." / "B)"; "(B)" anywhere; the text of exactly
    one option (``options[i]`` is the text of letter ``letters[i]``); a reply that is a bare letter.
    """
    if not isinstance(reply, str):
        raise TypeError(f"extract_choice: reply must be a str, got {type(reply).__name__}")
    if not letters:
        raise ValueError("extract_choice: letters must be non-empty")
    klass = "[" + re.escape(letters) + "]"
    boxed = _last_boxed(reply)
    if boxed is not None:
        inner = _strip_latex(boxed).strip().strip("*").strip()
        m = re.match(rf"\(?({klass})\)?(?:[\.\):\s]|$)", inner)
        if m:
            return m.group(1)
        letter = _option_in(inner, options, letters)
        if letter is not None:
            return letter
    for pattern in _LETTER_PATTERNS:
        matches = re.findall(pattern.format(L=klass), reply, flags=re.IGNORECASE if pattern is _LETTER_PATTERNS[0] else 0)
        # Lower-case "a" in "answer is a cat" must not count: letters are matched upper-case.
        matches = [x for x in matches if x in letters]
        if matches:
            return matches[-1]
    # "Answer: c" (lower case) counts only when the letter stands alone.
    lower = re.findall(
        r"answer\s*(?:is|:)\s*:?\s*\(?([" + re.escape(letters.lower()) + r"])\)?\s*(?:$|[.\n])", reply, flags=re.IGNORECASE
    )
    if lower:
        return lower[-1].upper()
    letter = _option_in(reply, options, letters)
    if letter is not None:
        return letter
    bare = reply.strip().strip("*.").strip()
    if len(bare) == 1 and bare in letters:
        return bare
    return None


def _normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _option_in(text: str, options: Sequence[str], letters: str) -> str | None:
    """The letter of the option whose text appears in `text`: first comparing the texts as
    written (case and spacing aside), then with punctuation ignored. When several options
    appear, one that contains the others wins, else the one mentioned last."""
    for normalise in (_spacing, _normalise_text):
        hay = normalise(text)
        hits = []
        for i, option in enumerate(options[: len(letters)]):
            needle = normalise(option)
            if not needle:
                continue
            found = [m.start() for m in re.finditer(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", hay)]
            if found:
                hits.append((found[-1], len(needle), letters[i]))
        if hits:
            return _pick(hits)
    return None


def _spacing(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _pick(hits: list[tuple[int, int, str]]) -> str:
    hits.sort(key=lambda h: (h[1], h[0]))
    longest = hits[-1]
    if all(h is longest or _contained(h, longest) for h in hits):
        return longest[2]
    return max(hits, key=lambda h: h[0])[2]


def _contained(inner: tuple[int, int, str], outer: tuple[int, int, str]) -> bool:
    return outer[0] <= inner[0] and inner[0] + inner[1] <= outer[0] + outer[1]


_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n", re.MULTILINE)


def _fenced_blocks(text: str) -> Iterator[tuple[str, int | None]]:
    """Each fenced block of ``text`` in order: its body, and where its closing fence line ends
    (before any line break), or None for an unclosed last block, which runs to the end."""
    pos = 0
    while True:
        m = _FENCE.search(text, pos)
        if m is None:
            return
        fence = m.group(1)
        close = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", re.MULTILINE)
        end = close.search(text, m.end())
        if end is None:
            yield text[m.end() :], None
            return
        yield text[m.end() : end.start()], end.end()
        pos = end.end()


def extract_code(reply: str) -> str:
    """The program in the last fenced code block of `reply` (an unclosed last fence runs to the
    end), or the whole reply when it has no fence. The language tag is removed as one word,
    never as a character set, so code starting with "p", "y", "t" ... is kept intact."""
    if not isinstance(reply, str):
        raise TypeError(f"extract_code: reply must be a str, got {type(reply).__name__}")
    blocks = [body for body, _ in _fenced_blocks(reply)]
    if not blocks:
        # A reply that is one line "```python print(1)```" has no newline after the fence.
        inline = re.findall(r"```(?:[\w+#.-]+[ \t])?(.*?)```", reply, flags=re.DOTALL)
        if inline:
            return inline[-1].strip("\n")
        return reply
    return blocks[-1].rstrip() + "\n"


# ------------------------------------------------------------------ a finished answer

# A line with a number after one of the extractor's markers ("####", "The answer is",
# "Answer:", \boxed{...}), ended by a newline.
_NUMBER_LINE = re.compile(r"(?:####|(?i:answer)[ \t]*(?:(?i:is)[ \t]*)?:?|\\boxed[ \t]*\{)[^\n]*?\d[^\n]*\n")
# "Answer: B" / "The answer is (C)" with an upper-case letter, its line ended by a newline.
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w", re.MULTILINE)
_CHOICE_LINE = re.compile(r"\b(?i:answer)\s*(?:(?i:is)\s*)?:?[ \t]*\(?([A-J])\)?(?![A-Za-z0-9])[^\n]*\n")


def number_line_complete(text: str) -> bool:
    """Whether ``text`` holds a finished math answer line: a number after one of the markers that
    ``extract_number`` reads first (``####``, "The answer is", "Answer:", ``\\boxed{``), the
    line ended by its newline (so a number is never cut)."""
    return _NUMBER_LINE.search(text) is not None


def choice_line_complete(text: str) -> bool:
    """Whether ``text`` holds a finished "Answer: X" line, ended by its newline."""
    return _CHOICE_LINE.search(text) is not None


def closed_block_with_def(text: str) -> bool:
    """Whether a fenced block holding a ``def`` is closed, its closing fence line ended by a line break."""
    return any(
        end is not None and end < len(text) and _DEF.search(body) for body, end in _fenced_blocks(text)
    )
