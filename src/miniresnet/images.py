"""Image files to the model's input: any size and mode of PNG, JPEG, BMP or WebP becomes a
32x32 RGB uint8 tensor, the way CIFAR-10's own images are.

The conversion, stated once (the README repeats it): transparent pixels are composited over white;
palette, greyscale and other modes are converted to RGB; the largest centred square is cropped and
resized to 32x32 with a bicubic filter (antialiased when shrinking). Pillow is an optional extra.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .errors import MiniResNetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise MiniResNetError(
            "reading image files needs Pillow: pip install 'miniresnet[images]' (or pip install Pillow)"
        ) from None
    return Image, ImageOps


class ImageTooLarge(MiniResNetError):
    """An image whose pixel count is over the caller's cap (a decompression bomb, or just too big)."""


def load_image(source: str | Path | bytes, size: int = 32, max_pixels: int | None = None) -> torch.Tensor:
    """One image, a file or its bytes, as a uint8 (3, size, size) tensor. Something that is not
    a readable image is a MiniResNetError naming it; with `max_pixels`, an image with more pixels
    is an ImageTooLarge, found from its header before it is decoded."""
    Image, ImageOps = _pil()
    name = "the upload" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {image.width}x{image.height} is {image.width * image.height:,} pixels, over the "
                    f"limit of {max_pixels:,}"
                )
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise MiniResNetError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise MiniResNetError(f"{name}: is a directory, not an image") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit (twice its 89M-pixel warning), met first
        limit = f"over the limit of {max_pixels:,} pixels: " if max_pixels else ""
        raise ImageTooLarge(f"{name}: {limit}{e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MiniResNetError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def find_images(paths: list[str | Path]) -> list[Path]:
    """The files named, plus the image files (by suffix) anywhere under the directories named,
    in a stable order. A named file is taken whatever its suffix; a missing path is an error."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise MiniResNetError(f"{p}: no such file or directory")
    return found
