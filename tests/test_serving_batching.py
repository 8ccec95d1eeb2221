"""The micro-batcher: concurrent items share runs, each caller gets its own rows, the queue is bounded."""

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from serving.batching import MicroBatcher, ServiceOverloaded


def test_concurrent_items_are_batched_and_answered_with_their_own_rows():
    sizes = []

    def run(batch: np.ndarray) -> list[np.ndarray]:
        sizes.append(len(batch))
        return [batch * 2, batch.sum(axis=1)]

    batcher = MicroBatcher(run, max_batch_size=4, max_latency_ms=50)
    items = [np.full(3, float(i)) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(batcher.submit, items))
    for i, (doubled, total) in enumerate(results):
        np.testing.assert_array_equal(doubled, np.full(3, 2.0 * i))
        assert total == 3.0 * i
    assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) < 12


def test_full_queue_is_refused_and_errors_reach_every_caller():
    release = threading.Event()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        release.wait(5)
        raise RuntimeError("session failed")

    batcher = MicroBatcher(run, max_batch_size=1, max_latency_ms=1, max_queue=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, np.zeros(2))  # taken by the loop, blocks in run
        for _ in range(100):
            if batcher.queue.empty():
                break
            threading.Event().wait(0.01)
        second = pool.submit(batcher.submit, np.zeros(2))  # waits in the queue
        threading.Event().wait(0.05)
        with pytest.raises(ServiceOverloaded):
            batcher.submit(np.zeros(2))
        release.set()
        for future in (first, second):
            with pytest.raises(RuntimeError, match="session failed"):
                future.result(timeout=10)


def test_workers_run_that_many_batches_at_once():
    both_running = threading.Barrier(2, timeout=5)  # broken (an error to each caller) unless two runs overlap

    def run(batch: np.ndarray) -> list[np.ndarray]:
        both_running.wait()
        return [batch + 1]

    batcher = MicroBatcher(run, max_batch_size=1, max_latency_ms=1, workers=2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(batcher.submit, [np.zeros(2), np.ones(2)]))
    np.testing.assert_array_equal(np.stack([r[0] for r in results]), [[1, 1], [2, 2]])


def test_a_lone_item_goes_to_solo_and_concurrent_items_do_not():
    calls = []
    first_running, release = threading.Event(), threading.Event()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        calls.append(("run", len(batch)))
        if batch[0, 0] == 0:  # the first item holds its run until released
            first_running.set()
            release.wait(5)
        return [batch + 1]

    def solo(batch: np.ndarray) -> list[np.ndarray]:
        calls.append(("solo", len(batch)))
        return [batch + 1]

    batcher = MicroBatcher(run, max_batch_size=1, max_latency_ms=1, workers=2, solo=solo, quiet_ms=300)
    np.testing.assert_array_equal(batcher.submit(np.zeros(2))[0], [1, 1])
    assert calls == [("solo", 1)]
    calls.clear()
    batcher.solo = None  # the next item must be running when the one after it arrives
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(batcher.submit, np.zeros(2))
        assert first_running.wait(5)
        batcher.solo = solo
        second = pool.submit(batcher.submit, np.ones(2))
        np.testing.assert_array_equal(second.result(timeout=5)[0], [2, 2])  # ran beside the first, not alone
        release.set()
        np.testing.assert_array_equal(busy.result(timeout=5)[0], [1, 1])
    assert calls == [("run", 1), ("run", 1)]
    calls.clear()
    batcher.submit(np.full(2, 5.0))  # alone, but right after an overlap: a loaded service keeps its narrow runs
    time.sleep(0.4)
    batcher.submit(np.full(2, 5.0))  # alone after the quiet period: the whole machine again
    assert calls == [("run", 1), ("solo", 1)]
