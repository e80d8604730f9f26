"""The shared worker pool: results in order, every batch done before an error, one core."""

from __future__ import annotations

import threading
import time

import pytest

from vmferry.disk import parallel


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64])
def test_results_come_back_in_order(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(parallel, "parallel_workers", lambda: 3)
    assert parallel.map_all(lambda x: x * x, range(n)) == [x * x for x in range(n)]


def test_batches_are_contiguous_and_one_runs_on_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parallel, "parallel_workers", lambda: 2)
    seen: list[tuple[list[int], str]] = []

    def batch(items: list[int]) -> list[int]:
        seen.append((items, threading.current_thread().name))
        return [-x for x in items]

    assert parallel.map_batches(batch, range(9)) == [-x for x in range(9)]
    assert sorted(items for items, _ in seen) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    caller = threading.current_thread().name
    assert {name for items, name in seen if items[0] == 0} == {caller}
    assert all(name.startswith("vmferry-codec") for items, name in seen if items[0] == 5)


def test_an_error_is_raised_after_every_batch_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "parallel_workers", lambda: 2)
    finished: list[int] = []

    def batch(items: list[int]) -> list[int]:
        if items[0] == 0:
            raise ValueError("first batch fails at once")
        time.sleep(0.2)  # the other batch is still working when the error happens
        finished.append(items[0])
        return items

    with pytest.raises(ValueError, match="fails at once"):
        parallel.map_batches(batch, range(4))
    assert finished == [2]


def test_one_core_runs_everything_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "parallel_workers", lambda: 1)
    names: set[str] = set()

    def batch(items: list[int]) -> list[int]:
        names.add(threading.current_thread().name)
        return items

    assert parallel.map_batches(batch, range(5)) == list(range(5))
    assert names == {threading.current_thread().name}
