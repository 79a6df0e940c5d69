"""Build a tiny random-weight DeepSeek-V4 checkpoint that tests and `make run` can load in seconds.

Real DeepSeek-V4 checkpoints are hundreds of gigabytes, so everything that only needs the
*architecture* (engine correctness against transformers, the worker, the API, the console)
runs on this stand-in until a trained demo model lands. The folder it writes is an ordinary
Hugging Face checkpoint: config.json, model.safetensors, generation_config.json,
tokenizer.json and tokenizer_config.json (with a chat template).

Every architectural feature of `transformers.DeepseekV4ForCausalLM` is present at toy size:
all three attention layer types (sliding window, compressed sparse attention with its
lightning indexer, heavily compressed attention), YaRN RoPE on the compressed branches,
both MoE router types (hash and top-k) with a shared expert, and manifold-constrained
hyper-connections. Parameters that transformers initialises to zero or one (attention sinks,
compressor position biases, hyper-connection biases, norms, router correction bias, the hash
router's token->expert table) get random values, so a reimplementation that forgets one of
them cannot match transformers by accident.

Usage: python -m inference.tiny_checkpoint OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# The special tokens come first, so their ids are stable: <|begin|> = 0 and <|end|> = 1 are
# also DeepseekV4Config's default bos and eos ids.
SPECIAL_TOKENS = ["<|begin|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
BOS, EOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
VOCAB_SIZE = 640

# OpenAI's "developer" role is the newer name of "system"; "tool" carries tool results.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role ' + role + ': use system, developer, user, assistant or tool.') }}"
    "{% endif %}"
    "<|{{ role }}|>{{ message['content'] or '' }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A little English (with a few non-ASCII characters so multi-byte UTF-8 is exercised) to
# train the byte-level BPE on. The text only shapes the merges; the weights stay random.
CORPUS = """\
The old citadel stood on a hill above the river, and every morning the keepers opened its
gates to the people of the valley. Merchants brought bread, cheese, apples and wool; scholars
brought books and questions. Inside the walls there was a library with a thousand rooms, and
in each room a clerk wrote down who came in, what they read, and when they left.
Nobody could enter the archive without a token from the council, and nobody could carry a
book beyond the river without a letter that said where it would be kept. The rules were
strict, but they were written down, and anyone could read them on the wall by the gate.
In spring the weather was mild and the fields were green. In summer the days were long and
warm, and children swam in the river while their parents worked in the orchards. In autumn
the leaves turned red and gold, and in winter snow covered the roofs and the roads.
A young engineer named Ada kept the great machine that answered questions. She fed it
letters and numbers, and it wrote back sentences, one word at a time. When it was asked
something it should not answer, it said so politely and wrote the request in the ledger.
"How many books are in the library?" asked a visitor. "More than I can count," said the
clerk, "but fewer than there are questions." The visitor laughed and wrote that down too.
Café owners served coffee and crème brûlée near the naïve statue of a dragon; the menu said
"déjà vu" in gold letters — and the price in euros (€) and pounds (£).
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024 3.14 and 2.71.
def add(a, b):
    return a + b
print(add(2, 3))
You are a helpful assistant. Answer the question briefly and clearly. Thank you!
What is the capital of France? The capital of France is Paris.
What is two plus two? Two plus two is four.
Tell me a story about the sea. Once upon a time, a small boat sailed across the sea.
"""

# Toy-sized DeepSeek-V4 (the real V4-Flash values are in comments where they differ).
CONFIG_KWARGS = dict(
    hidden_size=64,  # 4096
    moe_intermediate_size=32,  # 2048
    num_hidden_layers=4,  # 43
    num_attention_heads=4,  # 64
    num_key_value_heads=1,  # shared-KV MQA, as in the real model
    head_dim=32,  # 512
    partial_rotary_factor=0.5,  # rope on the trailing 16 of 32 channels (real: 64 of 512)
    q_lora_rank=32,  # 1024
    o_groups=2,  # 8
    o_lora_rank=16,  # 1024
    n_routed_experts=8,  # 256
    num_experts_per_tok=2,  # 6
    n_shared_experts=1,
    # One layer of each attention type, CSA twice because it is the one with an indexer.
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    # CSA keeps its real rate (4); HCA's real 128 would need prompts of 128+ tokens before the
    # compressor emits anything, so 8 makes it active in short test prompts.
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    # 128 in the real model; 16 makes prompts of a few dozen tokens slide out of the window.
    sliding_window=16,
    index_n_heads=4,  # 64
    index_head_dim=16,  # 128
    # 512 in the real model; 4 makes the indexer actually drop entries after 16+ tokens.
    index_topk=4,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    # YaRN on the compressed branches as in the real model (factor 16 there).
    max_position_embeddings=1024,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    # Larger than the default 0.02 so the random logits are peaked enough for greedy
    # decoding to be well away from ties.
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def build_tokenizer():
    """Train a byte-level BPE tokenizer on CORPUS; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Plain prompts get <|begin|> in front, like DeepSeek's tokenizers (add_bos_token).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _randomize_untrained_parameters(model, generator: torch.Generator) -> None:
    """Give random values to what transformers initialises as constants (see module docstring)."""

    def normal_(tensor, mean, std):
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)

    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "sinks":
            normal_(param, 0.0, 1.0)
        elif leaf == "position_bias":
            normal_(param, 0.0, 0.5)
        elif leaf in ("base", "hc_base"):
            normal_(param, 0.0, 0.5)
        elif leaf in ("scale", "hc_scale"):
            normal_(param, 1.0, 0.2)
        elif "norm" in name and leaf == "weight":
            normal_(param, 1.0, 0.1)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            normal_(buffer, 0.0, 0.1)
        elif name.endswith("tid2eid"):
            # Each token goes to `top_k` distinct experts, as in a real hash-routing table.
            n_tokens, top_k = buffer.shape
            n_experts = model.config.n_routed_experts
            rows = [torch.randperm(n_experts, generator=generator)[:top_k] for _ in range(n_tokens)]
            buffer.copy_(torch.stack(rows))


def build_model(vocab_size: int, seed: int):
    """A DeepseekV4ForCausalLM with random float32 weights, deterministic for `seed`."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **CONFIG_KWARGS,
    )
    # Weight init draws from the global RNG; fork it so callers' random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV4ForCausalLM(config).to(torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _randomize_untrained_parameters(model, generator)
    return model


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if needed) and return its path."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG_KWARGS["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    model = build_model(tokenizer.get_vocab_size(), seed)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference.tiny_checkpoint",
        description="Build a tiny random-weight DeepSeek-V4 checkpoint (for tests and `make run`).",
    )
    parser.add_argument("out_dir", help="folder to write the checkpoint into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0); same seed, same files")
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.out_dir, seed=args.seed)
    print(f"tiny DeepSeek-V4 checkpoint written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
