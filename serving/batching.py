"""Adaptive micro-batching: concurrent single-image requests share one ONNX Runtime run."""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from hub.errors import MedhubError


class ServiceOverloaded(MedhubError):
    """The batch queue is full: answered with 503 rather than queued without bound."""


class MicroBatcher:
    """Collects items for up to `max_latency_ms` (or `max_batch_size` items), runs them as one batch and hands
    each caller its rows; `workers` threads do this, so that many batches run at once. The queue holds at most
    `max_queue` waiting items; beyond that `submit` refuses."""

    def __init__(
        self,
        run: Callable[[np.ndarray], list[np.ndarray]],
        max_batch_size: int = 8,
        max_latency_ms: float = 5.0,
        max_queue: int = 64,
        workers: int = 1,
    ):
        self.run, self.max_batch_size, self.max_latency = run, max_batch_size, max_latency_ms / 1000.0
        self.workers = workers
        self.queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue(maxsize=max_queue)
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
            try:
                outputs = self.run(np.stack(items))
            except Exception as error:  # hand the failure to every waiting request, keep serving
                for future in futures:
                    future.set_exception(error)
                continue
            for index, future in enumerate(futures):
                future.set_result([output[index] for output in outputs])
