"""The in-memory batch iterator: the data set stays as one uint8 tensor (on the training device),
each epoch draws a permutation, and each batch is cropped, flipped and normalised in one go."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .augment import crop_flip, cut_out, normalize, pad, random_crops, random_squares


class BatchLoader:
    """Yields (images, labels) batches: normalised images (float32 unless `dtype` says otherwise),
    int64 labels; (images, labels, originals) with `originals_too` and JPEG versions (see __init__).
    With world_size N > 1 it yields this process's share of each global batch (see
    distributed.py), and every process takes the same number of images at every step: a full batch
    splits evenly (batch_size is a multiple of N), and the epoch's last, partial batch is cut to a
    multiple of N by leaving out its last `left_out` (< N) images, other ones each epoch since the
    order is shuffled; a last batch of fewer than N images is left out whole. DistributedDataParallel
    averages the processes' gradients as equals, so unequal shares would weigh images unequally, and
    a process with none would average an empty batch (NaN). One process (N = 1) leaves nothing out.

    Randomness comes from a generator seeded by (seed, epoch), drawn for the whole epoch up front,
    so an epoch's order and augmentation are the same whenever it is replayed, and `batches(start)`
    can begin at any batch of it (a resume from a mid-epoch checkpoint).
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
        alternate_flip: bool = False,
        cutout: int = 0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        jpeg_versions: torch.Tensor | None = None,
        jpeg_p: float = 0.0,
        originals_too: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a multiple of the {world_size} processes")
        self.size = images.shape[-1]
        # channels_last: each pixel's C values side by side, what crop_flip gathers and the model reads
        self.images = pad(images, crop_padding).to(device).contiguous(memory_format=torch.channels_last)
        self.labels = labels.to(device)
        # JPEG augmentation: (V, N, 3, H, W) compressed versions of the images, padded as they are; each
        # epoch each image is swapped for one of them with probability jpeg_p.
        self.jpeg_versions, self.jpeg_p = None, jpeg_p
        if jpeg_versions is not None and jpeg_p > 0:
            padded = pad(jpeg_versions.flatten(0, 1), crop_padding)
            self.jpeg_versions = padded.view(*jpeg_versions.shape[:2], *padded.shape[1:]).to(device)
        # For a teacher that sees the originals: batches are (images, labels, originals), where originals
        # are the same images, cropped, flipped, cut out and resized alike, but never compressed.
        self.originals_too = originals_too and self.jpeg_versions is not None
        self.batch_size = batch_size
        self.mean, self.std = mean.to(device), std.to(device)  # moved once, not with every batch
        self.shuffle, self.crop_padding, self.flip, self.cutout = shuffle, crop_padding, flip, cutout
        # Alternating flip: each image gets a fixed coin toss (from the seed alone) and is mirrored
        # in the epochs of one parity only, so every two epochs it is seen both ways.
        self.first_mirrored = None
        if flip and alternate_flip:
            self.first_mirrored = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < 0.5
        self.seed = seed
        self.rank, self.world_size = rank, world_size  # this process takes positions rank, rank + N, ...
        self.left_out = len(labels) % batch_size % world_size  # the images N processes cannot share equally
        self.epoch = 0
        self.resize_to: int | None = None  # progressive resizing: yield images scaled to this size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype  # of the images yielded: float32, or float64 for numerical checks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.images_per_epoch // self.batch_size)

    @property
    def images_per_epoch(self) -> int:
        return len(self.labels) - self.left_out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(0)

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch number `start` on."""
        # Drawn on the CPU (the same numbers on every device), then moved to the data's device once
        # per epoch: a copy per batch would make a GPU wait for it.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n, device = len(self.labels), self.labels.device
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        augment = self.crop_padding > 0 or self.flip
        if augment:
            dy, dx, mirrored = random_crops(n, 2 * self.crop_padding, self.flip, generator)
            if self.first_mirrored is not None:  # by image, not by position in the epoch
                mirrored = self.first_mirrored[order] ^ bool(self.epoch % 2)
            dy, dx, mirrored = dy.to(device), dx.to(device), mirrored.to(device)
        if self.cutout:  # drawn after the crops, so turning it on leaves their stream as it was
            cy, cx = (t.to(device) for t in random_squares(n, self.size, generator))
        if self.jpeg_versions is not None:  # drawn last, for the same reason
            compressed = (torch.rand(n, generator=generator) < self.jpeg_p).to(device)
            version = torch.randint(len(self.jpeg_versions), (n,), generator=generator).to(device)
        order = order.to(device)
        used = self.images_per_epoch  # the draws above cover all n, so leaving images out changes none of them
        for first in range(start * self.batch_size, used, self.batch_size):
            picked = torch.arange(first + self.rank, min(first + self.batch_size, used), self.world_size, device=device)
            index = order[picked]
            images = self.images[index]
            originals = images.clone() if self.originals_too else None
            if self.jpeg_versions is not None:
                swap = compressed[picked]
                images[swap] = self.jpeg_versions[version[picked][swap], index[swap]]
            augmented = (dy[picked], dx[picked], mirrored[picked]) if augment else None
            squares = (cy[picked], cx[picked]) if self.cutout else None
            images = self.finish(images, augmented, squares)
            if originals is None:
                yield images, self.labels[index]
            else:
                yield images, self.labels[index], self.finish(originals, augmented, squares)

    def finish(self, images: torch.Tensor, augmented: tuple | None, squares: tuple | None) -> torch.Tensor:
        """Picked uint8 images as the model takes them: cropped and flipped by `augmented` (dy, dx,
        mirrored), normalised, cut out at `squares` (cy, cx), resized, in the model's memory format."""
        if augmented:
            images = crop_flip(images, self.size, *augmented)
        images = normalize(images, self.mean, self.std, self.dtype)
        if squares:
            images = cut_out(images, self.cutout, *squares)
        if self.resize_to and self.resize_to != self.size:
            images = F.interpolate(images, size=(self.resize_to,) * 2, mode="bilinear", antialias=True)
        return images.contiguous(memory_format=self.memory_format)
