"""Random TOML never produces a traceback: a config either loads or is
refused with a ``ConfigError`` (exit 78) that names the file."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkserver import cli, config

KEYS = [*config.SETTINGS, *config.LISTENER_KEYS, "workrs", "x", "listeners.bind", "a-b"]

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(f), repr(f))),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=30).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"')
                             .replace("\n", "\\n") + '"'),
    st.sampled_from(['"127.0.0.1:0"', '"unix:/tmp/s"', '"systemd"', '"fd://3"', '"a:b"',
                     '"sync"', '"auto"', '"512M"', '"022"', "0o777", "1979-05-27",
                     "07:32:00", '""', "'lit\\eral'", "[" * 3000 + "]" * 3000]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(KEYS), inner), max_size=3).map(
            lambda kv: "{" + ", ".join(f'"{k}" = {v}' for k, v in kv) + "}")),
    max_leaves=6)
lines = st.one_of(
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f'"{kv[0]}" = {kv[1]}'),
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.sampled_from(["[[listeners]]", "[listeners]", "[workers]", "[[x]]", "# comment", ""]),
    st.text(max_size=20),
)
documents = st.lists(lines, max_size=12).map("\n".join)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check(path: Path) -> None:
    try:
        loaded = config.load(str(path), {})
    except config.ConfigError as exc:
        assert str(exc).startswith(str(path)), exc
        code = 78
    else:
        assert isinstance(loaded.settings, config.Settings)
        code = 0 if loaded.settings.handler else 78     # check-config needs a handler
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["check-config", "-c", str(path)]) == code
    assert "Traceback" not in err.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_toml_documents(workdir: Path, text: str) -> None:
    path = workdir / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(path)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(workdir: Path, data: bytes) -> None:
    path = workdir / "fuzz.bin"
    path.write_bytes(data)
    _check(path)
