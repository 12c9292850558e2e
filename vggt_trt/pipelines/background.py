"""Background work for the live loop.

:class:`Prefetcher`: batch k+1 is captured, decoded and uploaded while batch k runs on the GPU; the queue
is bounded, so memory stays flat when the consumer is slower; an error in the thread is raised in the
consumer; closing stops the thread within one queue timeout. :class:`BackgroundJob`: one long job (a
VGGT refresh) beside the loop instead of in it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator


class _End:
    pass


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """Iterate ``(item, prepare(item))`` for the items of ``source``, ``depth`` items ahead, in a thread."""

    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], depth: int = 2,
                 poll_s: float = 0.1) -> None:
        self.source, self.prepare, self.poll_s = source, prepare, poll_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="prefetch", daemon=True)

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=self.poll_s)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self.source:
                if not self._put((item, self.prepare(item))):
                    return
            self._put(_End())
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failed(exc))

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        while True:
            value = self._queue.get()
            if isinstance(value, _End):
                return
            if isinstance(value, _Failed):
                raise value.exc
            yield value


class BackgroundJob:
    """At most one job at a time in a worker thread (on its own CUDA stream on a GPU), polled by the loop.

    The live loop hands a VGGT refresh to it so the depth loop goes on meanwhile: a refresh that falls
    due while the previous one still runs is skipped, never queued.
    """

    def __init__(self, device: str = "cpu") -> None:
        import concurrent.futures as cf

        import torch

        self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="background")
        self._stream = torch.cuda.Stream(torch.device(device)) if device.startswith("cuda") else None
        self._future: Any = None

    @property
    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def submit(self, fn: Callable[[], Any], tensors: Iterable[Any] = ()) -> bool:
        """Start ``fn()`` unless a job is running; ``tensors`` are device inputs made on the current stream."""
        if self.busy:
            return False
        if self._stream is not None:
            import torch

            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
            for t in tensors:
                t.record_stream(self._stream)
        self._future = self._executor.submit(self._call, fn)
        return True

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self._stream is None:
            return fn()
        import torch

        with torch.cuda.stream(self._stream):
            return fn()

    def poll(self, wait: bool = False) -> Any:
        """The finished job's result (once), or None while it runs or when there is none."""
        if self._future is None or not (wait or self._future.done()):
            return None
        future, self._future = self._future, None
        return future.result()

    def __enter__(self) -> "BackgroundJob":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
