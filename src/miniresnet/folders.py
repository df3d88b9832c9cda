"""Your own images as a data set: `ROOT/train/<class>/*` and `ROOT/test/<class>/*` (or a training
folder alone, with a seeded, class-stratified share held out as the test set).

Class names are the training folder's sub-folder names, sorted. Every image, of any size, mode and
format, is prepared as `predict` prepares one (images.load_image: the largest centred square,
resized), decoded once in parallel and cached as uint8 tensors in the cache directory, under a key
made of every file's path, size and modification time, the image size, the preparation's version
and Pillow's, so adding, removing or changing a file rebuilds the cache. The cache holds only
what those determine (the prepared images and which files could be read), never the labels: they
follow from the class list of the run at hand, which another run may order differently. Caches
unused for longest are deleted once the directory holds more than CACHE_BYTES. A file that cannot
be read is listed and skipped (an error with `strict`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from .data import ImageSet
from .errors import MiniResNetError
from .files import torch_save_atomically
from .images import FORMATS_TEXT, IMAGE_SUFFIXES, display_name, files_under, jpeg_versions, listing, load_image
from .runtime import available_cores, log

CACHE_VERSION = 3  # bump when the preparation of an image changes
SPLIT_SEED = 0  # draws a folder's held-out test images and training order, whatever the run's --seed
CACHE_BYTES = 4 * 2**30  # the cache directory's size beyond which the least recently used caches go


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "miniresnet"


def scan_class_folders(root: Path, classes: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], list, list]:
    """(classes, image files, labels) of root/<class>/...; `classes` fixes the names and order
    (a test folder's classes must be the training folder's). Files whose names are not images are
    left out and counted in the log."""
    if not root.is_dir():
        raise MiniResNetError(f"image folder {root} does not exist or is not a directory")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise MiniResNetError(f"image folder {root} holds no class folders: expected {root}/<class>/<images>")
    names = tuple(d.name for d in folders)
    if classes is None:
        classes = names
        if len(classes) < 2:
            raise MiniResNetError(
                f"{root} holds {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a classifier "
                f"needs at least 2: one sub-folder per class, each holding its images"
            )
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise MiniResNetError(f"{root}: folders {unknown} are not among the classes {list(classes)}")
    files, labels, others = [], [], []
    for folder in folders:
        everything = files_under(folder)
        images = [f for f in everything if f.suffix.lower() in IMAGE_SUFFIXES]
        others += [f for f in everything if f.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise MiniResNetError(f"class folder {display_name(folder)} holds no images ({FORMATS_TEXT} files)")
        files += images
        labels += [classes.index(folder.name)] * len(images)
    if others:
        log(
            f"{display_name(root)}: left out {len(others)} file(s) that are not {FORMATS_TEXT} images by their "
            f"names: {listing(others, root)}"
        )
    return classes, files, labels


def cache_key(root: Path, files: list[Path], image_size: int) -> str:
    """A name for what the prepared images depend on. Paths go in as the file system's bytes: a
    file name need not be valid UTF-8."""
    import PIL

    digest = hashlib.sha256(f"{CACHE_VERSION} {PIL.__version__} {image_size}\n".encode())
    digest.update(os.fsencode(root.resolve()) + b"\n")
    for f in files:
        try:
            stat = f.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # a broken link: load_image will say so
            size, mtime = -1, -1
        digest.update(os.fsencode(f.relative_to(root)) + f"\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:24]


def decode_images(files: list[Path], image_size: int, progress: bool) -> tuple[list, list[int], list[str]]:
    """Each file through load_image, on all cores (Pillow decodes outside the GIL): (images,
    indices of the files read, errors of the others)."""

    def load(f: Path):
        try:
            return load_image(f, image_size)
        except MiniResNetError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        results = list(
            tqdm(pool.map(load, files), total=len(files), desc="decode images", unit="img", disable=not progress)
        )
    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    return [results[i] for i in kept], kept, [r for r in results if isinstance(r, str)]


def load_cache(path: Path, fits: Callable[[dict], bool]) -> dict | None:
    """A cache file's contents when `fits` accepts them, marked used (for trim_cache); None when it
    is missing, damaged or foreign: a cache is rebuilt, never trusted."""
    try:
        saved = torch.load(path, weights_only=True)
        if not (isinstance(saved, dict) and fits(saved)):
            return None
    except Exception:  # missing, truncated, another format: all mean "prepare again"
        return None
    with contextlib.suppress(OSError):  # a read-only cache directory: used as it is, just not marked
        os.utime(path)
    return saved


def read_cache(path: Path, n_files: int) -> dict | None:
    """A folder's cached preparation (images, indices of the files they are, errors of the
    others), or None when there is none that fits these files."""

    def fits(saved: dict) -> bool:
        images, kept, unreadable = saved["images"], saved["kept"], saved["unreadable"]
        whole = images.dtype == torch.uint8 and len(images) == len(kept) == n_files - len(unreadable)
        return whole and all(0 <= i < n_files for i in kept)

    return load_cache(path, fits)


def write_cache(path: Path, saved: dict) -> str:
    """Save a folder's preparation, then trim the directory; says where it went (or why not)."""
    try:
        torch_save_atomically(saved, path)
    except OSError as e:  # a read-only or full cache directory costs the next run a decode, nothing more
        return f"not cached ({path}: {e.strerror or e})"
    removed = trim_cache(path.parent, CACHE_BYTES, keep=path)
    return f"cached in {path}" + (f"; removed {removed} cache(s) unused for longest" if removed else "")


def trim_cache(cache_dir: Path, max_bytes: int, keep: Path) -> int:
    """Delete the least recently used caches (folders', JPEG versions') until the rest fit in
    `max_bytes`; returns how many."""
    caches = []
    for path in [*cache_dir.glob("folder-*.pt"), *cache_dir.glob("jpeg-*.pt")]:
        try:
            stat = path.stat()
        except OSError:
            continue
        caches.append((stat.st_mtime, stat.st_size, path))
    total, removed = sum(size for _, size, _ in caches), 0
    for _, size, path in sorted(caches):
        if total <= max_bytes:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total, removed = total - size, removed + 1
    return removed


def prepared_folder(
    root: Path, classes: tuple[str, ...] | None, image_size: int, cache_dir: Path, strict: bool, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(uint8 images, labels, classes) of one folder tree, from the cache when it is current."""
    classes, files, labels = scan_class_folders(root, classes)
    cache = cache_dir / f"folder-{cache_key(root, files, image_size)}.pt"
    started = time.perf_counter()
    saved = read_cache(cache, len(files))
    if saved is not None:
        log(f"{root}: {len(saved['images']):,} images from the cache {cache} ({time.perf_counter() - started:.1f} s)")
    else:
        decoded, kept, unreadable = decode_images(files, image_size, progress)
        if not decoded:
            raise MiniResNetError(f"none of the {len(files)} images in {root} could be read: {unreadable[:3]}")
        saved = {"images": torch.stack(decoded), "kept": torch.tensor(kept), "unreadable": unreadable}
        where = write_cache(cache, saved)
        log(f"{root}: {len(decoded):,} images decoded and {where} ({time.perf_counter() - started:.1f} s)")
    if saved["unreadable"]:
        unreadable = saved["unreadable"]
        message = f"{len(unreadable)} of {len(files)} files in {root} could not be read"
        shown = "; ".join(unreadable[:5]) + (f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        if strict:
            raise MiniResNetError(f"{message}; fix or remove them: {shown}")
        log(f"{message}, skipped: {shown}")
    return saved["images"], torch.tensor(labels, dtype=torch.int64)[saved["kept"]], classes


def cached_jpeg_versions(
    images: torch.Tensor,
    versions: int,
    qualities: tuple[int, int],
    seed: int,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """images.jpeg_versions of the training images, made once and then read from the cache
    directory, under a key of everything they depend on: the images' bytes, the number of
    versions, the quality range, the seed and Pillow's version."""
    import PIL

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    about = f"{CACHE_VERSION} {PIL.__version__} {versions} {tuple(qualities)} {seed} {tuple(images.shape)}\n"
    digest = hashlib.sha256(about.encode())
    digest.update(images.contiguous().numpy())
    cache = cache_dir / f"jpeg-{digest.hexdigest()[:24]}.pt"
    started = time.perf_counter()
    expected_shape = (versions, *images.shape)
    saved = load_cache(cache, lambda s: s["versions"].shape == expected_shape and s["versions"].dtype == torch.uint8)
    if saved is not None:
        log(f"{versions} JPEG versions of {len(images):,} images from the cache {cache}")
        return saved["versions"]
    made = jpeg_versions(images, versions, qualities, seed, progress)
    where = write_cache(cache, {"versions": made})
    log(f"{versions} JPEG versions of {len(images):,} images made and {where} ({time.perf_counter() - started:.1f} s)")
    return made


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices): `fraction` of each class (rounded, at least one image of any
    class with two or more) drawn with `seed`; the same seed and files give the same split."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_image_folders(
    train_dir: str | Path,
    test_dir: str | Path | None,
    *,
    test_fraction: float = 0.2,
    image_size: int = 32,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
) -> ImageSet:
    """An ImageSet from a training folder and a test folder, or a held-out share of the training
    folder when there is no test folder. The training images come in a shuffled order, so a
    --val-split taken from their end holds every class. The held-out test images and that order
    are drawn with SPLIT_SEED, not the run's seed: runs at every seed are scored on the same images,
    and none trains on another's test or validation images (as with CIFAR's fixed splits)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    train_dir = Path(train_dir)
    images, labels, classes = prepared_folder(train_dir, None, image_size, cache_dir, strict, progress)
    if test_dir is not None:
        test_images, test_labels, _ = prepared_folder(Path(test_dir), classes, image_size, cache_dir, strict, progress)
    else:
        train_idx, test_idx = stratified_holdout(labels, test_fraction, SPLIT_SEED)
        if len(test_idx) == 0:
            raise MiniResNetError(
                f"holding out {test_fraction:.0%} of {train_dir} leaves no test image; add images or a test folder"
            )
        test_images, test_labels = images[test_idx], labels[test_idx]
        images, labels = images[train_idx], labels[train_idx]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return ImageSet(images[order], labels[order], test_images, test_labels, classes, f"image folder {train_dir}")


def holds_image_folders(data_dir: str | Path) -> bool:
    """Whether data_dir is laid out as image folders: train/ holding at least one class folder."""
    train = Path(data_dir) / "train"
    return train.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in train.iterdir())


def folder_dataset(data_dir: str | Path, train_folder: str, test_folder: str, **options) -> ImageSet:
    """The folders a run names: --train-folder (and --test-folder), or DATA_DIR/train (and DATA_DIR/test)."""
    if train_folder:
        return load_image_folders(train_folder, test_folder or None, **options)
    root = Path(data_dir)
    if not (root / "train").is_dir():
        raise MiniResNetError(
            f"no image folder in {root}: expected {root}/train/<class>/<images> (and optionally {root}/test/...), "
            f"or give --train-folder"
        )
    test = root / "test" if (root / "test").is_dir() else None
    return load_image_folders(root / "train", test, **options)
