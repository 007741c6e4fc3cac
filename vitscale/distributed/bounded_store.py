"""Rendezvous-store calls that return within a deadline, whatever the store's host does.

A ``TCPStore`` client's own timeout does not cover every case: while the process hosting the store is stopped
(SIGSTOP, a hung node whose kernel still answers TCP), ``add()`` and ``set()`` never return, timeout or not. The
watchdog must notice exactly that case, so each call runs in a helper thread that the caller waits for with
``join(timeout)``. A call that misses its deadline leaves its thread blocked (a daemon: ``os._exit`` ends it); until
that thread returns, further calls fail at once rather than queue behind it on the same connection.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class StoreTimeout(TimeoutError):
    """A store call did not return within its deadline (the store's host is stopped, hung or unreachable)."""

    def __init__(self, message: str, blocked: Optional[threading.Thread] = None):
        super().__init__(message)
        self.blocked = blocked  # the helper thread still inside the call, if any


def call_with_deadline(fn: Callable[[], Any], deadline_s: float, what: str) -> Any:
    """``fn()``'s result, or its exception, if it finishes within ``deadline_s``; else :class:`StoreTimeout`."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller below
            result["error"] = e

    thread = threading.Thread(target=run, name="vitscale-store-call", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise StoreTimeout(f"the rendezvous store's {what} did not return within {deadline_s:g} s", thread)
    if "error" in result:
        raise result["error"]
    return result["value"]


class BoundedStore:
    """A TCPStore client whose calls (``set``/``get``/``add``/``check``) each return or raise within ``deadline_s``."""

    def __init__(self, store: Any, deadline_s: float):
        self._store, self.deadline_s = store, float(deadline_s)
        self._lock = threading.Lock()  # one call at a time on the one connection (watchdog and main thread share it)
        self._blocked: Optional[threading.Thread] = None

    def _call(self, name: str, *args: Any) -> Any:
        if not self._lock.acquire(timeout=self.deadline_s):
            raise StoreTimeout(f"the rendezvous store's {name} waited {self.deadline_s:g} s for an earlier call")
        try:
            if self._blocked is not None and self._blocked.is_alive():
                raise StoreTimeout(f"the rendezvous store's {name}: an earlier call has not returned yet")
            try:
                return call_with_deadline(lambda: getattr(self._store, name)(*args), self.deadline_s, name)
            except StoreTimeout as e:
                self._blocked = e.blocked
                raise
        finally:
            self._lock.release()

    def set(self, key: str, value: str) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, amount)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)
