"""The arithmetic of a forward pass: bf16 autocast on a GPU, float32 on a CPU, in one place for every caller.

On a GPU, bf16 autocast is what makes the Fig. 5 network fast (tensor cores) and is a recorded deviation (2015
training was fp32); a CPU's bf16 kernels are no faster than its fp32 ones here, so it keeps fp32 and the exact
numbers the tests compare.
"""

from __future__ import annotations

import torch


def autocast(device: torch.device) -> torch.autocast:
    """The forward pass's precision on ``device``: bf16 autocast on CUDA, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision(device: torch.device) -> str:
    """How a run on ``device`` computes, as manifests record it."""
    return "bf16 autocast" if device.type == "cuda" else "fp32"
