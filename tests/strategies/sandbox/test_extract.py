"""Finding the Python to run in a model's answer (strategies/sandbox/extract.py)."""

from __future__ import annotations

import pytest

from strategies.sandbox import extract_code


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\nprint(1)\n```", "print(1)"),
        ("```py\nprint(1)\n```", "print(1)"),
        ("```Python\nprint(1)\n```", "print(1)"),
        ("```\nprint(1)\n```", "print(1)"),
        # the last Python block wins
        ("```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```\nThe answer is 2.", "print(2)"),
        # another language's block is skipped, and does not pair its closing fence with the next one
        ("```bash\npip install x\n```\nThen:\n```python\nprint(2)\n```", "print(2)"),
        ("```python\nprint(3)\n```\nOutput:\n```text\n3\n```", "print(3)"),
        # an untagged block after the code is usually its output: a tagged block is preferred
        ("```python\nprint(4)\n```\nOutput:\n```\n4\n```", "print(4)"),
        ("```python\nx = 1\n\n\nprint(x)\n```", "x = 1\n\n\nprint(x)"),
        ("no code here", None),
        ("", None),
        ("```js\nconsole.log(1)\n```", None),
    ],
)
def test_extract_code(text: str, expected: str | None) -> None:
    assert extract_code(text) == expected


def test_extract_code_none() -> None:
    assert extract_code(None) is None  # type: ignore[arg-type]
