"""The control plane's side of the `finetune` package: turning API input into a TrainConfig, and
validating datasets, with the trainer's errors mapped to the API's.

`finetune` (torch, transformers, peft) is imported lazily: web processes only need it for
validation, which reads a checkpoint's config and tokenizer, never its weights.
"""

import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from citadel.core.exceptions import InvalidRequest

# OpenAI's hyperparameter names and the TrainConfig fields they set.
OPENAI_HYPERPARAMETERS = {"n_epochs": "epochs", "batch_size": "batch_size",
                          "learning_rate_multiplier": "learning_rate"}
OPENAI_PARAMS = {field: f"hyperparameters.{name}" for name, field in OPENAI_HYPERPARAMETERS.items()}


@dataclass(frozen=True)
class JobConfig:
    """What a job request asked for, resolved: the trainer's config and OpenAI's view of it."""

    config: object  # finetune.TrainConfig
    hyperparameters: dict
    seed: int


def default_learning_rate() -> float:
    from finetune import TrainConfig

    return TrainConfig().learning_rate


def _param_for(field: str, *, from_openai: set[str]) -> str:
    return OPENAI_PARAMS[field] if field in from_openai else f"citadel.{field}"


def job_config(*, hyperparameters: dict | None, method: dict | None, citadel: dict | None,
               seed: int | None) -> JobConfig:
    """The TrainConfig a job request describes; a bad value is a 400 naming the field (`param`).

    OpenAI's `hyperparameters` (n_epochs, batch_size, learning_rate_multiplier; "auto" leaves the
    default) may come at the top level or under `method.supervised.hyperparameters`; Citadel's own
    settings (rank, alpha, target_modules, max_seq_len, ...) come under `citadel`.
    """
    from finetune import ConfigError, TrainConfig

    if method is not None:
        if not isinstance(method, dict):
            raise InvalidRequest("method must be an object like {\"type\": \"supervised\"}.", param="method")
        kind = method.get("type", "supervised")
        if kind != "supervised":
            raise InvalidRequest(f"method.type '{kind}' is not supported: Citadel trains LoRA adapters by supervised "
                                 "fine-tuning only; use \"supervised\".", param="method.type",
                                 code="unsupported_method")
        nested = (method.get("supervised") or {}).get("hyperparameters")
        if nested:
            hyperparameters = {**(hyperparameters or {}), **nested}
    hyperparameters = hyperparameters or {}
    if not isinstance(hyperparameters, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="hyperparameters")
    citadel = citadel or {}
    if not isinstance(citadel, dict):
        raise InvalidRequest("citadel must be an object of LoRA settings (rank, alpha, target_modules, ...).",
                             param="citadel")
    values: dict = {}
    for name, value in hyperparameters.items():
        if name not in OPENAI_HYPERPARAMETERS:
            known = ", ".join(OPENAI_HYPERPARAMETERS)
            raise InvalidRequest(f"hyperparameters.{name} is not a known hyperparameter; the known ones are {known} "
                                 "(Citadel's LoRA settings go under `citadel`).", param=f"hyperparameters.{name}",
                                 code="invalid_hyperparameter")
        if value == "auto" or value is None:
            continue
        if name == "learning_rate_multiplier":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise InvalidRequest(f"hyperparameters.learning_rate_multiplier must be a number above 0 or "
                                     f"\"auto\", got {value!r}.", param="hyperparameters.learning_rate_multiplier",
                                     code="invalid_hyperparameter")
            value = default_learning_rate() * value
        values[OPENAI_HYPERPARAMETERS[name]] = value
    from_openai = set(values)
    for name, value in citadel.items():
        if name in from_openai:
            raise InvalidRequest(f"citadel.{name} repeats hyperparameters.{_openai_name(name)}; give it once.",
                                 param=f"citadel.{name}", code="invalid_hyperparameter")
        if name == "seed":
            raise InvalidRequest("citadel.seed: give the seed as the request's `seed`.", param="citadel.seed",
                                 code="invalid_hyperparameter")
        values[name] = value
    if seed is None:
        seed = secrets.randbelow(2**31)
    values["seed"] = seed
    try:
        config = TrainConfig.from_dict(values)
    except ConfigError as error:
        param = "seed" if error.field == "seed" else _param_for(error.field, from_openai=from_openai)
        raise InvalidRequest(f"{param}: {error.message}.", param=param, code="invalid_hyperparameter") from error
    except TypeError as error:  # a value of a type the dataclass cannot take
        raise InvalidRequest(f"Invalid hyperparameters: {error}", param="hyperparameters",
                             code="invalid_hyperparameter") from error
    return JobConfig(config=config, hyperparameters=openai_hyperparameters(config.to_dict()), seed=seed)


def _openai_name(field: str) -> str:
    return {v: k for k, v in OPENAI_HYPERPARAMETERS.items()}.get(field, field)


def openai_hyperparameters(config: dict) -> dict:
    """OpenAI's view of a stored TrainConfig dict."""
    return {"n_epochs": config["epochs"], "batch_size": config["batch_size"],
            "learning_rate_multiplier": round(config["learning_rate"] / default_learning_rate(), 6)}


def dataset_validate(*, path: Path, base_path: str, config=None, param: str):
    """finetune.validate_dataset's report for the file at `path` against the base checkpoint.

    An argument the validator cannot use (the checkpoint is not a supported family, max_seq_len)
    is a 400 naming `param` (or the setting at fault)."""
    from finetune import ConfigError, validate_dataset

    max_examples = settings.CITADEL_FINETUNE_MAX_EXAMPLES or None
    try:
        return validate_dataset(path, base_model=base_path, max_seq_len=config.max_seq_len if config else 256,
                                max_examples=max_examples, config=config)
    except ConfigError as error:
        where = {"max_seq_len": "citadel.max_seq_len", "max_examples": param}.get(error.field, param)
        raise InvalidRequest(f"{where}: {error.message}.", param=where, code="invalid_file") from error
    except OSError as error:
        raise InvalidRequest(f"The base model's tokenizer could not be read ({error}); ask an administrator to "
                             "check the model's path.", param="model", code="model_not_available") from error


def report_problem(report, *, what: str) -> str | None:
    """Why a report's file cannot be trained on, in a sentence with line numbers; None when it can."""
    if report.ok:
        return None
    parts = list(report.problems)
    if report.error_count:
        shown = "; ".join(f"line {e['line']}: {e['reason']}" for e in report.errors[:5])
        more = f" (and {report.error_count - 5} more bad lines)" if report.error_count > 5 else ""
        parts.append(f"{report.error_count} bad line{'s' if report.error_count != 1 else ''}: {shown}{more}")
    if report.too_long_count and not report.examples:
        parts.append(f"all {report.too_long_count} examples are longer than max_seq_len {report.max_seq_len}")
    return f"The {what} cannot be used for fine-tuning: " + "; ".join(parts or ["it holds no usable example"]) + "."


def storage_dir(site) -> Path:
    """The folder where fine-tuning data stored at `site` lives: its storage path (relative paths
    are under the data dir)."""
    root = Path(site.storage_path)
    if not root.is_absolute():
        root = Path(settings.DATA_DIR) / root
    return root / "finetuning"
