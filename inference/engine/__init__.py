"""Citadel's runtime: continuous batching over a paged KV cache, for the model families in models/.

Why it exists: transformers' `generate` runs one batch to completion with a cache per request.
A server must instead let requests join and leave the running batch at every step, share one
fixed pool of cache memory among them, and never stall decoding behind a long prompt. This
package is that runtime; the model definitions in `inference/models/` plug into it.

One step, top to bottom (nano-vllm's shape):

    LLMEngine.step()
      Scheduler.schedule()          which sequences run this step, and how many tokens each feeds:
                                    every running decode (1 token), then prefill chunks up to the
                                    token budget (chunked prefill); when the cache is full the newest
                                    running sequence is preempted (its pages freed, it re-queues
                                    at the front and later recomputes its tokens: nothing is lost)
      BlockManager                  pages of a fixed byte size, handed out per cache group
      ModelRunner.execute(batch)    flattens the batch into one varlen step (no padding) and calls
                                    the model, then computes logits only for the rows needed
      sampler.sample(...)           batched temperature / top-k / top-p, a generator per request
      Sequence.append_token(...)    stop tokens, eos, stop strings, max_tokens -> StreamEvent

`EngineLoop` (loop.py) runs `step()` in one thread per `inference.LLM` and hands each caller its
events through a queue, so concurrent `stream()` callers share batches.

The model interface
-------------------
A family is one class in `inference/models/<family>.py`, registered by its `model_type` in
`inference/models/registry.py`. It is an `nn.Module` built on the meta device from the Hugging
Face config object and loaded from safetensors (`engine/weights.py`), and it provides:

    cache_spec() -> CacheSpec
        What the family caches, as cache groups (engine/cache.py). The block manager sizes its
        pages from it, the runner allocates the memory and hands each layer its view.
    forward(input_ids, positions, ctx) -> hidden
        input_ids, positions: [T] int64, the tokens of every scheduled sequence concatenated
        (ctx.query_starts marks where each sequence's tokens begin); ctx: a ForwardContext
        (engine/context.py) with per-sequence query and context lengths, and per cache group
        the block tables [B, pages], the slots [T] this step writes, and the per-layer cache
        tensors. Returns the final hidden states [T, hidden].
    compute_logits(hidden) -> logits
        [N, hidden] -> [N, vocab] for the rows the runner selected (the last token of each
        sequence that samples, plus prompt rows when prompt_logprobs were asked for).
    load_weights(weights, device, dtype)
        Materialises the parameters from a CheckpointWeights (memory-mapped safetensors),
        raising a clear error for a missing or unexpected tensor.

Plain families (Qwen3-MoE) declare one group, "kv": one entry (K and V of every layer) per token.

A family with heterogeneous per-layer caches (DeepSeek-V4)
---------------------------------------------------------
DeepSeek-V4 keeps different things per layer: every layer a sliding window of the last W
tokens' K(=V); compressed-sparse-attention (CSA) layers one compressed entry per `m` tokens plus
the lightning indexer's key for it; heavily-compressed (HCA) layers one entry per `m'` tokens;
and the compressors a partial window of not-yet-compressed tokens. Two kinds of cache group
(engine/cache.py) express all of it (inference/models/deepseek_v4_cache.py declares them):

- fixed-size state lives in per-sequence groups (`per_sequence=True`), kept in a slot that each
  running sequence holds (the budget reserves max_num_seqs slots first):
      CacheGroup("window", all layers, (W, head_dim), dtype, per_sequence=True)   # a ring, pos % W
      CacheGroup("csa_tail", csa layers, (2 * m, 4 * hd + 4 * ihd), dtype, per_sequence=True)
      CacheGroup("hca_tail", hca layers, (m', 2 * hd), dtype, per_sequence=True)
- growing state lives in paged groups that share one pool of equal-size pages:
      CacheGroup("csa", csa layers, (hd + ihd,), dtype, tokens_per_entry=m)
      CacheGroup("hca", hca layers, (hd,), dtype, tokens_per_entry=m')

The BlockManager counts pages per group (ceil(ceil(n / tokens_per_entry) / page_entries)) and
hands out slots; the runner passes per paged group the block tables ([B, pages]) in
`ctx.groups[name]`, each sequence's slot in `ctx.slots`, prompt lengths in `ctx.prompt_lens` (V4
breaks indexer ties by them) and the per-layer tensors in `ctx.caches[name]`. A compressed group
writes an entry only when a window of `tokens_per_entry` tokens closes; the model finds where
from the group's block table (`ctx.groups[name].slot(seq_index, entry_index)`, or the tables
themselves for batched writes). Write slots for every token are precomputed only for groups with
one entry per token. Sliding-window groups that are paged (e.g. Qwen3-MoE's optional window) read
only their last W entries; returning pages that fell out of the window to the pool early is a
later optimisation of the BlockManager, invisible to models.
"""

from .cache import CacheGroup, CacheSpec
from .config import EngineConfig
from .context import ForwardContext, GroupTables
from .llm_engine import LLMEngine
from .loop import EngineLoop
from .sequence import Sequence, SequenceStatus

__all__ = [
    "CacheGroup",
    "CacheSpec",
    "EngineConfig",
    "EngineLoop",
    "ForwardContext",
    "GroupTables",
    "LLMEngine",
    "Sequence",
    "SequenceStatus",
]
