"""The demo model's tokenizer: byte-level BPE trained on the corpus, digits kept one per token.

Byte-level, so any text round-trips; digits are split before BPE so "472" is always the three
tokens 4, 7, 2, which is what lets a small model learn column arithmetic and decimal shifts.
The special tokens and the chat template are tiny_checkpoint.py's, so the engine handles both
checkpoints alike: <|begin|> = 0 and <|end|> = 1, and the reply ends with <|end|>.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..tiny_checkpoint import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer` trained on `texts` (deterministic for the same texts in the same order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    # Plain prompts get <|begin|> in front, like DeepSeek's tokenizers (add_bos_token).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tokenizer


def save_tokenizer(tokenizer, out: Path, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into `out`."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: Path):
    """The saved tokenizer as transformers loads it (what the engine and `eval` use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
