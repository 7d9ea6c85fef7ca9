"""The README's two set-up commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_opens_with_exactly_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n\n## ", 1)[0]
    assert len(re.findall(r"```sh\n", head)) == 2
    assert len(readme_commands()[:2]) == 2


def test_ci_runs_the_readme_test_command_word_for_word() -> None:
    test_command = readme_commands()[1]
    assert "pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_first_command_runs_the_daemon_on_a_bundled_example() -> None:
    run_command = readme_commands()[0]
    assert "forkserver run" in run_command
    match = re.search(r"forkserver\.examples\.(\w+):(\w+)", run_command)
    assert match, run_command
    example = ROOT / "forkserver" / "examples" / f"{match.group(1)}.py"
    assert example.is_file()
    assert f"def {match.group(2)}" in example.read_text()
