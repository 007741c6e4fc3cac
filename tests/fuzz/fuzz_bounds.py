"""What every fuzzed reader must respect: only the allowed errors escape, one line each, in bounded time and memory.

Every fuzz module imports this first; it sets hypothesis's profile. CI runs a fixed, bounded set of examples
(``derandomize``: the same inputs every run, so a failure reproduces).
``VITSCALE_FUZZ=long pytest tests/fuzz`` runs 2000 random examples per property (50x CI), for a soak.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import tracemalloc

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much], print_blob=True)
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=2000, derandomize=False, **_COMMON)
settings.load_profile("long" if os.environ.get("VITSCALE_FUZZ") == "long" else "ci")

# No single read may ask for more than this: a header claiming 100 GB must not make the reader allocate it.
MAX_READ_REQUEST = 1 << 20


@contextlib.contextmanager
def time_limit(seconds: float, what: str = "reader"):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def hang(_signum, _frame):
        raise TimeoutError(f"{what} still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_limit(max_bytes: int, what: str = "reader"):
    """Fail if Python allocates more than ``max_bytes`` at once inside the block (tracemalloc's peak)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= max_bytes, f"{what} allocated {peak} bytes at its peak, more than {max_bytes}"


class StingyStream(io.RawIOBase):
    """A byte stream that fails any single read asking for more than MAX_READ_REQUEST bytes (and can trickle
    out a few bytes per read, as a pipe may)."""

    def __init__(self, data: bytes, trickle: int = 0):
        self.data, self.at, self.trickle, self.largest = data, 0, trickle, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        assert n is not None and 0 <= n <= MAX_READ_REQUEST, f"read({n}) asks for more than {MAX_READ_REQUEST}"
        self.largest = max(self.largest, n)
        if self.trickle:
            n = min(n, self.trickle)
        out = self.data[self.at:self.at + n]
        self.at += len(out)
        return out


def one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) < 1000, f"not one short line: {message!r}"
