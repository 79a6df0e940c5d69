"""The two training signals DeepSeek-V4 needs besides next-token loss, as forward hooks.

- Top-k routers carry an `e_score_correction_bias` that only steers which experts are picked.
  No gradient reaches it: DeepSeek's auxiliary-loss-free balancing nudges it after each step,
  up for experts that got fewer tokens than average and down for busier ones.
- CSA's lightning indexer picks compressed entries with a top-k, which passes no gradient
  either. As in DeepSeek-V3.2, it learns by distillation: a KL divergence between its scores
  over the entries it selected and the main attention's weight on those entries (summed over
  heads, held fixed as the target).

Both hook into transformers' own modules, so the trained model is an ordinary checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RouterBalancer:
    """Counts the tokens each top-k router sends to each expert, then balances its bias."""

    def __init__(self, model, rate: float):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekV4TopKRouter)]
        self.counts = [torch.zeros(r.num_experts) for r in self.routers]
        self.token_mask: torch.Tensor | None = None  # [B*S] bool: real tokens, not padding
        self.active = False
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def record(module, args, output) -> None:
            if self.active:
                indices = output[2]  # [B*S, top_k]
                if self.token_mask is not None:
                    indices = indices[self.token_mask]
                self.counts[i] += torch.bincount(indices.flatten(), minlength=module.num_experts).float()
        return record

    @torch.no_grad()
    def step(self) -> float:
        """Move every bias one step towards balance; return the worst expert load / mean load."""
        worst = 0.0
        for router, counts in zip(self.routers, self.counts, strict=True):
            mean = counts.mean()
            if mean > 0:
                worst = max(worst, float(counts.max() / mean))
                router.e_score_correction_bias += self.rate * torch.sign(mean - counts)
            counts.zero_()
        return worst

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class IndexerDistillation:
    """Captures, per CSA layer, the indexer's scores and picks and the attention weights."""

    def __init__(self, model):
        self.captured: list[dict] = []
        self.active = False
        self._handles = []
        for layer in model.model.layers:
            attention = layer.self_attn
            indexer = getattr(attention.compressor, "indexer", None)
            if indexer is None:
                continue
            slot: dict = {}
            self.captured.append(slot)
            self._handles += [
                indexer.scorer.register_forward_hook(self._store(slot, "scores", lambda out: out)),
                indexer.register_forward_hook(self._store(slot, "picks", lambda out: out)),
                attention.register_forward_hook(self._store(slot, "attention", lambda out: out[1].detach())),
            ]

    def _store(self, slot: dict, key: str, pick):
        def record(module, args, output) -> None:
            if self.active:
                slot[key] = pick(output)
        return record

    def loss(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Mean KL(attention || indexer) over queries that picked two or more entries; token_mask [B, S]."""
        losses = []
        for slot in self.captured:
            scores, picks, attention = slot.pop("scores"), slot.pop("picks"), slot.pop("attention")
            n_entries = scores.shape[-1]  # [B, S, T]
            if n_entries == 0:
                continue
            valid = picks >= 0  # [B, S, k]
            index = picks.clamp(min=0)
            # Attention weight of each query on the compressed entries (the last T keys), summed over heads.
            target = attention[..., -n_entries:].float().sum(dim=1).gather(-1, index) * valid  # [B, S, k]
            mass = target.sum(-1, keepdim=True)
            rows = token_mask & (mass.squeeze(-1) > 0) & (valid.sum(-1) > 1)
            if not rows.any():
                continue
            target = target[rows] / mass[rows]  # [R, k]
            valid = valid[rows]
            logits = scores.gather(-1, index)[rows].masked_fill(~valid, -1e9)
            log_pred = F.log_softmax(logits, dim=-1)
            log_target = torch.where(valid & (target > 0), target, torch.ones_like(target)).log()
            losses.append((target * (log_target - log_pred)).sum(-1).mean())
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
