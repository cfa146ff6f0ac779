"""Numbers in README.md and docs/ are generated, never typed by hand.

A generated table is pasted in more than one place (README.md and docs/): each copy is the same block,
under the same `<!-- generated: <command> -->` marker, so the README cannot show numbers the docs do not.
Outside such blocks, prose states findings and points at the table that holds the number."""

from __future__ import annotations

import importlib.util
import json
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


# What the prose may not hold: the look of a measurement. Narrow on purpose (settings are typed freely), so a
# finding written in words ("lost to random at the same budget") passes and a typed result does not.
MEASURED_LOOKING = {
    "a percentage with a decimal point": r"\d+\.\d+\s?%",
    "a ratio written with x": r"(?<![\w.])\d+(?:\.\d+)?[x×](?!\w)",
    "a time with a unit": r"(?<![\w.])\d+(?:\.\d+)?(?:\s?[-–]\s?\d+(?:\.\d+)?)?"
                          r"(?:\s(?:ms|s|h)|\s?(?:min|minutes?|sec|seconds?|hours?))\b",
    "N points": r"(?<![\w.])\d+(?:\.\d+)?(?:\s?[-–]\s?\d+(?:\.\d+)?)?\s(?:\w+\s)?points?\b",
    "a number with three or more decimals": r"(?<![\w.:/-])\d+\.\d{3,}(?!\d)",
}

# Settings that look measured, as written in the docs (whitespace may wrap), each with why it may stay.
ALLOWED = {
    "`body_timeout_s` (10 s)": "the body deadline's default (tests/test_serving_docs.py checks it is the code's)",
    "`body_timeout_s`, 10 s": "the same default",
    "2 GiB address space, 10 s": "the grammar prover's limits",
    "`keep_alive_timeout_s` (90 s)": "Serve's default",
    "every 0.25 s": "how often the program app asks the Serve controller",
    "`health_check_period_s` (1 s)": "the LLM deployment's setting",
    "at once for 60 s": "the attack benchmark's --duration",
    "after 0.3-1.3 s": "the cancellation storm's setting",
    "every 15 s": "the attack benchmark's burst interval",
    "one example is 2.5 points": "arithmetic: one of the gate's 40 gold examples",
}

# Not prose: generated blocks (both marker styles: `<!-- name:begin -->` blocks are rendered by
# benchmarks/attack_report.py and cascade_bench_report.py), fenced code, and inline code (a command, a key,
# or the format of a printed line).
NOT_PROSE = [
    re.compile(r"<!-- generated: .+? -->\n.*?<!-- end generated -->", re.S),
    re.compile(r"<!-- ([\w-]+):begin -->\n.*?<!-- \1:end -->", re.S),
    re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M),
    re.compile(r"`[^`]+`"),
]


def _phrase(text: str) -> re.Pattern[str]:
    return re.compile(r"\s+".join(map(re.escape, text.split())))


def measured_looking(text: str) -> list[tuple[int, str, str]]:
    """(line, rule, match) for every measured-looking number in the prose of one Markdown text."""
    def blank(m: re.Match[str]) -> str:  # keeps line numbers
        return re.sub(r"[^\n]", " ", m.group(0))

    for phrase in ALLOWED:
        text = _phrase(phrase).sub(blank, text)
    for pattern in NOT_PROSE:
        text = pattern.sub(blank, text)
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for rule, pattern in MEASURED_LOOKING.items():
            found += [(n, rule, m.group(0)) for m in re.finditer(pattern, line)]
    return found


def _prose_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_prose_holds_no_measured_looking_number() -> None:
    """Outside generated blocks and code, README.md and docs/*.md hold none of MEASURED_LOOKING: a percentage
    with a decimal point (68.9%), a ratio written with x (0.92x), a time with a unit (77 s, 3-11 s,
    50 minutes), "N points" (6.5 points), a number with three or more decimals (a loss or ECE, 0.081).
    A measured number goes in a generated block, and the prose says what it shows and where it is; a
    setting that looks measured goes in ALLOWED with its reason."""
    found = [f"{path.relative_to(ROOT)}:{n}: {rule}: {match!r}"
             for path in _prose_files() for n, rule, match in measured_looking(path.read_text())]
    assert not found, "typed measurements (generate them, or say what they show):\n" + "\n".join(found)


def test_the_rule_catches_typed_results_and_every_allowed_phrase_is_in_use() -> None:
    typed = ("Active lost: 68.9% against 75.4%, 6.5 points; 0.92x its teacher; 77 s; about 50 minutes; "
             "~0.5 s; ECE 0.084.")
    assert {rule for _, rule, _ in measured_looking(typed)} == set(MEASURED_LOOKING)
    assert not measured_looking("`deployed: 72.0% (0.92x)`\n```\n77 s\n```\n"
                                "<!-- generated: x -->\n68.9%\n<!-- end generated -->\n"
                                "<!-- attack:begin -->\n1.376 s\n<!-- attack:end -->\n")
    prose = "\n".join(path.read_text() for path in _prose_files())
    assert [p for p in ALLOWED if not _phrase(p).search(prose)] == []  # no stale exceptions


def _script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_active_proxy_table_is_rendered_from_the_committed_json() -> None:
    report = json.loads((ROOT / "docs" / "active_proxy.json").read_text())
    table = _script("benchmarks/active_proxy.py").markdown(report)
    command = "python benchmarks/active_proxy.py --from-json docs/active_proxy.json"
    assert blocks(ROOT / "docs" / "pipeline.md")[command] == table + "\n", f"regenerate it: {command}"


def test_the_probe_tables_are_rendered_from_their_committed_json() -> None:
    # The quick recipe's comparison (docs/finetune.md), the calibration probe, the quick run on the whole
    # test set and the threshold rules' comparison (docs/cascade.md): each block is its script's rendering
    # of the JSON it names, so an edit to either side shows here.
    for script, source, doc in (("benchmarks/probes/quick_recipe.py", "docs/finetune_quick_recipe.json",
                                 "docs/finetune.md"),
                                ("benchmarks/probes/calibration_holdout.py", "docs/calibration/holdout_local.json",
                                 "docs/cascade.md"),
                                ("benchmarks/calibration_full_test.py", "docs/calibration/full_test_local.json",
                                 "docs/cascade.md"),
                                *(("benchmarks/probes/threshold_rules.py",
                                   f"docs/calibration/threshold_rules_{profile}.json", "docs/cascade.md")
                                  for profile in ("local", "local_next25", "local_full"))):
        rendered = _script(script).markdown(json.loads((ROOT / source).read_text()), Path(source))
        assert rendered in (ROOT / doc).read_text(), f"regenerate it: python {script} --from-json {source}"
