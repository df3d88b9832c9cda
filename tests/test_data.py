import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_dataset, serve_directory, synthetic_images, write_binary_batch
from miniresnet.data import (
    BIN_DIR,
    PY_DIR,
    RELEASES,
    TEST_FILES,
    TRAIN_FILES,
    download_release,
    load_cifar10,
    md5sum,
    read_binary_batch,
    read_python_batch,
    safe_extract,
    verify_files,
)
from miniresnet.errors import MiniResNetError


@pytest.mark.parametrize("fmt", [BIN_DIR, PY_DIR])
def test_both_formats_load_the_same_pixels(tmp_path, fmt):
    make_dataset(tmp_path, fmt, per_file=12, test_size=30)
    data = load_cifar10(tmp_path, verify=False)
    assert data.train_images.shape == (60, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (30, 3, 32, 32)
    assert data.train_labels.dtype == torch.int64
    images, labels = synthetic_images(12, seed=0)
    assert torch.equal(data.train_images[:12], torch.from_numpy(images))
    assert torch.equal(data.train_labels[:12], torch.from_numpy(labels).long())


def test_binary_record_layout(tmp_path):
    """label byte, then the full red plane, then green, then blue, each row-major."""
    record = bytes([7]) + bytes([1] * 1024) + bytes([2] * 1024) + bytes(range(256)) * 4
    (tmp_path / "b.bin").write_bytes(record)
    images, labels = read_binary_batch(tmp_path / "b.bin")
    assert labels.tolist() == [7]
    assert (images[0, 0] == 1).all() and (images[0, 1] == 2).all()
    assert images[0, 2, 0, :].tolist() == list(range(32))


def test_truncated_binary_file_names_file_and_fix(tmp_path):
    make_dataset(tmp_path, per_file=5)
    path = tmp_path / BIN_DIR / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MiniResNetError, match=r"data_batch_3\.bin.*not a whole number.*miniresnet download"):
        load_cifar10(tmp_path, verify=False)


def test_label_out_of_range_is_an_error(tmp_path):
    images, labels = synthetic_images(3)
    labels[1] = 12
    write_binary_batch(tmp_path / "x.bin", images, labels)
    with pytest.raises(MiniResNetError, match="outside 0-9"):
        read_binary_batch(tmp_path / "x.bin")


def test_missing_file_and_missing_dir(tmp_path):
    with pytest.raises(MiniResNetError, match="does not exist.*miniresnet download"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniResNetError, match="has neither cifar-10-batches-bin"):
        load_cifar10(tmp_path / "empty")
    make_dataset(tmp_path / "d", per_file=3)
    (tmp_path / "d" / BIN_DIR / "test_batch.bin").unlink()
    with pytest.raises(MiniResNetError, match=r"test_batch\.bin is missing"):
        load_cifar10(tmp_path / "d", verify=False)


def test_altered_file_fails_checksum_with_both_sums(tmp_path):
    make_dataset(tmp_path, per_file=3)
    batches = tmp_path / BIN_DIR
    sums = {name: md5sum(batches / name) for name in TRAIN_FILES[BIN_DIR] + TEST_FILES[BIN_DIR]}
    verify_files(batches, sums)  # intact: passes
    raw = bytearray((batches / "data_batch_2.bin").read_bytes())
    raw[500] ^= 0xFF
    (batches / "data_batch_2.bin").write_bytes(bytes(raw))
    with pytest.raises(MiniResNetError, match=rf"data_batch_2\.bin is altered.*{sums['data_batch_2.bin']}"):
        verify_files(batches, sums)


def test_default_verification_uses_the_published_sums(tmp_path):
    make_dataset(tmp_path, per_file=3)  # synthetic files cannot match the official MD5s
    with pytest.raises(MiniResNetError, match="5dd7e06a14cb22eb9f671a540d1b7c25"):
        load_cifar10(tmp_path)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(MiniResNetError, match="posix.system|os.system|not allowed"):
        read_python_batch(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_python_batch_with_wrong_shape_is_an_error(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(MiniResNetError, match="not a valid CIFAR Python-format file"):
        read_python_batch(path)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, payload: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "member",
    [
        _file("../escape.txt"),
        _file("/tmp/absolute.txt"),
        _file("cifar-10-batches-bin/../../escape.txt"),
        _special("link", tarfile.SYMTYPE, "/etc/passwd"),
        _special("hard", tarfile.LNKTYPE, "/etc/passwd"),
        _special("dev", tarfile.CHRTYPE),
        _special("fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "symlink", "hardlink", "device", "fifo"],
)
def test_safe_extract_refuses_hostile_members(tmp_path, member):
    archive = _tar(tmp_path / "evil.tar.gz", [_file("ok.txt", b"fine"), member])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(MiniResNetError, match="refusing member"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "escape.txt").exists()


def test_safe_extract_rejects_a_non_archive(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(b"not a tar file at all")
    with pytest.raises(MiniResNetError, match="not a readable tar archive"):
        safe_extract(tmp_path / "a.tar.gz", tmp_path)


@pytest.fixture
def archive_server(tmp_path):
    """A tiny release archive served over HTTP on 127.0.0.1, like the official one."""
    source = make_dataset(tmp_path / "source", per_file=4, test_size=8)
    archive = tmp_path / "www" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / BIN_DIR, arcname=BIN_DIR)
    sums = {p.name: md5sum(p) for p in (source / BIN_DIR).iterdir()}

    with serve_directory(archive.parent) as base_url:
        yield f"{base_url}/{archive.name}", md5sum(archive), sums


def test_download_verifies_and_extracts(tmp_path, archive_server):
    url, archive_md5, sums = archive_server
    dest = tmp_path / "data"
    path = download_release(RELEASES["cifar10"], dest, url=url, archive_md5=archive_md5, file_md5=sums, progress=False)
    assert path == dest / BIN_DIR
    assert load_cifar10(dest, verify=False).train_images.shape == (20, 3, 32, 32)
    assert not (dest / "cifar-10-binary.tar.gz").exists()  # archive removed after a good extract
    # A second call finds the verified copy and does not fetch again (the URL is now dead).
    assert (
        download_release(
            RELEASES["cifar10"], dest, url=url + ".gone", archive_md5=archive_md5, file_md5=sums, progress=False
        )
        == path
    )


def test_download_with_wrong_archive_checksum_fails_and_cleans_up(tmp_path, archive_server):
    url, _, sums = archive_server
    dest = tmp_path / "data"
    with pytest.raises(MiniResNetError, match="MD5 is .* expected 0{32}"):
        download_release(RELEASES["cifar10"], dest, url=url, archive_md5="0" * 32, file_md5=sums, progress=False)
    assert not (dest / "cifar-10-binary.tar.gz").exists()


def test_download_from_unreachable_url_is_a_clear_error(tmp_path, archive_server):
    url, archive_md5, sums = archive_server
    with pytest.raises(MiniResNetError, match="could not download"):
        download_release(
            RELEASES["cifar10"],
            tmp_path / "d",
            url=url + ".missing",
            archive_md5=archive_md5,
            file_md5=sums,
            progress=False,
        )
    assert not list((tmp_path / "d").glob(".*.tmp"))


def test_md5sum_matches_hashlib(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert md5sum(tmp_path / "f") == hashlib.md5(b"abc" * 1000).hexdigest()
