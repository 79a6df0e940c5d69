"""The engine's public entry point: `LLM`, shaped like vLLM's offline API.

`generate` and `chat` return whole results; `stream` and `stream_chat` yield one event per
generated token, which is what the Celery worker forwards as server-sent events. All four go
through the same path for a given model, so a stream's text deltas add up to exactly the text
that `generate` returns for the same prompt, parameters and seed.

Every family Citadel serves has a native definition in inference/models (see
models/registry.py) and runs on Citadel's runtime (inference/engine): one engine loop thread per
LLM steps a continuous batch, so the prompts of one `generate` call, and concurrent `stream`
callers in several threads, are decoded together.

Every call takes an optional `lora_request` (inference/lora): the request is served with that
PEFT adapter, batched with requests for other adapters and for the base model. And an optional
`cache_salt`: requests reuse the cached prompt prefixes (engine/prefix_cache.py) of requests with
the same salt only, so a server gives each tenant its own.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .detokenizer import IncrementalDetokenizer
from .engine import EngineConfig, EngineLoop, LLMEngine
from .engine.expert_store import ExpertTierSettings
from .engine.host_malloc import keep_freed_memory
from .engine.loop import EngineFailure
from .engine.sequence import Sequence
from .loader import check_checkpoint_folder, load_tokenizer, resolve_device, resolve_dtype
from .lora import LoRAAdapter, LoRARequest, load_adapter
from .lora.adapter import adapter_cache_key
from .lora.layers import lora_targets, token_modules
from .models import registry
from .outputs import RequestOutput, StreamEvent
from .sampling_params import SamplingParams

Prompt = str | list[int]
ADAPTERS_KEPT_IN_HOST_MEMORY = 32
"""Adapters read from disk are kept (on the CPU) for the next request that names them."""
Messages = list[dict]


class LLM:
    """A loaded model that generates text.

    Args:
        model: path to a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dtype: "auto" (the checkpoint's dtype; float32 on CPU), "float32", "bfloat16" or "float16".
        seed: seeds the engine's generator, which supplies the randomness of requests that set
            no seed of their own (each such request still gets different draws). None: seeded
            from the operating system.
        **engine_settings: scheduling and cache settings of the runtime (EngineConfig:
            max_num_seqs, max_num_batched_tokens, block_size, kv_cache_memory, max_model_len,
            max_loras, kv_cache_dtype ("auto" or "fp8" KV pages); KV tiers: kv_device_bytes,
            kv_host_bytes, kv_disk_bytes, kv_disk_path; expert tiers: expert_cache_experts or
            expert_cache_bytes, expert_host_experts, expert_prefetch).
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        seed: int | None = 0,
        **engine_settings,
    ):
        from transformers import AutoConfig

        self.model_path = check_checkpoint_folder(model)
        self.device = resolve_device(device)
        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=False)
        registry.model_class(config)  # refuses an unsupported architecture before loading anything
        engine_config = _engine_config(engine_settings)
        self.dtype = resolve_dtype(dtype, self.device, config)
        self.tokenizer = load_tokenizer(self.model_path)
        # The engine thread detokenizes every sequence at every step with a tokenizer of its own, so it
        # never waits for a caller that is tokenizing a prompt (a fast tokenizer cannot be used by two
        # threads at once): with one shared instance and a lock, a batch worker's feeder tokenizing the
        # next chunk held the engine's step up, more so when the feeder was descheduled holding the lock.
        self._engine_tokenizer = load_tokenizer(self.model_path)
        vocab = len(self.tokenizer)
        self._vocab_size = min(vocab, getattr(config, "vocab_size", None) or vocab)
        self._engine_generator = torch.Generator()
        if seed is None:
            self._engine_generator.seed()
        else:
            self._engine_generator.manual_seed(seed & (2**64 - 1))
        self._lock = threading.Lock()  # the callers' tokenizer's: several threads may tokenize prompts
        self._request_counter = itertools.count()
        self._eos_token_ids = self._find_eos_token_ids(config, _generation_config(self.model_path))
        self._adapters: collections.OrderedDict[str, LoRAAdapter] = collections.OrderedDict()
        self._adapters_lock = threading.Lock()
        self._lora_targets: tuple[dict, dict] | None = None

        # Runs in the engine loop thread (see engine/loop.py). It must not hold `self`, or the
        # thread would keep this LLM alive and __del__ would never stop it.
        build_engine = functools.partial(
            _build_engine,
            self.model_path,
            config,
            self.device,
            self.dtype,
            engine_config,
            self._eos_token_ids,
            self._engine_generator,
        )
        self._loop = EngineLoop(build_engine)

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt plus completion) one sequence may hold."""
        return self._loop.engine.max_model_len

    def count_tokens(self, text: str) -> int:
        """How many prompt tokens `text` becomes (including a BOS the tokenizer adds)."""
        with self._lock:
            return len(self.tokenizer(text).input_ids)

    def stats(self) -> dict:
        """Engine counters: steps, batch sizes (last, max, mean, histogram), tokens, preemptions, pages."""
        return {"backend": "citadel", **self._loop.stats()}

    def close(self) -> None:
        """Stop the engine loop thread (requests still in flight fail); the LLM is unusable afterwards."""
        self._loop.close()

    def __del__(self) -> None:
        # The loop thread holds the engine (weights, cache), not this object: stop it with us.
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.close(wait=False)

    def generate(
        self,
        prompts: Prompt | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
        cache_salt: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one RequestOutput per prompt.

        lora_request: serve every prompt with this adapter, or one adapter (or None) per prompt.
        cache_salt: the prefix-cache namespace of every prompt, or one per prompt (as vLLM's request
            `cache_salt`): only requests with the same salt reuse each other's cached prefixes.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(params, len(prompt_list))
        lora_list = _as_lora_list(lora_request, len(prompt_list))
        salt_list = _as_salt_list(cache_salt, len(prompt_list))
        token_ids = self._tokenize_all(prompt_list)
        seqs = [
            self._new_sequence(p, sp, lr, salt, ids)
            for p, sp, lr, salt, ids in zip(prompt_list, params_list, lora_list, salt_list, token_ids, strict=True)
        ]
        # All at once, so they decode as one batch; woken once, when the last one finishes.
        finished = self._loop.submit_all(seqs)
        try:
            item = finished.get()
            if isinstance(item, BaseException):
                raise EngineFailure(f"the engine failed while serving the request: {item}") from item
        finally:
            for seq in seqs:
                if seq.finish_reason is None:
                    self._loop.abort(seq.request_id)
        return [seq.to_output() for seq in seqs]

    def chat(
        self,
        messages: Messages | list[Messages],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
        cache_salt: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Answer each conversation ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template."""
        conversations = _as_conversation_list(messages)
        return self.generate([self._render_chat(c) for c in conversations], params, lora_request, cache_salt)

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[StreamEvent]:
        """Complete one prompt, yielding an event per generated token (the last one has finish_reason).

        Several threads may stream at once: their requests share the engine's batches.
        """
        return self._stream(self._new_sequence(prompt, params or SamplingParams(), lora_request, cache_salt))

    def stream_chat(
        self,
        messages: Messages,
        params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[StreamEvent]:
        """`stream` for one conversation, with the checkpoint's chat template applied."""
        return self.stream(self._render_chat(messages), params, lora_request, cache_salt)

    # -- internals ---------------------------------------------------------------------------

    def _render_chat(self, messages: Messages) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the checkpoint {self.model_path} has no chat template (tokenizer_config.json "
                "'chat_template'): use generate() with a plain prompt instead"
            )
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja2's TemplateError and whatever the template raises
            raise ValueError(
                f"the chat template of {self.model_path} rejected the messages: {error}"
            ) from error

    def _adapter(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter's weights, read and checked against this model once per version of its file."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be an inference.LoRARequest, got {type(request).__name__}")
        key = adapter_cache_key(request)
        with self._adapters_lock:
            adapter = self._adapters.get(key)
            if adapter is not None and adapter.name == request.name:
                self._adapters.move_to_end(key)
                return adapter
            model = self._loop.engine.runner.model
            if self._lora_targets is None:
                self._lora_targets = lora_targets(model), token_modules(model)
            targets, tokens = self._lora_targets
        adapter = load_adapter(request, targets, model.lora_module_name, tokens)
        with self._adapters_lock:
            self._adapters[adapter.key] = adapter
            while len(self._adapters) > ADAPTERS_KEPT_IN_HOST_MEMORY:
                self._adapters.popitem(last=False)
        return adapter

    def _adds_special_tokens(self, prompt: str) -> bool:
        # A rendered chat template already holds its special tokens (BOS included).
        return not (self.tokenizer.bos_token is not None and prompt.startswith(self.tokenizer.bos_token))

    def _tokenize_all(self, prompts: list) -> list[list[int] | None]:
        """The token ids of the string prompts (None for prompts given as ids), one tokenizer call for all
        of those with the tokenizer's special tokens and one for those without: a fast tokenizer encodes a
        list in Rust in one go, 128 chat prompts in 0.4 ms where a call each took 3.1 ms of Python, time
        that a batch worker's feeder takes from the engine's threads while they decode."""
        token_ids: list[list[int] | None] = [None] * len(prompts)
        for special in (True, False):
            chosen = [i for i, p in enumerate(prompts) if isinstance(p, str) and self._adds_special_tokens(p) == special]
            if chosen:
                with self._lock:  # fast tokenizers can fail with "Already borrowed" when shared by threads
                    encoded = self.tokenizer([prompts[i] for i in chosen], add_special_tokens=special).input_ids
                for i, ids in zip(chosen, encoded, strict=True):
                    token_ids[i] = ids
        return token_ids

    def _new_sequence(
        self,
        prompt: Prompt,
        params: SamplingParams,
        lora_request: LoRARequest | None = None,
        cache_salt: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Sequence:
        """prompt_token_ids: a string prompt's ids, when the caller tokenized it already (_tokenize_all)."""
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string or None, got {type(cache_salt).__name__}")
        if isinstance(prompt, str):
            if prompt_token_ids is None:
                with self._lock:  # fast tokenizers can fail with "Already borrowed" when shared by threads
                    prompt_token_ids = self.tokenizer(prompt, add_special_tokens=self._adds_special_tokens(prompt)).input_ids
            token_ids = prompt_token_ids
            text: str | None = prompt
        else:
            token_ids, text = list(prompt), None
            vocab = self._vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if not token_ids:
            raise ValueError("the prompt is empty: pass at least one token or character")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but the model holds at most {self.max_model_len}: "
                "shorten the prompt"
            )
        adapter = self._adapter(lora_request) if lora_request is not None else None
        return Sequence(
            lora=adapter,
            cache_salt=cache_salt,
            request_id=str(next(self._request_counter)),
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self._engine_tokenizer, params.stop),
        )

    def _stream(self, seq: Sequence) -> Iterator[StreamEvent]:
        outbox = self._loop.submit(seq)
        try:
            yield from _events(outbox)
        finally:  # the caller stopped early (or failed): free the request's place in the batch
            if seq.finish_reason is None:
                self._loop.abort(seq.request_id)

    def _find_eos_token_ids(self, config, generation_config) -> set[int]:
        """End-of-sequence ids from generation_config.json, config.json and the tokenizer."""
        ids: set[int] = set()
        for source in (generation_config, config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(v for v in value if isinstance(v, int))
        return ids


def _build_engine(path, config, device, dtype, engine_config, eos_token_ids, generator) -> LLMEngine:
    if device.type == "cpu":
        keep_freed_memory()  # a step's buffers stay mapped for the next one (engine/host_malloc.py)
    native = registry.load_model(
        path,
        config,
        device,
        dtype,
        quantization=engine_config.quantization,
        expert_tiers=ExpertTierSettings.from_config(engine_config),
    )
    return LLMEngine(native, engine_config, device, eos_token_ids, generator)


def _events(outbox) -> Iterator[StreamEvent]:
    """A request's events from the engine loop, up to the one that finishes it."""
    while True:
        item = outbox.get()
        if isinstance(item, BaseException):
            raise EngineFailure(f"the engine failed while serving the request: {item}") from item
        yield item
        if item.finish_reason is not None:
            return


def _engine_config(settings: dict) -> EngineConfig:
    try:
        return EngineConfig(**settings)
    except TypeError as error:
        known = ", ".join(EngineConfig.__dataclass_fields__)
        raise TypeError(f"unknown engine setting in {sorted(settings)}: the settings are {known}") from error


def _generation_config(path: Path):
    """generation_config.json when the checkpoint has one (its eos ids end generation)."""
    if not (path / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(path)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, list | tuple):
        raise TypeError(
            f"prompts must be a string, a list of token ids, or a list of either, got {type(prompts)}"
        )
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    for p in prompts:
        if not isinstance(p, str | list | tuple):
            raise TypeError(f"each prompt must be a string or a list of token ids, got {type(p)}")
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts: pass one, or one per prompt")
    return list(params)


def _as_lora_list(lora_request, n: int) -> list[LoRARequest | None]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if not isinstance(lora_request, list | tuple) or len(lora_request) != n:
        raise ValueError(f"pass one LoRARequest, or a list of {n} (one per prompt, None for the base model)")
    return list(lora_request)


def _as_salt_list(cache_salt, n: int) -> list[str | None]:
    if cache_salt is None or isinstance(cache_salt, str):
        return [cache_salt] * n
    if not isinstance(cache_salt, list | tuple) or len(cache_salt) != n:
        raise ValueError(f"pass one cache_salt string, or a list of {n} (one per prompt, None for no salt)")
    return list(cache_salt)


def _as_conversation_list(messages) -> list[Messages]:
    if messages and isinstance(messages, list | tuple) and all(isinstance(m, dict) for m in messages):
        return [list(messages)]
    if not isinstance(messages, list | tuple) or not all(isinstance(c, list | tuple) for c in messages):
        raise TypeError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")
    return [list(c) for c in messages]
