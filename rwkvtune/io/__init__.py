"""Checkpoint-file I/O, the layer under everything that knows what a model is: reading and
writing ``.pth`` (with a restricted unpickler that reads shapes without torch, and
``torch.load(weights_only=True)`` with one-line errors), ``.safetensors`` (written and read here,
no pickle) and rwkvtune's adapter/state artifacts, and the official <-> Hugging Face key layout.

Imports only the foundation (errors, utils, tensor_checks); configs, models and everything above
read files through it.
"""
