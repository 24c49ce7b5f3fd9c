"""Finding the Python to run in a model's answer."""

from __future__ import annotations

import re

# Every fence, whatever its language, so a ```bash block is never paired with the next fence.
_CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON = frozenset({"python", "py", "python3"})


def extract_code(text: str) -> str | None:
    """The last fenced Python block in a model's answer, if any."""
    blocks = _CODE_BLOCK.findall(text or "")
    # A block tagged Python wins over an untagged one (often the output shown after the code).
    tagged = [code for lang, code in blocks if lang.lower() in _PYTHON]
    bare = [code for lang, code in blocks if not lang]
    found = tagged or bare
    return found[-1].strip() if found else None
