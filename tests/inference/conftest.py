"""Fixtures for engine tests: one loaded engine per session over tests/conftest.py's tiny checkpoint."""

import pytest

from inference import LLM


@pytest.fixture(scope="session")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=tiny_checkpoint, device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """The same checkpoint loaded by plain transformers: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, use_safetensors=True).eval()
