"""`validate_dataset`: the report a user sees before any job starts (and before any GPU time).

It needs only the checkpoint's config and tokenizer, never its weights, so the control plane
can run it where datasets are uploaded. Bad content never raises: it is reported line by line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, TrainConfig
from .dataset import MAX_LISTED, parse_file
from .estimate import estimate_seconds
from .families import family_of, lora_targets


@dataclass
class DatasetReport:
    """What a fine-tuning file holds and whether it can be trained on."""

    ok: bool
    """True when the file can be trained on: no bad line, at least one example, within max_examples."""
    format: str | None
    """chat or prompt_completion (None when no line is well-formed)."""
    examples: int
    """Well-formed examples within max_seq_len (the ones training uses)."""
    lines: int
    """Non-blank lines in the file."""
    errors: list[dict]
    """The first 100 bad lines, {"line": n (1-based), "reason": "..."}."""
    error_count: int
    """Bad lines in all."""
    too_long: list[dict]
    """The first 100 examples over max_seq_len, {"line": n, "tokens": n}; they are left out of training."""
    too_long_count: int
    """Examples over max_seq_len in all."""
    total_tokens: int
    """Tokens of the usable examples (prompt and reply), one epoch."""
    trained_tokens: int
    """Of those, the tokens the loss covers (assistant replies or completions), one epoch."""
    max_seq_len: int
    """The limit the examples were checked against."""
    estimated_seconds: float | None
    """Estimated training time for the config's epochs (see estimate.py for how)."""
    estimate_basis: str
    """How estimated_seconds was obtained."""
    problems: list[str] = field(default_factory=list)
    """Reasons the file as a whole cannot be used (no examples, over max_examples, config unfit), if any."""

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


def validate_dataset(path: str | Path, *, base_model: str | Path, max_seq_len: int | None = None,
                     max_examples: int | None = None, config: TrainConfig | None = None) -> DatasetReport:
    """Check a JSONL dataset against a base model's tokenizer and chat template.

    max_seq_len defaults to the config's (256 without a config); the time estimate is for the
    config (defaults without one). max_examples is a quota on non-blank lines. Raises
    ConfigError only for unusable arguments (missing file, unsupported checkpoint, bad
    max_seq_len or max_examples); everything wrong in the file is in the report.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ConfigError("path", f"{path} is not a file")
    family = family_of(base_model)
    if max_seq_len is None:
        max_seq_len = config.max_seq_len if config is not None else TrainConfig().max_seq_len
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 8:
        raise ConfigError("max_seq_len", f"must be a whole number of at least 8, got {max_seq_len!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ConfigError("max_examples", f"must be a positive whole number or None, got {max_examples!r}")
    config = config or TrainConfig(max_seq_len=max_seq_len)
    if not isinstance(config, TrainConfig):
        raise ConfigError("config", "must be a TrainConfig (use TrainConfig.from_dict)")
    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
    parsed = parse_file(path, tokenizer, max_seq_len)

    problems = []
    if not parsed.lines:
        problems.append("the file is empty")
    elif not parsed.examples and not parsed.error_count:
        problems.append(f"every example is longer than max_seq_len {max_seq_len}")
    if max_examples is not None and parsed.lines > max_examples:
        problems.append(f"{parsed.lines} examples are more than the quota of {max_examples}: split the file or "
                        "ask for a larger quota")
    try:
        lora_targets(family, config)
    except ConfigError as error:
        problems.append(f"config {error}")
    total = sum(len(e.input_ids) for e in parsed.examples)
    seconds, basis = estimate_seconds(Path(base_model), [len(e.input_ids) for e in parsed.examples], config)
    return DatasetReport(
        ok=not problems and parsed.error_count == 0 and bool(parsed.examples),
        format=parsed.format,
        examples=len(parsed.examples),
        lines=parsed.lines,
        errors=parsed.errors[:MAX_LISTED],
        error_count=parsed.error_count,
        too_long=parsed.too_long[:MAX_LISTED],
        too_long_count=parsed.too_long_count,
        total_tokens=total,
        trained_tokens=sum(e.trained_tokens for e in parsed.examples),
        max_seq_len=max_seq_len,
        estimated_seconds=seconds,
        estimate_basis=basis,
        problems=problems,
    )
