"""The example config and docs/configuration.md come from the settings
model; they must agree with it, and with `forkserver run --help`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from forkserver import cli, config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "forkserver.toml"
DOCS = ROOT / "docs" / "configuration.md"
REGENERATE = ("regenerate with: .venv/bin/python -c 'from forkserver import config; "
              "open(\"config/forkserver.toml\", \"w\").write(config.render_example_toml()); "
              "open(\"docs/configuration.md\", \"w\").write(config.render_markdown())'")


def test_example_file_is_rendered_from_the_model() -> None:
    assert EXAMPLE.read_text() == config.render_example_toml(), REGENERATE


def test_docs_are_rendered_from_the_model() -> None:
    assert DOCS.read_text() == config.render_markdown(), REGENERATE


def test_example_file_loads_to_the_defaults() -> None:
    assert config.load_settings(str(EXAMPLE), {}) == config.Settings()


def test_example_mentions_every_key_and_its_commented_examples_are_valid(
        tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and (" = " in line or line.startswith("# [[")) else line
        for line in text.splitlines() if "# fd://N" not in line)
    data = tomllib.loads(uncommented)
    for key in config.SETTINGS:
        assert key in data, key
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    s = config.load_settings(str(path), {})
    assert s.user == "nobody"
    assert [ls.name for ls in s.listeners] == ["web", "local"]


def test_docs_list_every_setting_with_env_and_option() -> None:
    text = DOCS.read_text()
    for key in config.SETTINGS:
        assert f"| `{key}` |" in text
        assert f"`{config.env_name(key)}`" in text


def test_run_help_explains_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for key, meta in config.setting_fields():
        if key != "handler":
            assert config.flag_name(key) in out, key
        assert config.env_name(key) in out, key
        assert " ".join(meta.help.split())[:40] in out, key
