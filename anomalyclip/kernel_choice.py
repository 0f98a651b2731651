"""A process-wide choice of CPU kernel, like a ``torch.backends`` flag, with what ``"auto"`` measured.

Shared by :mod:`anomalyclip.cpu_linear` and :mod:`anomalyclip.cpu_attention`: the backend is read
once from an environment variable (``"auto"`` when unset or unknown), may be set in code, and
``"auto"``'s measurements (per shape and thread count) survive switching (switching back measures
nothing again); :meth:`KernelChoice.clear` forgets them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Hashable

import torch

from .errors import InvalidInputError

logger = logging.getLogger(__name__)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_seconds(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """The best wall time in seconds of each of two calls: one untimed warm-up each, then
    ``repeats`` timed calls alternating between them (so load falls on both alike)."""
    first(), second()
    best_first = best_second = float("inf")
    for _ in range(repeats):
        best_first = min(best_first, _seconds(first))
        best_second = min(best_second, _seconds(second))
    return best_first, best_second


class KernelChoice:
    """The backend of one kind of kernel and ``"auto"``'s measurements (shape key -> faster kernel).

    Args:
        what: the kernel's name in messages, e.g. ``"CPU linear"``.
        env_var: the environment variable read on first use.
        backends: the allowed names; ``"auto"`` among them.
    """

    def __init__(self, what: str, env_var: str, backends: tuple[str, ...]) -> None:
        self.what, self.env_var, self.backends = what, env_var, backends
        self.backend: str | None = None  # None: not yet read from the environment
        self.choices: dict[Hashable, bool] = {}  # (shape key, threads) -> the non-default kernel is faster
        self._lock = threading.Lock()

    def get(self) -> str:
        """The current backend (first read from the environment variable, default ``"auto"``)."""
        if self.backend is None:
            value = os.environ.get(self.env_var, "auto").strip().lower() or "auto"
            if value not in self.backends:
                logger.warning("Ignoring %s=%r: use one of %s.", self.env_var, value, ", ".join(self.backends))
                value = "auto"
            self.backend = value
        return self.backend

    def set(self, backend: str) -> str:
        """Set the backend; returns the previous one. Raises ``InvalidInputError`` for an unknown name."""
        if backend not in self.backends:
            raise InvalidInputError(f"Unknown {self.what} backend {backend!r}; use one of {', '.join(self.backends)}.")
        previous = self.get()
        self.backend = backend
        return previous

    def choose(self, key: Hashable, measure: Callable[[], bool]) -> bool:
        """``"auto"``'s choice for ``key`` at the current thread count: measured once, then kept.

        One measurement at a time: concurrent first calls would time each other's load.
        """
        key = (key, torch.get_num_threads())
        choice = self.choices.get(key)
        if choice is None:
            with self._lock:
                choice = self.choices.get(key)
                if choice is None:
                    choice = self.choices[key] = bool(measure())
        return choice

    def clear(self) -> None:
        """Forget what ``"auto"`` measured (the next calls measure again)."""
        with self._lock:
            self.choices.clear()
