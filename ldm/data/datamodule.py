"""``main.DataModuleFromConfig``: a LightningDataModule assembled from dataset configs."""
from __future__ import annotations

from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.compat import drop_ignored_keys
from ldm.data.resumable import ResumableDataLoader, ResumableSampler
from ldm.util import instantiate_from_config

# batch entries that only name images (latent-cache keys, face flags), read as Python values
HOST_BATCH_KEYS = ("image_index", "flipped", "has_face", "class_image_index", "class_flipped")


def keep_on_host(batch):
    """``batch`` with its image indices and flags as lists, which Lightning leaves on the host where they
    are read: reading them from a GPU would wait for it in every step."""
    if isinstance(batch, dict):
        for key in HOST_BATCH_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                batch[key] = batch[key].tolist()
    return batch


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test datasets from ``{target, params}`` configs, with the LDM keys.

    Datasets seed their own per-worker randomness, so no ``worker_init_fn`` is needed.
    """

    def __init__(self, batch_size: int, train: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
                 predict: Mapping[str, Any] | None = None, num_workers: int | None = None,
                 shuffle_test_loader: bool = False, shuffle_val_dataloader: bool = False, **ignored: Any):
        super().__init__()
        drop_ignored_keys("DataModuleFromConfig", ignored)
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.dataset_configs = {name: cfg for name, cfg in
                                {"train": train, "validation": validation, "test": test, "predict": predict}.items()
                                if cfg is not None}
        self.shuffle_test_loader = shuffle_test_loader
        self.shuffle_val_dataloader = shuffle_val_dataloader
        self.datasets: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        for name, cfg in self.dataset_configs.items():
            if name not in self.datasets:
                self.datasets[name] = instantiate_from_config(cfg)

    def _loader(self, name: str, shuffle: bool) -> DataLoader | list:
        """The split's loader; no batches (an empty list) when the config has no such split."""
        if name not in self.datasets:
            return []
        return DataLoader(self.datasets[name], batch_size=self.batch_size, num_workers=self.num_workers,
                          shuffle=shuffle,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from the dataset's seed; its position is saved in checkpoints (exact resume)."""
        dataset = self.datasets["train"]
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(dataset, seed=getattr(dataset, "seed", None) or 0, num_replicas=world_size,
                                   rank=rank)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=self.batch_size,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return keep_on_host(batch)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=self.shuffle_val_dataloader)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
