"""Image files to the model's input: a photo, a screenshot or a web image of any size and mode
becomes a 32x32 RGB uint8 tensor, the way CIFAR-10's own images are. `predict`, image folders and
`serve` all read images through `load_image`, so what is said here holds for each of them.

The preparation, stated once (the README repeats it):
1. Only the formats in FORMATS are opened; a file of any other kind is refused before a decoder
   sees it (Pillow has dozens of decoders, some rarely exercised, and EPS runs Ghostscript).
2. A large image is decoded small: a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8) that leaves
   its shorter side at least REDUCE_MARGIN times the target size, any other format box-averaged
   down to that size as soon as it is decoded. What the final resize sees barely changes, and a
   phone photo costs a fraction of a full decode.
3. The EXIF orientation is applied, so the image is upright as a phone or a browser shows it.
4. Transparent pixels are composited over white; palette, greyscale, CMYK and 16-bit images
   become RGB. Greyscale of more than 8 bits (16-bit PNG and TIFF, 32-bit integer or floating-point
   TIFF) is scaled from its full range (65,535, or 1.0 for floating point) to 255, not clipped.
5. The largest centred square is cropped and resized to size x size with a bicubic filter
   (antialiased when shrinking).

Pillow is an optional extra; HEIC/HEIF needs the pillow-heif plugin (in the same extra).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from .errors import MiniResNetError
from .runtime import log

# Pillow's name of each accepted format and the file suffixes that stand for it. MPO is how Pillow
# names the JPEGs many phone cameras write (a JPEG with extra pictures); its files end in .jpg.
FORMATS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "HEIF": (".heic", ".heif"),
    "AVIF": (".avif",),
}
IMAGE_SUFFIXES = tuple(suffix for suffixes in FORMATS.values() for suffix in suffixes)
FORMATS_TEXT = "PNG, JPEG, BMP, GIF, TIFF, WebP, HEIC/HEIF or AVIF"
REDUCE_MARGIN = 4  # decode no smaller than 4x the target side, so the bicubic resize still sees detail
# EXIF orientation -> the transposition that makes the stored pixels upright (the EXIF standard's table).
ORIENTATIONS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270"}
ORIENTATIONS |= {7: "TRANSVERSE", 8: "ROTATE_90"}
# The brands of an ISO media file ("ftyp" box) that say it is a HEIF or AVIF image.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
AVIF_BRANDS = (b"avif", b"avis")


class ImageTooLarge(MiniResNetError):
    """An image whose pixel count is over the caller's cap (a decompression bomb, or just too big)."""


class PixelsOutOfRange(MiniResNetError):
    """A greyscale image of more than 8 bits whose values are outside its format's range (or not finite)."""


def _pil():
    """Pillow's Image module, with the HEIF plugin registered when it is installed."""
    try:
        from PIL import Image
    except ImportError:
        raise MiniResNetError(
            "reading image files needs Pillow: pip install 'miniresnet[images]' (or pip install Pillow)"
        ) from None
    if "HEIF" not in Image.OPEN:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            pass
        else:
            register_heif_opener()
    Image.init()
    return Image


def accepted_formats() -> list[str]:
    """The FORMATS this Pillow can open (HEIF needs its plugin; AVIF a Pillow built with it)."""
    Image = _pil()
    return [name for name in FORMATS if name in Image.OPEN]


def missing_plugin(start: bytes) -> str | None:
    """What to install when a file's first bytes say HEIF or AVIF and no decoder took it."""
    if start[4:8] != b"ftyp":
        return None
    brand = start[8:12]
    if brand in HEIF_BRANDS:
        return "a HEIC/HEIF image, which needs the pillow-heif plugin: pip install 'miniresnet[images]'"
    if brand in AVIF_BRANDS:
        return "an AVIF image, which needs a Pillow built with AVIF support: pip install --upgrade Pillow"
    return None


def display_name(path: str | Path) -> str:
    """A path as text that can always be printed (a file name need not be valid UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")  # an undecodable byte shows as \xe9


def load_image(source: str | Path | bytes, size: int = 32, max_pixels: int | None = None) -> torch.Tensor:
    """One image, a file or its bytes, as a uint8 (3, size, size) tensor, prepared as the module
    says. Anything that is not a readable image of an accepted format is a MiniResNetError naming
    it (whatever the decoder raised); with `max_pixels`, an image with more pixels is an
    ImageTooLarge, found from its header before it is decoded."""
    Image = _pil()
    name = "the upload" if isinstance(source, bytes) else display_name(source)
    try:
        file = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise MiniResNetError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise MiniResNetError(f"{name}: is a directory, not an image") from None
    except OSError as e:
        raise MiniResNetError(f"{name}: cannot be read ({e.strerror or e})") from None
    with file:
        try:
            with Image.open(file, formats=accepted_formats()) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise ImageTooLarge(
                        f"{name}: {image.width}x{image.height} is {image.width * image.height:,} pixels, over the "
                        f"limit of {max_pixels:,}"
                    )
                prepared = prepare(image, size)
        except PixelsOutOfRange as e:
            raise MiniResNetError(f"{name}: {e}") from None
        except MiniResNetError:
            raise
        except Image.DecompressionBombError as e:  # Pillow's own limit (twice its 89M-pixel warning)
            limit = f"over the limit of {max_pixels:,} pixels: " if max_pixels else ""
            raise ImageTooLarge(f"{name}: {limit}{e}") from None
        except Image.UnidentifiedImageError:
            file.seek(0)
            plugin = missing_plugin(file.read(16))
            what = plugin or f"not a readable image (not a {FORMATS_TEXT} file, or a damaged one)"
            raise MiniResNetError(f"{name}: {what}") from None
        except MemoryError:
            raise MiniResNetError(f"{name}: too large to decode in the memory available") from None
        except Exception as e:  # a damaged file can make a decoder raise anything (TypeError, struct.error, ...)
            raise MiniResNetError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(prepared, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def prepare(image, size: int):
    """An opened Pillow image as the size x size RGB image the model takes (steps 2-5 above)."""
    Image = _pil()
    from PIL import ImageOps

    orientation = exif_orientation(image)
    image = decode_reduced(image, REDUCE_MARGIN * size)
    if orientation in ORIENTATIONS:
        image = image.transpose(getattr(Image.Transpose, ORIENTATIONS[orientation]))
    image = eight_bit_grey(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)


def eight_bit_grey(image):
    """A greyscale image of more than 8 bits (modes I;16*, I and F) as 8-bit greyscale, scaled from
    its full range: 65,535 for integers (16-bit files, and 32-bit ones holding 16-bit values), 1.0 for
    floating point. Pillow's own conversion to RGB clips these values, so mid-grey would come out
    white (16-bit) or black (floating point). Any other image is returned as it is."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    full = 1.0 if image.mode == "F" else 65535.0
    pixels = np.asarray(image, dtype=np.float32)  # half float64's memory; x / 257 is never near a .5 to round
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > full:
        values = "floating-point greyscale outside 0-1" if full == 1.0 else "32-bit greyscale outside 0-65,535"
        raise PixelsOutOfRange(f"{values} (or not finite): save the image as 8- or 16-bit")
    return _pil().fromarray(np.rint(pixels * (255 / full)).astype(np.uint8), "L")


def exif_orientation(image) -> int:
    """The EXIF Orientation tag (1 = upright); a damaged EXIF block counts as upright."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # EXIF is metadata: a broken block should not lose an otherwise good picture
        return 1


def decode_reduced(image, shortest: int):
    """The image decoded, and shrunk by an integer factor while its shorter side stays at least
    `shortest` pixels: by the JPEG decoder itself (draft mode), else by box-averaging."""
    width, height = image.size
    if image.format in ("JPEG", "MPO") and min(width, height) >= 2 * shortest:
        scale = shortest / min(width, height)
        image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
    image.load()
    factor = min(image.size) // shortest
    if factor < 2:
        return image
    if image.mode == "P":  # modes reduce() cannot average: to the nearest one it can
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor)


def jpeg_roundtrip(images: torch.Tensor, quality: int, progress: bool = True) -> torch.Tensor:
    """uint8 images (N, 3, H, W), each encoded as a JPEG of `quality` (Pillow's default 4:2:0
    chroma subsampling, as cameras and most software write them) and decoded again: what the
    format's loss does to them. On all cores (Pillow works outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from .runtime import available_cores

    Image = _pil()
    if not 1 <= quality <= 100:
        raise MiniResNetError(f"a JPEG quality is between 1 and 100, got {quality}")

    def roundtrip(image: torch.Tensor) -> torch.Tensor:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(decoded.copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        done = tqdm(pool.map(roundtrip, images), total=len(images), desc=f"JPEG q{quality}", disable=not progress)
        return torch.stack(list(done))


def jpeg_versions(
    images: torch.Tensor, versions: int, qualities: tuple[int, int], seed: int, progress: bool = True
) -> torch.Tensor:
    """`versions` JPEG-compressed versions of each uint8 image, (versions, N, 3, H, W): version v of
    image i at a quality drawn uniformly from `qualities` (both ends included) with `seed`."""
    low, high = qualities
    drawn = torch.randint(low, high + 1, (versions, len(images)), generator=torch.Generator().manual_seed(seed))
    from tqdm import tqdm

    out = torch.empty(versions, *images.shape, dtype=torch.uint8)
    with tqdm(total=drawn.numel(), desc="JPEG versions", unit="img", disable=not progress) as bar:
        for quality in drawn.unique().tolist():  # one parallel pass per quality
            where = (drawn == quality).nonzero()
            out[where[:, 0], where[:, 1]] = jpeg_roundtrip(images[where[:, 1]], quality, progress=False)
            bar.update(len(where))
    return out


def listing(paths: list[Path], root: Path, first: int = 5) -> str:
    """The first few of `paths`, relative to `root`, and how many more."""
    names = [display_name(p.relative_to(root)) for p in paths[:first]]
    return ", ".join(names) + (f" and {len(paths) - first} more" if len(paths) > first else "")


def files_under(directory: Path) -> list[Path]:
    """Every file under `directory`, following symbolic links to folders (each real folder once,
    so a link loop ends), in a stable order; names starting with a dot are left out."""
    found, seen = [], set()
    for top, folders, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders[:] = [d for d in folders if not d.startswith(".")]
        found += [Path(top, f) for f in files if not f.startswith(".")]
    return sorted(found)


def find_images(paths: list[str | Path]) -> list[Path]:
    """The files named, plus the image files (by suffix) anywhere under the directories named,
    in a stable order. A named file is taken whatever its suffix; a missing path is an error.
    Files in the directories that are not images by their names are left out, and listed."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            everything = files_under(p)
            found += [f for f in everything if f.suffix.lower() in IMAGE_SUFFIXES]
            others = [f for f in everything if f.suffix.lower() not in IMAGE_SUFFIXES]
            if others:
                log(
                    f"{display_name(p)}: left out {len(others)} file(s) that are not {FORMATS_TEXT} images "
                    f"by their names: {listing(others, p)}"
                )
        elif p.exists():
            found.append(p)
        else:
            raise MiniResNetError(f"{display_name(p)}: no such file or directory")
    return found
