"""The models a worker process keeps loaded between tasks.

One instance lives in each worker process (worker-side state, like the engine's own core):
the first task for a model loads it, later tasks reuse it. Web processes never import this.
"""

import json
import threading
from pathlib import Path

from citadel.jobs.logprobs import TokenTexts


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
