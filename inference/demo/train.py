"""The training loop: supervised chat training of the demo model from scratch, on the CPU.

Each conversation is rendered with the checkpoint's own chat template, so training sees
exactly the prompt the engine builds at inference; the loss covers only the reply and the
<|end|> that closes it. Batches group conversations of similar length (less padding), and the
order, like everything else, follows from the seed: the same settings on the same machine
type and thread count give bitwise the same weights.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import BuildSettings
from .corpus import Corpus, Example
from .model import EOS_ID, PAD_ID
from .objectives import IndexerDistillation, RouterBalancer


@dataclass(frozen=True)
class Encoded:
    """Token ids of one conversation and where its reply starts."""

    ids: list[int]
    reply_start: int


def encode(tokenizer, examples: list[Example], max_len: int) -> list[Encoded]:
    """Prompt (chat template, generation prompt on) + reply + <|end|>, as the engine would see them."""
    prompts = [tokenizer.apply_chat_template(list(e.messages), add_generation_prompt=True, tokenize=False)
               for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    reply_ids = tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids
    encoded = []
    for example, prompt, reply in zip(examples, prompt_ids, reply_ids, strict=True):
        ids = prompt + reply + [EOS_ID]
        if len(ids) > max_len:
            raise ValueError(f"a {example.family} conversation has {len(ids)} tokens, more than max_seq_len "
                             f"{max_len}: raise train.max_seq_len or shorten the corpus templates")
        encoded.append(Encoded(ids, len(prompt)))
    return encoded


def batches(encoded: list[Encoded], batch_size: int, rng: random.Random) -> list[list[Encoded]]:
    """Consecutive batches, each of conversations of similar length (sorted within windows of 32 batches)."""
    window = batch_size * 32
    out = []
    for start in range(0, len(encoded), window):
        chunk = sorted(encoded[start:start + window], key=lambda e: len(e.ids))
        group = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(group)
        out += group
    return out


def collate(batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, S] right-padded with <|pad|>, and labels [B, S] (-100 except on the replies)."""
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.reply_start : len(e.ids)] = torch.tensor(e.ids[e.reply_start :])
    return input_ids, labels


def learning_rate(step: int, settings) -> float:
    """Linear warm-up, then cosine decay to min_learning_rate."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.min_learning_rate + (settings.learning_rate - settings.min_learning_rate) * cosine


def train(model, tokenizer, corpus: Corpus, settings: BuildSettings, log: Callable[[str], None] = print) -> dict:
    """Train `model` in place; returns statistics for build.json."""
    t = settings.train
    started = time.monotonic()
    encoded = encode(tokenizer, corpus.training_examples(t.steps * t.batch_size), t.max_seq_len)
    order = batches(encoded, t.batch_size, random.Random(f"batches-{settings.seed}"))
    log(f"encoded {len(encoded)} conversations in {time.monotonic() - started:.0f}s; training {t.steps} steps")

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.learning_rate, betas=(0.9, 0.95), eps=1e-8)
    balancer = RouterBalancer(model, t.router_bias_rate)
    distillation = IndexerDistillation(model)
    balancer.active = distillation.active = True
    model.train()
    tokens = seen = 0
    window_loss = window_kl = 0.0
    worst_load = 0.0
    loop_started = time.monotonic()
    try:
        for step, batch in enumerate(order):
            input_ids, labels = collate(batch)
            token_mask = input_ids != PAD_ID
            balancer.token_mask = token_mask.flatten()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, t)
            logits = model(input_ids=input_ids, use_cache=False).logits  # [B, S, V]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            kl = distillation.loss(token_mask)
            (loss + t.indexer_loss_weight * kl).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            worst_load = max(worst_load, balancer.step())
            tokens += int(token_mask.sum())
            seen += len(batch)
            window_loss += loss.item()
            window_kl += kl.item()
            if (step + 1) % t.log_every == 0 or step + 1 == len(order):
                n = (step % t.log_every) + 1
                elapsed = time.monotonic() - loop_started
                log(f"step {step + 1}/{len(order)}  loss {window_loss / n:.4f}  indexer-kl {window_kl / n:.4f}  "
                    f"lr {learning_rate(step, t):.2e}  worst-expert-load {worst_load:.2f}x  "
                    f"{tokens / elapsed:.0f} tok/s  {elapsed / 60:.1f} min")
                final_loss, window_loss, window_kl, worst_load = window_loss / n, 0.0, 0.0, 0.0
    finally:
        balancer.remove()
        distillation.remove()
        model.eval()
    return {"steps": len(order), "conversations": seen, "tokens": tokens, "final_loss": round(final_loss, 5),
            "seconds": round(time.monotonic() - started, 1)}
