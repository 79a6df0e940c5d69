"""DeepSeek-V4 attention over a batched step: sliding window, CSA (compressed + top-k), HCA.

Every layer attends over its sliding window of shared keys/values (MQA, one KV head) with a
learned per-head sink; CSA and HCA layers add compressed entries, one per `m` tokens, pooled by
a Compressor. HCA attends to all visible entries; CSA attends to the `index_topk` entries its
lightning Indexer scores highest. State lives in the engine's cache (the groups of
deepseek_v4_cache.py), addressed through a V4Batch (deepseek_v4_batch.py): this step's tokens are
attended from fresh tensors plus what the rings (in each sequence's slot) and pages hold.

Single-token sequences (decodes) are attended together in one batched gather, O(window +
selected entries) per query; each prefill chunk is attended one sequence at a time, its queries
in blocks. Computations mirror transformers' DeepseekV4Attention, DeepseekV4{CSA,HCA}Compressor
and DeepseekV4Indexer in operation and dtype. Parameter names are DeepSeek's (wq_a, wkv,
attn_sink, compressor.ape, indexer.wq_b, ...).

Shapes: T tokens in the step, B sequences (Bd decodes), H heads of width hd, W the window,
m a compression rate, N compressed entries of one sequence, K entries attended per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import kv_quant
from ..layers.linear import Linear
from .deepseek_v4_batch import GroupMeta, V4Batch
from .deepseek_v4_cache import GROUPS, WINDOW
from .deepseek_v4_layers import RMSNorm, RopeTable, Rotary, unweighted_rms_norm

# Elements of attention or index scores (queries x heads x keys) one prefill block may hold at once.
SCORE_BUDGET = 1 << 24
# Queries of a prefill chunk attended at once (each scores the block's Lb+W-1 local keys).
PREFILL_BLOCK = 128
# Elements of indexer scores (queries x index heads x entries) computed at once in a prefill: 1 MiB.
INDEX_TILE = 1 << 18
# A key matrix shared by every query is folded into one GEMM from this many elements on (below it,
# torch's batched kernels round a few products differently, and the product is cheap anyway).
FOLD_MIN = 1 << 14


def batched_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [Q, H, a] @ y [Q or 1, a, b] -> [Q, H, b]; a y shared by every query (HCA's entries of one
    sequence) is one [Q*H, a] x [a, b] GEMM, not Q small ones over a broadcast copy of y (same values)."""
    if y.shape[0] != 1 or y[0].numel() < FOLD_MIN:
        return torch.matmul(x, y)
    return torch.matmul(x.reshape(-1, x.shape[-1]), y[0]).view(*x.shape[:-1], y.shape[-1])


def mask_tail(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """scores [Q, (H,) N] in place: -inf at entries >= visible [Q] of each query. Only the columns past
    the block's fewest visible entries are touched: a prefill block at depth sees all but its last
    few entries, so masking the whole row (a fresh [Q, N] mask and copy) cost as much as the top-k."""
    first = min(int(visible.min()), scores.shape[-1])
    cols = torch.arange(first, scores.shape[-1], device=scores.device)
    hidden = cols >= visible[:, None]  # [Q, N - first]
    tail = scores[..., first:]
    tail.masked_fill_(hidden if scores.dim() == 2 else hidden[:, None], float("-inf"))
    return scores


def fused_attention(q: torch.Tensor) -> bool:
    """Whether attend_shared's fused CPU kernel serves these queries (float32 on a CPU)."""
    return q.device.type == "cpu" and q.dtype == torch.float32


def flash_attention(q, kv, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [L, H, hd], kv [S, hd] (K = V, one head shared by all), additive mask [L, S] or None ->
    softmax(q k^T * scale + mask) @ v [H, L, hd] and each row's log-sum-exp [H, L]: torch's fused CPU
    attention (flash: blocks of scores kept in cache, no [L, H, S] score, copy or softmax passes)."""
    kv = kv[None, None].expand(1, q.shape[1], *kv.shape)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(0, 1)[None], kv, kv, 0.0, False, attn_mask=None if mask is None else mask[None, None], scale=scale
    )
    return out[0], lse[0]


def attend_shared(q, keys, in_window, entries, visible, sinks, scale: float, bulk=None) -> torch.Tensor:
    """A prefill block's attention over its window and the entries its queries share (HCA), with a sink.

    q [Lb, H, hd]; keys [nw, hd] the block's local keys (K = V), in_window [Lb, nw]; entries [n, hd],
    query i seeing the first visible[i] of them; sinks [H]; bulk: (out [H, Lb, hd], lse [H, Lb]) of
    these queries over entries every query of the chunk sees, attended once per chunk (a big maskless
    flash_attention). Parts attended apart are merged by their log-sum-exps, and the sink's share of
    softmax([scores, sink]) applied: the same math as softmax_with_sink in another summation order
    (float32 rounding apart). -> [Lb, H, hd]."""
    nw = keys.shape[0]
    kv = torch.cat([keys, entries])  # [nw + n, hd]
    mask = kv.new_zeros(q.shape[0], kv.shape[0])
    mask[:, :nw].masked_fill_(~in_window, float("-inf"))
    mask_tail(mask[:, nw:], visible)
    parts = [flash_attention(q, kv, mask, scale)] + ([bulk] if bulk is not None else [])
    sink = sinks[:, None].to(parts[0][1].dtype)  # [H, 1]
    top = torch.stack([lse for _, lse in parts]).amax(dim=0).maximum(sink)  # [H, Lb]: every query sees itself
    shares = [torch.exp(lse - top) for _, lse in parts]
    total = sum(shares) + torch.exp(sink - top)
    merged = sum(out * (share / total)[..., None] for (out, _), share in zip(parts, shares, strict=True))
    return merged.transpose(0, 1)


def softmax_with_sink(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """scores [..., H, n] (masked with -inf), sinks [H] -> probabilities [..., H, n] without the sink's.

    `sinks` None: scores [..., H, n + 1] already end with the sink's column (float32), and are
    overwritten (a long prefill block's scores are large: no copy)."""
    if sinks is None:
        combined = scores
    else:
        sink = sinks.view(*([1] * (scores.dim() - 2)), -1, 1).expand(*scores.shape[:-1], 1)
        combined = torch.cat([scores, sink], dim=-1)  # float32 (the sink is)
    combined -= combined.amax(dim=-1, keepdim=True)
    return F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


class Compressor(nn.Module):
    """Pools each closed window of `rate` tokens into one entry (CSA: overlapping, HCA: not).

    CSA (overlap): kv/gate project to 2*dim; entry e is the softmax(gate + ape)-weighted sum over
    2*rate slots: the first half ("Ca") of window e-1's tokens and the second half ("Cb") of
    window e's. Entry 0 has no previous window: those slots get zero kv and -inf gate.
    """

    def __init__(self, config, dim: int, rate: int, overlap: bool):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim
        self.wkv = Linear(config.hidden_size, width, bias=False)
        self.wgate = Linear(config.hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.empty(rate, width, dtype=torch.float32))
        self.norm = RMSNorm(dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> kv|gate [T, 2*width] (what the tail ring stores)."""
        return torch.cat([self.wkv(x), self.wgate(x)], dim=-1)

    def emit(self, src: torch.Tensor, valid: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        """src [E, n_src, 2*width] kv|gate of each entry's source tokens -> entries [E, dim], rotated by
        `rope` (at the entries' positions)."""
        d, m = self.dim, self.rate
        if self.overlap:
            kv = torch.cat([src[:, :m, :d], src[:, m:, d : 2 * d]], dim=1)  # [E, 2m, d]
            gate = torch.cat(
                [src[:, :m, 2 * d : 3 * d] + self.ape[:, :d], src[:, m:, 3 * d :] + self.ape[:, d:]], dim=1
            )
            kv = torch.where(valid[..., None], kv, torch.zeros((), dtype=kv.dtype, device=kv.device))
            gate = gate.masked_fill(~valid[..., None], float("-inf"))
        else:
            kv, gate = src[..., :d], src[..., d:] + self.ape  # [E, m, d]
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        return rope.rotate(self.norm((kv * weights).sum(dim=1)))  # [E, d]


def select_top_k(scores: torch.Tensor, visible: torch.Tensor, hf_len: torch.Tensor, k: int, ties=None):
    """The indexer's top-k entries per query, exactly as transformers picks them.

    scores [Q, N] float32 with -inf past each query's `visible` [Q] entries. Returns (entry ids
    [Q, kk], valid [Q, kk]) with kk = min(k, N). When the k-th and (k+1)-th best scores tie (the
    ReLU makes exact zeros common), which entry wins depends on torch.topk's algorithm and on
    the row's length. transformers' rows are `hf_len` [Q] long (prompt_len // m for prompt
    tokens in its one-shot prefill, the entries so far in its cached decode), so only such rows
    are recomputed on a row of that length: the result then does not depend on this engine's
    chunking, batching or padding, and equals transformers' generate().
    `ties` (rows [Q], positions [Q], first_tie [B]): lower first_tie[row] to the position of each
    tied query, since what it computes depends on the prompt's length (prefix caching must know).
    """
    q_count, n = scores.shape
    if n <= k:
        ids = torch.arange(n, device=scores.device).expand(q_count, n)
        return ids, ids < visible[:, None]
    values, ids = scores.topk(k + 1, dim=-1)
    ids = ids[:, :k].clone()
    tied = (visible > k) & (values[:, k - 1] == values[:, k])
    if bool(tied.any()):
        if ties is not None and ties[2] is not None:
            ties[2].scatter_reduce_(0, ties[0][tied], ties[1][tied], "amin")
        _retop_tied_rows(scores, visible, hf_len, k, tied.nonzero().flatten(), ids)
    return ids, ids < visible[:, None]


def _retop_tied_rows(scores, visible, hf_len, k: int, rows: torch.Tensor, ids: torch.Tensor) -> None:
    """ids[row] = top-k of scores[row, :visible] padded with -inf to hf_len[row], for each tied row.

    Rows of one length are re-ranked together, a few at a time (SCORE_BUDGET elements): torch.topk
    ranks each row of a batch on its own, with the algorithm a single row of that length gets, so
    the result is the per-row one without a Python loop per query (a long prompt's prefill ties
    on thousands of queries, each on a row of prompt_len // m entries)."""
    lengths = hf_len[rows]
    for length in torch.unique(lengths).tolist():
        group = rows[lengths == length]
        per_batch = max(1, SCORE_BUDGET // max(length, 1))
        for start in range(0, len(group), per_batch):
            part = group[start : start + per_batch]
            seen = visible[part]
            width = min(length, scores.shape[1])
            cols = torch.arange(width, device=scores.device)
            padded = scores.new_full((len(part), length), float("-inf"))
            padded[:, :width] = scores[part, :width].masked_fill(cols >= seen[:, None], float("-inf"))
            ids[part] = padded.topk(k, dim=-1).indices


class Indexer(nn.Module):
    """CSA's lightning indexer: scores compressed keys per query, sum_h w_h * relu(q_h . k)."""

    def __init__(self, config, rate: int):
        super().__init__()
        self.n_heads, self.dim, self.top_k = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.dim, bias=False)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(config, self.dim, rate, overlap=True)

    def queries(
        self, x: torch.Tensor, q_residual: torch.Tensor, rope: RopeTable
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q [T, nh, ihd] float32 (roped), head weights [T, nh] float32."""
        q = rope.rotate(self.wq_b(q_residual).view(x.shape[0], self.n_heads, self.dim))
        weights = self.weights_proj(x).float() * self.n_heads**-0.5
        return q.float(), weights

    def scores(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [Q, nh, ihd], weights [Q, nh], keys [Q or 1, N, ihd] -> [Q, N] float32."""
        scale, weights = self.dim**-0.5, weights[..., None]
        if keys.shape[0] != 1 or keys[0].numel() < FOLD_MIN:
            s = torch.matmul(q, keys.float().transpose(-1, -2))  # [Q, nh, N]
            return s.relu_().mul_(scale).mul_(weights).sum(dim=1)
        # One sequence's keys for every query (prefill): [Q*nh, ihd] x [ihd, tile] GEMMs over tiles of
        # the entries, each tile's scores small enough to stay in the CPU's cache through the relu,
        # scale, weight and sum (in place, in transformers' order: the same values as one big product).
        flat, keys = q.reshape(-1, q.shape[-1]), keys[0].float()
        out = q.new_empty(q.shape[0], keys.shape[0])
        tile = max(256, INDEX_TILE // flat.shape[0])
        for a in range(0, keys.shape[0], tile):
            s = torch.matmul(flat, keys[a : a + tile].t()).view(*q.shape[:2], -1)
            torch.sum(s.relu_().mul_(scale).mul_(weights), dim=1, out=out[:, a : a + tile])
        return out


class Attention(nn.Module):
    """Shared-KV MQA with a sliding window, plus compressed entries (CSA: top-k selected; HCA: all)."""

    def __init__(self, config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.kind = config.layer_types[layer_id]
        self.rope_kind = "main" if self.kind == "sliding_attention" else "compress"
        self.n_heads, self.head_dim, self.window = (
            config.num_attention_heads,
            config.head_dim,
            config.sliding_window,
        )
        self.groups, self.o_rank = config.o_groups, config.o_lora_rank
        self.scaling = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        D, H, hd = config.hidden_size, self.n_heads, self.head_dim
        self.wq_a = Linear(D, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = Linear(config.q_lora_rank, H * hd, bias=False)
        self.wkv = Linear(D, hd, bias=False)
        self.norm = RMSNorm(hd, config.rms_norm_eps)
        # Grouped low-rank output: each of `groups` head groups -> o_rank, then all -> D.
        self.wo_a = Linear(H * hd // self.groups, self.groups * self.o_rank, bias=False)
        self.wo_b = Linear(self.groups * self.o_rank, D, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.compressor = self.indexer = None
        self.group = GROUPS.get(self.kind)  # its paged cache group, None for sliding-window layers
        # This layer's index among the layers of its kind: caches[group][kind_index] is its tensor.
        self.kind_index = list(config.layer_types[:layer_id]).count(self.kind)
        if self.group == "csa":
            rate = config.compress_rates[self.kind]
            self.compressor = Compressor(config, hd, rate, overlap=True)
            self.indexer = Indexer(config, rate)
        elif self.group == "hca":
            self.compressor = Compressor(config, hd, config.compress_rates[self.kind], overlap=False)

    def forward(self, x: torch.Tensor, batch: V4Batch, rotary: Rotary) -> torch.Tensor:
        """x [T, D] -> [T, D]; reads and writes this layer's state in the batch's caches."""
        T, H, hd = x.shape[0], self.n_heads, self.head_dim
        rope = batch.rope[self.rope_kind]
        q_residual = self.q_norm(self.wq_a(x))  # [T, q_lora]
        q = unweighted_rms_norm(self.wq_b(q_residual).view(T, H, hd), self.eps)
        q = rope.rotate(q)  # [T, H, hd]
        kv = rope.rotate(self.norm(self.wkv(x)))  # [T, hd]: keys and values alike

        ring = batch.rings[WINDOW]
        window = batch.caches[WINDOW][self.layer_id]  # [S, W, hd]
        window_read = window[batch.slots[:, None], ring.read_slot]  # [B, W-1, hd]: positions start-W+1..

        entries = index = None
        if self.compressor is not None:
            entries, index_keys = self._compress(x, batch, rotary)
            if self.indexer is not None:
                index = (index_keys, *self.indexer.queries(x, q_residual, batch.rope["compress"]))

        if batch.all_decodes:  # the common decode-only step: no scatter into a fresh tensor
            out = self._decode(q, kv, window_read, entries, index, batch)
        else:
            out = x.new_empty(T, H, hd)
        if batch.decodes and not batch.all_decodes:
            out[batch.decode_tokens] = self._decode(q, kv, window_read, entries, index, batch)
        for i in batch.prefills:
            a, b = batch.offsets[i], batch.offsets[i + 1]
            out[a:b] = self._prefill(i, q[a:b], kv[a:b], window_read[i], entries, index, batch)

        window[ring.write_seq_slot, ring.write_ring] = kv[ring.write_token]
        # K = V carries RoPE on its rope channels: rotate the output back to the query's position.
        out = rope.rotate(out, inverse=True)
        grouped = out.view(T, self.groups, -1).transpose(0, 1)  # [G, T, H*hd/G]
        w_a = self.wo_a.weight if isinstance(self.wo_a, nn.Linear) else self.wo_a.dequantized_weight(out.dtype)
        w_a = w_a.view(self.groups, self.o_rank, -1).transpose(1, 2)  # [G, H*hd/G, o_rank]
        return self.wo_b(torch.bmm(grouped, w_a).transpose(0, 1).reshape(T, -1))

    # -- compressed entries --------------------------------------------------------------------

    def _compress(self, x, batch: V4Batch, rotary: Rotary):
        """Emit this step's entries into the pages and keep the tail; returns the page group views."""
        group = batch.groups[self.group]
        ring, emit = batch.rings[self.group], group.emit
        tail = batch.caches[f"{self.group}_tail"][self.kind_index]  # [S, R, C]
        fresh = self.compressor.project(x)  # [T, C_main]
        if self.indexer is not None:
            fresh = torch.cat([fresh, self.indexer.compressor.project(x)], dim=-1)  # [T, C]
        pages = batch.caches[self.group][self.kind_index]  # [P, entries_per_page, hd (+ ihd)]
        if emit.count:
            assert batch.tiers is None or bool((emit.page >= 0).all()), "KV tiers: a written page was not staged"
            tail_read = tail[batch.slots[:, None], ring.read_slot]  # [B, R-1, C]
            src = torch.cat([tail_read.flatten(0, 1), fresh])[emit.src_index]  # [E, n_src, C]
            main = 4 * self.head_dim if self.indexer is not None else 2 * self.head_dim
            kv_columns, index_columns = self._columns(pages, index=False), self._columns(pages, index=True)
            rope = rotary.table(emit.positions, "compress", x.dtype, batch.end)
            pages[emit.page, emit.offset, kv_columns] = kv_quant.store(  # fp8 KV: quantized
                self.compressor.emit(src[..., :main], emit.src_valid, rope), pages.dtype
            )
            if self.indexer is not None:
                pages[emit.page, emit.offset, index_columns] = kv_quant.store(
                    self.indexer.compressor.emit(src[..., main:], emit.src_valid, rope), pages.dtype
                )
        tail[ring.write_seq_slot, ring.write_ring] = fresh[ring.write_token]
        entries = pages[..., : self.head_dim]
        index_keys = pages[..., self.head_dim :] if self.indexer is not None else None
        return entries, index_keys

    # -- decodes: one query per sequence, batched --------------------------------------------------

    def _decode(self, q, kv, window_read, entries, index, batch: V4Batch):
        """All single-token sequences at once: O(window + selected entries) per query."""
        rows = batch.decode_rows
        by_row, by_token = batch.decode_row_values, batch.decode_token_values
        pos = by_token(batch.positions)  # [Bd]
        keys = torch.cat([by_row(window_read), by_token(kv)[:, None]], dim=1)  # [Bd, W, hd]
        valid = batch.decode_window_valid  # [Bd, W]
        if entries is not None:
            group: GroupMeta = batch.groups[self.group]
            counts = [group.counts[i] for i in batch.decodes]
            n_max = max(counts)
            if n_max:
                visible = (pos + 1) // group.rate  # [Bd] all entries written so far
                ids = torch.arange(n_max, device=q.device).expand(len(rows), n_max)  # [Bd, N]
                if index is not None:
                    _, iq, iw = index
                    page, offset = group.locate(None if batch.all_decodes else rows, ids)
                    index_keys = self._read(batch, page, offset, index=True)  # [Bd, N, ihd]
                    scores = self.indexer.scores(by_token(iq), by_token(iw), index_keys)  # [Bd, N]
                    scores = scores.masked_fill(ids >= visible[:, None], float("-inf"))
                    prompt_lens = by_row(batch.prompt_len_tensor)
                    hf_len = torch.where(pos < prompt_lens, prompt_lens // group.rate, visible)
                    ids, chosen = select_top_k(scores, visible, hf_len, self.indexer.top_k, (rows, pos, batch.first_tie))
                else:
                    chosen = ids < visible[:, None]
                page, offset = group.locate(None if batch.all_decodes else rows, ids)
                keys = torch.cat([keys, self._read(batch, page, offset, index=False)], dim=1)  # [Bd, W + K, hd]
                valid = torch.cat([valid, chosen], dim=1)
        scores = torch.matmul(by_token(q), keys.transpose(1, 2)) * self.scaling  # [Bd, H, n]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = softmax_with_sink(scores, self.attn_sink).to(keys.dtype)
        return torch.matmul(probs, keys)  # [Bd, H, hd]

    # -- prefill chunks: one sequence at a time, its queries in blocks -----------------------------

    def _prefill(self, i, q, kv, window_read, entries, index, batch: V4Batch):
        """q [L, H, hd], kv [L, hd] of sequence i's chunk, window_read [W-1, hd] -> [L, H, hd]."""
        L, W, start, dev = q.shape[0], self.window, batch.starts[i], q.device
        local = torch.cat([window_read, kv])  # [W-1+L, hd]: keys at positions start-W+1 .. start+L-1
        local_pos = torch.arange(start - W + 1, start + L, device=dev)
        q_pos = torch.arange(start, start + L, device=dev)
        seq = self._sequence_entries(i, entries, index, batch) if entries is not None else None
        # Queries in blocks of at most PREFILL_BLOCK (a block's queries score all its Lb+W-1 local keys,
        # most of them masked: a whole 2k-token chunk at once cost ~65x the window's work), so the
        # scores of a long chunk never exceed SCORE_BUDGET elements either.
        width = W + (0 if seq is None else self.indexer.top_k if self.indexer else seq.count)
        fused = seq is not None and self.indexer is None and fused_attention(q)
        if fused:  # HCA on a CPU: the entries the chunk's first query sees, all its queries see: at once
            shared = (start + 1) // seq.rate
            bulk = flash_attention(q, seq.entries[:shared], None, self.scaling) if shared else None
            width = W + seq.count - shared  # per block: its window and the chunk's last entries
        block = max(1, min(L, PREFILL_BLOCK, SCORE_BUDGET // (self.n_heads * (width + PREFILL_BLOCK))))
        if seq is not None and self.indexer is not None:
            block = max(1, min(block, SCORE_BUDGET // (self.indexer.n_heads * seq.count)))
        out = q.new_empty(q.shape)
        for a in range(0, L, block):
            b = min(a + block, L)
            qp, keys, kp = q_pos[a:b], local[a : b + W - 1], local_pos[a : b + W - 1]  # [Lb], [Lb+W-1, hd]
            in_window = (kp >= 0) & (kp <= qp[:, None]) & (kp > qp[:, None] - W)  # [Lb, Lb+W-1]
            if fused:
                part = None if bulk is None else (bulk[0][:, a:b], bulk[1][:, a:b])
                visible = (qp + 1) // seq.rate - shared  # of the entries past the shared ones
                out[a:b] = attend_shared(
                    q[a:b], keys, in_window, seq.entries[shared:], visible, self.attn_sink, self.scaling, part
                )
                continue
            scores = torch.matmul(q[a:b], keys.t()) * self.scaling  # [Lb, H, Lb+W-1]
            if seq is None:
                scores = scores.masked_fill(~in_window[:, None], float("-inf"))
                out[a:b] = torch.matmul(softmax_with_sink(scores, self.attn_sink).to(q.dtype), keys)
                continue
            if self.indexer is None:  # HCA: every entry whose window has closed
                extra_keys = seq.entries[None]  # [1, N, hd]
            else:
                extra_keys, chosen = self._chosen_entries(seq, qp, a, b, batch.prompt_lens[i], batch)
            extra = batched_matmul(q[a:b], extra_keys.transpose(-1, -2)).mul_(self.scaling)  # [Lb, H, N or K]
            # Window scores | entry scores | sink in one buffer (what cat-ing them twice built).
            nw, ne = keys.shape[0], extra.shape[-1]
            dtype = torch.promote_types(scores.dtype, self.attn_sink.dtype)
            combined = torch.empty(*scores.shape[:-1], nw + ne + 1, dtype=dtype, device=dev)
            combined[..., :nw] = scores
            combined[..., :nw].masked_fill_(~in_window[:, None], float("-inf"))
            combined[..., nw:-1] = extra
            if self.indexer is None:
                mask_tail(combined[..., nw:-1], visible=(qp + 1) // seq.rate)
            else:
                combined[..., nw:-1].masked_fill_(~chosen[:, None], float("-inf"))
            combined[..., -1] = self.attn_sink
            probs = softmax_with_sink(combined, None).to(q.dtype)
            out[a:b] = torch.matmul(probs[..., :nw], keys) + batched_matmul(probs[..., nw:], extra_keys)
        return out

    def _sequence_entries(self, i, entries, index, batch: V4Batch) -> _SequenceEntries | None:
        """Sequence i's compressed entries (and indexer keys and queries) once this step has written."""
        group: GroupMeta = batch.groups[self.group]
        n = group.counts[i]
        if not n:
            return None
        ids = torch.arange(n, device=batch.slots.device)[None]  # [1, N]
        page, offset = group.locate(batch.slots.new_tensor([i]), ids)
        seq = _SequenceEntries(n, group.rate, page[0], offset[0])
        seq.row = i
        if index is None:  # HCA attends to every entry
            seq.entries = self._read(batch, seq.page, seq.offset, index=False)  # [N, hd]
        else:  # CSA: the indexer scores every entry's key; only the entries it selects are read
            a, b = batch.offsets[i], batch.offsets[i + 1]
            seq.index_keys = self._read(batch, seq.page, seq.offset, index=True)  # [N, ihd]
            seq.queries, seq.weights = index[1][a:b], index[2][a:b]  # [L, nh, ihd], [L, nh]
        return seq

    def _chosen_entries(self, seq: _SequenceEntries, qp, a: int, b: int, prompt_len: int, batch: V4Batch):
        """CSA: the entries the queries at positions qp [Lb] attend to -> keys [Lb, K, hd], chosen [Lb, K]."""
        visible = (qp + 1) // seq.rate  # [Lb]: entries whose window has closed
        scores = self.indexer.scores(seq.queries[a:b], seq.weights[a:b], seq.index_keys[None])  # [Lb, N]
        mask_tail(scores, visible)
        hf_len = torch.where(qp < prompt_len, prompt_len // seq.rate, visible)
        ties = (torch.full_like(qp, seq.row), qp, batch.first_tie)
        ids, chosen = select_top_k(scores, visible, hf_len, self.indexer.top_k, ties)  # [Lb, K]
        return self._read(batch, seq.page[ids], seq.offset[ids], index=False), chosen

    def _read(self, batch: V4Batch, page: torch.Tensor, offset: torch.Tensor, index: bool) -> torch.Tensor:
        """This layer's compressed K/V [.., hd] (or, `index`, its indexer keys [.., ihd]) at (page, offset).

        With KV tiers (engine/tiers.py) a page may be in host memory or on disk (page < 0): the tiers
        fetch only the entries asked for, so a CSA layer moves the indexer keys and the selected
        entries, never the whole sequence's cache."""
        pages = batch.caches[self.group][self.kind_index]
        columns = self._columns(pages, index)
        if batch.tiers is None:
            read = pages[page, offset, columns]
        else:
            read = batch.tiers.gather(self.group, self.kind_index, page, offset, columns)
        return kv_quant.load(read, batch.caches[WINDOW][self.layer_id].dtype)  # fp8 KV: to the model's dtype

    def _columns(self, pages: torch.Tensor, index: bool) -> slice:
        """The columns of the compressed K/V (or, `index`, the indexer key) in a page entry as stored."""
        if self.indexer is None:
            return slice(None)
        parts = (self.head_dim, pages.shape[-1] - self.head_dim)
        if kv_quant.is_packed(pages):  # hd + 1 | ihd + 1 bytes: each part has its own scale byte
            parts = (self.head_dim, pages.shape[-1] - self.head_dim - 2)
        return kv_quant.packed_columns(parts, int(index), kv_quant.is_packed(pages))


@dataclass
class _SequenceEntries:
    count: int
    rate: int
    page: torch.Tensor  # [N] the page of each entry (negative: in a slower KV tier)
    offset: torch.Tensor  # [N]
    entries: torch.Tensor | None = None  # [N, hd] (HCA: every entry is attended)
    index_keys: torch.Tensor | None = None  # [N, ihd]
    queries: torch.Tensor | None = None  # [L, nh, ihd] the chunk's indexer queries
    weights: torch.Tensor | None = None  # [L, nh]
    row: int = 0  # the sequence's row in the batch
