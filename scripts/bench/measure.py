"""Median wall time and peak memory of a callable, on CPU (resident set size) or CUDA (allocator peak).

CPU peak memory is the highest resident set size sampled every millisecond by a background thread
while the call runs, minus the resident size just before it. Before the call, glibc is asked to hand
freed heap pages back to the OS (``malloc_trim``), so pages that an earlier call freed but kept are
not silently reused, which would hide the call's own memory. The memory is taken during the last
timed run (sampling costs one small read per millisecond). tracemalloc does not see torch's
allocations and ``getrusage`` only reports a process-lifetime maximum, hence the sampling.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


@dataclass
class Measurement:
    """Median seconds over the timed repeats, every timed run, and the peak extra bytes (None: unknown)."""

    median_s: float
    times_s: list[float]
    peak_bytes: int | None


def with_state(m: Measurement, state_bytes: int) -> Measurement:
    """Add the memory a recipe keeps between steps (optimizer state, caches) to a step's peak."""
    peak = None if m.peak_bytes is None else m.peak_bytes + state_bytes
    return Measurement(m.median_s, m.times_s, peak)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def _malloc_trim() -> None:
    """Return free heap pages to the OS where glibc is the allocator (a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _rss_bytes() -> int | None:
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE_SIZE  # statm: size resident shared ... (pages)
    except OSError:
        return None


class RssSampler:
    """Tracks the highest resident set size while active (every ``interval_s`` seconds)."""

    def __init__(self, interval_s: float = 1e-3):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = _rss_bytes() or 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int | None]]:
    """Yields a one-item list that holds the peak extra bytes of the block once it exits."""
    result: list[int | None] = [None]
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result[0] = torch.cuda.max_memory_allocated(device) - base
        return
    _malloc_trim()
    base = _rss_bytes()
    if base is None:  # no /proc: peak memory is not measured on this OS
        yield result
        return
    with RssSampler() as sampler:
        yield result
    result[0] = max(sampler.peak - base, 0)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> Measurement:
    """Median time of ``fn`` over ``repeats`` runs after ``warmup``; the last run also takes memory."""
    for _ in range(warmup):
        fn()
    times = [timed(fn, device) for _ in range(repeats - 1)]
    with peak_memory(device) as peak:
        times.append(timed(fn, device))
    return Measurement(statistics.median(times), times, peak[0])


def measure_pair(ours: Callable[[], object], reference: Callable[[], object], device: torch.device,
                 repeats: int, warmup: int = 1) -> tuple[Measurement, Measurement]:
    """Time both callables alternately (so machine load hits both alike); the last run also takes memory."""
    for _ in range(warmup):
        ours()
        reference()
    times: tuple[list[float], list[float]] = ([], [])
    peaks: list[int | None] = [None, None]
    for i in range(repeats):
        for side, fn in enumerate((ours, reference)):
            if i < repeats - 1:
                times[side].append(timed(fn, device))
                continue
            with peak_memory(device) as peak:
                times[side].append(timed(fn, device))
            peaks[side] = peak[0]
    return tuple(Measurement(statistics.median(t), t, p) for t, p in zip(times, peaks))  # type: ignore[return-value]


def saved_activation_bytes(fn: Callable[[], object], module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs, ``module``'s weights
    (and views of them, such as a Linear's transposed weight) excluded."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def tensor_bytes(*objects: object) -> int:
    """Bytes held by the tensors in (nested dicts, lists and tuples of) ``objects``."""
    total = 0
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total
