"""A kernel wrapper for the store tests that counts, delays or fails tile computations."""

from __future__ import annotations

import time

from ntkit.kernels import KernelFunction


class Instrumented(KernelFunction):
    """Delegates to ``base`` (same config, so the same store identity) and counts its calls.

    ``fail_after=k`` raises RuntimeError on call k + 1 (a crash after k tiles); ``delay`` sleeps per call.
    """

    name = "instrumented"

    def __init__(self, base: KernelFunction, fail_after: int | None = None, delay: float = 0.0):
        self.base = base
        self.fail_after = fail_after
        self.delay = delay
        self.calls = 0

    def _matrix(self, x1, x2, same):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.base._matrix(x1, x2, same)

    def to_config(self):
        return self.base.to_config()
