"""Which embedding rows to train besides the LoRA matrices (config.trainable_tokens).

A base model leaves the output rows of tokens it was never trained to produce close to their
random initialisation, so no low-rank change of the hidden states can make it produce them:
LoRA alone then distorts everything trying (demo-v4 learning new product names it has only
ever read is the case in point). PEFT's trainable_token_indices trains just those rows of the
input embedding and the output head, which leaves every other token's logits alone.

- "reply": every token the training replies contain.
- "new": the reply tokens the base model cannot produce: at every occurrence in the training
  replies it gives them less than NEW_TOKEN_PROBABILITY (one forward pass over the data).
"""

from __future__ import annotations

import torch

from .batching import collate
from .dataset import IGNORE, Example

NEW_TOKEN_PROBABILITY = 1e-3
"""A reply token is "new" when the base model never gives it this much probability where it occurs."""


def reply_tokens(examples: list[Example]) -> list[int]:
    return sorted({t for e in examples for t in e.labels if t != IGNORE})


@torch.no_grad()
def new_tokens(model, examples: list[Example], pad_id: int, device: str, batch_size: int = 16) -> list[int]:
    """Reply tokens whose highest base-model probability over their occurrences is below the threshold."""
    best: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            input_ids, labels, _ = collate(examples[start:start + batch_size], pad_id)
            logits = model(input_ids=input_ids.to(device), use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:].to(device)
            mask = targets != IGNORE
            probability = torch.softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            for token, p in zip(targets[mask].tolist(), probability[mask].tolist(), strict=True):
                best[token] = max(best.get(token, 0.0), p)
    finally:
        model.train(was_training)
    return sorted(t for t, p in best.items() if p < NEW_TOKEN_PROBABILITY)


def token_rows(model, tokens: list[int]) -> dict[str, list[int]]:
    """PEFT trainable_token_indices: those rows of the input embedding and of an untied output head."""
    names = {module: name for name, module in model.named_modules()}
    inputs = model.get_input_embeddings()
    rows = {names[inputs].rsplit(".", 1)[-1]: tokens}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not inputs.weight:
        rows[names[output].rsplit(".", 1)[-1]] = tokens
    return rows
