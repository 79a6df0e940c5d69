"""Turning one position's logits into the next token, and into log-probabilities for the client.

Sampling runs on the CPU in float32 with a per-request `torch.Generator`, so a seed gives the
same tokens whatever device produced the logits (up to the logits' own numerical differences).
Log-probabilities are the log-softmax of the raw logits, before temperature, top-k and top-p,
which is what vLLM returns by default.
"""

from __future__ import annotations

import torch

from .outputs import TokenLogprobs
from .sampling_params import SamplingParams


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from `logits` [vocab] (float32, CPU) as `params` asks."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (always >= 1 token)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def token_logprobs(logprobs: torch.Tensor, chosen: int, top_k: int) -> TokenLogprobs:
    """{token_id: logprob} for the chosen token first, then the `top_k` most likely ones."""
    result = {chosen: float(logprobs[chosen])}
    if top_k > 0:
        values, indices = torch.topk(logprobs, min(top_k, logprobs.numel()))
        for token_id, value in zip(indices.tolist(), values.tolist(), strict=True):
            result.setdefault(token_id, value)
    return result


def prompt_token_logprobs(
    logits: torch.Tensor, prompt_ids: list[int], top_k: int
) -> list[TokenLogprobs | None]:
    """Per prompt position, the logprob of the actual token given what precedes it; None at 0.

    `logits` is the prefill output [prompt_len, vocab]: row i predicts token i + 1.
    """
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1).cpu()
    result: list[TokenLogprobs | None] = [None]
    for position, token_id in enumerate(prompt_ids[1:]):
        result.append(token_logprobs(logprobs[position], token_id, top_k))
    return result


def request_generator(seed: int | None, engine_generator: torch.Generator) -> torch.Generator:
    """A fresh CPU generator for one request: from its seed, or drawn from the engine's generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=engine_generator))
    # Any Python int is a valid seed: fold it into the generator's 64-bit range.
    return torch.Generator().manual_seed(seed & (2**64 - 1))
