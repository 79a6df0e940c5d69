"""One system of `python -m bench.finetune`, in a process of its own: `python -m bench.finetune_child SPEC RESULT`.

Systems: `base` (no training: the "before" figures), `citadel` (finetune.train) and `trainer`
(plain PEFT + transformers Trainer, what a user would otherwise write). Each trains (unless
base), records its peak memory over what the process held before loading the model (own
process, so the peaks do not mix), then evaluates with inference/demo/evaluate.py: exact match
of transformers' greedy generate on the held-out fine-tuning questions and on the base model's
own eval files, with the adapter loaded by PEFT on the base and merged.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .metrics import MemoryMeter


def evaluate_model(model_path: str, adapter_dir: str | None, heldout: str, base_eval: str,
                   limit: int | None, heldout_limit: int | None = None) -> dict:
    """Exact match on the held-out file and per base eval family, with the evaluator of inference.demo."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.demo.evaluate import eval_files, evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.eval()
    started = time.perf_counter()
    held = evaluate(model, tokenizer, eval_files(Path(heldout)), limit=heldout_limit, log=lambda line: None)
    base = evaluate(model, tokenizer, eval_files(Path(base_eval)), limit=limit, log=lambda line: None)
    lines = sum(r.lines for r in base.values())
    return {
        "heldout_acc": next(iter(held.values())).exact_match,
        "heldout_lines": next(iter(held.values())).lines,
        "heldout_answer_perplexity": next(iter(held.values())).answer_perplexity,
        "base_eval": {family: r.exact_match for family, r in base.items()},
        "base_eval_lines": lines,
        "base_eval_acc": round(sum(r.exact_match * r.lines for r in base.values()) / max(1, lines), 4),
        "eval_seconds": round(time.perf_counter() - started, 1),
    }


def train_citadel(spec: dict, meter: MemoryMeter) -> dict:
    from finetune import TrainConfig, train

    losses, evals = [], []

    def on_event(event: dict) -> None:
        if event["type"] == "metrics":
            losses.append(event["loss"])
        elif event["type"] == "eval":
            evals.append(event["valid_loss"])

    started = time.perf_counter()
    result = train(base_model=spec["model"], train_file=spec["train_file"], validation_file=spec["heldout"],
                   output_dir=spec["workdir"], config=TrainConfig.from_dict(spec["config"]),
                   on_event=on_event, resume=False, device="cpu")
    wall = time.perf_counter() - started
    return {
        "adapter_dir": result.adapter_dir,
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "train_seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "wall_seconds": round(wall, 2),
        "train_loss": result.train_loss,
        "valid_loss": result.valid_loss,
        "valid_losses": evals,
        "checkpoints": len(result.checkpoints),
        "peak_memory_bytes": meter.peak(),
    }


def train_trainer(spec: dict, meter: MemoryMeter) -> dict:
    """The baseline: PEFT's get_peft_model and transformers' Trainer with its defaults, same hyperparameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from finetune.dataset import parse_file

    cfg = spec["config"]
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # The same tokens and loss masks as Citadel's run (what is compared is the training loop).
    examples = parse_file(Path(spec["train_file"]), tokenizer, cfg["max_seq_len"]).examples
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, use_safetensors=True)
    model.config.use_cache = False
    lora = LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], bias="none",
                      task_type="CAUSAL_LM", target_modules=spec["lora_target_modules"],
                      target_parameters=spec["lora_target_parameters"] or None,
                      trainable_token_indices=spec["trainable_token_indices"] or None)
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "trainer"), per_device_train_batch_size=cfg["batch_size"],
        num_train_epochs=cfg["epochs"], learning_rate=cfg["learning_rate"], lr_scheduler_type=cfg["lr_schedule"],
        warmup_steps=cfg["warmup_steps"], weight_decay=cfg["weight_decay"], max_grad_norm=cfg["max_grad_norm"],
        seed=cfg["seed"], save_strategy="no", eval_strategy="no", report_to=[], logging_steps=50,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    train_started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - train_started
    tokens = sum(len(e.input_ids) for e in examples) * cfg["epochs"]
    adapter = Path(spec["workdir"]) / "adapter"
    model.save_pretrained(adapter, safe_serialization=True)
    return {
        "adapter_dir": str(adapter),
        "steps": output.global_step,
        "trained_tokens": tokens,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(tokens / train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_loss": round(output.training_loss, 6),
        "peak_memory_bytes": meter.peak(),
    }


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    import peft  # noqa: F401  (code imported before the baseline memory is taken)
    import transformers  # noqa: F401

    meter = MemoryMeter(torch.device("cpu"))
    result: dict = {"system": spec["system"]}
    if spec["system"] == "citadel":
        result.update(train_citadel(spec, meter))
    elif spec["system"] == "trainer":
        result.update(train_trainer(spec, meter))
    result.update(evaluate_model(spec["model"], result.get("adapter_dir"), spec["heldout"], spec["base_eval"],
                                 spec["limit"], spec.get("heldout_limit")))
    return result


def main() -> int:
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    try:
        result = run(spec)
    except Exception:  # reported to the parent, which shows it
        result = {"system": spec["system"], "failed": True, "reason": traceback.format_exc()[-3000:]}
    result_path.write_text(json.dumps(result))
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
