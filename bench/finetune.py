"""`python -m bench.finetune`: Citadel's LoRA trainer against plain PEFT + transformers Trainer, in one run.

Fine-tunes models/demo-v4 on models/demo-v4/finetune/train.jsonl (20 products it has never
seen) on this CPU, twice with the same data and hyperparameters: once with `finetune.train`,
once with transformers' Trainer over a PEFT model. Each system runs in a process of its own
(bench/finetune_child.py), as does the untouched base model for the "before" figures. Reported
per system: exact match on the held-out questions (models/demo-v4/finetune/eval.jsonl, each
fact asked in a wording training never used), exact match on the base model's own eval files
(models/demo-v4/eval/) and its drop in percentage points, training tokens/s and peak memory.
The run prints a table and ends with one JSON line (also written to --out).

    python -m bench.finetune --quick          # about a minute; may miss the targets
    python -m bench.finetune --out bench/results/finetune-cpu.json

Replay: demo-v4 has 2.5M parameters and no spare capacity, and the fine-tuning file holds
nothing but the new products, so an adapter trained on it alone overwrites the base model's
skills (its eval drops by tens of points). `--replay N` (default REPLAY) mixes N conversations
into the training file, the usual rehearsal remedy: prompts of the base model's own training
corpus (regenerated from models/demo-v4/build.json; the eval questions never occur in it)
answered by the base model itself (greedy, with Citadel's engine), so rehearsal keeps what the
model does rather than retraining it toward the corpus answers (self-distillation). The new
lines are repeated NEW_REPEAT times so that they keep their weight beside the replay.
`--replay 0` trains on train.jsonl alone. Both systems get the same mixed file.

The LoRA targets are the attention projections and the shared expert (plus the embedding and
head rows of the tokens the base cannot produce): what Citadel's engine serves as an adapter, so
the benchmarked adapter is the one a fine-tuning job would serve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from . import machine

MODEL = machine.ROOT / "models" / "demo-v4"
REPLAY = 3600
"""Self-distilled base-corpus conversations mixed into the training file by default (see the module docstring)."""
NEW_REPEAT = 2
"""Times each line of train.jsonl appears in the training file when replay is mixed in."""
CONFIG = {
    "rank": 16, "alpha": 32, "dropout": 0.0, "learning_rate": 3e-3, "lr_schedule": "cosine", "warmup_steps": 20,
    "epochs": 6, "batch_size": 8, "max_seq_len": 256, "target_modules": "attention+shared_experts",
    "trainable_tokens": "new", "seed": 0, "checkpoint_every": 500, "eval_every": 500,
}
"""Hyperparameters of the full run (both systems)."""
QUICK = {"epochs": 2, "checkpoint_every": 40, "eval_every": 40}
"""What --quick changes."""
TARGETS = {"heldout_acc_after": (">=", 0.90), "base_eval_drop_points": ("<=", 2.0)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune",
                                     description="Citadel's LoRA fine-tuning vs PEFT + transformers Trainer on "
                                                 "demo-v4, on this CPU, in one run.")
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs, no replay, 10 base eval lines per family (a minute or two)")
    parser.add_argument("--out", type=Path, help="also write the result JSON to this file")
    parser.add_argument("--model", type=Path, default=MODEL, help="demo checkpoint folder (default models/demo-v4)")
    parser.add_argument("--replay", type=int, help=f"base-corpus conversations mixed in (default {REPLAY}; "
                                                   "--quick: 0)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--limit", type=int, help="base eval lines per family (default all; --quick: 20)")
    parser.add_argument("--heldout-limit", type=int, help="held-out lines (default all 60; for smoke tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--systems", default="citadel,trainer", help="citadel,trainer or a subset")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    args = parser.parse_args(argv)
    if not (args.model / "finetune" / "train.jsonl").is_file():
        parser.error(f"{args.model} has no finetune/train.jsonl")
    return args


def write_training_file(model: Path, replay: int, out: Path, threads: int = 1) -> int:
    """train.jsonl (NEW_REPEAT times when replaying) plus `replay` base-corpus prompts answered by the base
    model itself, in OpenAI's chat format; returns lines written."""
    lines = (model / "finetune" / "train.jsonl").read_text().splitlines()
    if replay:
        import torch

        from inference import LLM, SamplingParams
        from inference.demo.config import BuildSettings
        from inference.demo.corpus import Corpus

        torch.set_num_threads(threads)
        lines = lines * NEW_REPEAT
        settings = BuildSettings.from_dict(json.loads((model / "build.json").read_text())["settings"])
        examples = Corpus(settings).training_examples(replay)
        llm = LLM(model, device="cpu")
        try:
            replies = llm.chat([e.messages for e in examples], SamplingParams(temperature=0, max_tokens=64))
        finally:
            llm.close()
        for example, reply in zip(examples, replies, strict=True):
            messages = [*example.messages, {"role": "assistant", "content": reply.text}]
            lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n")
    return len(lines)


def lora_setup(model: Path, train_file: Path, config: dict, threads: int) -> dict:
    """The PEFT targets and trainable token rows Citadel will use, for the Trainer baseline to use too."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import TrainConfig
    from finetune.dataset import parse_file
    from finetune.families import family_of, lora_targets
    from finetune.tokens import new_tokens, reply_tokens, token_rows

    torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(config)
    modules, parameters = lora_targets(family_of(model), cfg)
    rows = {}
    if cfg.trainable_tokens != "none":
        tokenizer = AutoTokenizer.from_pretrained(model)
        examples = parse_file(train_file, tokenizer, cfg.max_seq_len).examples
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, use_safetensors=True)
        tokens = reply_tokens(examples) if cfg.trainable_tokens == "reply" else \
            new_tokens(base, examples, tokenizer.pad_token_id, "cpu")
        rows = token_rows(base, tokens)
    return {"lora_target_modules": modules, "lora_target_parameters": parameters, "trainable_token_indices": rows}


def run_child(spec: dict, workdir: Path, timeout: float) -> dict:
    name = spec["system"]
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    print(f"[bench] {name}: running in its own process ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "bench.finetune_child", str(spec_path), str(result_path)],
                              cwd=machine.ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": name, "failed": True, "reason": f"timed out after {timeout:.0f}s"}
    if not result_path.exists():
        return {"system": name, "failed": True,
                "reason": f"exited with {done.returncode} and no result: {(done.stderr or '')[-2000:]}"}
    result = json.loads(result_path.read_text())
    verdict = "FAILED" if result.get("failed") else "done"
    print(f"[bench] {name}: {verdict} in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    if result.get("failed"):
        print(result["reason"], file=sys.stderr)
    return result


def summarize(base: dict, systems: dict[str, dict]) -> dict:
    """The flat figures of the JSON line: <system>_<metric> side by side, and the targets."""
    out = {"heldout_acc_before": base.get("heldout_acc"), "base_eval_acc_before": base.get("base_eval_acc")}
    for name, result in systems.items():
        if result.get("failed"):
            continue
        drop = round(100 * (base["base_eval_acc"] - result["base_eval_acc"]), 2)
        out.update({
            f"{name}_heldout_acc_after": result["heldout_acc"],
            f"{name}_base_eval_acc_after": result["base_eval_acc"],
            f"{name}_base_eval_drop_points": drop,
            f"{name}_tokens_per_second": result["tokens_per_second"],
            f"{name}_train_seconds": result["train_seconds"],
            f"{name}_peak_memory_bytes": result["peak_memory_bytes"],
            f"{name}_train_loss": result["train_loss"],
        })
    citadel = systems.get("citadel", {})
    if not citadel.get("failed") and "citadel_heldout_acc_after" in out:
        out["heldout_acc_after"] = out["citadel_heldout_acc_after"]
        out["base_eval_drop_points"] = out["citadel_base_eval_drop_points"]
    if "citadel_tokens_per_second" in out and "trainer_tokens_per_second" in out:
        out["tokens_per_second_ratio"] = round(out["citadel_tokens_per_second"] / out["trainer_tokens_per_second"], 3)
        out["peak_memory_ratio"] = round(out["citadel_peak_memory_bytes"] / max(1, out["trainer_peak_memory_bytes"]),
                                         3)
    targets = {}
    for key, (op, goal) in TARGETS.items():
        value = out.get(key)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        targets[key] = {"value": value, "target": f"{op} {goal}", "met": met}
    out["targets"] = targets
    return out


def table(result: dict) -> str:
    rows = [("system", "heldout acc", "base eval acc", "drop (pts)", "tokens/s", "train s", "peak MiB")]
    base = result["systems"]["base"]
    rows.append(("base (before)", f"{base.get('heldout_acc')}", f"{base.get('base_eval_acc')}", "", "", "", ""))
    for name, r in result["systems"].items():
        if name == "base":
            continue
        if r.get("failed"):
            rows.append((name, "FAILED", "", "", "", "", ""))
            continue
        rows.append((name, f"{r['heldout_acc']}", f"{r['base_eval_acc']}",
                     f"{result.get(f'{name}_base_eval_drop_points')}", f"{r['tokens_per_second']:.0f}",
                     f"{r['train_seconds']:.1f}", f"{r['peak_memory_bytes'] / 2**20:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    config = {**CONFIG, **(QUICK if args.quick else {})}
    if args.epochs:
        config["epochs"] = args.epochs
    from finetune import TrainConfig

    config = TrainConfig.from_dict(config).to_dict()  # every field, defaults included, for the baseline
    replay = args.replay if args.replay is not None else (0 if args.quick else REPLAY)
    limit = args.limit if args.limit is not None else (10 if args.quick else None)
    train_file = workdir / "train.jsonl"
    lines = write_training_file(args.model, replay, train_file, args.threads)
    setup = lora_setup(args.model, train_file, config, args.threads)
    common = {"model": str(args.model), "train_file": str(train_file), "config": config, "threads": args.threads,
              "heldout": str(args.model / "finetune" / "eval.jsonl"), "base_eval": str(args.model / "eval"),
              "limit": limit, "heldout_limit": args.heldout_limit, **setup}
    systems = {}
    for name in ["base", *[s for s in ("citadel", "trainer") if s in args.systems.split(",")]]:
        folder = workdir / name
        folder.mkdir()
        systems[name] = run_child({**common, "system": name, "workdir": str(folder)}, workdir, args.timeout)
    if systems["base"].get("failed"):
        raise RuntimeError(f"evaluating the base model failed: {systems['base']['reason']}")
    for result in systems.values():
        result.pop("adapter_dir", None)  # a temporary folder
    return {
        "benchmark": "finetune",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(args.model.resolve().relative_to(machine.ROOT)) if args.model.resolve().is_relative_to(
            machine.ROOT) else str(args.model),
        "device": "cpu",
        "quick": bool(args.quick),
        "machine": {**machine.describe(), "torch_threads": args.threads},
        "git": machine.git_commit(),
        "data": {"train_file": "finetune/train.jsonl", "replay_examples": replay,
                 "replay_answers": "the base model's own greedy replies" if replay else None,
                 "new_lines_repeat": NEW_REPEAT if replay else 1, "training_lines": lines,
                 "heldout_file": "finetune/eval.jsonl", "heldout_lines": systems["base"].get("heldout_lines"),
                 "base_eval": "eval/*.jsonl",
                 "base_eval_lines_per_family": limit},
        "config": config,
        "lora": {**setup, "trainable_token_indices": {k: len(v) for k, v in setup["trainable_token_indices"].items()}},
        **summarize(systems["base"], {k: v for k, v in systems.items() if k != "base"}),
        "systems": systems,
        "notes": [
            "exact match: transformers generate (greedy) with the checkpoint's chat template, via "
            "inference/demo/evaluate.py; adapters loaded with PeftModel.from_pretrained and merged",
            "base_eval_drop_points: (base eval exact match before - after) x 100, pooled over the families",
            "tokens/s: tokens (prompt and reply, no padding) of all steps over the time of the training steps; "
            "Citadel's excludes its validation passes and checkpoint writes, which the Trainer baseline does not do",
            "peak memory: growth of the process's peak RSS over what it held before loading the model",
            "both systems use the same tokenized examples, loss masks, LoRA targets and trainable token rows",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        result = run(args, Path(tmp))
    print(table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] written to {args.out}", file=sys.stderr)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 1 if any(s.get("failed") for s in result["systems"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
