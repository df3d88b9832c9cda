"""Image files to the model's input: any size and mode of PNG, JPEG, BMP or WebP becomes a
32x32 RGB uint8 tensor, the way CIFAR-10's own images are.

The conversion, stated once (the README repeats it): transparent pixels are composited over white;
palette, greyscale and other modes are converted to RGB; the largest centred square is cropped and
resized to 32x32 with a bicubic filter (antialiased when shrinking). Pillow is an optional extra.
"""

from __future__ import annotations

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


def load_image(path: str | Path, size: int = 32) -> torch.Tensor:
    """One image file as a uint8 (3, size, size) tensor; a file that is not an image is a
    MiniResNetError naming it."""
    Image, ImageOps = _pil()
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise MiniResNetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MiniResNetError(f"{path}: is a directory, not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MiniResNetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
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


def load_image_folder(root: str | Path, classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """A labelled set from root/<class name>/<image files>, the layout torchvision's ImageFolder
    reads: (uint8 images, labels, files). Folders that are not class names are an error (a typo
    would otherwise drop a class silently), as is a file that is not an image."""
    root = Path(root)
    if not root.is_dir():
        raise MiniResNetError(f"image folder {root} does not exist or is not a directory")
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    unknown = [d.name for d in folders if d.name not in classes]
    if unknown:
        raise MiniResNetError(
            f"{root}: folders {unknown} are not class names of this model; expected some of {list(classes)}"
        )
    files, labels = [], []
    for folder in folders:
        for f in find_images([folder]):
            files.append(f)
            labels.append(classes.index(folder.name))
    if not files:
        raise MiniResNetError(
            f"{root} holds no images: expected sub-folders named after classes ({', '.join(classes[:3])}, ...) "
            f"holding {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} files"
        )
    images, bad = [], []
    for f in files:
        try:
            images.append(load_image(f))
        except MiniResNetError as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise MiniResNetError(
            f"{len(bad)} unreadable file(s) in {root}; remove them and retry: " + "; ".join(bad[:5]) + more
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), files
