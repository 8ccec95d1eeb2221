"""Adaptive micro-batching: concurrent single-image requests share one ONNX Runtime run."""

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from hub.errors import MedhubError


class ServiceOverloaded(MedhubError):
    """The batch queue is full: answered with 503 rather than queued without bound."""


class MicroBatcher:
    """Collects items for up to `max_latency_ms` (or `max_batch_size` items), runs them as one batch and hands
    each caller its rows; `workers` threads do this, so that many batches run at once. The queue holds at most
    `max_queue` waiting items; beyond that `submit` refuses. `solo`, when given, runs a lone item while no other
    run is in flight and none waits (e.g. on a session using every core), and none has overlapped another for
    `quiet_ms`: a single client gets the whole machine and a loaded service keeps its narrower concurrent runs.
    Under load the queue drains for moments while request threads decode uploads; a lone item taking every core
    then, with another run starting beside it, oversubscribed the cores; the quiet period keeps the solo session to
    an idle service (`benchmarks/bench_serving.py` measures the service against ONNX Runtime in process)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], list[np.ndarray]],
        max_batch_size: int = 8,
        max_latency_ms: float = 5.0,
        max_queue: int = 64,
        workers: int = 1,
        solo: Callable[[np.ndarray], list[np.ndarray]] | None = None,
        quiet_ms: float = 1000.0,
    ):
        self.run, self.max_batch_size, self.max_latency = run, max_batch_size, max_latency_ms / 1000.0
        self.workers, self.solo, self.quiet = workers, solo, quiet_ms / 1000.0
        self._crowded_at = float("-inf")  # when a batch last started beside another run, or with company
        self.queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue(maxsize=max_queue)
        self._in_flight, self._lock = 0, threading.Lock()
        for index in range(workers):
            threading.Thread(target=self._loop, name=f"medhub-batcher-{index}", daemon=True).start()

    def submit(self, item: np.ndarray) -> list[np.ndarray]:
        """The outputs for one item (batch axis removed); blocks until its batch has run."""
        future: Future = Future()
        try:
            self.queue.put_nowait((item, future))
        except queue.Full:
            raise ServiceOverloaded("the service is at capacity; retry shortly") from None
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            try:
                while len(batch) < self.max_batch_size:
                    batch.append(self.queue.get(timeout=self.max_latency))
            except queue.Empty:
                pass
            items, futures = zip(*batch)
            with self._lock:
                now = time.monotonic()
                if len(batch) > 1 or self._in_flight > 0 or not self.queue.empty():
                    self._crowded_at = now
                alone = self.solo is not None and now - self._crowded_at > self.quiet
                self._in_flight += 1
            try:
                outputs = (self.solo if alone else self.run)(np.stack(items))
            except Exception as error:  # hand the failure to every waiting request, keep serving
                for future in futures:
                    future.set_exception(error)
                continue
            finally:
                with self._lock:
                    self._in_flight -= 1
            for index, future in enumerate(futures):
                future.set_result([output[index] for output in outputs])
