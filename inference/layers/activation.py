"""The gated MLP activations that the supported families name in their configs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation `name` (config.hidden_act); a clear error for one the engine lacks."""
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"hidden_act {name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[name]
