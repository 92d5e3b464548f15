"""Run an iterator in a background thread, a bounded number of items ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator


def run_ahead(items: Iterable, depth: int, transform: Callable | None = None, name: str = "run-ahead") -> Iterator:
    """Yield ``items`` (each passed through ``transform``, in the thread) while a thread produces
    up to ``depth`` more. An error in the producer is raised in the consumer. A consumer that stops
    early (break, an exception, the generator closed) stops the producer at its next item and
    waits for it to end, so no producer thread outlives its consumer: a thread still holding
    tensors when the interpreter exits aborts the process (PyTorch frees them without the GIL)."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if transform is not None:
                    item = transform(item)
                if not offer(item):
                    return
                del item
            offer(done)
        except BaseException as error:  # hand the error to the consumer
            offer(error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, daemon=True, name=name)
    producer.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
    finally:
        stop.set()
        while producer.is_alive():  # drop what it queued so nothing it made outlives this call
            producer.join(timeout=0.05)
            _drain(buffer)
        _drain(buffer)


def _drain(buffer: queue.Queue) -> None:
    while True:
        try:
            buffer.get_nowait()
        except queue.Empty:
            return
