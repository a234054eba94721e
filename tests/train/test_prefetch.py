import threading

import pytest

from mt.train.prefetch import Prefetcher


def test_items_come_in_order_each_with_what_was_made_of_it():
    p = Prefetcher(iter(range(50)), lambda i: i * i, depth=3)
    try:
        assert list(p) == [(i, i * i) for i in range(50)]
    finally:
        p.close()


def test_an_error_in_the_thread_is_raised_in_the_consumer_at_its_item():
    def make(i):
        if i == 3:
            raise ValueError("bad item 3")
        return i

    p = Prefetcher(iter(range(10)), make)
    try:
        assert [next(p)[0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad item 3"):
            next(p)
    finally:
        p.close()


def test_close_stops_the_thread_of_an_endless_iterator():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    p = Prefetcher(endless(), str, depth=2)
    assert next(p) == (0, "0")
    p.close()
    assert not any(t.name == "mt-prefetch" and t.is_alive() for t in threading.enumerate())


def test_unthreaded_gives_the_same_items_on_the_callers_thread():
    made_on = []

    def make(i):
        made_on.append(threading.current_thread())
        return -i

    p = Prefetcher(iter(range(5)), make, threaded=False)
    assert list(p) == [(i, -i) for i in range(5)]
    p.close()
    assert set(made_on) == {threading.current_thread()}
