"""The thread count of one-token CPU steps: measured at both settings, the faster kept, threads restored."""

import time

import pytest
import torch

from inference.engine import step_threads
from inference.engine.step_threads import OneTokenThreads


@pytest.mark.parametrize("slow", [1, 2])
def test_one_token_steps_keep_the_faster_thread_count(two_threads, monkeypatch, slow):
    monkeypatch.setattr(step_threads, "TRIAL_STEPS", 3)
    chooser = OneTokenThreads(torch.device("cpu"))
    seen = []
    for _ in range(6):  # trials: the two settings alternate, three steps each
        with chooser.step(1):
            seen.append(torch.get_num_threads())
            time.sleep(0.02 if torch.get_num_threads() == slow else 0.001)
        assert torch.get_num_threads() == 2  # restored after every step
    assert sorted(seen) == [1, 1, 1, 2, 2, 2]
    assert chooser.choice == 3 - slow
    with chooser.step(1):
        assert torch.get_num_threads() == 3 - slow
    with chooser.step(7):  # a step with more tokens always uses every thread
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_nothing_to_choose_on_one_thread_or_a_gpu(two_threads):
    assert OneTokenThreads(torch.device("cuda")).choice == 2
    torch.set_num_threads(1)
    assert OneTokenThreads(torch.device("cpu")).choice == 1
