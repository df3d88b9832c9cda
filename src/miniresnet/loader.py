"""The in-memory batch iterator: the data set stays as one uint8 tensor (on the training device),
each epoch draws a permutation, and each batch is cropped, flipped and normalised in one go."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .augment import normalize, pad, random_crop_flip


class BatchLoader:
    """Yields (images, labels) batches: float32 normalised images, int64 labels.

    Randomness comes from a generator seeded by (seed, epoch), so an epoch's order and
    augmentation are the same whenever it is replayed, e.g. after a resume.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.size = images.shape[-1]
        self.images = pad(images, crop_padding).to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.shuffle, self.crop_padding, self.flip = shuffle, crop_padding, flip
        self.seed = seed
        self.epoch = 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order.to(self.labels.device)
        augment = self.crop_padding > 0 or self.flip
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if augment:
                images = random_crop_flip(images, self.size, self.flip, generator)
            images = normalize(images, self.mean, self.std)
            yield images.contiguous(memory_format=self.memory_format), self.labels[index]
