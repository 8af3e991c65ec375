"""Pick the torch device for training."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; says which it picked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device=auto: using %s", name)
    elif name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device=cuda was asked for but torch sees no CUDA device; use device=cpu"
        )
    return name
