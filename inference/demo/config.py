"""Build settings of the demo model: one validated dataclass per stage, and the two presets.

Everything that changes the files a build writes is a field here, so `build.json` (written
next to the checkpoint) records exactly what produced it and `eval` can regenerate the
training corpus from it. The `full` preset is what `models/demo-v4` ships; `tiny` builds in
seconds and exists for the determinism test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
FAMILIES = ("arithmetic", "units", "handbook")
"""The evaluated task families, one eval file each."""


@dataclass(frozen=True)
class ModelSettings:
    """The DeepSeek-V4 architecture at demo size (real V4-Flash values in the model card)."""

    vocab_size: int = 1024
    """Byte-level BPE vocabulary size, special tokens included."""
    hidden_size: int = 128
    """Width of the residual stream (each of the hc_mult hyper-connection streams)."""
    layer_types: tuple[str, ...] = (
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    )
    """Attention type per layer; one entry per layer."""
    mlp_layer_types: tuple[str, ...] = ("hash_moe", "hash_moe", "moe", "moe")
    """MoE router per layer: hash_moe (frozen token-id -> experts table) or moe (learned top-k)."""
    num_attention_heads: int = 4
    """Query heads; keys and values share one head (shared-KV MQA) as in DeepSeek-V4."""
    head_dim: int = 64
    """Channels per attention head."""
    partial_rotary_factor: float = 0.5
    """Fraction of each head's channels (the trailing ones) that get RoPE."""
    q_lora_rank: int = 64
    """Rank of the low-rank query projection."""
    o_groups: int = 2
    """Head groups of the grouped low-rank output projection."""
    o_lora_rank: int = 64
    """Per-group rank of the grouped output projection."""
    moe_intermediate_size: int = 128
    """Hidden width of each routed expert and of the shared expert."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 2
    """Routed experts each token uses."""
    n_shared_experts: int = 1
    """Shared experts every token uses."""
    sliding_window: int = 32
    """Tokens each layer attends to directly (the compressors see further back)."""
    csa_compress_rate: int = 4
    """Tokens per compressed entry in compressed sparse attention (CSA); 4 as in the real model."""
    hca_compress_rate: int = 16
    """Tokens per compressed entry in heavily compressed attention (HCA); 128 in the real model."""
    index_n_heads: int = 4
    """Heads of CSA's lightning indexer."""
    index_head_dim: int = 32
    """Channels per lightning-indexer head."""
    index_topk: int = 8
    """Compressed entries the indexer keeps per query."""
    hc_mult: int = 4
    """Hyper-connection streams (manifold-constrained hyper-connections)."""
    hc_sinkhorn_iters: int = 8
    """Sinkhorn-Knopp iterations that make the 4x4 stream-mixing matrices doubly stochastic (20 in the real
    model; 8 converge as well at this size and make CPU training a third faster)."""
    max_position_embeddings: int = 1024
    """Longest sequence the config admits (training sequences are much shorter)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_attention_heads", "head_dim", "q_lora_rank",
                  "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts",
                  "num_experts_per_tok", "sliding_window", "csa_compress_rate", "hca_compress_rate",
                  "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters")
        if len(self.layer_types) != len(self.mlp_layer_types):
            raise ValueError("layer_types and mlp_layer_types must have one entry per layer each")
        if set(self.layer_types) != set(LAYER_TYPES):
            raise ValueError(f"layer_types must use every DeepSeek-V4 attention type {LAYER_TYPES}")
        if set(self.mlp_layer_types) != set(MLP_LAYER_TYPES):
            raise ValueError(f"mlp_layer_types must use both router types {MLP_LAYER_TYPES}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok cannot exceed n_routed_experts")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ValueError("o_groups must divide num_attention_heads * head_dim")
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError("head_dim * partial_rotary_factor must be even (RoPE rotates channel pairs)")


@dataclass(frozen=True)
class CorpusSettings:
    """Sizes of the synthetic chat corpus, its held-out eval files and the fine-tuning set."""

    handbook_people: int = 32
    """Employees in the fictional company handbook (four per department at the full size)."""
    handbook_products: int = 16
    """Products in the handbook's catalogue."""
    arithmetic_max: int = 99
    """Largest operand of the addition and subtraction problems."""
    units_max: int = 999
    """Largest whole part of a quantity to convert."""
    eval_per_family: int = 200
    """Most held-out eval lines per family."""
    system_prompt_rate: float = 0.2
    """Share of conversations that open with a system message."""
    two_turn_rate: float = 0.15
    """Share of conversations that carry an earlier question and answer before the asked one."""
    finetune_products: int = 20
    """Products of the new catalogue in the fine-tuning dataset (absent from the base corpus)."""

    def __post_init__(self) -> None:
        _positive(self, "handbook_people", "handbook_products", "arithmetic_max", "units_max",
                  "eval_per_family", "finetune_products")
        for name in ("system_prompt_rate", "two_turn_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True)
class TrainSettings:
    """The training loop: AdamW with warm-up and cosine decay over a fixed number of steps."""

    steps: int = 3000
    """Optimizer steps (fixed, not time-based, so a build is reproducible)."""
    batch_size: int = 32
    """Conversations per step."""
    learning_rate: float = 3e-3
    """Peak learning rate."""
    min_learning_rate: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 150
    """Steps of linear warm-up."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (not on norms, biases, sinks or gates' small vectors)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""
    max_seq_len: int = 128
    """Longest training conversation in tokens; longer ones are an error in the corpus."""
    mixture: tuple[tuple[str, float], ...] = (
        ("arithmetic", 0.40), ("units", 0.25), ("handbook", 0.31), ("chat", 0.04),
    )
    """Share of each family in the training batches."""
    router_bias_rate: float = 5e-3
    """Step of DeepSeek's auxiliary-loss-free balancing of the top-k routers' correction bias."""
    indexer_loss_weight: float = 0.1
    """Weight of the lightning indexer's KL distillation from the main attention."""
    threads: int = 1
    """torch intra-op threads. One keeps a build bitwise reproducible on any machine of the same CPU type, and
    fast on a shared machine: with two threads, a busy second core slows training several-fold."""
    log_every: int = 50
    """Steps between progress lines."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "learning_rate", "max_seq_len", "threads", "log_every")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps must be >= 0 and smaller than steps")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError("min_learning_rate must be between 0 and learning_rate")
        names = [name for name, _ in self.mixture]
        if sorted(names) != sorted((*FAMILIES, "chat")) or any(w <= 0 for _, w in self.mixture):
            raise ValueError(f"mixture must give a positive share to each of {(*FAMILIES, 'chat')}")


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build depends on; the same settings give byte-identical files."""

    seed: int = 0
    """Seeds the corpus, the tokenizer's input order, the weights and the batch order."""
    preset: str = "full"
    """Name of the preset these settings came from (recorded in build.json)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    """Architecture."""
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    """Synthetic data."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Training loop."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BuildSettings:
        model = dict(data["model"])
        for key in ("layer_types", "mlp_layer_types"):
            model[key] = tuple(model[key])
        train = dict(data["train"])
        train["mixture"] = tuple((name, weight) for name, weight in train["mixture"])
        return cls(seed=data["seed"], preset=data["preset"], model=ModelSettings(**model),
                   corpus=CorpusSettings(**data["corpus"]), train=TrainSettings(**train))


def preset(name: str, seed: int = 0) -> BuildSettings:
    """The `full` settings (the shipped demo model) or the `tiny` ones (seconds, for tests)."""
    if name == "full":
        return BuildSettings(seed=seed, preset="full")
    if name == "tiny":
        return BuildSettings(
            seed=seed,
            preset="tiny",
            model=ModelSettings(vocab_size=400, hidden_size=32, head_dim=16, q_lora_rank=16, o_lora_rank=8,
                                moe_intermediate_size=16, n_routed_experts=4, sliding_window=8,
                                hca_compress_rate=8, index_head_dim=8, index_topk=2, hc_sinkhorn_iters=4),
            corpus=CorpusSettings(handbook_people=8, handbook_products=4, arithmetic_max=99, units_max=99,
                                  eval_per_family=10, finetune_products=4),
            train=TrainSettings(steps=6, batch_size=4, warmup_steps=2, log_every=2, max_seq_len=256),
        )
    raise ValueError(f"unknown preset {name!r}: use 'full' or 'tiny'")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be positive, got {value!r}")
