"""The systems a benchmark compares, behind one small interface so the harness treats them alike.

Each system loads the checkpoint, then serves requests and reports when each output token
became available (bench.metrics.RequestTiming):

    load()                                   build or load the model
    warmup()                                 a short untimed run (first-call costs out of the way)
    serve(requests, start, poisson)          every request, arrivals all at `start` or at
                                             start + request.arrival; one RequestTiming each
    batch1(prompt, output_len)               one request alone; its token times
    info()                                   the system's counters since the last call (per phase)
    settings()                               how the system was configured, for the result file
    close()

A system that cannot serve the model raises Unsupported with the reason from `load`.
"""

from __future__ import annotations


class Unsupported(RuntimeError):
    """The system cannot run this model (the message says why)."""


def system_class(name: str):
    if name == "citadel":
        from .citadel import CitadelSystem

        return CitadelSystem
    if name == "transformers_generate":
        from .hf_generate import GenerateSystem

        return GenerateSystem
    if name == "transformers_continuous":
        from .hf_continuous import ContinuousSystem

        return ContinuousSystem
    raise ValueError(f"unknown system {name!r}")


SYSTEMS = ("citadel", "transformers_generate", "transformers_continuous")
