"""Fixtures of the fine-tuning tests: the shipped checkpoints, one torch thread, small files."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-v4"
QWEN = ROOT / "models" / "tiny-qwen3-moe"


@pytest.fixture(autouse=True)
def one_thread():
    """The development machine is shared: keep each test on one core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def demo() -> Path:
    return DEMO


@pytest.fixture
def qwen() -> Path:
    return QWEN


@pytest.fixture
def small_train(tmp_path) -> Path:
    """The first 16 conversations of demo-v4's fine-tuning file."""
    lines = (DEMO / "finetune" / "train.jsonl").read_text().splitlines()[:16]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
