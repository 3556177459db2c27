"""Linear layers on CPU through oneDNN.

PyTorch's CPU build sends ``F.linear`` in float32 to MKL, which on AMD processors runs
its AVX2 code; oneDNN (also inside PyTorch) picks its kernels from the CPU's feature
flags and runs AVX-512 where the CPU has it. On a 2-core AVX-512 EPYC a prefill
chunk's projections take about half the time through oneDNN (36 rows x 512 -> 2,048:
0.39 ms against 0.78 ms; 512 rows: 4.7 against 10.7 ms), with the same weights
(nothing is copied or repacked) and results equal up to float32 summation order.
Small products (under ``MIN_WORK`` multiply-adds, or one or two rows: a decode
step of one or two sequences) stay with ``F.linear``: oneDNN's ~13 us per call
outweighs its speed there.

``PREFIXCACHE_ONEDNN_LINEAR=0`` turns the oneDNN path off (every linear through
``F.linear``).
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

MIN_ROWS = 3  # fewer rows: F.linear is as fast or faster
MIN_WORK = 1 << 20  # multiply-adds (rows x in x out) where the two break even


def _available() -> bool:
    if os.environ.get("PREFIXCACHE_ONEDNN_LINEAR", "1") == "0":
        return False
    has_op = hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return has_op and torch.backends.mkldnn.is_available()


ENABLED = _available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)``, through oneDNN for float32 CPU products of at
    least ``MIN_ROWS`` rows and ``MIN_WORK`` multiply-adds, outside autograd."""
    if ENABLED and _onednn_fits(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() >= MIN_ROWS * x.shape[-1] > 0
        and x.numel() * weight.shape[0] >= MIN_WORK
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )
