"""The models a worker process keeps loaded between tasks.

One instance lives in each worker process (worker-side state, like the engine's own core):
the first task for a model loads it, later tasks reuse it. Web processes never import this.

Before a model is loaded its folder is checked against the SHA-256 manifest recorded when it
was imported (citadel.registry.services.model_files_check): a pickle checkpoint or a changed file
is refused, audited, and the job fails with the file's name.

CITADEL_BENCH_STUB_ENGINE=1 (benchmarks only: bench/gateway.py) puts StubEngine in the real
engine's place, answering at once, so a benchmark measures the control plane's own overhead.
"""

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from citadel.jobs.logprobs import TokenTexts

STUB_ENGINE_ENV = "CITADEL_BENCH_STUB_ENGINE"


@dataclass
class StubEvent:
    """The fields of inference.StreamEvent that the worker reads."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list | None = None


@dataclass
class StubEngine:
    """Benchmarks only: answers every request at once with one fixed token, no model involved.

    Streams yield `tokens` events (CITADEL_BENCH_STUB_TOKENS, default 1) back to back.
    """

    path: str
    tokens: int = field(default_factory=lambda: int(os.environ.get("CITADEL_BENCH_STUB_TOKENS", "1")))

    def _events(self):
        for n in range(1, self.tokens + 1):
            yield StubEvent(text="ok", token_ids=[1], finish_reason="length" if n == self.tokens else None,
                            prompt_tokens=1, completion_tokens=n)

    def stream(self, prompt, params=None, lora_request=None, cache_salt=None):
        return self._events()

    def stream_chat(self, messages, params=None, lora_request=None, cache_salt=None):
        return self._events()

    def stats(self) -> dict:
        return {"backend": "stub"}


class EngineCache:
    def __init__(self):
        self._engines: dict[str, object] = {}
        self._token_texts: dict[str, TokenTexts] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str, engine_settings: dict) -> str:
        return json.dumps([path, engine_settings], sort_keys=True)

    def get(self, *, path: str, engine_settings: dict | None = None):
        """The loaded `inference.LLM` for this checkpoint and settings, loading it on first use."""
        key = self._key(path, engine_settings or {})
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                from citadel.registry.services import model_files_check

                model_files_check(path=path)  # pickle or a changed file: refused and audited
                if os.environ.get(STUB_ENGINE_ENV) == "1":
                    engine = StubEngine(path=path)
                else:
                    from inference import LLM  # imported here: torch is a worker-only dependency

                    engine = LLM(model=path, **(engine_settings or {}))
                self._engines[key] = engine
            return engine

    def token_texts(self, *, path: str) -> TokenTexts:
        """Token strings and bytes for this checkpoint's tokenizer (a separate instance, see TokenTexts)."""
        with self._lock:
            texts = self._token_texts.get(path)
            if texts is None:
                from inference.loader import load_tokenizer

                texts = self._token_texts[path] = TokenTexts(load_tokenizer(Path(path)))
            return texts

    def loaded_paths(self) -> list[str]:
        with self._lock:
            return sorted({json.loads(key)[0] for key in self._engines})

    def stats(self) -> dict[str, dict]:
        """Each loaded engine's counters (batch sizes, steps, preemptions), keyed by checkpoint path."""
        with self._lock:
            engines = list(self._engines.items())
        return {json.loads(key)[0]: engine.stats() for key, engine in engines}


engines = EngineCache()
