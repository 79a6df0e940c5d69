"""transformers' own continuous batching (`ContinuousBatchingManager`), the strongest transformers baseline.

One manager serves every phase, as a server would keep it: requests are added at their arrival
times and their tokens are stamped by transformers as it produces them (record_timestamps), which
is slightly kinder to transformers than Citadel's stamps, taken when the caller receives a token.
The manager gets the same step token budget and batch size as Citadel and a cache sized to hold
the whole workload (transformers sizes it from GPU memory otherwise, and not at all on a CPU).
End-of-sequence is disabled (eos_token_id=-1), so each request generates exactly its output length.

It does not support every architecture: DeepSeek-V4's compressed attention layers are refused
("Invalid layer type: heavily_compressed_attention"); `load` then raises Unsupported with
transformers' message.
"""

from __future__ import annotations

import time

import torch

from ..metrics import RequestTiming
from ..workload import Request
from . import Unsupported

PAGE_SIZE = 32
"""Tokens per cache page (transformers' default is 256, which wastes most of a short request's page)."""

RESULT_TIMEOUT_S = 600.0
"""Longest wait for the next finished request before the phase is declared stuck."""


class ContinuousSystem:
    def __init__(self, spec: dict):
        self.spec = spec
        self.model = None
        self.manager = None
        self._counter = 0

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

        device, dtype = torch.device(self.spec["device"]), getattr(torch, self.spec["dtype"])
        model = AutoModelForCausalLM.from_pretrained(self.spec["model"], dtype=dtype, use_safetensors=True)
        self.model = model.to(device).eval()
        settings = self.spec["engine_settings"]
        pages = sum(-(-n // PAGE_SIZE) for n in self.spec["sequence_tokens"]) + len(
            self.spec["sequence_tokens"]
        )
        self.num_blocks = pages
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=pages,
            max_batch_tokens=settings["max_num_batched_tokens"],
            max_requests_per_batch=settings["max_num_seqs"],
        )
        generation = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
        try:
            self.manager = self.model.init_continuous_batching(
                generation_config=generation, continuous_batching_config=config
            )
            self.manager.start()
        except Exception as error:
            raise Unsupported(f"{type(error).__name__}: {error}") from error

    def _run(self, requests: list[Request], timings: list[RequestTiming]) -> None:
        ids = {}
        for request, timing in zip(requests, timings, strict=True):
            wait = timing.arrival - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self._counter += 1
            request_id = f"bench-{self._counter}"
            added = self.manager.add_request(
                request.prompt_token_ids,
                request_id=request_id,
                max_new_tokens=request.output_len,
                record_timestamps=True,
                eos_token_id=-1,
            )
            if added is None:
                raise RuntimeError(f"transformers' continuous batching dropped request {request.index}")
            ids[request_id] = (request, timing)
        while ids:
            result = self.manager.get_result(timeout=RESULT_TIMEOUT_S)
            if result is None:
                raise RuntimeError(
                    f"transformers' continuous batching returned nothing for {RESULT_TIMEOUT_S:.0f}s "
                    f"with {len(ids)} requests unfinished (its generation thread may have died)"
                )
            if not result.is_finished() or result.request_id not in ids:
                continue
            request, timing = ids.pop(result.request_id)
            if result.error is not None:
                raise RuntimeError(
                    f"transformers' continuous batching failed request {request.index}: {result.error}"
                )
            if len(result.generated_tokens) != request.output_len:
                raise RuntimeError(
                    f"transformers' continuous batching generated {len(result.generated_tokens)} tokens for "
                    "request "
                    f"{request.index}, expected exactly {request.output_len}"
                )
            timing.token_times = list(result.timestamps)

    def warmup(self) -> None:
        prompt = self.spec["warmup_prompt"]
        self.serve([Request(i, prompt, 4, 0.0) for i in range(2)], time.perf_counter(), poisson=False)

    def serve(self, requests: list[Request], start: float, poisson: bool) -> list[RequestTiming]:
        timings = [RequestTiming(start + (r.arrival if poisson else 0.0)) for r in requests]
        self._run(requests, timings)
        return timings

    def batch1(self, prompt: list[int], output_len: int) -> list[float]:
        timing = RequestTiming(time.perf_counter())
        self._run([Request(0, prompt, output_len, 0.0)], [timing])
        return timing.token_times

    def info(self) -> dict:
        return {}

    def settings(self) -> dict:
        settings = self.spec["engine_settings"]
        return {
            "page_size": PAGE_SIZE,
            "num_blocks": self.num_blocks,
            "max_batch_tokens": settings["max_num_batched_tokens"],
            "max_requests_per_batch": settings["max_num_seqs"],
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }

    def close(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True, timeout=10)
            self.manager = None
