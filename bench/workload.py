"""The seeded request mix every system in a benchmark run serves, so their numbers compare.

A workload is a list of requests (prompt token ids, how many tokens to generate, when the request
arrives) built from a seed and the model's vocabulary alone: the same settings give the same
requests in every process of a run and on every machine. Prompt token ids are drawn from the
ordinary tokens of the vocabulary (no special token: a stray end-of-sequence or chat marker in a
prompt would make its meaning depend on the model family). Lengths are uniform in their ranges.
Arrivals are either all at once (an offline batch: measures throughput) or a Poisson process
of a given rate (a server's traffic: measures latency under load).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadSettings:
    """What `build_workload` draws; recorded in every result file."""

    requests: int = 64
    """How many requests."""
    min_prompt: int = 16
    """Shortest prompt, in tokens."""
    max_prompt: int = 1024
    """Longest prompt, in tokens (lowered per request where prompt + output would not fit the model)."""
    min_output: int = 16
    """Fewest tokens a request generates (end-of-sequence is ignored, so it generates exactly its count)."""
    max_output: int = 256
    """Most tokens a request generates."""
    rate: float = 4.0
    """Poisson arrival rate of the streamed run, in requests per second."""
    seed: int = 0
    """Seeds lengths, token ids and arrival gaps."""

    def __post_init__(self) -> None:
        for name in ("requests", "min_prompt", "max_prompt", "min_output", "max_output"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.min_prompt > self.max_prompt:
            raise ValueError(f"--min-prompt {self.min_prompt} is above --max-prompt {self.max_prompt}")
        if self.min_output > self.max_output:
            raise ValueError(f"--min-output {self.min_output} is above --max-output {self.max_output}")
        if not self.rate > 0:
            raise ValueError(f"--rate must be a positive number of requests per second, got {self.rate!r}")


FULL = WorkloadSettings()
QUICK = WorkloadSettings(requests=16, max_prompt=128, max_output=32, rate=8.0)
"""`--quick`: a run of a few seconds per system on a tiny model."""


@dataclass(frozen=True)
class Request:
    index: int
    prompt_token_ids: list[int]
    output_len: int
    """Tokens to generate, exactly."""
    arrival: float
    """Seconds after the start of the streamed run at which the request arrives (Poisson)."""


def build_workload(settings: WorkloadSettings, token_ids: list[int], max_model_len: int) -> list[Request]:
    """The requests of `settings`, prompts drawn from `token_ids`, each fitting in `max_model_len` tokens."""
    if not token_ids:
        raise ValueError("the model's vocabulary has no ordinary token to build prompts from")
    if settings.min_prompt + settings.min_output > max_model_len:
        raise ValueError(
            f"the model holds {max_model_len} tokens per sequence, less than "
            f"--min-prompt {settings.min_prompt} "
            f"plus --min-output {settings.min_output}: lower them"
        )
    rng = random.Random(settings.seed)
    requests, clock = [], 0.0
    for index in range(settings.requests):
        output_len = rng.randint(
            settings.min_output, min(settings.max_output, max_model_len - settings.min_prompt)
        )
        prompt_len = rng.randint(settings.min_prompt, min(settings.max_prompt, max_model_len - output_len))
        prompt = [rng.choice(token_ids) for _ in range(prompt_len)]
        requests.append(Request(index, prompt, output_len, clock))
        clock += rng.expovariate(settings.rate)
    return requests


def ordinary_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids below both the tokenizer's and the model's vocabulary size that are not special tokens."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]


def summary(settings: WorkloadSettings, requests: list[Request]) -> dict:
    """The settings and what was actually drawn (lengths can be lowered to fit the model)."""
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return {
        **dataclasses.asdict(settings),
        "prompt_tokens": sum(prompts),
        "output_tokens": sum(outputs),
        "longest_prompt": max(prompts),
        "longest_output": max(outputs),
        "poisson_span_s": round(requests[-1].arrival, 3),
        "length_distribution": "uniform",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (defaults: 64 requests, prompts 16..1024, outputs 16..256)")
    group.add_argument(
        "--quick",
        action="store_true",
        help="a short run: 16 requests, prompts 16..128, outputs 16..32, 8 requests/s",
    )
    group.add_argument("--requests", type=int, help="number of requests")
    group.add_argument("--min-prompt", type=int, help="shortest prompt in tokens")
    group.add_argument("--max-prompt", type=int, help="longest prompt in tokens")
    group.add_argument("--min-output", type=int, help="fewest generated tokens per request")
    group.add_argument("--max-output", type=int, help="most generated tokens per request")
    group.add_argument("--rate", type=float, help="Poisson arrival rate of the streamed run, requests/s")
    group.add_argument("--seed", type=int, help="workload seed (default 0)")


def settings_from_args(args: argparse.Namespace) -> WorkloadSettings:
    """The preset (--quick or full) with any flag given on the command line overriding it."""
    base = QUICK if args.quick else FULL
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(WorkloadSettings)
        if getattr(args, f.name, None) is not None
    }
    if "max_output" in overrides and "min_output" not in overrides:
        overrides["min_output"] = min(base.min_output, overrides["max_output"])
    if "max_prompt" in overrides and "min_prompt" not in overrides:
        overrides["min_prompt"] = min(base.min_prompt, overrides["max_prompt"])
    return dataclasses.replace(base, **overrides)
