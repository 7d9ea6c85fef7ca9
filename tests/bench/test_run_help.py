"""``tests/bench/run --help`` prints the options and installs nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run"


def test_help_installs_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "bench-venv"       # where run would put gunicorn and matplotlib
    for flag in ("--help", "-h"):
        result = subprocess.run(
            [str(RUN), "--rounds", "1", flag],
            env={**os.environ, "FORKSERVER_BENCH_VENV": str(venv)},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: "), result.stdout
        assert "--servers" in result.stdout and "--forkserver-from" in result.stdout
        assert not venv.exists(), f"{flag} created the bench's virtualenv"
        assert "apt-get" not in result.stderr + result.stdout
