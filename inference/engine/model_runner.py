"""Turns a scheduled batch into one flattened model call, and owns the cache memory.

The batch becomes [T] input ids and positions (every sequence's new tokens back to back, no
padding), a ForwardContext with the block tables and write slots of each cache group, and a
list of the rows whose logits are needed: the last row of each sequence that samples this step,
and the prompt rows whose log-probabilities were asked for. Only those rows reach the LM head.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..lora.manager import LoRAManager
from . import kv_quant
from .block_manager import BlockManager
from .cache import PagedCache
from .config import EngineConfig
from .context import ForwardContext, GroupTables
from .prefix_cache import load_slots, save_slots
from .scheduler import ScheduledBatch
from .sequence import NO_TIE, Sequence
from .step_threads import OneTokenThreads
from .tiers import KVTiers

logger = logging.getLogger(__name__)

CPU_MEMORY_SHARE = 0.25
"""Without kv_cache_memory, the cache may take this share of the host's available memory ..."""
GPU_MEMORY_SHARE = 0.8
"""... or of the GPU's free memory once the weights are loaded."""


@dataclass
class StepLogits:
    """The logits a step produced, float32."""

    sample_seqs: list[Sequence]
    sample_logits: torch.Tensor
    """[len(sample_seqs), vocab]: the next-token logits of each sequence that samples."""
    prompt_parts: list[tuple[Sequence, range, torch.Tensor]]
    """(sequence, prompt positions t, logits [len(t), vocab] predicting token t) per prompt_logprobs chunk."""


class ModelRunner:
    def __init__(self, model, config: EngineConfig, device: torch.device, lora: LoRAManager | None = None):
        self.model = model
        self.lora = lora
        self.device = device
        self.block_size = config.block_size
        self.spec = kv_quant.storage_spec(model.cache_spec(), config.kv_cache_dtype)  # fp8: packed pages
        page_bytes = self.spec.page_bytes(self.block_size)
        num_slots = config.max_num_seqs if self.spec.slot_groups else 0
        slot_bytes = num_slots * self.spec.slot_bytes
        model_len = min(model.max_model_len, config.max_model_len or model.max_model_len)
        sizing = BlockManager(self.spec, 2, 0, self.block_size)
        wanted = config.max_num_seqs * sizing.pages_for(model_len) + 1  # never more than can be used
        self.one_token_threads = OneTokenThreads(device)
        self.tiers: KVTiers | None = None
        self.step_page_limit: int | None = None
        """Most pages one step may use (whole-page KV tiers: what the device tier holds)."""
        if config.kv_device_bytes is not None:
            self._build_tiers(model, config, device, num_slots, slot_bytes, model_len)
            return
        budget = config.kv_cache_memory or self._default_cache_bytes()
        num_pages = min(max(budget - slot_bytes, 0) // page_bytes, wanted)
        if num_pages < 2:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no cache page (one page is {page_bytes} bytes for "
                f"block_size={self.block_size}, and {slot_bytes} bytes go to max_num_seqs={config.max_num_seqs} "
                "per-sequence slots): give the cache more memory"
            )
        self.cache = PagedCache(self.spec, num_pages, num_slots, self.block_size, device)
        self.block_manager = BlockManager(
            self.spec, num_pages, num_slots, self.block_size, prefix_caching=config.enable_prefix_caching
        )
        self.block_manager.tie_length_unit = getattr(model, "tie_length_unit", 1)
        self.max_model_len = min(model_len, self.block_manager.max_tokens_per_sequence())
        logger.info(
            "KV cache: %d pages of %d bytes (%.1f MiB), %d tokens per sequence at most",
            num_pages,
            page_bytes,
            num_pages * page_bytes / 2**20,
            self.max_model_len,
        )

    def _build_tiers(self, model, config: EngineConfig, device, num_slots: int, slot_bytes: int, model_len: int):
        """KV tiers (engine/tiers.py): the device pool is the fast tier; logical pages span all tiers."""
        page_bytes = self.spec.page_bytes(self.block_size)
        device_pages = max(config.kv_device_bytes - slot_bytes, 0) // page_bytes  # with the null page
        if device_pages < 2:
            raise ValueError(
                f"kv_device_bytes={config.kv_device_bytes} holds no cache page (one page is {page_bytes} bytes "
                f"and {slot_bytes} bytes go to max_num_seqs={config.max_num_seqs} per-sequence slots): raise it"
            )
        slower = {}
        for name in ("kv_host_bytes", "kv_disk_bytes"):
            value = getattr(config, name)
            slower[name] = (value or 0) // page_bytes
            if value is not None and slower[name] == 0:
                raise ValueError(f"{name}={value} holds no cache page (one page is {page_bytes} bytes): raise it")
        selective = bool(getattr(model, "reads_kv_through_tiers", False))
        sizing = BlockManager(self.spec, 2, 0, self.block_size, config.enable_prefix_caching)
        needs = []
        if selective:  # a step must hold the pages it writes: at most a chunk's and one more per sequence and group
            groups = len(self.spec.paged_groups)
            written = sizing.pages_for(config.max_num_batched_tokens) + groups * config.max_num_seqs
            why = (
                f"a step of max_num_batched_tokens={config.max_num_batched_tokens} and max_num_seqs="
                f"{config.max_num_seqs} may write {written}: raise kv_device_bytes or lower those"
            )
            needs.append((written, why))
        # A prefix-cache snapshot of a sequence's slot (V4's state, in the model dtype: more pages when pages
        # are fp8) is brought on device whole to be saved or loaded (KVTiers.on_device), before the step.
        snapshot = sizing.prefix.snapshot_pages if sizing.prefix is not None else 0
        if snapshot:
            why = (
                f"a prefix-cache snapshot of a sequence's state (block_size={self.block_size}, kv_cache_dtype="
                f"{config.kv_cache_dtype!r}) takes {snapshot}: raise kv_device_bytes, or set enable_prefix_caching=false"
            )
            needs.append((snapshot, why))
        for pages, why in needs:
            if device_pages - 1 < pages:
                least = slot_bytes + (max(p for p, _ in needs) + 1) * page_bytes  # with the null page
                raise ValueError(
                    f"kv_device_bytes={config.kv_device_bytes} holds {device_pages - 1} pages of {page_bytes} bytes; "
                    f"{why} (kv_device_bytes must be at least {least} with these settings)"
                )
        self.cache = PagedCache(self.spec, device_pages, num_slots, self.block_size, device)
        self.tiers = KVTiers(
            self.spec, self.block_size, self.cache.pool, slower["kv_host_bytes"], slower["kv_disk_bytes"],
            config.kv_disk_path, selective,
        )
        # Cached blocks are logical pages, in whichever tier holds them; so are the slot snapshots of
        # DeepSeek-V4's blocks (brought to the device tier when one is saved or loaded: execute()).
        self.block_manager = BlockManager(
            self.spec, self.tiers.num_logical + 1, num_slots, self.block_size, config.enable_prefix_caching
        )
        self.block_manager.tie_length_unit = getattr(model, "tie_length_unit", 1)
        longest = self.block_manager.max_tokens_per_sequence()
        if not selective:  # every page of a step is on the device: a sequence fits the device tier
            self.step_page_limit = device_pages - 1
            longest = BlockManager(self.spec, device_pages, 0, self.block_size).max_tokens_per_sequence()
        self.max_model_len = min(model_len, longest)
        logger.info(
            "KV tiers: %d device, %d host, %d disk pages of %d bytes (%s reads), %d tokens per sequence at most",
            device_pages - 1, slower["kv_host_bytes"], slower["kv_disk_bytes"], page_bytes,
            "selective" if selective else "whole-page", self.max_model_len,
        )

    def _default_cache_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_MEMORY_SHARE)
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(available * CPU_MEMORY_SHARE)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        saves, loads = self.block_manager.take_snapshots()
        place = self.tiers.on_device if self.tiers is not None else None  # snapshot pages are logical there
        save_slots(self.cache, saves, place)  # before new slots are cleared: a freed slot may be one of them
        pages, slots = self.block_manager.take_new()
        if self.tiers is None:
            self.cache.zero(pages, slots)
            load_slots(self.cache, loads)
        else:
            self.cache.zero([], slots)
            load_slots(self.cache, loads, place)  # before staging, which may need the device pages it takes
            self.tiers.new_pages(pages)
            self.tiers.stage(batch.seqs, batch.num_tokens)
        # Decodes (one token) first, so attention serves them with one batched gather.
        order = sorted(range(len(batch)), key=lambda i: batch.num_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]

        input_ids: list[int] = []
        positions: list[int] = []
        query_starts, context_lens = [0], []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, range, int]] = []  # (seq, targets, first row)
        for seq, count in zip(seqs, counts, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + count
            row0 = query_starts[-1]
            input_ids += seq.tokens(start, end)
            positions += range(start, end)
            query_starts.append(row0 + count)
            context_lens.append(end)
            if seq.prompt_logprobs is not None:
                targets = range(max(len(seq.prompt_logprobs), start + 1), min(end + 1, seq.num_prompt_tokens))
                if targets:
                    prompt_rows.append((seq, targets, row0 + targets.start - 1 - start))
            if end == seq.num_tokens:
                sample_rows.append(row0 + count - 1)
                sample_seqs.append(seq)

        device = self.device
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)  # [T]
        pos = torch.tensor(positions, dtype=torch.long, device=device)  # [T]
        num_decodes = sum(1 for c in counts if c == 1)
        ctx = ForwardContext(
            query_lens=counts,
            context_lens=context_lens,
            query_starts=query_starts,
            num_decodes=num_decodes,
            decode_context_lens=torch.tensor(context_lens[:num_decodes], dtype=torch.long, device=device),
            prompt_lens=[seq.num_prompt_tokens for seq in seqs],
            groups=self._group_tables(seqs, counts, pos),
            slots=torch.tensor([seq.slot for seq in seqs], device=device) if self.spec.slot_groups else None,
            caches=self.cache.caches,
            kv_tiers=self.tiers if self.tiers is not None and self.tiers.selective else None,
        )
        if self.block_manager.prefix is not None:  # models whose cache depends on the prompt's length say where
            ctx.shared["first_tie"] = torch.full((len(seqs),), NO_TIE, dtype=torch.long, device=device)
        adapters = [seq.lora for seq in seqs]
        with self.one_token_threads.step(len(input_ids)):
            if self.lora is not None and any(adapters):
                self.lora.set_batch(adapters, query_starts, device)
                try:
                    hidden = self.model(ids, pos, ctx)  # [T, H]
                finally:
                    self.lora.clear_batch()
            else:
                hidden = self.model(ids, pos, ctx)  # [T, H]
        if self.block_manager.prefix is not None:
            for seq, tie in zip(seqs, ctx.shared["first_tie"].tolist(), strict=True):
                seq.first_tie = min(seq.first_tie, tie)

        rows = sample_rows + [
            r for _, targets, first in prompt_rows for r in range(first, first + len(targets))
        ]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):  # e.g. decodes only: a view, no gather
            selected = hidden[rows[0] : rows[0] + len(rows)]
        else:
            selected = hidden[torch.tensor(rows, dtype=torch.long, device=device)]
        row_adapters = [seq.lora for seq in sample_seqs] + [
            seq.lora for seq, targets, _ in prompt_rows for _ in targets
        ]
        if self.lora is not None and any(a is not None and a.token_rows for a in row_adapters):
            self.lora.set_logits_batch(row_adapters, device)
            try:
                logits = self.model.compute_logits(selected).float()
            finally:
                self.lora.clear_batch()
        else:
            logits = self.model.compute_logits(selected).float()
        parts, offset = [], len(sample_rows)
        for seq, targets, _ in prompt_rows:
            parts.append((seq, targets, logits[offset : offset + len(targets)]))
            offset += len(targets)
        return StepLogits(sample_seqs, logits[: len(sample_rows)], parts)

    def _group_tables(
        self, seqs: list[Sequence], counts: list[int], pos: torch.Tensor
    ) -> dict[str, GroupTables]:
        tables: dict[str, GroupTables] = {}
        seq_of_token = None  # [T], for groups with an entry per token
        for index, group in enumerate(self.spec.paged_groups):
            rows = [seq.block_tables[index] for seq in seqs]
            width = max(len(r) for r in rows)
            block_tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # [B, pages]
            if self.tiers is not None:  # logical pages -> device pages (or -1 - logical: see tiers.py)
                block_tables = self.tiers.device_map[block_tables]
            block_tables = block_tables.to(self.device)
            entries = self.spec.page_entries(group, self.block_size)
            table = GroupTables(block_tables, entries)
            if group.tokens_per_entry == 1:
                if seq_of_token is None:
                    seq_of_token = torch.repeat_interleave(
                        torch.arange(len(seqs), device=self.device), torch.tensor(counts, device=self.device)
                    )
                table.slot_pages = block_tables[seq_of_token, pos // entries]  # [T]
                table.slot_offsets = pos % entries  # [T]
            tables[group.name] = table
        return tables
