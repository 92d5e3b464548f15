"""Run an iterator in a background thread, a bounded number of items ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator


def run_ahead(items: Iterable, depth: int, transform: Callable | None = None, name: str = "run-ahead") -> Iterator:
    """Yield ``items`` (each passed through ``transform``, in the thread) while a thread produces
    up to ``depth`` more. An error in the producer is raised in the consumer; a consumer that stops
    early (break, an exception) stops the producer at its next item."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if transform is not None:
                    item = transform(item)
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as error:  # hand the error to the consumer
            buffer.put(error)

    threading.Thread(target=produce, daemon=True, name=name).start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
