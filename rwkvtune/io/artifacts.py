"""Small rwkvtune files (LoRA adapters, tuned states): a dict of tensors and plain values, written
as ``.safetensors`` (tensors, and the rest as JSON in the header) or as a torch file, and read
back without unpickling anything but tensors."""

from __future__ import annotations

import json
import os

import torch

from rwkvtune.errors import CheckpointError
from rwkvtune.io.checkpoint import check_pickle_size
from rwkvtune.io.safetensors_io import (ARTIFACT_META, TENSOR_MARK, artifact_tree, load_safetensors, read_header,
                                       save_safetensors)
from rwkvtune.utils import atomic_torch_save, not_found, read_error


def save_artifact(obj: dict, path) -> None:
    """Write a small rwkvtune file (adapter, state) atomically: ``.safetensors`` (the tensors, and
    the other values as JSON in the header; no pickle) or a torch file."""
    if not str(path).endswith(".safetensors"):
        atomic_torch_save(obj, path)
        return
    tensors: dict = {}

    def skeleton(node, where: tuple):
        if isinstance(node, dict):
            return {k: skeleton(v, where + (k,)) for k, v in node.items()}
        if isinstance(node, torch.Tensor):
            name = "/".join(where)
            tensors[name] = node.detach().cpu().contiguous()
            return {TENSOR_MARK: name}
        return node

    save_safetensors(tensors, path, metadata={ARTIFACT_META: json.dumps(skeleton(obj, ()))})


def load_artifact(path, what: str, made_by: str):
    """Read a small rwkvtune file (adapter, state) written by :func:`save_artifact`, never
    unpickling anything but tensors, with one-line errors. A ``.safetensors`` file without
    rwkvtune's header entry (another tool's) comes back as its flat {name: tensor} dict.

    ``what`` names the file kind ("adapter", "state file") and ``made_by`` where it comes from
    ("adapter.pth from --mode lora"), so the message says what was expected.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected the {made_by}")
    if not os.path.exists(path):
        raise CheckpointError(not_found(path, what, f"expected the {made_by}"))
    if str(path).endswith(".safetensors"):
        return _load_safetensors_artifact(path)
    check_pickle_size(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise read_error(path, e, CheckpointError, what) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read {what} ({type(e).__name__}); expected "
                              f"{made_by} (another kind of file, or corrupt)") from e


def _load_safetensors_artifact(path):
    _, metadata = read_header(path)
    tensors = load_safetensors(path, mmap_file=False)
    if ARTIFACT_META not in metadata:
        return tensors
    tree = artifact_tree(path, metadata[ARTIFACT_META])

    def fill(node):
        if isinstance(node, dict) and set(node) == {TENSOR_MARK}:
            if node[TENSOR_MARK] not in tensors:
                raise CheckpointError(f"{path}: tensor {node[TENSOR_MARK]!r} is named in the header but missing; the "
                                      f"file is damaged")
            return tensors[node[TENSOR_MARK]]
        return {k: fill(v) for k, v in node.items()} if isinstance(node, dict) else node

    return fill(tree)
