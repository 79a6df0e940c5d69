"""transformers `generate` with padded static batches: what a user without a serving engine writes.

Requests are taken in arrival order, up to `batch_size` of those that have arrived, left-padded
into one batch and decoded to the batch's longest output length; the next batch starts when this
one ends (so under Poisson arrivals a request waits for the batch in flight, as it would behind
such a server). Greedy decoding with end-of-sequence disabled, so every row generates exactly the
batch's max_new_tokens; a request's tokens are its row's first `output_len`, and they count as
available at the step that produced them (a streamer stamps every step), which is kinder to
transformers than returning the batch at its end.

DeepSeek-V4 in transformers ignores the attention mask of a left-padded batch, so its outputs
are not comparable with Citadel's; the amount of work per step is the same, so it is still the
fair speed baseline.
"""

from __future__ import annotations

import time

import torch

from ..metrics import RequestTiming
from ..workload import Request


class _StepClock:
    """A generate() streamer that stamps each decoding step (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class GenerateSystem:
    def __init__(self, spec: dict):
        self.spec = spec
        self.batch_size = spec["batch_size"]
        self.model = None
        self.batches = 0
        self.generated_tokens = 0

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device, dtype = torch.device(self.spec["device"]), getattr(torch, self.spec["dtype"])
        model = AutoModelForCausalLM.from_pretrained(self.spec["model"], dtype=dtype, use_safetensors=True)
        self.model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.spec["model"])
        config_pad = getattr(model.generation_config, "pad_token_id", None)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, config_pad, 0) if isinstance(i, int))
        # No end-of-sequence: generate() fills an unset eos from model.generation_config, so unset it there.
        self.model.generation_config.eos_token_id = None
        self.device = device

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[float]:
        """Decode one left-padded batch; the time of each step's tokens."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        clock = _StepClock()
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            streamer=clock,
        )
        if out.shape[1] != width + max_new_tokens or len(clock.times) != max_new_tokens:
            raise RuntimeError(
                f"transformers generated {out.shape[1] - width} tokens per row ({len(clock.times)} steps), "
                f"expected exactly {max_new_tokens}"
            )
        self.batches += 1
        self.generated_tokens += len(prompts) * max_new_tokens
        return clock.times

    def warmup(self) -> None:
        prompt = self.spec["warmup_prompt"]
        self._generate([prompt, prompt[: max(1, len(prompt) // 2)]], 4)
        self.info()

    def serve(self, requests: list[Request], start: float, poisson: bool) -> list[RequestTiming]:
        timings = [RequestTiming(start + (r.arrival if poisson else 0.0)) for r in requests]
        done = 0
        while done < len(requests):
            wait = timings[done].arrival - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            now = time.perf_counter()
            end = done + 1
            while end < len(requests) and end - done < self.batch_size and timings[end].arrival <= now:
                end += 1
            batch = requests[done:end]
            step_times = self._generate([r.prompt_token_ids for r in batch], max(r.output_len for r in batch))
            for request, timing in zip(batch, timings[done:end], strict=True):
                timing.token_times = step_times[: request.output_len]
            done = end
        return timings

    def batch1(self, prompt: list[int], output_len: int) -> list[float]:
        return self._generate([prompt], output_len)

    def info(self) -> dict:
        """The batches run since the last call, and the tokens they generated (padding rows included)."""
        info = {"batches": self.batches, "generated_tokens_including_padding": self.generated_tokens}
        self.batches = self.generated_tokens = 0
        return info

    def settings(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "padding": "left",
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }

    def close(self) -> None:
        self.model = None
