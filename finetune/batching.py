"""Data order, padding and the learning-rate schedule: pure functions of the seed and the step.

Nothing here keeps state, so a resumed run recomputes exactly the batches and learning rates
the interrupted one would have used from the step number alone.
"""

from __future__ import annotations

import math
import random

import torch

from .config import TrainConfig
from .dataset import IGNORE, Example

LENGTH_WINDOW = 16
"""Examples are grouped by length within windows of this many batches (less padding, still shuffled)."""


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of `epoch`, in training order."""
    rng = random.Random(f"finetune-{seed}-epoch-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * LENGTH_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids [B, S] right-padded, labels [B, S] (IGNORE off the trained tokens), non-pad token count."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return input_ids, labels, sum(len(e.input_ids) for e in examples)


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of 0-based `step`: linear warm-up, then the config's decay to zero at total_steps."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return peak * (1 - progress)
    return peak
