"""Training data whose order and random draws resume exactly: the sampler and loader behind ``-r``.

A run killed after a save and resumed with ``-r`` draws the same images, flips and captions as the
uninterrupted run:

- :class:`ResumableSampler` shuffles each epoch from ``(seed, epoch)`` (and splits it across ranks)
  like ``DistributedSampler``, can start in the middle of an epoch, and yields :class:`DrawKey`
  indices that number every draw of the stream.
- :class:`PersonalizedBase` (and any dataset that reads ``key.draw``) seeds an item's flips and
  captions from its draw number, so an item does not depend on which worker made it or on what
  came before.
- :class:`ResumableDataLoader` counts the batches it handed to the training loop; Lightning saves
  that position in ``last.ckpt`` (``state_dict``) and restores it on resume (``load_state_dict``).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info


class DrawKey(int):
    """A dataset index (it is the ``int``) carrying ``draw``, its position in the training stream."""

    draw: int

    def __new__(cls, index: int, draw: int) -> DrawKey:
        key = super().__new__(cls, index)
        key.draw = draw
        return key

    def __getnewargs__(self) -> tuple[int, int]:  # pickled to DataLoader workers
        return int(self), self.draw

    def with_index(self, index: int) -> DrawKey:
        """Another index with the same draw (e.g. the class image paired with a subject photo)."""
        return DrawKey(index, self.draw)


class ItemRandom:
    """The random source of a dataset's items.

    A :class:`DrawKey` index gets a ``random.Random`` seeded from ``(seed, draw)`` (resumable and
    worker-independent); a plain index gets the dataset's own RNG, seeded with ``seed`` in the main
    process and re-seeded once per DataLoader worker from ``(seed, worker seed)``.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._worker_seed: int | None = None

    def for_index(self, index: int) -> random.Random:
        if isinstance(index, DrawKey):
            return random.Random(f"{self.seed}/{index.draw}")
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._rng = random.Random(f"{self.seed}/{info.seed}")
            self._worker_seed = info.seed
        return self._rng


def with_same_draw(key: int, index: int) -> int:
    """``index`` carrying ``key``'s draw when ``key`` is a :class:`DrawKey`, else ``index`` itself."""
    return key.with_index(index) if isinstance(key, DrawKey) else index


class ResumableSampler(DistributedSampler):
    """Per-epoch shuffled indices (split across ``num_replicas`` ranks) as DrawKeys, from ``start`` on."""

    def __init__(self, dataset: Dataset, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0  # items of this rank's share to skip on the next pass (set by the loader on resume)

    def __iter__(self) -> Iterator[DrawKey]:
        indices = list(super().__iter__())  # this rank's share of the epoch: positions rank, rank + R, ...
        first_draw = self.epoch * self.total_size
        start, self.start = self.start, 0
        for position in range(start, len(indices)):
            yield DrawKey(indices[position], first_draw + position * self.num_replicas + self.rank)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose place in the epoch Lightning checkpoints."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._served = 0  # batches of the current epoch handed out
        self._resume_at = 0  # batches to skip at the next pass

    def __iter__(self):
        self.sampler.start = self._resume_at * self.batch_size
        self._served, self._resume_at = self._resume_at, 0
        return self._counted(super().__iter__())

    def _counted(self, batches) -> Iterator[Any]:
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: the next pass is a new epoch
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self._resume_at = batches
