"""Citadel's engine as a benchmarked system: `inference.LLM`, one `stream` per request, each in a thread.

That is how the Celery worker drives the engine (concurrent callers, batched by the engine loop),
and it gives per-token times as the caller sees them: a token counts when its StreamEvent arrives.
Greedy decoding with ignore_eos, so every request generates exactly its output length.
"""

from __future__ import annotations

import threading
import time

from ..metrics import RequestTiming
from ..workload import Request


class CitadelSystem:
    def __init__(self, spec: dict):
        self.spec = spec
        self.llm = None
        self._last_stats: dict = {}

    def load(self) -> None:
        from inference import LLM

        self.llm = LLM(
            model=self.spec["model"],
            device=self.spec["device"],
            dtype=self.spec["dtype"],
            seed=0,
            **self.spec["engine_settings"],
        )
        needed = self.spec["max_sequence_tokens"]
        if self.llm.max_model_len < needed:
            raise RuntimeError(
                f"Citadel holds at most {self.llm.max_model_len} tokens per sequence but the workload needs "
                f"{needed}: lower --max-prompt/--max-output, or give the cache more memory "
                "(--kv-cache-memory)"
            )

    def _stream(self, prompt: list[int], output_len: int, timing: RequestTiming) -> None:
        from inference import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        for event in self.llm.stream(prompt, params):
            now = time.perf_counter()
            timing.token_times.extend([now] * len(event.token_ids))

    def warmup(self) -> None:
        prompt = self.spec["warmup_prompt"]
        self.serve([Request(i, prompt, 4, 0.0) for i in range(2)], time.perf_counter(), poisson=False)
        self.info()

    def serve(self, requests: list[Request], start: float, poisson: bool) -> list[RequestTiming]:
        timings = [RequestTiming(start + (r.arrival if poisson else 0.0)) for r in requests]
        errors: list[BaseException] = []

        def client(request: Request, timing: RequestTiming) -> None:
            try:
                delay = timing.arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                self._stream(request.prompt_token_ids, request.output_len, timing)
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [
            threading.Thread(target=client, args=(r, t), name=f"bench-client-{r.index}", daemon=True)
            for r, t in zip(requests, timings, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for request, timing in zip(requests, timings, strict=True):
            if len(timing.token_times) != request.output_len:
                raise RuntimeError(
                    f"Citadel generated {len(timing.token_times)} tokens for request {request.index}, "
                    f"expected exactly {request.output_len} (ignore_eos)"
                )
        return timings

    def batch1(self, prompt: list[int], output_len: int) -> list[float]:
        timing = RequestTiming(time.perf_counter())
        self._stream(prompt, output_len, timing)
        return timing.token_times

    def info(self) -> dict:
        """The engine's counters since the last call."""
        stats = self.llm.stats()
        before, self._last_stats = self._last_stats, stats
        info = {"backend": stats["backend"]}
        if "steps" not in stats:  # a family still served through transformers has no engine counters
            return info
        for key in ("steps", "prefill_tokens", "decode_tokens", "preemptions"):
            info[key] = stats[key] - before.get(key, 0)
        sizes = {
            size: count - before.get("batch_sizes", {}).get(size, 0)
            for size, count in stats["batch_sizes"].items()
        }
        sizes = {size: count for size, count in sizes.items() if count > 0}
        info["max_batch_size"] = max(sizes, default=0)
        info["mean_batch_size"] = round(sum(s * c for s, c in sizes.items()) / max(sum(sizes.values()), 1), 2)
        return info

    def settings(self) -> dict:
        stats = self.llm.stats()
        return {
            "backend": stats["backend"],
            "engine_settings": self.spec["engine_settings"],
            "max_model_len": self.llm.max_model_len,
            "kv_pages_total": stats.get("kv_pages_total"),
        }

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
