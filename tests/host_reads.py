"""Test helper: records the calls that read a tensor's value on the host.

On a GPU each of these waits for every queued kernel (a host sync); on the CPU they cost nothing, but
recording them there shows which code would sync on a GPU, so the CPU suite can check it.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = frozenset({torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
                        torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy})


class HostReadRecorder(TorchFunctionMode):
    """``with HostReadRecorder() as reads: ...`` then ``reads.calls`` lists each host read by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))
