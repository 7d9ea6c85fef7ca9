"""Pure helpers of the master."""

import pytest

from forkserver.master import describe_exit


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "exit code 0"), (3, "exit code 3"), (-9, "killed by SIGKILL"),
     (-15, "killed by SIGTERM"), (-40, "killed by signal 40")],
)  # fmt: skip
def test_worker_exits_are_described_with_code_or_signal_name(code: int, text: str) -> None:
    assert describe_exit(code) == text
