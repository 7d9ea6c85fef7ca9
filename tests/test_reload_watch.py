"""``reload = true``: a changed source file reloads the daemon, with no failed connection.

The handler lives in a scratch directory (a module and a package), the
test rewrites it while a load flows, and the new code serves once the
reload has completed.  Unit-level: which files the watcher finds
without importing anything, and that a tick stats a bounded batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from forkserver.eventloop import EventLoop
from forkserver.watch import SourceWatcher, handler_sources
from tests.loadgen import BackgroundLoad
from tests.support import read_line, start_daemon

HANDLER = '''\
def handle(conn, peer):
    data = conn.recv(100)
    conn.sendall(b"{version} " + data)
'''


def write_handler(path: Path, version: str, mtime: int) -> None:
    path.write_text(HANDLER.format(version=version))
    os.utime(path, ns=(mtime, mtime))  # distinct whatever the file system's granularity


def ask(daemon: object) -> bytes:
    with daemon.connect() as sock:  # type: ignore[attr-defined]
        sock.sendall(b"hi\n")
        return read_line(sock)


def test_a_changed_handler_serves_after_the_reload_with_no_failed_connection(
        tmp_path: Path) -> None:
    source = tmp_path / "devhandler.py"
    write_handler(source, "v1", 1_000_000_000_000_000_000)
    with start_daemon("devhandler:handle", "--reload", cwd=tmp_path, workers=2) as daemon:
        watching = daemon.wait_log("reload_watching")
        assert watching["files"] == 1
        assert ask(daemon) == b"v1 hi\n"
        expect = {b"v1 hi\n", b"v2 hi\n"}
        with BackgroundLoad(*daemon.address, total=None, concurrency=8, payload=b"hi\n",
                            expect=lambda answer: answer in expect) as load:
            load.wait_answered(50)
            write_handler(source, "v2", 1_000_000_000_000_000_999)
            changed = daemon.wait_log("reload_source_changed")
            assert changed["path"] == str(source)
            daemon.wait_log("reload_completed", generation=1)
            load.wait_answered(load.answered + 50)
            result = load.stop()
        assert result.failures == [], result.failure_summary()
        assert ask(daemon) == b"v2 hi\n"
        assert daemon.stop() == 0


def test_reload_with_preload_is_refused_at_load(tmp_path: Path) -> None:
    with start_daemon("forkserver.examples.echo:handle", "--reload", "--preload",
                      wait_ready=False) as daemon:
        assert daemon.proc.wait(timeout=20) == 78
        daemon.logs.wait_eof(20)
        assert "reload = true with preload = true" in daemon.logs.text()


def test_the_handler_sources_are_found_without_importing(tmp_path: Path) -> None:
    package = tmp_path / "devpkg"
    (package / "sub").mkdir(parents=True)
    (package / "__pycache__").mkdir()
    for name in ("__init__.py", "app.py", "sub/__init__.py", "sub/more.py",
                 "__pycache__/app.cpython.pyc", "notes.txt"):
        (package / name).write_text("raise SystemExit('imported!')\n")
    (tmp_path / "single.py").write_text("raise SystemExit('imported!')\n")
    found = handler_sources("devpkg.app:handle", [str(tmp_path)])
    assert sorted(Path(p).relative_to(package).as_posix() for p in found) == [
        "__init__.py", "app.py", "sub/__init__.py", "sub/more.py"]
    assert handler_sources("single:handle", [str(tmp_path)]) == [str(tmp_path / "single.py")]
    assert handler_sources("nowhere_at_all:handle", [str(tmp_path)]) == []
    assert "devpkg" not in sys.modules and "single" not in sys.modules


def test_a_tick_stats_a_bounded_batch_and_a_change_is_seen_once(tmp_path: Path) -> None:
    files = [tmp_path / f"f{i}.py" for i in range(10)]
    for path in files:
        path.write_text("x")
    seen: list[str] = []
    loop = EventLoop()
    try:
        watcher = SourceWatcher(loop, lambda: [str(p) for p in files], seen.append,
                                interval=0.0, per_tick=4)  # fmt: skip
        watcher.start()
        os.utime(files[9], ns=(1, 1))
        for _ in range(2):  # files 0-3, then 4-7: the change is not looked at yet
            watcher._tick()
        assert seen == []
        watcher._tick()  # 8-9
        assert seen == [str(files[9])]
        for _ in range(3):  # a whole round more: nothing new
            watcher._tick()
        assert seen == [str(files[9])]
        watcher.close()
    finally:
        loop.close()
