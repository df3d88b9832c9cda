"""images.py, the one way an image file becomes the model's input: EXIF orientation, the accepted
formats (and nothing else), the reduced decode of large images, and a clear error for any damaged
file whatever its decoder raises (fuzzed)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from miniresnet import images as images_module
from miniresnet.errors import MiniResNetError
from miniresnet.images import ORIENTATIONS, accepted_formats, find_images, load_image, missing_plugin


def picture(width: int = 60, height: int = 44) -> Image.Image:
    """An upright test picture whose every orientation differs: smooth gradients plus a corner mark."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    pixels[: height // 3, : width // 4] = (250, 250, 20)  # top-left mark
    return Image.fromarray(pixels.astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# The transposition that turns upright pixels into what a camera stores for each orientation: the
# inverse of the one that makes them upright again (rotations by 90 degrees swap; the rest undo themselves).
STORED = {o: {"ROTATE_270": "ROTATE_90", "ROTATE_90": "ROTATE_270"}.get(t, t) for o, t in ORIENTATIONS.items()}


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    stored = upright if orientation == 1 else upright.transpose(getattr(Image.Transpose, STORED[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_prepares_to_the_same_upright_pixels(orientation):
    upright = picture()
    expected = load_image(encoded(upright, "PNG"))
    assert torch.equal(load_image(with_orientation(upright, orientation, "PNG")), expected)
    from_jpeg = load_image(with_orientation(upright, orientation, "JPEG")).float()
    assert (from_jpeg - expected.float()).abs().mean() < 3  # JPEG's loss, not a turned picture
    if orientation != 1:  # the check can fail: the stored pixels alone are another picture
        stored = load_image(with_orientation(upright, orientation, "PNG"), size=32)
        stored_as_is = load_image(encoded(Image.open(io.BytesIO(with_orientation(upright, orientation, "PNG"))), "PNG"))
        assert torch.equal(stored, expected) and not torch.equal(stored_as_is, expected)


LOSSLESS = {"PNG": {}, "BMP": {}, "TIFF": {}, "WEBP": {"lossless": True}, "GIF": {}}
LOSSY = {"JPEG": {"quality": 95}, "HEIF": {"quality": 95}, "AVIF": {"quality": 95}}


@pytest.mark.parametrize("fmt", [*LOSSLESS, *LOSSY])
def test_every_accepted_format_prepares_as_its_png_does(fmt):
    if fmt not in accepted_formats():
        pytest.skip(f"this Pillow cannot open {fmt} (HEIF needs pillow-heif, AVIF a Pillow built with it)")
    image = picture(90, 70)
    if fmt == "GIF":  # a palette format: compare with the PNG of the same palette image
        image = image.quantize(256).convert("RGB")
    expected = load_image(encoded(image, "PNG")).float()
    got = load_image(encoded(image, fmt, **LOSSLESS.get(fmt, LOSSY.get(fmt)))).float()
    tolerance = 0 if fmt in LOSSLESS else 4
    assert (got - expected).abs().mean() <= tolerance, fmt


def test_a_gif_is_read_by_its_first_frame():
    first, second = Image.new("RGB", (40, 40), (250, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 250))
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second])
    assert torch.equal(load_image(buffer.getvalue()), load_image(encoded(first, "PNG")))


def refused_files() -> dict[str, bytes]:
    """Files of formats Pillow reads but we do not (those this Pillow can write)."""
    files = {}
    for fmt in ("EPS", "DDS", "SPIDER", "ICNS", "JPEG2000", "PPM", "TGA", "ICO", "PCX", "SGI", "QOI"):
        try:
            files[fmt] = encoded(picture(64, 64).convert("F" if fmt == "SPIDER" else "RGB"), fmt)
        except Exception:  # a writer this Pillow lacks
            continue
    return files


def test_formats_outside_the_list_never_reach_a_decoder():
    files = refused_files()
    assert {"EPS", "DDS", "SPIDER"} <= files.keys()  # the issue's dangerous and fragile decoders at least
    for fmt, data in files.items():
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open each one
        with pytest.raises(MiniResNetError, match="not a readable image"):
            load_image(data)


def test_a_heic_or_avif_without_its_decoder_names_what_to_install(monkeypatch):
    assert "pillow-heif" in missing_plugin(b"\0\0\0\x18ftypheic\0\0\0\0")
    assert "AVIF" in missing_plugin(b"\0\0\0\x18ftypavif\0\0\0\0")
    assert missing_plugin(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR") is None
    if "HEIF" not in accepted_formats():
        pytest.skip("pillow-heif is not installed: no HEIC file to make")
    heic = encoded(picture(), "HEIF")
    monkeypatch.setattr(images_module, "accepted_formats", lambda: ["PNG", "JPEG"])
    with pytest.raises(MiniResNetError, match=r"pip install 'miniresnet\[images\]'"):
        load_image(heic)


def test_a_large_photo_is_decoded_small_and_prepares_as_the_full_decode_does(monkeypatch):
    photo = picture().resize((3000, 2000), Image.Resampling.BICUBIC)
    for data in (encoded(photo, "JPEG", quality=90), encoded(photo, "PNG")):
        reduced = load_image(data).float()
        monkeypatch.setattr(images_module, "REDUCE_MARGIN", 10_000)  # so large that nothing is reduced
        full = load_image(data).float()
        monkeypatch.undo()
        assert 0 < (reduced - full).abs().mean() < 1.5  # a slightly different image, the same picture

    sizes = []
    original = images_module.decode_reduced

    def spy(image, shortest):
        decoded = original(image, shortest)
        sizes.append(decoded.size)
        return decoded

    monkeypatch.setattr(images_module, "decode_reduced", spy)
    load_image(encoded(photo, "JPEG", quality=90))
    assert sizes == [(375, 250)]  # the decoder's 1/8 scale: 250 >= 4 x 32 and 1/16 does not exist


def test_an_image_over_the_pixel_cap_is_refused_from_its_header():
    with pytest.raises(images_module.ImageTooLarge, match="3000x2000 is 6,000,000 pixels"):
        load_image(encoded(Image.new("L", (3000, 2000)), "PNG"), max_pixels=5_000_000)


def test_directories_list_what_they_leave_out_and_follow_links(tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("a.heic", "b.avif", "c.gif", "d.TIFF", "e.jpeg", "notes.txt"):
        (photos / name).write_bytes(b"x")
    (elsewhere / "f.png").write_bytes(b"x")
    (photos / "trip" / "linked").symlink_to(elsewhere)
    (photos / "trip" / "loop").symlink_to(photos)  # a link loop must end
    found = find_images([photos])
    assert [f.name for f in found] == ["a.heic", "b.avif", "c.gif", "d.TIFF", "e.jpeg", "f.png"]
    assert "left out 1 file(s)" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_read_and_printed(tmp_path, capsys):
    from miniresnet.cli import main

    name = os.fsdecode(b"caf\xe9.png")
    encoded_png = encoded(picture(), "PNG")
    (tmp_path / name).write_bytes(encoded_png)
    (tmp_path / "broken.png").write_bytes(encoded_png[:50])
    assert torch.equal(load_image(tmp_path / name), load_image(encoded_png))
    assert main(["predict", "seed", str(tmp_path), "--top-k", "1"]) == 1
    out, err = capsys.readouterr()
    assert "caf\\xe9.png: " in out and "broken.png" in err


@pytest.mark.parametrize(
    "fmt, dtype, full",
    [("PNG", np.uint16, 65535), ("TIFF", np.uint16, 65535), ("TIFF", np.int32, 65535), ("TIFF", np.float32, 1.0)],
)
def test_greyscale_of_more_than_8_bits_is_scaled_not_clipped(fmt, dtype, full):
    grey8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # a ramp, black to near-white
    deep = (grey8.astype(np.float64) * (full / 255)).astype(dtype)
    expected = load_image(encoded(Image.fromarray(grey8, "L"), "PNG"))
    got = load_image(encoded(Image.fromarray(deep), fmt))
    assert (got.int() - expected.int()).abs().max() <= 1  # one step of rounding, not white or black


@pytest.mark.parametrize("values", [np.full((8, 8), 3.0, np.float32), np.full((8, 8), 70_000, np.int32)])
def test_greyscale_outside_its_range_is_a_clear_error(values):
    with pytest.raises(MiniResNetError, match="^the upload: .*outside .*save the image as 8- or 16-bit"):
        load_image(encoded(Image.fromarray(values), "TIFF"))


SEEDS = {
    fmt: encoded(picture(48, 40).convert(mode), fmt, **options)
    for fmt, mode, options in (
        ("PNG", "RGBA", {}),
        ("JPEG", "RGB", {"quality": 80}),
        ("BMP", "RGB", {}),
        ("GIF", "P", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("WEBP", "RGB", {}),
    )
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns of the damage it skips: expected here
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    inserted=st.binary(max_size=16),
)
def test_a_damaged_file_of_any_accepted_format_is_a_clear_error_or_an_image(fmt, edits, cut, inserted):
    data = bytearray(SEEDS[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    if inserted:
        at = edits[0][0] % len(data) if edits else len(data) // 2
        data[at:at] = inserted
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        tensor = load_image(bytes(data))
    except MiniResNetError as e:
        assert str(e).startswith("the upload: ")
    else:
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8


def test_a_file_the_process_may_not_read_is_a_clear_error(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(picture(), "PNG"))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything
        pytest.skip("running as root: permissions do not stop reads")
    with pytest.raises(MiniResNetError, match="cannot be read"):
        load_image(path)


def test_missing_files_and_directories_are_clear_errors(tmp_path):
    with pytest.raises(MiniResNetError, match="no such file"):
        load_image(tmp_path / "nothing.png")
    with pytest.raises(MiniResNetError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(MiniResNetError, match="no such file or directory"):
        find_images([Path(tmp_path / "nothing")])
