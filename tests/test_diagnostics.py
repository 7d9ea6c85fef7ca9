"""Bad input gets an error that names what is wrong and where.

Bind specs, TOML files past the shape limits, duplicate keys, and
descriptors passed by socket activation that are not what they should
be (through the real command line, behind the same shim the systemd
tests use).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from forkserver import config
from forkserver.config import ConfigError
from tests.support import ROOT

ECHO = "forkserver.examples.echo:handle"
SHIM = ROOT / "tests" / "systemd_e2e" / "listen_shim.py"


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {})
    return str(info.value).removeprefix(f"{path}")


def test_a_long_bind_spec_says_it_is_too_long_and_the_limit(tmp_path: Path) -> None:
    spec = "h" * 5000 + ":80"
    expected = f"is too long: {len(spec)} characters, the limit is 4096"
    assert expected in _error(tmp_path, f'[[listeners]]\nbind = "{spec}"\n')
    with pytest.raises(ConfigError, match=expected):
        config.load(None, {"FORKSERVER_BIND": spec})


def test_a_duplicate_key_is_named(tmp_path: Path) -> None:
    message = _error(tmp_path, "workers = 2\nname = 'a'\nworkers = 3\n")
    assert message.startswith(":3: TOML syntax error: key 'workers' is given a value twice")


def test_a_top_level_bind_points_to_listeners_tables(tmp_path: Path) -> None:
    message = _error(tmp_path, 'bind = "127.0.0.1:8000"\n')
    assert message.startswith(":1, key 'bind': unknown setting: in a file, each listener is "
                              'a [[listeners]] table with bind = "..."')  # fmt: skip


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("name = 'x'\n" + ".".join(["a"] * 33) + " = 1\n", 2,
         "a dotted key of more than 32 parts (the limit)"),
        ("[" + ".".join(["t"] * 40) + "]\n", 1, "a dotted key of more than 32 parts (the limit)"),
        ("x = " + "[" * 33 + "]" * 33 + "\n", 1,
         "arrays and tables nested more than 32 deep (the limit)"),
        ("x = " + "{a = " * 33 + "1" + "}" * 33 + "\n", 1,
         "arrays and tables nested more than 32 deep (the limit)"),
        ("\n\n" + "k" * 300 + " = 1\n", 3, "a key of 300 characters, over the limit of 256"),
        ('"' + "k" * 300 + '" = 1\n', 1, "a key of 302 characters, over the limit of 256"),
        ("name = 'x'   " + " " * 70_000 + "\n", 1,
         "a line longer than 65536 characters (the limit)"),
    ],
)
def test_a_file_past_a_shape_limit_is_refused_naming_the_limit_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    assert _error(tmp_path, text) == f":{line}: {message}; the file is refused before it is parsed"


def test_strings_and_comments_do_not_count_toward_the_shape_limits(tmp_path: Path) -> None:
    dots, brackets = "." * 60, "[" * 100 + "{" * 100  # name: at most 64 characters
    path = tmp_path / "fine.toml"
    path.write_text(
        f'# {dots} {brackets}\nname = "{dots}"\nlog_file = \'/{dots}/{brackets}\'\n'
        f'pid_file = """/x{dots}\n{brackets}"""\n'
        'handler = "a.b.c.d:e.f"\n[[listeners]]\nbind = "127.0.0.1:1"\n'
        '[[listeners]]\nbind = "unix:/run/x.y.z"\nname = "a.b"\n'
    )
    with pytest.raises(ConfigError, match="key 'pid_file': expected printable text"):
        config.load(str(path), {})  # the scan passed: the value checks speak
    path.write_text(path.read_text().replace(f'pid_file = """/x{dots}\n{brackets}"""\n', ""))
    loaded = config.load(str(path), {})
    assert loaded.settings.name == dots
    assert [item.bind for item in loaded.settings.listeners] == ["127.0.0.1:1", "unix:/run/x.y.z"]


def test_the_example_file_passes_the_shape_scan() -> None:
    config.load(str(ROOT / "config" / "forkserver.toml"), {})


def _activated(*shim_args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SHIM), *shim_args, "--", sys.executable, "-m", "forkserver", "run",
         "--workers", "1", ECHO],
        check=False, pass_fds=pass_fds, cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
    )  # fmt: skip


def test_a_closed_activation_descriptor_is_called_not_open() -> None:
    result = _activated("--count", "1")  # LISTEN_FDS=1, and nothing at fd 3
    assert result.returncode == 69, result.stderr
    assert "LISTEN_FDS=1: descriptor 3 is not open" in result.stderr
    assert "ListenFIFO" not in result.stderr


@pytest.mark.parametrize(
    ("bound", "expected"),
    [
        (False, "is an unbound stream socket (never bound, never listening), not a listening one"),
        (True, "is a stream socket bound to 127.0.0.1:{port} that is not listening, not a "
               "listening one"),
    ],
)
def test_a_stream_socket_that_does_not_listen_is_described_as_it_is(
    bound: bool, expected: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if bound:
            sock.bind(("127.0.0.1", 0))
        result = _activated(str(sock.fileno()), pass_fds=(sock.fileno(),))
        port = sock.getsockname()[1]
    assert result.returncode == 69, result.stderr
    assert "inherited descriptor 3 (unknown) " + expected.format(port=port) in result.stderr
    assert "connected socket" not in result.stderr


def test_a_fifo_passed_as_a_socket_is_called_a_fifo() -> None:
    read_end, write_end = os.pipe()
    try:
        result = _activated(str(read_end), pass_fds=(read_end,))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 69, result.stderr
    expected = "inherited descriptor 3 (unknown) is a FIFO or pipe (a ListenFIFO= unit?)"
    assert expected in result.stderr
