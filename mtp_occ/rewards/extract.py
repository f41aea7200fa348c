"""Final-answer extraction: the last `\\boxed{...}` / `\\fbox{...}` (brace-matched) or the last DAPO-style
"Answer: ..." line, and the `EXTRACTORS` registry behind `grade(..., extract=...)`. Stdlib only."""

from __future__ import annotations

import re
from collections.abc import Callable

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
# `\\.` swallows escaped characters, so `\{`, `\}` (literal braces, e.g. `\left\{ ... \right.`) and `\\{`
# are handled the way LaTeX groups them.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}`; None when there is none or it never closes."""
    opener = max(_BOX_OPENERS, key=text.rfind)
    pos = text.rfind(opener)
    if pos < 0:
        return None
    start, depth = pos + len(opener), 1
    for tok in _BRACE_TOKEN.finditer(text, start):
        char = tok.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:tok.start()]
    return None


def extract_answer_line(text: str) -> str | None:
    """The text after the last "Answer:" (DAPO-Math's output format), stripped; None when absent."""
    matches = _ANSWER_LINE.findall(text)
    return matches[-1].strip() if matches else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {"boxed": extract_boxed,
                                                       "answer_line": extract_answer_line}
