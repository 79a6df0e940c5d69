"""Model definitions, one file per family, and the registry that maps a checkpoint to one."""

from .registry import ENGINE_FAMILIES, UnsupportedModelError, load_model, model_class, supported_families

__all__ = ["ENGINE_FAMILIES", "UnsupportedModelError", "load_model", "model_class", "supported_families"]
