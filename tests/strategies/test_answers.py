"""Final-answer extraction, normalisation and majority voting (strategies/answers.py)."""

from __future__ import annotations

import pytest

from strategies.answers import (
    FORM_CODE_ONLY,
    FORM_NO_ANSWER,
    FORM_OK,
    FORM_PLACEHOLDER,
    FORM_TRUNCATED,
    extract,
    final_answer,
    form,
    is_code_only,
    is_placeholder,
    majority,
    normalize,
    placeholders,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # numbers: the last one in the text, commas, currency, decimals, signs, fractions
        ("We add them up and get 1,000 apples in total", "1000"),
        ("It costs $1,234.50 with tax", "1234.5"),
        ("first 3, then 5, finally 12.0", "12"),
        ("so x = -3", "-3"),
        ("Move the marker -12 steps", "-12"),
        ("half of it is 1/2", "1/2"),
        ("0.25 of 8 is 2.50", "2.5"),
        ("the total is 12345678901234567891", "12345678901234567891"),  # exact, not via float
        # \boxed{}: the last one, nested braces kept whole, wins over everything else
        (r"so \boxed{42}", "42"),
        (r"first \boxed{3} then \boxed{5}", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{ {a} + {b} } is the answer is 7", "{a} + {b}"),
        (r"The answer is 3 but \boxed{1,000}", "1000"),
        (r"\boxed { 7 }", "7"),
        # "the answer is ..."
        ("Reasoning 1 2 3. The answer is 42.", "42"),
        ("The answer is 42 apples.", "42"),
        ("The final answer is 12.0", "12"),
        ("The answer is -7.", "-7"),
        ("The answer is $5.", "5"),
        ("The answer is 3, not 4", "3"),
        ("The answer is Paris.", "paris"),
        ("the answer is   New   York!", "new york"),
        ("The answer is (B).", "B"),
        ("The answer is 1 and later the answer is 2", "2"),  # the last statement counts
        # "Answer:"
        ("Answer: 17", "17"),
        ("**Answer:** 42", "42"),
        ("Answer: -0.5", "-0.5"),
        ("Answer: 1/3", "1/3"),
        ("Answer: $1,000.00", "1000"),
        ("Answer: B", "B"),
        ("Answer: (C)", "C"),
        ("Answer: d.", "D"),
        # option letters in prose
        ("I pick option D.", "D"),
        ("Looking at each, choice (b) fits", "B"),
        # last non-empty line when nothing else is found
        ("Let me think.\nParis\n\n", "paris"),
        ("  Hello   World  ", "hello world"),
    ],
)
def test_extract(text: str, expected: str) -> None:
    assert extract(text) == expected


@pytest.mark.parametrize("text", [None, "", "   \n\t "])
def test_extract_nothing(text: str | None) -> None:
    assert extract(text) is None


def test_extract_without_last_line_fallback() -> None:
    assert extract("Paris is lovely in spring", last_line=False) is None
    assert extract("Paris is lovely in spring") == "paris is lovely in spring"
    # answer-like forms are still found
    assert extract("The answer is Paris.", last_line=False) == "paris"
    assert extract("about 12 of them", last_line=False) == "12"


@pytest.mark.parametrize("text", ["The answer is infinity.", "Answer: inf", "Answer: -Infinity", "Answer: NaN"])
def test_extract_non_finite_words_do_not_crash(text: str) -> None:
    # float("inf") parses, and int(inf) used to raise OverflowError out of the whole request
    got = extract(text)
    assert got is not None
    assert got == got.lower()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,000", "1000"),
        ("1000.0", "1000"),
        ("$1000", "1000"),
        (" 1000. ", "1000"),
        ("**7**", "7"),
        ("`7`", "7"),
        ("-0.50", "-0.5"),
        ("007", "7"),
        ("1e3", "1000"),
        ("1/2", "1/2"),
        ("(b)", "B"),
        ("b)", "B"),
        ("C.", "C"),
        (r"\text{yes}", "yes"),
        ("Hello   World", "hello world"),
        ("infinity", "infinity"),
        ("nan", "nan"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_normalize_makes_equivalent_forms_agree() -> None:
    forms = ["1,000", "1000", "1000.0", "$1000", "$1,000.00", " 1000. "]
    assert len({normalize(f) for f in forms}) == 1
    assert normalize("12345678901234567891") != normalize("12345678901234567890")


def test_majority() -> None:
    assert majority(["3", "7", "7", "7"]) == ("7", 0.75)
    # the share is over all candidates, unparsed ones included
    assert majority(["7", None, "7", "3"]) == ("7", 0.5)
    assert majority(["5"]) == ("5", 1.0)
    assert majority([None, None]) == (None, 0.0)
    assert majority([]) == (None, 0.0)


def test_majority_tie_goes_to_the_first_seen() -> None:
    assert majority(["3", "7", "7", "3"])[0] == "3"
    assert majority(["7", "3", "3", "7"])[0] == "7"


# ---- well-formedness (issue 12, item 7) ----------------------------------------------------------

INSTR = "Think step by step, then end with a line 'The answer is X.'"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (INSTR, {"x"}),
        ('End with "The answer is N".', {"n"}),
        ("Reply as Answer: <answer>", {"<answer>"}),
        ("The answer is the sum of both numbers.", set()),  # a sentence, not a template
        ("", set()),
        (None, set()),
    ],
)
def test_placeholders_come_from_the_format_instruction(prompt: str | None, expected: set[str]) -> None:
    assert placeholders(prompt) == expected


def test_placeholder_answers_are_never_answers() -> None:
    t = placeholders(INSTR)
    assert is_placeholder("x", t)
    assert is_placeholder("<answer>")  # bracketed forms anywhere
    assert is_placeholder("your answer")
    assert not is_placeholder("x")  # a bare letter only when the prompt used it
    assert not is_placeholder("42", t) and not is_placeholder(None, t)
    assert final_answer("The answer is X.", "stop", t) == (None, FORM_PLACEHOLDER)
    assert final_answer("The answer is N.", "stop", placeholders('End with "The answer is N"')) == (
        None, FORM_PLACEHOLDER)


def test_an_echoed_template_falls_back_to_the_reasoning_but_ranks_low() -> None:
    t = placeholders(INSTR)
    assert final_answer("5 + 3 = 8\nThe answer is X.", "stop", t) == ("8", FORM_TRUNCATED)


def test_truncated_and_code_only_replies_rank_last() -> None:
    assert final_answer("Step 1: 12 + 30 = 42. The answer is 42.", "stop") == ("42", FORM_OK)
    assert final_answer("Step 1: 12 + 30 = 42, then 42 * 3 = 1", "length") == ("1", FORM_TRUNCATED)
    assert final_answer("```python\nx = 5\nprint(x * 3)\n```", "stop") == ("3", FORM_CODE_ONLY)
    # code followed by a stated answer is fine
    assert final_answer("```python\nprint(15)\n```\nThe answer is 15.", "stop") == ("15", FORM_OK)
    assert final_answer("", "stop") == (None, FORM_NO_ANSWER)
    assert form("The answer is 7", "7", "stop") < form("The answer is 7", "7", "length")
    assert FORM_OK < FORM_TRUNCATED < FORM_CODE_ONLY < FORM_PLACEHOLDER < FORM_NO_ANSWER
    assert not is_code_only("no code here 5") and not is_code_only(None)


def test_quoted_answers_lose_their_quotes() -> None:
    assert extract('The answer is "donet".') == "donet"
    assert extract("The answer is 'tllet'") == "tllet"
    assert extract("The answer is \u201cabc\u201d.") == "abc"
