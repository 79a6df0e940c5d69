"""Continuous batching: which sequences run at each step, and how many tokens each one feeds.

Every step first serves the running sequences, oldest first: a decoding sequence feeds its
one new token, a sequence in the middle of its prompt feeds the next chunk. Then waiting
sequences are admitted, oldest first, while the step's token budget, the running-batch size
and the free cache pages allow; a prompt longer than what is left of the budget starts with a
chunk (chunked prefill), so one long prompt never stalls the decodes of everybody else.

When a running sequence needs a page and none is free, the newest running sequence is
preempted: its pages go back to the pool, its tokens (prompt and everything generated so far)
stay with it, and it returns to the front of the waiting queue to recompute its cache later.
No request is ever dropped.

With prefix caching, a waiting sequence starts after the cached blocks that hold its prompt's
prefix (block_manager.cached_prefix), and the full blocks a step completes are cached when it is
committed; for models with per-sequence state, prefill chunks end at block boundaries so that
state can be snapshotted there (block_manager.chunk).

A waiting sequence whose prompt shares blocks that a running sequence is computing at the moment
waits for them to be cached rather than computing them too (prefix-aware admission, see
_awaits_prefix); the sequences behind it are considered meanwhile.

A request served with a LoRA adapter is admitted only when its adapter is, or can be, loaded
(see inference/lora/manager.py); otherwise it waits, and so do the requests queued behind it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..lora.manager import LoRAManager
from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: sequences and the tokens each one feeds, starting at its num_computed_tokens."""

    seqs: list[Sequence]
    num_tokens: list[int]
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    step_page_limit: int | None = None
    """Most pages a step's sequences may hold together (set by the engine for whole-page KV tiers)."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager, lora: LoRAManager | None = None):
        self.config = config
        self.block_manager = block_manager
        self.lora = lora
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        batch = ScheduledBatch([], [])

        # 1. Running sequences, oldest first; preempt from the newest end when pages run out.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            start = seq.num_computed_tokens
            count = self.block_manager.chunk(seq, start, min(seq.num_tokens - start, budget))
            if not self._fits_step(batch, seq.num_computed_tokens + count):
                break  # the device KV tier holds no more pages this step (whole-page KV tiers)
            while not self.block_manager.can_grow(seq, seq.num_computed_tokens + count):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                self.block_manager.grow(seq, seq.num_computed_tokens + count)
                batch.seqs.append(seq)
                batch.num_tokens.append(count)
                budget -= count
                index += 1
                continue
            # `seq` was the newest and preempted itself: nothing after it is left to serve.

        # 2. Waiting sequences, oldest first, unless this step had to preempt (memory is tight); one
        #    whose prefix a running sequence is computing now is held back (skipped) until it is cached.
        index = 0
        while index < len(self.waiting) and budget > 0 and not batch.num_preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[index]
            hit = self.block_manager.cached_prefix(seq)  # cached blocks it starts from (prefix caching)
            if self._awaits_prefix(seq, hit):
                index += 1
                continue
            start = seq.num_computed_tokens + len(hit) * (self.block_manager.prefix.block_tokens if hit else 0)
            count = self.block_manager.chunk(seq, start, min(seq.num_tokens - start, budget))
            if not self.block_manager.can_grow(seq, start + count, hit) or not self._fits_step(batch, start + count):
                break
            if seq.lora is not None:
                if self.lora is None or not self.lora.acquire(seq.lora):
                    break  # every loaded adapter is in use: wait until one is free
                seq.lora_held = True
            del self.waiting[index]
            self.block_manager.grow(seq, start + count, hit)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(count)
            budget -= count
        return batch

    def _awaits_prefix(self, seq: Sequence, hit: list) -> bool:
        """Whether a running sequence is computing, now, prompt blocks of `seq`'s beyond its hit that
        `seq` could take from the cache once they are committed (prefix-aware admission).

        Holding `seq` then saves computing the same prefix twice: in a burst of requests that share a
        system prompt, only the first computes it, the others start from the cache. The hold cannot
        starve or deadlock: it lasts only while that running sequence's prefill moves forward (it is
        served before any waiting one), and ends when it has passed those blocks or left the batch.
        """
        prefix = self.block_manager.prefix
        if prefix is None or seq.params.prompt_logprobs is not None or not self.running:
            return False
        n = prefix.block_tokens
        resume = len(hit)  # blocks: where seq would start ...
        limit = (seq.num_tokens - 1) // n  # ... and the most it may hit
        if limit <= resume:
            return False
        mine = self.block_manager.block_hashes(seq, limit)
        for other in self.running:
            if not resume * n <= other.num_computed_tokens < other.num_prompt_tokens:
                continue  # not prefilling, or behind seq's start (computing blocks seq already has)
            shared = min(limit, other.num_prompt_tokens // n)
            if other.first_tie < shared * n and self.block_manager.tie_class(other) != self.block_manager.tie_class(seq):
                shared = min(shared, other.first_tie // n)  # its blocks past a tie: for its length class only
            if other.num_computed_tokens >= shared * n:
                continue
            theirs = self.block_manager.block_hashes(other, shared)
            if theirs[resume] == mine[resume]:
                return True
        return False

    def _fits_step(self, batch: ScheduledBatch, num_tokens: int) -> bool:
        """Whether one more sequence of `num_tokens` keeps the step's pages within step_page_limit."""
        if self.step_page_limit is None:
            return True
        used = sum(self.block_manager.pages_for(s.num_computed_tokens + n) for s, n in zip(batch.seqs, batch.num_tokens, strict=True))
        return used + self.block_manager.pages_for(num_tokens) <= self.step_page_limit

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._release_adapter(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def commit(self, batch: ScheduledBatch) -> None:
        """Record that the step wrote the cache entries of the tokens it fed."""
        for seq, count in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += count
            self.block_manager.cache_blocks(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.FINISHED

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_held:
            self.lora.release(seq.lora)
            seq.lora_held = False
