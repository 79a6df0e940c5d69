"""The engine core: requests in, one batched step at a time, stream events out.

Single-threaded by design: `add_request`, `step` and `abort` are called from one thread (the
EngineLoop's, in a server). Each `step` schedules, runs the model once over the whole batch,
samples every sequence that is due a token and returns one StreamEvent per new token.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..lora.manager import LoRAManager
from ..outputs import StreamEvent
from .config import EngineConfig
from .model_runner import ModelRunner
from .sampler import logprob_entries, request_generator, sample
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters since the engine started (read them through LLM.stats())."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    batch_size_sum: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """How many steps ran with each batch size."""
    step_seconds: float = 0.0
    """Wall time spent inside step(): against a caller's wall time it shows how long the engine sat idle
    or waited for its callers (bench.batch compares the Batch API's worker with the offline engine by it)."""

    def as_dict(self) -> dict:
        mean = self.batch_size_sum / self.steps if self.steps else 0.0
        return {**self.__dict__, "batch_sizes": dict(self.batch_sizes), "mean_batch_size": mean}


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        config: EngineConfig,
        device: torch.device,
        eos_token_ids: set[int],
        generator: torch.Generator,
    ):
        self.config = config
        self.lora = LoRAManager(model, config.max_loras)
        self.runner = ModelRunner(model, config, device, self.lora)
        self.scheduler = Scheduler(config, self.runner.block_manager, self.lora)
        self.scheduler.step_page_limit = self.runner.step_page_limit
        self.eos_token_ids = eos_token_ids
        self._generator = generator
        self._requests: dict[str, Sequence] = {}
        self.stats = EngineStats()

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def add_request(self, seq: Sequence) -> None:
        """Queue a new request (its prompt already checked against max_model_len)."""
        assert seq.request_id not in self._requests, f"duplicate request id {seq.request_id}"
        assert seq.num_tokens < self.max_model_len
        seq.generator = request_generator(seq.params.seed, self._generator)
        self._requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str) -> None:
        """Stop a request now (its caller went away); unknown or finished ids are ignored."""
        seq = self._requests.pop(request_id, None)
        if seq is not None and seq.status is not SequenceStatus.FINISHED:
            seq.finish("abort")
            self.scheduler.remove(seq)

    def step(self) -> list[tuple[Sequence, StreamEvent]]:
        """Run one batched step; return (sequence, StreamEvent) for every token generated."""
        started = time.perf_counter()
        try:
            return self._step()
        finally:
            self.stats.step_seconds += time.perf_counter() - started

    def _step(self) -> list[tuple[Sequence, StreamEvent]]:
        batch = self.scheduler.schedule()
        self._count(batch)
        if not batch.seqs:
            return []
        result = self.runner.execute(batch)
        self.scheduler.commit(batch)

        for seq, targets, logits in result.prompt_parts:
            chosen = [seq.prompt_token_ids[t] for t in targets]
            logprobs = torch.log_softmax(logits, dim=-1)
            seq.prompt_logprobs.extend(
                logprob_entries(logprobs, chosen, [seq.params.prompt_logprobs] * len(chosen))
            )

        seqs = result.sample_seqs
        if not seqs:
            return []
        tokens = sample(result.sample_logits, [s.params for s in seqs], [s.generator for s in seqs])
        wants = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        entries: dict[int, dict] = {}
        if wants:
            logprobs = torch.log_softmax(result.sample_logits[wants], dim=-1)
            found = logprob_entries(
                logprobs, [tokens[i] for i in wants], [seqs[i].params.logprobs for i in wants]
            )
            entries = dict(zip(wants, found, strict=True))

        events = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):  # detokenizes (LLM's engine tokenizer)
            events.append((seq, seq.append_token(token, entries.get(i), self.eos_token_ids, self.max_model_len)))
        for seq, _ in events:
            if seq.is_finished:
                self.scheduler.remove(seq)
                self._requests.pop(seq.request_id, None)
                self.stats.requests_finished += 1
        return events

    def fail_all(self) -> list[Sequence]:
        """Drop every unfinished request (after a failed step); return them so their callers can be told."""
        dropped = list(self._requests.values())
        for seq in dropped:
            seq.finish("abort")
            self.scheduler.remove(seq)
        self._requests.clear()
        return dropped

    def _count(self, batch) -> None:
        stats = self.stats
        stats.preemptions += batch.num_preempted
        if not batch.seqs:
            return
        size = len(batch.seqs)
        stats.steps += 1
        stats.last_batch_size = size
        stats.max_batch_size = max(stats.max_batch_size, size)
        stats.batch_size_sum += size
        stats.batch_sizes[size] = stats.batch_sizes.get(size, 0) + 1
        for seq, count in zip(batch.seqs, batch.num_tokens, strict=True):
            if seq.num_computed_tokens + count <= seq.num_prompt_tokens or count > 1:
                stats.prefill_tokens += count
            else:
                stats.decode_tokens += count
