"""Pick the torch device for training."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve(name: str, torch_threads: int = 1) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; says which it picked.

    On the CPU torch uses ``torch_threads`` threads (0 = torch's default, one per
    core): the policies here are small, and one thread per process is 2-4x faster
    than contending threads, the more so with parallel sweep jobs.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device=auto: using %s", name)
    elif name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device=cuda was asked for but torch sees no CUDA device; use device=cpu"
        )
    if name == "cpu" and torch_threads > 0:
        torch.set_num_threads(torch_threads)
    return name
