"""A deployment's engine settings, checked where they are set (web) rather than when a worker loads.

The rules are the engine's own: inference.engine.config.EngineConfig validates every setting it
knows (tier budgets kv_device_bytes / kv_host_bytes / kv_disk_bytes / kv_disk_path, FP8
quantization, batch sizes, ...). That module imports nothing but dataclasses, yet importing it the
usual way would import the `inference` package and with it torch, which web processes never load
(DESIGN.md). So the one file is loaded on its own, once, and its rules are applied unchanged.
Besides EngineConfig's fields, inference.LLM takes `device`, `dtype` and `seed`.
"""

import functools
import importlib.util
import sys
from pathlib import Path

from citadel.core.exceptions import InvalidRequest

LLM_ARGUMENTS = {"device": str, "dtype": str, "seed": int}


@functools.cache
def engine_config_class():
    spec = importlib.util.find_spec("inference")  # finds the package without running its __init__
    path = Path(next(iter(spec.submodule_search_locations))) / "engine" / "config.py"
    name = "citadel_engine_config_rules"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses look the module up while building the class
    module_spec.loader.exec_module(module)
    return module.EngineConfig


def engine_setting_names() -> list[str]:
    return [*LLM_ARGUMENTS, *engine_config_class().__dataclass_fields__]


def engine_settings_check(settings: dict | None) -> dict:
    """`settings` unchanged when the engine would accept them, else InvalidRequest naming the setting
    (param `engine_settings.<name>`) and what it must be."""
    settings = dict(settings or {})
    config_class = engine_config_class()
    known = engine_setting_names()
    for name, value in settings.items():
        if name not in known:
            raise InvalidRequest(f"Unknown engine setting '{name}'; the settings are {', '.join(known)}.",
                                 param=f"engine_settings.{name}")
        if name in LLM_ARGUMENTS and value is not None and (
                not isinstance(value, LLM_ARGUMENTS[name]) or isinstance(value, bool)):
            raise InvalidRequest(f"{name} must be of type {LLM_ARGUMENTS[name].__name__}, got {value!r}.",
                                 param=f"engine_settings.{name}")
    try:
        config_class(**{k: v for k, v in settings.items() if k not in LLM_ARGUMENTS})
    except (TypeError, ValueError) as error:
        message = str(error)
        field = next((n for n in config_class.__dataclass_fields__ if message.startswith(n)), None)
        raise InvalidRequest(f"{message}.", param=f"engine_settings.{field}" if field else "engine_settings") \
            from error
    return settings
