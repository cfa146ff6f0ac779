"""A generated table is pasted in more than one place (README.md and docs/): each copy is the same block,
under the same `<!-- generated: <command> -->` marker, so the README cannot show numbers the docs do not."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- generated: (.+?) -->\n(.*?)<!-- end generated -->", re.S)


def blocks(path: Path) -> dict[str, str]:
    return {cmd.strip(): body for cmd, body in BLOCK.findall(path.read_text())}


def test_every_generated_block_in_readme_is_the_docs_block_of_the_same_command() -> None:
    docs: dict[str, list[tuple[Path, str]]] = {}
    for path in sorted((ROOT / "docs").glob("*.md")):
        for cmd, body in blocks(path).items():
            docs.setdefault(cmd, []).append((path, body))
    readme = blocks(ROOT / "README.md")
    assert readme, "README.md shows one generated results table"
    for cmd, body in readme.items():
        assert cmd in docs, f"README's block for `{cmd}` has no copy in docs/"
        assert all(body == other for _, other in docs[cmd]), f"README's block for `{cmd}` differs from docs/"
        assert "Measured at commit" in body  # provenance travels with the numbers


def test_readme_stays_short() -> None:
    # A newcomer reads the README first: what it is, the commands, one results table, where to change what.
    # Deep dives go to docs/ (`wc -w` counting: whitespace-separated words).
    words = len((ROOT / "README.md").read_text().split())
    assert words < 1500, f"README.md has {words} words: move detail into docs/"
