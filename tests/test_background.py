"""The read-ahead thread behind the loader's prefetch and the shard writer's source reads."""

import threading
import time

import pytest

from pipeline.data.background import run_ahead


def _threads(name):
    return [t for t in threading.enumerate() if t.name == name]


def test_items_arrive_in_order_through_the_transform():
    assert list(run_ahead(range(100), 3, lambda x: x * 2, name="ra-order")) == [2 * x for x in range(100)]
    assert not _threads("ra-order")


def test_a_consumer_that_stops_early_leaves_no_producer_running():
    def slow():
        for i in range(1000):
            time.sleep(0.002)
            yield i

    stream = run_ahead(slow(), 4, name="ra-early")
    assert [next(stream) for _ in range(5)] == list(range(5))
    assert _threads("ra-early")
    stream.close()  # what a `break` out of the training loop does
    assert not _threads("ra-early"), "the producer outlived its consumer"


def test_a_producer_error_reaches_the_consumer_and_the_thread_ends():
    def failing():
        yield 1
        raise ValueError("shard 3 is missing")

    stream = run_ahead(failing(), 2, name="ra-error")
    assert next(stream) == 1
    with pytest.raises(ValueError, match="shard 3 is missing"):
        next(stream)
    assert not _threads("ra-error")


def test_a_full_queue_does_not_block_the_producer_forever():
    produced = []

    def items():
        for i in range(10):
            produced.append(i)
            yield i

    stream = run_ahead(items(), 1, name="ra-full")
    assert next(stream) == 0
    time.sleep(0.2)  # the producer is now waiting on the full queue
    stream.close()
    assert not _threads("ra-full") and len(produced) < 10
