"""Torch's thread count for one-token steps on a CPU: one thread or all of them, whichever runs faster.

At a one-token step (a batch of one decoding) nearly every operation is tiny, yet torch and MKL
still open parallel regions for some of them (a 4x40 matmul, a softmax over four rows), and
waking the second thread for those costs more than it gives: on the 2-core CI machine such a
matmul took 2.5 us with two threads and 1.2 us with one. A model with large weights gains from
the threads all the same (inference/layers/linear.py splits a one-row product over them), a
small one loses (demo-v4's decode step was ~4% faster on one thread). Which way a model and a
machine go is measured, not guessed: the first TRIAL_STEPS one-token steps at each setting
alternate, and the one with the lower median step time is kept for the engine's lifetime.
Steps with more tokens always use every thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

TRIAL_STEPS = 24
"""One-token steps timed at each setting before choosing (48 in all: a fraction of one reply)."""


class OneTokenThreads:
    """Chooses, then applies, the thread count of one-token CPU steps (`step`)."""

    def __init__(self, device: torch.device):
        self.threads = torch.get_num_threads()
        self.choice: int | None = None if device.type == "cpu" and self.threads > 1 else self.threads
        self.trials: dict[int, list[float]] = {1: [], self.threads: []}

    @contextmanager
    def step(self, num_tokens: int) -> Iterator[None]:
        """Run the step inside this with the chosen thread count (measuring it, while still choosing)."""
        if num_tokens != 1 or self.choice == self.threads:
            yield
            return
        count = self.choice or min(self.trials, key=lambda n: len(self.trials[n]))
        torch.set_num_threads(count)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            torch.set_num_threads(self.threads)
        if self.choice is None:
            self.trials[count].append(elapsed)
            if all(len(times) >= TRIAL_STEPS for times in self.trials.values()):
                self.choice = min(self.trials, key=lambda n: statistics.median(self.trials[n]))
