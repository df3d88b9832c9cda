"""JPEG augmentation is data: a few compressed versions of each training image, made once (seeded,
cached), and drawn per image per epoch by the loader, which otherwise yields what it always did."""

from __future__ import annotations

import torch

from conftest import tiny_config
from miniresnet.augment import normalize
from miniresnet.folders import cached_jpeg_versions
from miniresnet.images import jpeg_roundtrip, jpeg_versions
from miniresnet.loader import BatchLoader
from miniresnet.train import train


def some_images(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def test_each_version_is_the_image_at_its_drawn_quality():
    images = some_images()
    versions = jpeg_versions(images, 3, (40, 95), seed=1, progress=False)
    assert versions.shape == (3, 12, 3, 32, 32) and torch.equal(versions, jpeg_versions(images, 3, (40, 95), 1, False))
    qualities = torch.randint(40, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    for v, i in ((0, 0), (2, 7), (1, 11)):
        assert torch.equal(versions[v, i], jpeg_roundtrip(images[i : i + 1], qualities[v, i].item(), False)[0])
    assert not torch.equal(versions, jpeg_versions(images, 3, (40, 95), seed=2, progress=False))


def batches(loader: BatchLoader, epoch: int) -> list[torch.Tensor]:
    loader.set_epoch(epoch)
    return [x for x, _ in loader]


def test_the_loader_swaps_in_versions_per_image_per_epoch_and_is_unchanged_without(tmp_path):
    images, labels = some_images(), torch.arange(12) % 3
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    versions = jpeg_versions(images, 2, (30, 60), seed=0, progress=False)
    options = dict(shuffle=True, crop_padding=2, flip=True, seed=3)
    plain = BatchLoader(images, labels, 4, mean, std, **options)
    off = BatchLoader(images, labels, 4, mean, std, **options, jpeg_versions=versions, jpeg_p=0.0)
    assert all(torch.equal(a, b) for a, b in zip(batches(plain, 1), batches(off, 1), strict=True))

    bare = dict(shuffle=True, seed=3)  # no crop or flip: each yielded image is an original or a version as stored
    always = BatchLoader(images, labels, 12, mean, std, **bare, jpeg_versions=versions, jpeg_p=1.0)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3 * 1_000_003 + 0))
    (x,) = batches(always, 0)
    for position, i in enumerate(order.tolist()):
        assert any(torch.allclose(x[position], normalize(versions[v, i : i + 1], mean, std)[0]) for v in range(2))
    half = BatchLoader(images, labels, 12, mean, std, **bare, jpeg_versions=versions, jpeg_p=0.5)
    swapped = []
    for epoch in range(3):
        (x,) = batches(half, epoch)
        order = torch.randperm(12, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        originals = normalize(images[order], mean, std)
        swapped.append([not torch.equal(x[p], originals[p]) for p in range(12)])
    assert 0 < sum(map(sum, swapped)) < 36 and swapped[0] != swapped[1]  # some, not all, and other ones each epoch


def test_versions_are_cached_under_a_key_of_what_they_depend_on(tmp_path, capsys):
    images = some_images()
    first = cached_jpeg_versions(images, 2, (40, 95), 0, tmp_path, progress=False)
    assert "made and cached" in capsys.readouterr().err
    again = cached_jpeg_versions(images, 2, (40, 95), 0, tmp_path, progress=False)
    assert "from the cache" in capsys.readouterr().err and torch.equal(first, again)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    cached_jpeg_versions(changed, 2, (40, 95), 0, tmp_path, progress=False)
    cached_jpeg_versions(images, 2, (50, 95), 0, tmp_path, progress=False)
    assert capsys.readouterr().err.count("made and cached") == 2 and len(list(tmp_path.glob("jpeg-*.pt"))) == 3


def test_a_run_with_jpeg_augmentation_trains_on_versions_it_cached(tiny_data, tmp_path):
    summary = train(
        tiny_config(tiny_data, tmp_path / "run", epochs=1, jpeg_p=0.5, jpeg_versions=2, cache_dir=str(tmp_path))
    )
    assert summary["epochs"] == 1 and len(list(tmp_path.glob("jpeg-*.pt"))) == 1


def test_with_originals_too_batches_carry_the_images_before_compression():
    """Each batch is (images, labels, originals): the images as a JPEG-augmented loader yields
    them, and the originals as a loader without JPEG yields them, cropped, flipped and cut out
    alike. Without JPEG versions there is nothing to carry."""
    images, labels = some_images(), torch.arange(12) % 3
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    versions = jpeg_versions(images, 2, (30, 60), seed=0, progress=False)
    options = dict(shuffle=True, crop_padding=2, flip=True, cutout=6, seed=3)
    compressed = dict(jpeg_versions=versions, jpeg_p=0.5)
    both = BatchLoader(images, labels, 5, mean, std, **options, **compressed, originals_too=True)
    only_compressed = BatchLoader(images, labels, 5, mean, std, **options, **compressed)
    plain = BatchLoader(images, labels, 5, mean, std, **options)
    for epoch in range(2):
        for loader in (both, only_compressed, plain):
            loader.set_epoch(epoch)
        for (x, y, originals), (x_alone, y_alone), (x_plain, y_plain) in zip(both, only_compressed, plain, strict=True):
            assert torch.equal(x, x_alone) and torch.equal(originals, x_plain)
            assert torch.equal(y, y_alone) and torch.equal(y, y_plain)
    assert any(not torch.equal(x, originals) for x, _, originals in both)  # some were compressed
    without = BatchLoader(images, labels, 5, mean, std, **options, originals_too=True)
    assert all(len(batch) == 2 for batch in without)
