"""LoRA fine-tuning with PEFT over transformers' own model classes (torch, peft, transformers; never Django).

The control plane's Celery tasks call this API; nothing here knows about jobs or databases:

    from finetune import TrainConfig, ConfigError, validate_dataset, DatasetReport, train, TrainResult

    config = TrainConfig.from_dict({"rank": 8, "epochs": 3, ...})    # ConfigError(field, message) if bad
    report = validate_dataset(path, base_model=folder, max_seq_len=256, max_examples=None, config=config)
    result = train(base_model=folder, train_file=path, validation_file=None, output_dir=out,
                   config=config, on_event=callback, should_stop=poll, resume=True, device="auto")

Files: config.py (hyperparameters), families.py (supported models, target modules),
dataset.py (JSONL parsing and loss masks), validate.py (the dataset report), estimate.py
(training-time estimate), batching.py (data order, padding, learning rate), state.py
(checkpoints without pickle), tokens.py (embedding rows to train), trainer.py (the loop).

Importing the package does not import torch: `train` and `TrainResult` load the trainer on first
use, so a web process can build and check configs without loading torch.
"""

from .config import ConfigError, TrainConfig
from .validate import DatasetReport, validate_dataset


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


__all__ = ["ConfigError", "DatasetReport", "TrainConfig", "TrainResult", "train", "validate_dataset"]
