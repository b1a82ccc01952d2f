"""FLOPs of a step (``torch.utils.flop_counter``) and the card's dense half-precision peak to compare with.

FlopCounterMode counts the matrix multiplications, convolutions and attention of one call, forward
and backward (2 FLOPs per multiply-add); elementwise work is not counted, so achieved TFLOP/s is a
lower bound of the arithmetic rate.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s, from NVIDIA's data sheets; most specific first.
DENSE_HALF_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                          ("A100", 312.0))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (run once, untimed)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def dense_half_peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16/fp16 peak, when its name is in the table; None on the CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_HALF_PEAK_TFLOPS if key in name), None)
