"""Checks a loaded tensor dict against the state dict a module expects, before loading it, so a
mismatched checkpoint fails with the file, the tensor and the config fields to look at."""
from __future__ import annotations

from typing import Mapping


def check_state_dict(source: str, tensors: Mapping, expected: Mapping, config_name: str, fields: str = "") -> None:
    """source: the file the tensors came from; config_name: the config file the expected shapes
    come from; fields: which of its fields decide the shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}"
                         f" (saved with a different config or code version?)")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: tensor {key} has shape {list(tensor.shape)}; {config_name} implies "
                             f"{list(expected[key].shape)}{f' (check {fields})' if fields else ''}")
