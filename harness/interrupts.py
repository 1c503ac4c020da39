"""Signals around optuna: interrupt cells at once, never optuna's own bookkeeping."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class DeferredInterrupts:
    """SIGINT/SIGTERM raise KeyboardInterrupt at once only while a cell runs (``live``).

    Elsewhere — inside optuna's trial bookkeeping, which a KeyboardInterrupt leaves half done
    (optuna 5 then fails with UnboundLocalError) — the signal is remembered and raised at the
    next safe point: the start of the next cell, or when ``optimize`` returns.
    """

    def __init__(self) -> None:
        self.pending = False
        self.is_live = False

    def _handler(self, signum: int, _frame: object) -> None:
        if self.is_live:
            raise KeyboardInterrupt(f"signal {signum}")
        self.pending = True

    def raise_pending(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt("deferred signal")

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def live(self) -> Iterator[None]:
        self.raise_pending()
        self.is_live = True
        try:
            yield
        finally:
            self.is_live = False
        self.raise_pending()
