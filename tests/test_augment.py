import pytest
import torch

from miniresnet.augment import channel_stats, crop_flip, cut_out, normalize, pad, random_crops, random_squares


def numbered_images(n: int) -> torch.Tensor:
    """uint8 images whose pixel values identify their position (mod 256), so crops are traceable."""
    base = torch.arange(3 * 32 * 32).reshape(3, 32, 32) % 251
    return ((base[None] + torch.arange(n)[:, None, None, None]) % 251 + 1).to(torch.uint8)


def random_crop_flip(padded: torch.Tensor, flip: bool, seed: int) -> torch.Tensor:
    draws = random_crops(len(padded), padded.shape[-1] - 32, flip, torch.Generator().manual_seed(seed))
    return crop_flip(padded, 32, *draws)


def test_pad_adds_black_border():
    images = numbered_images(2)
    padded = pad(images, 4)
    assert padded.shape == (2, 3, 40, 40)
    assert (padded[:, :, :4] == 0).all() and (padded[:, :, :, -4:] == 0).all()
    assert torch.equal(padded[:, :, 4:36, 4:36], images)


def test_crop_shape_and_each_image_gets_its_own_window():
    images = numbered_images(64)
    out = random_crop_flip(pad(images, 4), False, 0)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    # Recover each image's offset: the window is an exact sub-array of its padded source.
    offsets = set()
    padded = pad(images, 4)
    for i in range(64):
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])
        ]
        assert len(found) >= 1
        offsets.add(found[0])
    assert len(offsets) > 20  # 81 possible windows: 64 images do not share one


def test_crop_without_padding_is_identity_and_flip_mirrors():
    images = numbered_images(200)
    out = random_crop_flip(images, True, 1)
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, images, strict=True)])
    assert (mirrored ^ unchanged).all()  # every image is either itself or its mirror
    assert 60 < mirrored.sum() < 140  # about half are mirrored


def test_padding_content_reaches_the_crops():
    images = torch.full((500, 3, 32, 32), 200, dtype=torch.uint8)
    out = random_crop_flip(pad(images, 4), True, 2)
    zero_fraction = (out == 0).float().mean().item()
    # Expected black share: E[|dy - 4|] = 20/9 rows of 32, likewise columns.
    expected = 1 - (1 - (20 / 9) / 32) ** 2
    assert abs(zero_fraction - expected) < 0.02
    assert set(out.unique().tolist()) == {0, 200}


def test_same_generator_seed_same_batch():
    padded = pad(numbered_images(8), 4)
    a = random_crop_flip(padded, True, 5)
    b = random_crop_flip(padded, True, 5)
    assert torch.equal(a, b)


def test_crop_flip_reads_either_layout_and_returns_channels_last():
    padded = pad(numbered_images(16), 4)
    nchw = random_crop_flip(padded, True, 7)
    nhwc = random_crop_flip(padded.contiguous(memory_format=torch.channels_last), True, 7)
    assert torch.equal(nchw, nhwc)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)


def test_channel_stats_match_direct_computation():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert torch.allclose(mean.double(), x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), x.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False), atol=1e-6)


def test_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    out = normalize(images, mean, std)
    expected = (images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_cut_out_blanks_exactly_its_square_clipped_at_the_edges():
    images = torch.ones(3, 3, 32, 32)
    cy, cx = torch.tensor([10, 0, 31]), torch.tensor([20, 0, 5])
    cut_out(images, 8, cy, cx)
    assert torch.all(images[0, :, 6:14, 16:24] == 0)
    assert (images[0] == 0).sum() == 3 * 8 * 8  # only the square, in every channel
    assert torch.all(images[1, :, :4, :4] == 0) and (images[1] == 0).sum() == 3 * 4 * 4  # centre in a corner
    assert torch.all(images[2, :, 27:, 1:9] == 0) and (images[2] == 0).sum() == 3 * 5 * 8  # off the bottom


def test_random_squares_cover_the_whole_image_and_follow_the_seed():
    cy, cx = random_squares(10_000, 32, torch.Generator().manual_seed(0))
    assert cy.min() == cx.min() == 0 and cy.max() == cx.max() == 31
    again = random_squares(10_000, 32, torch.Generator().manual_seed(0))
    assert torch.equal(cy, again[0]) and torch.equal(cx, again[1])


def test_a_channel_that_never_varies_gets_the_std_of_one_level_not_zero():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = torch.randint(0, 256, (4, 8, 8), dtype=torch.uint8)
    images[:, 1] = 20  # flat: a 0 std would make every normalised pixel nan
    mean, std = channel_stats(images)
    assert std[1].item() == pytest.approx(1 / 255) and std[2].item() == pytest.approx(1 / 255)
    assert std[0].item() > 0.2 and mean[1].item() == pytest.approx(20 / 255)
    assert torch.isfinite(normalize(images, mean, std)).all()
