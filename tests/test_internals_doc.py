"""docs/internals.md lists every log event the code emits, and no other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "internals.md"
#: ``extra={"event": "name"}``, or an f-string name such as ``f"worker_{stage}_error"``.
EVENT = re.compile(r"""["']event["']\s*:\s*(f?)["']([a-z_{}]+)["']""")


def events_in_code() -> tuple[set[str], set[str]]:
    """(literal names, patterns of f-string names as regular expressions)."""
    names: set[str] = set()
    patterns: set[str] = set()
    for path in (ROOT / "forkserver").rglob("*.py"):
        for is_format, name in EVENT.findall(path.read_text()):
            if is_format and "{" in name:
                patterns.add("^" + re.sub(r"\{[^}]*\}", "[a-z]+", name) + "$")
            else:
                names.add(name)
    return names, patterns


def events_in_the_doc() -> set[str]:
    section = DOC.read_text().split("\n## Logging events\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))


def test_every_event_in_the_code_is_documented_and_every_documented_one_exists() -> None:
    names, patterns = events_in_code()
    documented = events_in_the_doc()
    assert names, "no event found in the code: the pattern is wrong"
    assert names - documented == set(), "logged but not in docs/internals.md"
    unknown = {name for name in documented - names
               if not any(re.match(pattern, name) for pattern in patterns)}  # fmt: skip
    assert unknown == set(), "in docs/internals.md but never logged"
    for pattern in patterns:
        assert any(re.match(pattern, name) for name in documented), pattern


def test_the_event_pattern_reads_both_forms() -> None:
    text = 'extra={"event": "worker_exited", "x": 1}; extra={"event": f"worker_{stage}_error"}'
    assert EVENT.findall(text) == [("", "worker_exited"), ("f", "worker_{stage}_error")]
