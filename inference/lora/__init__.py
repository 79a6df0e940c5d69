"""Many LoRA adapters served at once on one base model (multi-LoRA).

A request names its adapter with a `LoRARequest` (a PEFT folder: adapter_config.json and
adapter_model.safetensors). The front end reads and checks the adapter in the caller's thread
(adapter.py), so a bad folder fails that request with a clear error and never the engine. The
engine thread keeps up to `max_loras` adapters on the model's device (manager.py), loading one
when a request that needs it is admitted and evicting the least recently used one that no
running request needs. One step can mix requests for different adapters and for the base
model: each LoRA-wrapped linear layer adds, to the rows of each adapter's tokens, that adapter's
low-rank update (layers.py), computed as PEFT computes it.
"""

from .adapter import AdapterError, LoRAAdapter, load_adapter
from .manager import LoRAManager
from .request import LoRARequest

__all__ = ["AdapterError", "LoRAAdapter", "LoRAManager", "LoRARequest", "load_adapter"]
