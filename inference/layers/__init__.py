"""Building blocks shared by the model families: paged attention, rotary, RMSNorm, MoE dispatch.

Plain torch, for CPU and CUDA alike; shapes are written in comments ([T] is the flattened
token count of a step, H the hidden size, D a head's width).
"""

from .activation import act_fn
from .attention import paged_attention
from .moe import moe_dispatch, topk_softmax_router
from .norm import RMSNorm
from .rotary import RotaryEmbedding

__all__ = ["RMSNorm", "RotaryEmbedding", "act_fn", "moe_dispatch", "paged_attention", "topk_softmax_router"]
