"""Model definitions, one file per family, and the registry that maps a checkpoint to one."""

from .registry import (
    ENGINE_FAMILIES,
    TRANSFORMERS_FAMILIES,
    UnsupportedModelError,
    load_model,
    supported_families,
)

__all__ = [
    "ENGINE_FAMILIES",
    "TRANSFORMERS_FAMILIES",
    "UnsupportedModelError",
    "load_model",
    "supported_families",
]
