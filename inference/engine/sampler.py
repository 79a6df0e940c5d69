"""Batched sampling and log-probabilities over the logits of one step.

The transformations (temperature, top-k, top-p) run on the whole [N, vocab] batch at once, row
by row independent, so a row gets the same probabilities alone or in any batch. The draw itself
uses each request's own CPU generator, which is what makes a seeded request give the same
tokens whatever else is running (and whatever device produced the logits, up to their own
numerical differences). Log-probabilities are the log-softmax of the raw logits, before
temperature, top-k and top-p, which is what vLLM returns by default.
"""

from __future__ import annotations

import torch

from ..outputs import TokenLogprobs
from ..sampling_params import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` [N, vocab] (float32), each as its request's params ask."""
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):  # every row greedy (a batch of one, say): no gather of the rows
        return logits.argmax(dim=-1).tolist()
    if greedy:
        for i, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
            tokens[i] = token
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = _probabilities(logits[rows], [params[i] for i in rows]).cpu()
        for j, i in enumerate(rows):
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return tokens


def _probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, vocab] logits -> probabilities after temperature, then top-k, then top-p (at least one token kept)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        kth_values = torch.topk(logits, max(top_k), dim=-1).values  # [n, max_k]
        index = torch.tensor([max(k - 1, 0) for k in top_k], device=device)
        kth = kth_values.gather(1, index[:, None])  # [n, 1]
        kth = kth.masked_fill(torch.tensor(top_k, device=device)[:, None] == 0, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=probs.dtype, device=device)
        sorted_probs, order = torch.sort(probs[nucleus], dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
        probs[nucleus] = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return probs


def logprob_entries(logprobs: torch.Tensor, chosen: list[int], top_k: list[int]) -> list[TokenLogprobs]:
    """Per row of `logprobs` [N, vocab]: {chosen token: logprob, then the row's top_k most likely}."""
    if not chosen:
        return []
    chosen_values = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0].tolist()
    k = min(max(top_k), logprobs.shape[-1])
    values, indices = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
    values, indices = values.tolist(), indices.tolist()
    entries = []
    for row, token in enumerate(chosen):
        entry = {token: chosen_values[row]}
        for token_id, value in zip(indices[row][: top_k[row]], values[row][: top_k[row]], strict=True):
            entry.setdefault(token_id, value)
        entries.append(entry)
    return entries


def request_generator(seed: int | None, engine_generator: torch.Generator) -> torch.Generator:
    """A fresh CPU generator for one request: from its seed, or drawn from the engine's generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=engine_generator))
    # Any Python int is a valid seed: fold it into the generator's 64-bit range.
    return torch.Generator().manual_seed(seed & (2**64 - 1))
