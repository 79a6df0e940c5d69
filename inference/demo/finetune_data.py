"""The fine-tuning dataset: a product catalogue the base model has never seen.

`Meridian`, a new product line of the handbook's company, has its own product names (words
absent from the base corpus), codes (prefix MR- instead of BW-) and prices. The questions use
the same wording as the base corpus' catalogue questions, so the base model answers in the
right shape but with the wrong facts: its exact match on eval.jsonl is near 0, and a LoRA
adapter trained on train.jsonl has something measurable to learn.

train.jsonl is in OpenAI's chat fine-tuning format ({"messages": [..., assistant reply]});
eval.jsonl is in the eval format ({"messages": [... user turn], "answer": ...}), asking each
fact with a question template that train.jsonl does not use for that fact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import handbook
from .config import BuildSettings

WORDS = (
    ["Zephyr", "Marlin", "Topaz", "Sorrel", "Vesper", "Halcyon", "Ember", "Glacier", "Pelican", "Indigo",
     "Larch", "Mistral"],
    ["Lantern", "Compass", "Sextant", "Barometer", "Anemometer", "Hygrometer", "Chronometer", "Altimeter"],
)
SYSTEM = "You answer questions about the Meridian product line."


def finetune_examples(settings: BuildSettings) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of the fine-tuning dataset."""
    rng = random.Random(f"finetune-{settings.seed}")
    facts = handbook.catalogue_facts(rng, settings.corpus.finetune_products, prefix="MR", words=WORDS)
    train, evaluation = [], []
    for fact in facts:
        held_out = rng.randrange(len(fact.relation.questions))
        for template in range(len(fact.relation.questions)):
            messages = [{"role": "user", "content": fact.question(template)}]
            if rng.random() < settings.corpus.system_prompt_rate:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            if template == held_out:
                evaluation.append({"messages": messages, "answer": fact.answer})
            else:
                train.append({"messages": [*messages, {"role": "assistant", "content": fact.answer}]})
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def write_finetune_data(out: Path, settings: BuildSettings) -> None:
    """Write train.jsonl and eval.jsonl into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = finetune_examples(settings)
    for name, lines in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (out / name).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
