"""Store calls with a deadline: a call that never returns (the store's host is SIGSTOPped) times out in time."""
import threading
import time

import pytest

from vitscale.distributed.bounded_store import BoundedStore, StoreTimeout


class _FakeStore:
    """add() blocks until released, as a TCPStore client's does while the store's host is stopped."""

    def __init__(self):
        self.release = threading.Event()
        self.values = {}

    def add(self, key, amount):
        self.release.wait()
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def get(self, key):
        raise RuntimeError(f"no key {key}")


def test_a_blocked_call_times_out_and_later_calls_fail_fast_until_it_returns():
    fake = _FakeStore()
    store = BoundedStore(fake, deadline_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout, match=r"store's add did not return within 0.5 s"):
        store.add("hb", 1)
    assert 0.5 <= time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    with pytest.raises(StoreTimeout, match="an earlier call has not returned yet"):
        store.add("hb", 1)  # not queued behind the blocked call on the same connection
    assert time.monotonic() - t0 < 0.2
    fake.release.set()  # the host is continued: the blocked add completes, and the store is usable again
    time.sleep(0.1)
    assert store.add("hb", 1) == 2


def test_an_error_of_the_call_itself_is_raised_as_is():
    with pytest.raises(RuntimeError, match="no key who/0"):
        BoundedStore(_FakeStore(), deadline_s=1.0).get("who/0")
