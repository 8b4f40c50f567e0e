"""The fenced code blocks of README.md, with the section each stands in."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # the line of the opening fence, 1-based
    section: str  # the nearest heading above it
    code: str

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')[:40]}"


def blocks(path: Path = README) -> list[Block]:
    found: list[Block] = []
    section = ""
    fence: tuple[str, int] | None = None
    lines: list[str] = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if fence is None:
            if text.startswith("#"):
                section = text.lstrip("#").strip()
            elif text.startswith("```"):
                fence, lines = (text[3:].strip(), number), []
        elif text.startswith("```"):
            found.append(Block(fence[0], fence[1], section, "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(text)
    return found
