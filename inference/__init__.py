"""Citadel's inference engine: load a Hugging Face checkpoint folder and generate text.

The public API is shaped like vLLM's offline API, so users already know it:

    from inference import LLM, SamplingParams
    llm = LLM(model="/models/deepseek-v4")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].text, out[0].finish_reason)
    llm.generate(["Hello"], params, lora_request=LoRARequest("support-bot", "/adapters/support-bot"))

This package never imports Django: the control plane calls it only from Celery workers.
"""

from .llm import LLM
from .lora import LoRARequest
from .outputs import CompletionOutput, RequestOutput, StreamEvent
from .sampling_params import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput", "StreamEvent"]
