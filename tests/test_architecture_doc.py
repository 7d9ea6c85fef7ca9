"""docs/architecture.md states the real layout, and the docs cite only files
the project has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def modules_on_disk() -> set[str]:
    found = set()
    for path in (ROOT / "forkserver").rglob("*.py"):
        relative = path.relative_to(ROOT / "forkserver").with_suffix("")
        if relative.name in ("__init__", "__main__") or relative.parts[0] == "examples":
            continue
        found.add("/".join(relative.parts))
    return found


def modules_in_the_table() -> set[str]:
    section = DOC.read_text().split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+`) \|", section, re.MULTILINE):
        named |= set(re.findall(r"`([\w/]+)`", row))
    return named


def test_the_module_table_is_the_package() -> None:
    assert modules_in_the_table() == modules_on_disk()


def test_docs_link_only_to_files_that_exist() -> None:
    for doc in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "SIGNALS.md",
                ROOT / "systemd" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+?\.md)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).is_file(), f"{doc.name} links to {target}"
        assert "DESIGN.md" not in doc.read_text(), f"{doc.name} cites a DESIGN.md"


def test_internals_points_at_the_architecture() -> None:
    assert "(architecture.md)" in (ROOT / "docs" / "internals.md").read_text()
