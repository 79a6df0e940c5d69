"""LoRA fine-tuning with PEFT (torch, peft, transformers; never Django). Built in the fine-tuning issue."""
