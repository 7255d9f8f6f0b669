"""The arithmetic of a forward pass: bf16 autocast on a GPU, float32 on a CPU, in one place for every caller.

On a GPU, bf16 autocast is what makes the Fig. 5 network fast (tensor cores) and is a recorded deviation (2015
training was fp32); a CPU's bf16 kernels are no faster than its fp32 ones here, so it keeps fp32 and the exact
numbers the tests compare.
"""

from __future__ import annotations

import os

import torch


def autocast(device: torch.device) -> torch.autocast:
    """The forward pass's precision on ``device``: bf16 autocast on CUDA, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision(device: torch.device) -> str:
    """How a run on ``device`` computes, as manifests record it."""
    return "bf16 autocast" if device.type == "cuda" else "fp32"


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """How a GPU picks its kernels for this process. By default cuDNN autotunes each convolution's algorithm
    (``cudnn.benchmark``: the fastest for these shapes, chosen once); several backward kernels add with atomics, in
    an order that varies, so two runs, or a run and its resume, agree to rounding but not bit for bit.
    ``deterministic``: only kernels that repeat their results (torch's deterministic algorithms, cuDNN's
    deterministic convolutions, cuBLAS with a fixed workspace), slower, so a resumed run equals an uninterrupted one
    exactly on a GPU as it does on a CPU. A CPU's kernels are deterministic already: nothing changes there."""
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any product
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
