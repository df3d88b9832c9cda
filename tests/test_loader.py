import torch

from miniresnet.loader import BatchLoader

MEAN, STD = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)


def make_loader(n=103, batch=10, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return BatchLoader(images, torch.arange(n), batch, MEAN, STD, **kw)


def test_every_image_once_per_epoch_with_a_short_last_batch():
    loader = make_loader(shuffle=True, crop_padding=4, flip=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 11
    assert [len(y) for _, y in batches][-1] == 3
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(103))


def test_images_travel_with_their_labels():
    for x, y in make_loader(shuffle=True):
        pixel = x[:, 0, 0, 0] * 0.25 + 0.5  # undo normalisation -> value / 255
        assert torch.allclose(pixel * 255, y.float(), atol=1e-3)


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        loader = make_loader(shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_unshuffled_is_in_order_and_channels_last():
    batches = list(make_loader(shuffle=False, channels_last=True))
    assert torch.cat([y for _, y in batches]).tolist() == list(range(103))
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert batches[0][0].dtype == torch.float32


def test_a_replay_can_start_at_any_batch_of_the_epoch():
    loader = make_loader(shuffle=True, crop_padding=4, flip=True, seed=3)
    loader.set_epoch(2)
    whole = list(loader)
    tail = list(loader.batches(7))
    assert len(tail) == 4
    for (x1, y1), (x2, y2) in zip(whole[7:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_progressive_resizing_scales_the_batches_only_while_asked():
    loader = make_loader(shuffle=True, crop_padding=4, flip=True, channels_last=True)
    full = next(iter(loader))[0]
    loader.resize_to = 24
    small, labels = next(iter(loader))
    assert small.shape == (10, 3, 24, 24) and small.is_contiguous(memory_format=torch.channels_last)
    # Each image is uniform (value = its index), so scaling keeps its value: the same images, smaller.
    assert torch.allclose(small.mean(dim=(2, 3)), full.mean(dim=(2, 3)), atol=0.05)
    loader.resize_to = None
    assert next(iter(loader))[0].shape == (10, 3, 32, 32)


def test_cutout_blanks_one_square_per_image_and_leaves_the_crops_as_they_were():
    plain = make_loader(shuffle=True, crop_padding=4, flip=True, seed=1)
    cut = make_loader(shuffle=True, crop_padding=4, flip=True, seed=1, cutout=8)
    for (x, y), (xc, yc) in zip(plain, cut, strict=True):
        assert torch.equal(y, yc)
        changed = (x != xc).any(dim=1)  # pixels the square covers (all channels)
        assert torch.all(xc.permute(0, 2, 3, 1)[changed] == 0)  # blanked to the mean
        per_image = changed.flatten(1).sum(1)
        assert per_image.max() <= 8 * 8 and per_image.sum() > 0


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    # Each image is a left-to-right ramp tagged by its label, so a mirrored one is recognisable.
    n = 50
    ramp = torch.arange(32, dtype=torch.uint8).view(1, 1, 1, 32).expand(n, 3, 32, 32).contiguous()
    loader = BatchLoader(ramp, torch.arange(n), 10, MEAN, STD, shuffle=True, flip=True, alternate_flip=True, seed=5)

    def mirrored_in(epoch):
        loader.set_epoch(epoch)
        flags = {}
        for x, y in loader:
            for image, label in zip(x, y, strict=True):
                flags[int(label)] = bool(image[0, 0, 0] > image[0, 0, -1])  # a mirrored ramp falls
        return [flags[i] for i in range(n)]

    epochs = [mirrored_in(e) for e in range(4)]
    assert 10 < sum(epochs[0]) < 40  # a coin toss per image in the first epoch
    assert all(a != b for a, b in zip(epochs[0], epochs[1], strict=True))  # the other way in the next
    assert epochs[2] == epochs[0] and epochs[3] == epochs[1]
