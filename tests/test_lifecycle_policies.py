"""The pure lifecycle policies: reload generations and worker recycling."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from forkserver.generations import GenerationError, Generations
from forkserver.recycling import (
    MemoryExcess,
    check_memory,
    format_bytes,
    request_limit,
    sample_memory,
    served_enough,
)
from forkserver.worker_table import TableError, WorkerTable

# --- generations ---------------------------------------------------------


def test_a_reload_starts_the_next_generation_and_commits_it() -> None:
    gens = Generations()
    assert gens.request() is True
    assert gens.begin() == 1
    assert gens.reloading
    assert gens.is_live(0) and gens.is_live(1)
    assert gens.commit() == 0
    assert (gens.serving, gens.starting, gens.reloading) == (1, None, False)
    assert not gens.is_live(0)


def test_reloads_asked_for_while_one_starts_merge_into_one() -> None:
    gens = Generations()
    gens.begin()
    assert [gens.request() for _ in range(5)] == [False] * 5
    gens.commit()
    assert gens.take_again() is True
    assert gens.take_again() is False  # taken once
    assert gens.request() is True
    assert gens.begin() == 2


def test_an_abandoned_generation_leaves_the_serving_one_and_its_number_is_not_reused() -> None:
    gens = Generations()
    assert gens.begin() == 1
    assert gens.abandon() == 1
    assert (gens.serving, gens.starting) == (0, None)
    assert not gens.is_live(1)
    assert gens.begin() == 2


def test_impossible_generation_transitions_are_refused() -> None:
    gens = Generations()
    with pytest.raises(GenerationError):
        gens.commit()
    with pytest.raises(GenerationError):
        gens.abandon()
    gens.begin()
    with pytest.raises(GenerationError, match="still starting"):
        gens.begin()


# --- max_requests ----------------------------------------------------------


def test_max_requests_off_means_no_limit() -> None:
    rng = random.Random(1)
    assert request_limit(0, 50, rng) is None
    assert not served_enough(10**9, None)


def test_jitter_spreads_the_limits_within_its_bounds() -> None:
    rng = random.Random(7)
    limits = [request_limit(100, 20, rng) for _ in range(500)]
    assert all(limit is not None and 100 <= limit <= 120 for limit in limits)
    assert len(set(limits)) > 10  # not all workers restart together
    assert {request_limit(100, 0, rng) for _ in range(20)} == {100}


def test_a_worker_has_served_enough_at_its_limit() -> None:
    assert not served_enough(99, 100)
    assert served_enough(100, 100)


# --- max_memory -------------------------------------------------------------


def test_memory_within_or_without_a_limit_is_fine() -> None:
    assert check_memory(100, 0, "rss") is None
    assert check_memory(100, 100, "rss") is None
    assert check_memory(None, 100, "uss") is None


def test_memory_over_the_limit_says_which_and_by_how_much() -> None:
    excess = check_memory(150 * 1024 * 1024, 100 * 1024 * 1024, "uss")
    assert excess == MemoryExcess(metric="uss", used=150 * 2**20, limit=100 * 2**20)
    assert excess.excess == 50 * 2**20
    assert excess.describe() == "USS 150.0 MiB is over max_memory 100.0 MiB by 50.0 MiB"


def test_bytes_read_well() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024) == "3.0 KiB"
    assert format_bytes(5 * 2**30) == "5.0 GiB"
    assert format_bytes(4096 * 2**30) == "4096.0 GiB"


def test_memory_is_sampled_from_a_real_process_and_grows_with_it() -> None:
    code = "import sys; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); " \
           "sys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()"  # fmt: skip
    small = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    big = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert big.stdout is not None and big.stdout.readline() == b"ok\n"
        for metric in ("rss", "uss"):
            small_use = sample_memory(small.pid, metric)  # type: ignore[arg-type]
            big_use = sample_memory(big.pid, metric)  # type: ignore[arg-type]
            assert small_use is not None and big_use is not None
            assert big_use - small_use > 48 << 20, metric
    finally:
        for proc in (small, big):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
        assert big.stdout is not None
        big.stdout.close()
    assert sample_memory(big.pid, "rss") is None  # gone


def test_sampling_ourselves_works_for_both_metrics() -> None:
    assert (sample_memory(os.getpid(), "rss") or 0) > 0
    assert (sample_memory(os.getpid(), "uss") or 0) > 0


# --- the worker table across generations ----------------------------------------


def test_a_slot_is_shared_by_two_generations_and_by_a_retiring_worker_and_its_successor() -> None:
    table = WorkerTable()
    table.add(0, 100, 1, now=0.0, generation=0)
    table.add(0, 200, 1, now=0.0, generation=1)  # a reload fills the same slot
    with pytest.raises(TableError, match="slot 0 is already taken"):
        table.add(0, 300, 1, now=0.0, generation=1)
    table.mark_stopping(200)  # retiring: its successor may start now
    successor = table.add(0, 300, 1, now=0.0, generation=1)
    assert successor.generation == 1
    assert (successor.retired, successor.request_limit) == (False, None)
    assert sorted((w.generation, w.pid) for w in table) == [(0, 100), (1, 200), (1, 300)]
