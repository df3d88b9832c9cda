"""CIFAR-10 and CIFAR-100 from disk to uint8 tensors: download, checksums, safe extraction, and
readers for the authors' binary format and the Python (pickle) format. (Image folders: folders.py.)

Everything returns an ImageSet: uint8 tensors of shape (N, 3, 32, 32), int64 labels and the class
names. A whole data set is ~180 MB, so it is read once and held in memory; augmentation happens
later, on whole batches.
"""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import MiniResNetError
from .files import atomic_path, hexdigest

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

DATASETS = ("cifar10", "cifar100")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
TRAIN_FILES = {BIN_DIR: [f"data_batch_{i}.bin" for i in range(1, 6)], PY_DIR: [f"data_batch_{i}" for i in range(1, 6)]}
TEST_FILES = {BIN_DIR: ["test_batch.bin"], PY_DIR: ["test_batch"]}
# The published MD5 of each file of the official releases (binary and Python versions).
FILE_MD5 = {
    BIN_DIR: {
        "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
        "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
        "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
        "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
        "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
        "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
    },
    PY_DIR: {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}
RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue planes

# CIFAR-100: 100 fine classes in 20 coarse superclasses. The Python release is the one downloaded,
# because its files have published MD5s; the binary release (records of a coarse label byte, a
# fine label byte and the pixels) is read too, checked by its structure only.
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_PY_DIR = "cifar-100-python"
CIFAR100_BIN_DIR = "cifar-100-binary"
CIFAR100_FILE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
LABEL_KINDS = ("fine", "coarse")


@dataclass(frozen=True)
class Release:
    """An official archive: where it is, its MD5, the directory it unpacks to and its files' MD5s."""

    name: str
    url: str
    archive_md5: str
    folder: str
    file_md5: dict[str, str]


RELEASES = {
    "cifar10": Release("CIFAR-10", URL, ARCHIVE_MD5, BIN_DIR, FILE_MD5[BIN_DIR]),
    "cifar100": Release("CIFAR-100", CIFAR100_URL, CIFAR100_ARCHIVE_MD5, CIFAR100_PY_DIR, CIFAR100_FILE_MD5),
}


@dataclass
class ImageSet:
    """A labelled data set in memory: what every data source (CIFAR-10, CIFAR-100, image folders) gives."""

    train_images: torch.Tensor  # uint8 (N, 3, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...] = CLASSES
    name: str = "CIFAR-10"

    def split_validation(self, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((images, labels) to train on, (images, labels) held out): the last `n` training images
        are held out. `train --val-split n` and `evaluate --val-split n` both split here."""
        kept = len(self.train_labels) - n
        images, labels = self.train_images, self.train_labels
        return (images[:kept], labels[:kept]), (images[kept:], labels[kept:])


def md5sum(path: Path) -> str:
    return hexdigest(path, "md5")


def _fix_hint(data_dir: Path, delete: bool = True) -> str:
    fetch = f"run `miniresnet download --data-dir {data_dir}` to fetch a fresh copy"
    return f"delete it and {fetch}" if delete else fetch


def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One file of the binary release: records of a label byte then 3,072 pixel bytes."""
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % RECORD_BYTES:
        raise MiniResNetError(
            f"{path}: {len(raw):,} bytes is not a whole number of {RECORD_BYTES:,}-byte records "
            f"(an official batch file is 30,730,000 bytes); the file is truncated or not CIFAR-10: "
            f"{_fix_hint(path.parent.parent)}"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    return _checked(path, records[:, 1:], records[:, 0])


class _RestrictedUnpickler(pickle.Unpickler):
    """The Python-format batches are pickles of a dict of bytes, lists and one numpy array.
    Only the globals needed to rebuild such an array are admitted, so a crafted file cannot run
    code the way plain `pickle.load` would let it."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR file")
        if name == "encode":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def _numpy_reconstruct():
    """numpy moved `_reconstruct` from numpy.core to numpy._core in 2.0; find whichever exists."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def read_pickle(path: Path) -> dict:
    """A Python-release file, through the restricted unpickler; keys as str."""
    raw = _read_bytes(path)
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in loaded.items()}
    except Exception as e:  # any malformed or hostile content ends up here
        raise MiniResNetError(
            f"{path}: not a valid CIFAR Python-format file ({type(e).__name__}: {e}); {_fix_hint(path.parent.parent)}"
        ) from None


def read_python_batch(
    path: Path, label_key: str = "labels", num_classes: int = len(CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """One file of a Python release: a pickled dict with 'data' (N x 3072) and the labels
    ('labels' in CIFAR-10, 'fine_labels' and 'coarse_labels' in CIFAR-100)."""
    batch = read_pickle(path)
    try:
        data = batch["data"]
        labels = batch[label_key]
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"data of shape {data.shape} with {len(labels)} labels")
    except Exception as e:  # any malformed content ends up here
        raise MiniResNetError(
            f"{path}: not a valid CIFAR Python-format file ({type(e).__name__}: {e}); {_fix_hint(path.parent.parent)}"
        ) from None
    return _checked(path, data, labels, num_classes)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MiniResNetError(f"{path} is missing; {_fix_hint(path.parent.parent, delete=False)}") from None
    except OSError as e:
        raise MiniResNetError(f"{path}: cannot read it ({e})") from None


def _checked(
    path: Path, pixels: np.ndarray, labels: np.ndarray, num_classes: int = len(CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise MiniResNetError(
            f"{path}: label {int(labels.max())} is outside 0-{num_classes - 1}; the file is corrupt: "
            f"{_fix_hint(path.parent.parent)}"
        )
    return pixels.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def find_batches_dir(data_dir: Path) -> Path:
    """The data directory holds cifar-10-batches-bin/ (preferred) or cifar-10-batches-py/."""
    data_dir = Path(data_dir)
    for name in (BIN_DIR, PY_DIR):
        if (data_dir / name).is_dir():
            return data_dir / name
    if data_dir.name in (BIN_DIR, PY_DIR) and data_dir.is_dir():
        return data_dir
    where = "does not exist" if not data_dir.exists() else f"has neither {BIN_DIR}/ nor {PY_DIR}/"
    raise MiniResNetError(
        f"no CIFAR-10 data in {data_dir}: it {where}. Point --data-dir at a directory that holds "
        f"{BIN_DIR}/, or run `miniresnet download --data-dir {data_dir}`"
    )


def verify_files(batches_dir: Path, expected: dict[str, str] | None = None) -> None:
    """Compare every file with its published MD5; the error names the file and both sums."""
    expected = expected if expected is not None else FILE_MD5[batches_dir.name]
    for name, md5 in expected.items():
        path = batches_dir / name
        if not path.is_file():
            raise MiniResNetError(f"{path} is missing; {_fix_hint(batches_dir.parent, delete=False)}")
        actual = md5sum(path)
        if actual != md5:
            raise MiniResNetError(
                f"{path} is altered or corrupt: its MD5 is {actual}, the published one is {md5}; "
                f"{_fix_hint(batches_dir.parent)}"
            )


def load_cifar10(data_dir: str | Path, verify: bool = True) -> ImageSet:
    """Read the whole data set into memory. With `verify`, each file must match its published
    checksum first (half a second); tests that build tiny stand-in files turn it off."""
    batches_dir = find_batches_dir(Path(data_dir))
    if verify:
        verify_files(batches_dir)
    read = read_binary_batch if batches_dir.name == BIN_DIR else read_python_batch

    def read_all(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read(batches_dir / name) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(images.copy()), torch.from_numpy(labels)

    train_images, train_labels = read_all(TRAIN_FILES[batches_dir.name])
    test_images, test_labels = read_all(TEST_FILES[batches_dir.name])
    return ImageSet(train_images, train_labels, test_images, test_labels, CLASSES, "CIFAR-10")


def read_cifar100_binary(path: Path, labels: str) -> tuple[np.ndarray, np.ndarray]:
    """train.bin or test.bin of the binary release: a coarse label byte, a fine label byte, pixels."""
    raw = _read_bytes(path)
    record = 2 + 3 * 32 * 32
    if len(raw) == 0 or len(raw) % record:
        raise MiniResNetError(
            f"{path}: {len(raw):,} bytes is not a whole number of {record:,}-byte records; the file is "
            f"truncated or not CIFAR-100: {_fix_hint(path.parent.parent)}"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    column, num_classes = (1, 100) if labels == "fine" else (0, 20)
    return _checked(path, records[:, 2:], records[:, column], num_classes)


def cifar100_class_names(folder: Path, labels: str) -> tuple[str, ...]:
    if folder.name == CIFAR100_BIN_DIR:
        path = folder / f"{labels}_label_names.txt"
        names = [line.strip() for line in _read_bytes(path).decode().splitlines() if line.strip()]
    else:
        names = read_pickle(folder / "meta").get(f"{labels}_label_names", [])
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    expected = 100 if labels == "fine" else 20
    if len(names) != expected:
        raise MiniResNetError(f"{folder}: expected {expected} {labels} class names, found {len(names)}")
    return tuple(names)


def load_cifar100(data_dir: str | Path, labels: str = "fine", verify: bool = True) -> ImageSet:
    """CIFAR-100 with its 100 fine classes, or with `labels="coarse"` its 20 superclasses. With
    `verify`, the Python release's files must match their published MD5s (the binary release has
    none published: its files are checked by their structure)."""
    if labels not in LABEL_KINDS:
        raise MiniResNetError(f"labels must be one of {', '.join(LABEL_KINDS)}, got {labels!r}")
    data_dir = Path(data_dir)
    folder = next((data_dir / d for d in (CIFAR100_PY_DIR, CIFAR100_BIN_DIR) if (data_dir / d).is_dir()), None)
    if folder is None and data_dir.name in (CIFAR100_PY_DIR, CIFAR100_BIN_DIR) and data_dir.is_dir():
        folder = data_dir
    if folder is None:
        raise MiniResNetError(
            f"no CIFAR-100 data in {data_dir}: it holds neither {CIFAR100_PY_DIR}/ nor {CIFAR100_BIN_DIR}/. "
            f"Point --data-dir at one that does, or run `miniresnet download --dataset cifar100 --data-dir {data_dir}`"
        )
    classes = cifar100_class_names(folder, labels)
    if folder.name == CIFAR100_PY_DIR:
        if verify:
            verify_files(folder, CIFAR100_FILE_MD5)
        train = read_python_batch(folder / "train", f"{labels}_labels", len(classes))
        test = read_python_batch(folder / "test", f"{labels}_labels", len(classes))
    else:
        train = read_cifar100_binary(folder / "train.bin", labels)
        test = read_cifar100_binary(folder / "test.bin", labels)
    name = "CIFAR-100" + (" (20 superclasses)" if labels == "coarse" else "")
    as_tensors = [torch.from_numpy(a.copy()) for a in (*train, *test)]
    return ImageSet(*as_tensors, classes, name)


def release_folders(dataset: str) -> tuple[str, str]:
    """The folders an official release of `dataset` extracts to (binary and Python versions)."""
    return (BIN_DIR, PY_DIR) if dataset == "cifar10" else (CIFAR100_PY_DIR, CIFAR100_BIN_DIR)


def holds_release(dataset: str, data_dir: str | Path) -> bool:
    """Whether data_dir holds an extracted release of `dataset`, or is one of its folders."""
    data_dir, folders = Path(data_dir), release_folders(dataset)
    return any((data_dir / f).is_dir() for f in folders) or (data_dir.name in folders and data_dir.is_dir())


def holds_loose_images(data_dir: Path, looked_at: int = 1000) -> bool:
    """Whether data_dir has image files in it or in a folder inside it (the first `looked_at`
    entries of each), as a folder of photos not laid out as train/<class>/ has."""
    from .images import IMAGE_SUFFIXES

    def has_images(folder: Path) -> bool:
        return any(f.suffix.lower() in IMAGE_SUFFIXES for f in itertools.islice(folder.iterdir(), looked_at))

    if not data_dir.is_dir():
        return False
    folders = [d for d in itertools.islice(data_dir.iterdir(), looked_at) if d.is_dir() and not d.name.startswith(".")]
    return has_images(data_dir) or any(has_images(folder) for folder in folders)


def load_dataset(
    dataset: str,
    data_dir: str | Path,
    labels: str = "fine",
    *,
    verify: bool = True,
    download: bool = False,
    progress: bool = True,
) -> ImageSet:
    """CIFAR-10 or CIFAR-100 from data_dir, downloaded first (when allowed) if it is not there."""
    if dataset not in DATASETS:
        raise MiniResNetError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)} (or image folders)")
    data_dir = Path(data_dir)
    if download and not holds_release(dataset, data_dir):
        if holds_loose_images(data_dir):  # someone's photos, not laid out as folders: no place for CIFAR
            raise MiniResNetError(
                f"{data_dir} holds image files but neither {RELEASES[dataset].name} nor image folders laid out as "
                f"{data_dir}/train/<class>/<images>: arrange them so, or name a folder of class folders with "
                "--train-folder; nothing was downloaded"
            )
        try:
            download_release(RELEASES[dataset], data_dir, progress=progress)
        except MiniResNetError as e:
            if data_dir.is_dir() and any(not p.name.startswith(".") for p in data_dir.iterdir()):
                expected = " or ".join(f"{f}/" for f in release_folders(dataset))
                raise MiniResNetError(
                    f"{data_dir} holds neither {RELEASES[dataset].name} ({expected}) nor image folders "
                    f"(train/<class>/<images>); downloading it there failed too: {e}"
                ) from None
            raise
    if dataset == "cifar10":
        return load_cifar10(data_dir, verify=verify)
    return load_cifar100(data_dir, labels, verify=verify)


def download_release(
    release: Release,
    data_dir: str | Path,
    url: str | None = None,
    archive_md5: str | None = None,
    file_md5: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Fetch an official release into data_dir (skipped when a verified copy is already there),
    check the archive's MD5, extract it safely and check every file's MD5. The tests pass their
    own url and sums."""
    data_dir = Path(data_dir)
    url = url or release.url
    archive_md5 = archive_md5 or release.archive_md5
    file_md5 = file_md5 if file_md5 is not None else release.file_md5
    batches_dir = data_dir / release.folder
    if batches_dir.is_dir():
        try:
            verify_files(batches_dir, file_md5)
            return batches_dir
        except MiniResNetError:
            pass  # incomplete or altered: fetch again
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / url.rsplit("/", 1)[-1]
    if not (archive.is_file() and md5sum(archive) == archive_md5):
        _fetch(url, archive, progress)
    actual = md5sum(archive)
    if actual != archive_md5:
        archive.unlink()
        raise MiniResNetError(
            f"downloaded {url} but its MD5 is {actual}, expected {archive_md5}; the download was "
            f"corrupted or the server sent something else. It was deleted: try again."
        )
    safe_extract(archive, data_dir)
    verify_files(batches_dir, file_md5)
    archive.unlink()
    return batches_dir


def _fetch(url: str, dest: Path, progress: bool) -> None:
    try:
        with (
            atomic_path(dest) as partial,
            urllib.request.urlopen(url, timeout=60) as response,
            open(partial, "wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        raise MiniResNetError(
            f"could not download {url}: {e}. Check the network, or put the extracted "
            f"release into {dest.parent} by hand."
        ) from None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract only regular files and directories that land inside `dest`: absolute paths, '..',
    links and device files are refused before anything is written."""
    dest = Path(dest).resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (dest / m.name).resolve()
                if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts or not target.is_relative_to(dest):
                    raise MiniResNetError(f"{archive}: refusing member '{m.name}': it would land outside {dest}")
                if not (m.isfile() or m.isdir()):
                    raise MiniResNetError(
                        f"{archive}: refusing member '{m.name}': only regular files and directories are allowed"
                    )
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
    except tarfile.TarError as e:
        raise MiniResNetError(f"{archive} is not a readable tar archive ({e}); delete it and download again") from None
