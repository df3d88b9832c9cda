"""Pure tensor functions for augmentation and normalisation, applied to whole batches at once:
no per-image Python, so the data path costs next to nothing beside the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std on the [0, 1] scale, exact, from a 256-bin histogram of the uint8
    pixels (no float copy of the whole data set). A channel that never varies (greyscale images,
    a folder of flat colours) gets the std of one pixel level, not 0, which would divide by zero."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1).cpu().long(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(mean)
        stds.append(var.sqrt().clamp(min=1 / 255))
    return torch.stack(means).float(), torch.stack(stds).float()


def pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad uint8 images on every side, once, so each batch only has to pick its crops.
    Zeros are black pixels, as in torchvision's RandomCrop(padding=4)."""
    return F.pad(images, (padding,) * 4) if padding else images


def random_crops(
    n: int, max_offset: int, flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image window offsets (dy, dx in [0, max_offset]) and mirror coin tosses for n images.
    Drawn apart from the cropping so a loader can draw a whole epoch's at once (and so resume
    in the middle of it)."""
    dy = torch.randint(0, max_offset + 1, (n,), generator=generator)
    dx = torch.randint(0, max_offset + 1, (n,), generator=generator)
    mirrored = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, mirrored


def crop_flip(
    padded: torch.Tensor, size: int, dy: torch.Tensor, dx: torch.Tensor, mirrored: torch.Tensor
) -> torch.Tensor:
    """Image i becomes the size x size window of padded[i] at (dy[i], dx[i]), mirrored where
    mirrored[i]; the result is channels_last.

    All of it is one gather of whole pixels (rows of C values): a view, not a copy, when `padded`
    is channels_last, as the loader keeps it. Against gathering single values of an NCHW tensor
    by four indices, it halves the loader's time per batch (benchmarks/RESULTS.md has the figures)."""
    n, c, height, width = padded.shape
    pixels = padded.permute(0, 2, 3, 1).reshape(-1, c)
    device = padded.device
    dy, dx, mirrored = dy.to(device), dx.to(device), mirrored.to(device)
    offsets = torch.arange(size, device=device)
    rows = dy[:, None] + offsets
    cols = dx[:, None] + offsets
    cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    index = (torch.arange(n, device=device)[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
    window = pixels.index_select(0, index.view(-1))
    return window.view(n, size, size, c).permute(0, 3, 1, 2)


def random_squares(n: int, image_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image centres (cy, cx) of cutout squares, anywhere in the image, so a square near an
    edge is partly outside it (as in DeVries & Taylor's Cutout): the model sees every amount of
    occlusion from none to a full square."""
    cy = torch.randint(0, image_size, (n,), generator=generator)
    cx = torch.randint(0, image_size, (n,), generator=generator)
    return cy, cx


def cut_out(images: torch.Tensor, size: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Zero a size x size square centred at (cy[i], cx[i]) of each normalised image, in place:
    zero is the data set's mean, so the square carries no information. One mask for the batch."""
    h, w = images.shape[-2:]
    low_y, low_x = (cy - size // 2).to(images.device), (cx - size // 2).to(images.device)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= low_y[:, None]) & (ys < low_y[:, None] + size)
    in_cols = (xs >= low_x[:, None]) & (xs < low_x[:, None] + size)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill_(mask, 0)


def normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 pixels -> (x/255 - mean) / std, per channel, as one multiply-add, in `dtype`: the one
    normalisation of the project (training, evaluation, prediction and export all use it)."""
    mean, std = mean.to(images.device, dtype), std.to(images.device, dtype)
    scale = (1 / (255 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    return images.to(dtype).mul_(scale).sub_(shift)
