"""Conversions between checkpoint formats: safetensors, the Hugging Face (fla) RWKV-7 layout,
and the tuned-state layout of RWKV-PEFT / RWKV Runner. See each module's docstring."""
