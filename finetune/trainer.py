"""`train`: LoRA fine-tuning of a supported MoE checkpoint with PEFT, resumable and cancellable.

setup (check everything, load, wrap with PEFT) -> fit (steps, events, evals, checkpoints) ->
save the adapter alone. The caller (a Celery task on a worker) gets progress as JSON events
through `on_event`, stops a run through `should_stop`, and after a crash calls `train` again
with the same arguments: it continues from the newest complete checkpoint and ends with the
same adapter an uninterrupted run would have written, because the data order and learning
rate are functions of the step (batching.py) and the optimizer and RNG states are restored.
A run that already finished returns its stored result without training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .batching import collate, epoch_batches, learning_rate, steps_per_epoch
from .config import ConfigError, TrainConfig
from .dataset import Example, parse_file
from .families import check_targets_match, family_of, lora_targets
from .state import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .tokens import new_tokens, reply_tokens, token_rows

STOP_POLL_SECONDS = 1.0
"""Inside a step, should_stop is asked at most this often (from the decoder layers' forward hooks)."""
RESUME_FREE_FIELDS = ("checkpoint_every", "eval_every")
"""Config fields that may change between an interrupted run and its resumption."""


@dataclass
class TrainResult:
    """What a training run produced."""

    adapter_dir: str | None
    """output_dir/adapter, the PEFT adapter folder (None when cancelled)."""
    steps: int
    """Optimizer steps done (including those before a resume)."""
    total_steps: int
    """Steps the config asks for: epochs x ceil(examples / batch_size)."""
    train_loss: float | None
    """Mean training loss over the last epoch's steps (or those run, if fewer)."""
    valid_loss: float | None
    """Loss on the validation file at the last evaluation (None without one)."""
    cancelled: bool
    """True when should_stop ended the run early."""
    trained_tokens: int
    """Tokens (prompt and reply, no padding) processed by all steps."""
    checkpoints: list[str] = field(default_factory=list)
    """Complete checkpoint folders, oldest first."""
    seconds: float = 0.0
    """Wall time of the training steps of this call (loading, evaluation and checkpoints excluded)."""
    tokens_per_second: float = 0.0
    """Tokens processed per second of training step in this call."""

    def to_dict(self) -> dict:
        return asdict(self)


class _Stopped(Exception):
    """should_stop() said so in the middle of a step."""


def train(*, base_model: str | Path, train_file: str | Path, validation_file: str | Path | None = None,
          output_dir: str | Path, config: TrainConfig | dict | None = None,
          on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          resume: bool = True, device: str = "auto") -> TrainResult:
    """Train a LoRA adapter; see the module docstring and finetune/__init__.py for the contract."""
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    config.validate()
    family = family_of(base_model)
    modules, parameters = lora_targets(family, config)
    device = _resolve_device(device)
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    output_dir = Path(output_dir)
    for name, path in (("train_file", train_file), ("validation_file", validation_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(name, f"{path} is not a file")
    fingerprint = _fingerprint(base_model, train_file, validation_file)

    finished = _finished_result(output_dir, config, fingerprint) if resume else None
    if finished is not None:
        emit({"type": "message", "level": "info", "text": "this run had already finished; nothing to do"})
        return finished
    if not resume:
        for stale in (output_dir / "checkpoints", output_dir / "adapter", output_dir / "result.json"):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
    train_set = _load_examples(tokenizer, Path(train_file), "train_file", config, emit)
    valid_set = _load_examples(tokenizer, Path(validation_file), "validation_file", config, emit) \
        if validation_file is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(config.seed)
    model = _load_model(base_model, device, config, modules, parameters, train_set, pad_id, emit)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    per_epoch = steps_per_epoch(len(train_set), config.batch_size)
    total_steps = per_epoch * config.epochs
    lengths = [len(e.input_ids) for e in train_set]
    checkpoints_dir = output_dir / "checkpoints"

    step, trained_tokens, recent, valid_loss = 0, 0, [], None
    latest = latest_checkpoint(checkpoints_dir) if resume else None
    if latest is not None:
        saved = json.loads((latest / "state.json").read_text())
        _check_resumable(saved, config, fingerprint, latest)
        state = load_checkpoint(latest, model, optimizer)
        step, trained_tokens = state["step"], state["trained_tokens"]
        recent, valid_loss = state["recent_losses"], state["valid_loss"]
        emit({"type": "message", "level": "info", "text": f"resumed from checkpoint {latest.name} "
                                                          f"(step {step} of {total_steps})"})
    emit({"type": "message", "level": "info",
          "text": f"training {len(train_set)} examples for {config.epochs} epochs ({total_steps} steps of "
                  f"{config.batch_size}) on {device}; {sum(p.numel() for p in trainable):,} adapter parameters"})

    hooks = _install_stop_hooks(model, stop)
    model.train()
    run_tokens, run_seconds, run_started, run_steps_start = 0, 0.0, time.monotonic(), step
    cancelled, order = False, (-1, [])
    try:
        while step < total_steps:
            if stop():
                cancelled = True
                break
            epoch, index = divmod(step, per_epoch)
            if order[0] != epoch:
                order = (epoch, epoch_batches(lengths, config.batch_size, config.seed, epoch))
            batch = [train_set[i] for i in order[1][index]]
            lr = learning_rate(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            try:
                loss, tokens = _train_step(model, optimizer, trainable, batch, pad_id, device, config)
            except _Stopped:
                optimizer.zero_grad(set_to_none=True)
                cancelled = True
                break
            run_seconds += time.perf_counter() - started
            if not math.isfinite(loss):
                raise RuntimeError(f"the training loss became {loss} at step {step + 1}: lower learning_rate "
                                   f"(now {config.learning_rate}) or raise max_grad_norm clipping")
            step += 1
            trained_tokens += tokens
            run_tokens += tokens
            recent = (recent + [loss])[-per_epoch:]
            per_step = (time.monotonic() - run_started) / max(1, step - run_steps_start)
            emit({"type": "metrics", "step": step, "total_steps": total_steps, "epoch": epoch + 1,
                  "loss": round(loss, 6), "learning_rate": lr,
                  "tokens_per_second": round(run_tokens / max(run_seconds, 1e-9), 1),
                  "eta_seconds": round(per_step * (total_steps - step), 1)})
            if valid_set and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                valid_loss = evaluate_loss(model, valid_set, config.batch_size, pad_id, device)
                emit({"type": "eval", "step": step, "valid_loss": round(valid_loss, 6)})
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                path = save_checkpoint(checkpoints_dir, step, model, optimizer, {
                    "step": step, "position": {"epoch": step // per_epoch, "batch": step % per_epoch},
                    "total_steps": total_steps, "trained_tokens": trained_tokens, "recent_losses": recent,
                    "valid_loss": valid_loss, "scheduler": {"schedule": config.lr_schedule, "step": step},
                    "config": config.to_dict(), "fingerprint": fingerprint})
                emit({"type": "checkpoint", "step": step, "path": str(path)})
    finally:
        for hook in hooks:
            hook.remove()

    result = TrainResult(
        adapter_dir=None, steps=step, total_steps=total_steps,
        train_loss=round(sum(recent) / len(recent), 6) if recent else None,
        valid_loss=round(valid_loss, 6) if valid_loss is not None else None, cancelled=cancelled,
        trained_tokens=trained_tokens, checkpoints=[str(p) for p in list_checkpoints(checkpoints_dir)],
        seconds=round(run_seconds, 3), tokens_per_second=round(run_tokens / max(run_seconds, 1e-9), 1))
    if cancelled:
        emit({"type": "message", "level": "warning", "text": f"cancelled at step {step} of {total_steps}"})
        return result
    result.adapter_dir = str(_save_adapter(model, output_dir))
    (output_dir / "result.json").write_text(json.dumps(
        {"result": result.to_dict(), "config": config.to_dict(), "fingerprint": fingerprint}, indent=2) + "\n")
    emit({"type": "message", "level": "info", "text": f"adapter written to {result.adapter_dir}"})
    return result


def _train_step(model, optimizer, trainable, batch: list[Example], pad_id: int, device: str,
                config: TrainConfig) -> tuple[float, int]:
    input_ids, labels, tokens = collate(batch, pad_id)
    input_ids, labels = input_ids.to(device), labels.to(device)
    loss = causal_lm_loss(model, input_ids, labels)
    loss.backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), tokens


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (IGNORE elsewhere)."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # [B, S, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: str) -> float:
    """Token-weighted mean loss over `examples` (dropout off)."""
    model.eval()
    try:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            input_ids, labels, _ = collate(batch, pad_id)
            n = int((labels[:, 1:] != -100).sum())
            total += float(causal_lm_loss(model, input_ids.to(device), labels.to(device))) * n
            count += n
        return total / max(1, count)
    finally:
        model.train()


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was asked for but torch sees no GPU: use device='cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError("device", f"{device!r} is not auto, cpu or cuda[:N]")
    return device


def _load_model(base_model, device: str, config: TrainConfig, modules, parameters, train_set: list[Example],
                pad_id: int, emit):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16  # frozen base in bf16; PEFT keeps the adapter weights in float32
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False).to(device)
    model.config.use_cache = False
    check_targets_match(model, modules, parameters)
    tokens = []
    if config.trainable_tokens == "reply":
        tokens = reply_tokens(train_set)
    elif config.trainable_tokens == "new":
        tokens = new_tokens(model, train_set, pad_id, device)
    if config.trainable_tokens != "none":
        emit({"type": "message", "level": "info", "text": f"training the embedding rows of {len(tokens)} "
                                                          f"{config.trainable_tokens} tokens"})
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                      target_modules=modules, target_parameters=parameters or None, task_type="CAUSAL_LM",
                      trainable_token_indices=token_rows(model, tokens) if tokens else None)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # PEFT refuses a module type it cannot wrap
        raise ConfigError("target_modules", str(error)) from error


def _load_examples(tokenizer, path: Path, name: str, config: TrainConfig, emit) -> list[Example]:
    parsed = parse_file(path, tokenizer, config.max_seq_len)
    if parsed.error_count:
        first = parsed.errors[0]
        raise ConfigError(name, f"{parsed.error_count} bad lines, the first at line {first['line']}: "
                                f"{first['reason']} (validate_dataset lists them all)")
    if not parsed.examples:
        raise ConfigError(name, f"no usable example (empty, or all over max_seq_len {config.max_seq_len})")
    if parsed.too_long_count:
        lines = ", ".join(str(t["line"]) for t in parsed.too_long[:10])
        emit({"type": "message", "level": "warning",
              "text": f"{name}: {parsed.too_long_count} examples over max_seq_len {config.max_seq_len} are left "
                      f"out (lines {lines}{', ...' if parsed.too_long_count > 10 else ''})"})
    return parsed.examples


def _install_stop_hooks(model, stop: Callable[[], bool]) -> list:
    """Forward pre-hooks on the decoder layers that ask should_stop at most every STOP_POLL_SECONDS."""
    last = [time.monotonic()]

    def hook(module, args):
        now = time.monotonic()
        if now - last[0] >= STOP_POLL_SECONDS:
            last[0] = now
            if stop():
                raise _Stopped

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return [layer.register_forward_pre_hook(hook) for layer in layers]


def _fingerprint(base_model, train_file, validation_file) -> str:
    digest = hashlib.sha256()
    for path in (Path(base_model) / "config.json", train_file, validation_file):
        if path is not None:
            with open(path, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _check_resumable(saved: dict, config: TrainConfig, fingerprint: str, folder: Path) -> None:
    if saved.get("fingerprint") != fingerprint:
        raise ConfigError("train_file", f"the base model or data changed since {folder} was written: use a new "
                                        "output_dir, or resume=False to start over")
    now, then = config.to_dict(), saved.get("config", {})
    changed = [k for k in now if k not in RESUME_FREE_FIELDS and now[k] != then.get(k)]
    if changed:
        raise ConfigError(changed[0], f"differs from the checkpoint in {folder} ({then.get(changed[0])!r}): "
                                      "resume with the same hyperparameters, or pass resume=False to start over")


def _finished_result(output_dir: Path, config: TrainConfig, fingerprint: str) -> TrainResult | None:
    stored = output_dir / "result.json"
    if not stored.is_file() or not (output_dir / "adapter" / "adapter_config.json").is_file():
        return None
    payload = json.loads(stored.read_text())
    if payload.get("fingerprint") != fingerprint or payload.get("config") != config.to_dict():
        return None
    return TrainResult(**payload["result"])


def _save_adapter(model, output_dir: Path) -> Path:
    """Write the adapter alone (PEFT folder) atomically into output_dir/adapter."""
    final = output_dir / "adapter"
    temporary = output_dir / f".tmp-adapter-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    return final
