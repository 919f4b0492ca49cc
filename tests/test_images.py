"""Tests for xpcnn.data.images: user pictures and arrays -> MNIST-style (28, 28) inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

from xpcnn.data.images import CLOTHING, DIGITS, ImageError, decode_picture, framing_for, load_image, load_images

# ---------------------------------------------------------------- drawing helpers


def draw_zero(size=(200, 300), ink=0, paper=255, mode="L", box=(0.3, 0.25, 0.7, 0.75), width=0.07):
    """An ellipse "0" drawn into a new Pillow image; box and width are fractions of the size."""
    w, h = size
    img = Image.new(mode, size, paper)
    ImageDraw.Draw(img).ellipse(
        (box[0] * w, box[1] * h, box[2] * w, box[3] * h), outline=ink, width=max(1, round(width * w))
    )
    return img


def draw_one(size=(200, 300), ink=0, paper=255, mode="L", x=0.5, top=0.2, bottom=0.8, width=0.08):
    """A thick vertical "1" stroke."""
    w, h = size
    img = Image.new(mode, size, paper)
    ImageDraw.Draw(img).line((x * w, top * h, x * w, bottom * h), fill=ink, width=max(1, round(width * w)))
    return img


def save(img, tmp_path, name, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def centre_of_mass(a):
    total = a.sum()
    return a.sum(axis=1) @ np.arange(28) / total, a.sum(axis=0) @ np.arange(28) / total


def ink_box(a, level=0.05):
    """(height, width) of the bounding box of pixels above level."""
    rows, cols = np.nonzero(a > level)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def assert_mnist_like(a):
    """Shape, dtype, range, dark background, strong ink, centred, 20 px long side."""
    assert a.shape == (28, 28)
    assert a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() == pytest.approx(1.0)
    assert np.percentile(a, 50) < 0.02  # most pixels are background
    assert a[:2].max() == 0 and a[-2:].max() == 0 and a[:, :2].max() == 0 and a[:, -2:].max() == 0
    row, col = centre_of_mass(a)
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1
    assert max(ink_box(a)) in (19, 20)


def assert_same_digit(a, b, mean_tol=0.01, max_tol=0.1, shift=1):
    """a and b are nearly equal once aligned; placement may differ by up to shift px
    (the centre of mass is rounded to whole pixels, so a tie can go either way)."""
    diffs = [
        np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b)
        for dy in range(-shift, shift + 1)
        for dx in range(-shift, shift + 1)
    ]
    diff = min(diffs, key=np.mean)
    assert diff.mean() < mean_tol, diff.mean()
    assert diff.max() < max_tol, diff.max()


def assert_one_line_error(path, match=None):
    with pytest.raises(ImageError, match=match) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.fixture
def reference(tmp_path):
    """The black-on-white "0" as processed, which the other forms are compared with."""
    return load_image(save(draw_zero(), tmp_path, "reference.png"))


# ---------------------------------------------------------------- pictures


def test_black_on_white_png(reference):
    assert_mnist_like(reference)
    height, width = ink_box(reference)
    assert height == 20 and 10 <= width <= 12  # the tall "0" keeps its aspect ratio (~0.55)


def test_white_on_black_matches_black_on_white(tmp_path, reference):
    a = load_image(save(draw_zero(ink=255, paper=0), tmp_path, "white_on_black.png"))
    assert_mnist_like(a)
    assert_same_digit(a, reference, mean_tol=1e-6, max_tol=1e-5, shift=0)


def test_noisy_rgb_jpeg(tmp_path, reference):
    rng = np.random.default_rng(0)
    clean = np.asarray(draw_zero(ink=(20, 30, 140), paper=(245, 240, 225), mode="RGB"), dtype=float)
    noisy = np.clip(clean + rng.normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
    a = load_image(save(Image.fromarray(noisy), tmp_path, "noisy.jpg", quality=75))
    assert_mnist_like(a)
    assert_same_digit(a, reference)


def test_dark_ink_on_transparent_background(tmp_path, reference):
    img = Image.new("RGBA", (200, 300), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((60, 75, 140, 225), outline=(0, 0, 0, 255), width=14)
    a = load_image(save(img, tmp_path, "dark_on_transparent.png"))
    assert_mnist_like(a)
    assert_same_digit(a, reference)


def test_light_ink_on_transparent_background(tmp_path, reference):
    # Compositing onto white would lose white ink; the backdrop must contrast with the ink.
    img = Image.new("RGBA", (200, 300), (255, 255, 255, 0))
    ImageDraw.Draw(img).ellipse((60, 75, 140, 225), outline=(255, 255, 255, 255), width=14)
    a = load_image(save(img, tmp_path, "light_on_transparent.png"))
    assert_mnist_like(a)
    assert_same_digit(a, reference)


def test_opaque_rgba_is_an_ordinary_picture(tmp_path, reference):
    a = load_image(save(draw_zero().convert("RGBA"), tmp_path, "opaque.png"))
    assert_same_digit(a, reference, mean_tol=1e-6, max_tol=1e-5, shift=0)


def test_palette_and_la_modes(tmp_path, reference):
    for img, name in [
        (draw_zero().convert("P"), "palette.png"),
        (draw_zero().convert("LA"), "la.png"),
        (draw_zero().convert("1"), "bilevel.png"),
    ]:
        a = load_image(save(img, tmp_path, name))
        assert_mnist_like(a)
        assert_same_digit(a, reference)


def test_palette_gif_with_transparent_background(tmp_path, reference):
    img = draw_zero(ink=1, paper=0, mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)  # index 0 white, 1 black
    a = load_image(save(img, tmp_path, "transparent.gif", transparency=0))
    assert_mnist_like(a)
    assert_same_digit(a, reference)


def test_16_bit_grey(tmp_path, reference):
    lightness = np.asarray(draw_zero(), dtype=np.float64) / 255
    img = Image.fromarray((20000 + lightness * 40000).astype(np.uint16))
    path = save(img, tmp_path, "grey16.png")
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    a = load_image(path)
    assert_mnist_like(a)
    assert_same_digit(a, reference, mean_tol=1e-3, max_tol=0.01)


def test_off_centre_digit_is_centred(tmp_path, reference):
    a = load_image(save(draw_zero(size=(400, 300), box=(0.02, 0.05, 0.22, 0.55), width=0.035), tmp_path, "corner.png"))
    assert_mnist_like(a)
    assert_same_digit(a, reference)


def test_tiny_image_is_scaled_up(tmp_path):
    img = Image.new("L", (10, 14), 255)
    ImageDraw.Draw(img).ellipse((2, 2, 7, 11), outline=0, width=1)
    a = load_image(save(img, tmp_path, "tiny.png"))
    assert_mnist_like(a)


def test_one_keeps_its_aspect_ratio(tmp_path):
    a = load_image(save(draw_one(), tmp_path, "one.png"))
    assert_mnist_like(a)
    height, width = ink_box(a)
    assert height == 20 and width <= 5


def test_faint_pencil_is_stretched(tmp_path, reference):
    a = load_image(save(draw_zero(ink=205, paper=235), tmp_path, "pencil.png"))
    assert_mnist_like(a)
    assert_same_digit(a, reference)


def test_dim_photo_of_paper_is_inverted(tmp_path, reference):
    # Grey (badly lit) paper: the background is below mid-grey, but the ink is darker still.
    a = load_image(save(draw_zero(ink=20, paper=100), tmp_path, "dim.png"))
    assert_same_digit(a, reference)


def test_exif_orientation_is_applied(tmp_path):
    upright = load_image(save(draw_one(size=(300, 200), x=0.3), tmp_path, "upright.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored = draw_one(size=(300, 200), x=0.3).transpose(Image.Transpose.ROTATE_90)
    a = load_image(save(stored, tmp_path, "rotated.jpg", exif=exif, quality=95))
    assert_same_digit(a, upright)


# ---------------------------------------------------------------- .npy arrays


def mnist_like_array():
    """A 28x28 uint8 digit on black, deliberately off-centre."""
    a = np.zeros((28, 28), dtype=np.uint8)
    a[3:15, 2:5] = 255
    a[3:15, 5] = 128
    return a


@pytest.mark.parametrize(
    "form",
    [
        lambda a: a,
        lambda a: a[None],
        lambda a: a[..., None],
        lambda a: a.astype(np.float32) / 255,
        lambda a: (a.astype(np.float64) / 255)[None],
        lambda a: a.astype(np.float32),  # float above 1: read as 0..255
        lambda a: a.astype(np.int64),
    ],
    ids=["uint8", "1HW", "HW1", "float01", "float64-1HW", "float255", "int64"],
)
def test_mnist_like_npy_is_used_as_is(tmp_path, form):
    raw = mnist_like_array()
    path = tmp_path / "digit.npy"
    np.save(path, form(raw))
    a = load_image(path)
    assert a.dtype == np.float32 and a.shape == (28, 28)
    np.testing.assert_allclose(a, raw / 255, atol=1e-6)  # not re-centred


@pytest.mark.parametrize("past", [np.float32(1.0000001), -1e-7], ids=["above-1", "below-0"])
def test_floats_rounded_just_past_the_unit_range_are_that_range(tmp_path, past):
    raw = mnist_like_array() / 255.0
    raw[raw == (1.0 if past > 0 else 0.0)] = past  # as arithmetic in float32 leaves them
    np.save(tmp_path / "digit.npy", raw.astype(np.float32))
    np.testing.assert_allclose(load_image(tmp_path / "digit.npy"), np.clip(raw, 0, 1), atol=1e-6)


def test_npy_of_another_size_goes_through_the_pipeline(tmp_path, reference):
    path = tmp_path / "big.npy"
    np.save(path, np.asarray(draw_zero()))
    assert_same_digit(load_image(path), reference, mean_tol=1e-6, max_tol=1e-5, shift=0)


def test_light_background_28x28_npy_is_inverted_and_centred(tmp_path):
    path = tmp_path / "light.npy"
    np.save(path, 255 - mnist_like_array())
    a = load_image(path)
    assert_mnist_like(a)


def garment():
    """A 28x28 uint8 shirt-like shape on black that fills the frame's height, as Fashion-MNIST's items do."""
    a = np.zeros((28, 28), dtype=np.uint8)
    a[0:28, 6:22] = np.linspace(60, 220, 16).astype(np.uint8)  # the body, shaded
    a[2:12, 2:6] = a[2:12, 22:26] = 140  # the sleeves
    return a


def test_clothing_is_trimmed_to_fill_the_frame_and_centred_by_its_box_as_fashion_mnist_was(tmp_path):
    """A dataset's own image, saved as a PNG, comes back as it was (up to the brightest being 1); the digits'
    framing would shrink it to 20 px and move it by its centre of mass."""
    item = garment()
    Image.fromarray(item).save(tmp_path / "shirt.png")
    as_clothing = load_image(tmp_path / "shirt.png", CLOTHING)
    np.testing.assert_allclose(as_clothing, item / item.max(), atol=1e-6)
    as_digit = load_image(tmp_path / "shirt.png", DIGITS)
    assert max(ink_box(as_digit)) in (19, 20)
    photo = Image.new("L", (300, 200), 255)  # the same item, dark on white, smaller and off-centre
    photo.paste(Image.fromarray(255 - item).resize((84, 84), Image.Resampling.NEAREST), (20, 30))
    taken = load_image(save(photo, tmp_path, "photo.png"), CLOTHING)
    rows, cols = np.nonzero(taken > 0.05)
    assert (rows.min(), rows.max()) == (0, 27) and abs((cols.min() + cols.max()) / 2 - 13.5) <= 0.5
    assert np.abs(taken - item / item.max()).mean() < 0.03


def test_a_model_of_dark_ink_on_light_gets_pictures_so(tmp_path, reference):
    """A model trained on white-background images: pictures come out inverted, and its own 28x28 .npy images
    (light background) are taken as they are."""
    light = framing_for("mnist", light_background=True)
    assert light == DIGITS.__class__(light_background=True) and framing_for("fashion-mnist") == CLOTHING
    picture = load_image(save(draw_zero(), tmp_path, "zero.png"), light)
    np.testing.assert_allclose(picture, 1 - reference, atol=1e-6)
    np.save(tmp_path / "own.npy", 255 - mnist_like_array())
    np.testing.assert_allclose(load_image(tmp_path / "own.npy", light), 1 - mnist_like_array() / 255, atol=1e-6)
    np.save(tmp_path / "dark.npy", mnist_like_array())  # MNIST's polarity: prepared, then inverted
    assert load_image(tmp_path / "dark.npy", light).mean() > 0.5


def test_rgb_and_rgba_npy(tmp_path, reference):
    rgb = np.asarray(draw_zero(ink=(0, 0, 0), paper=(255, 255, 255), mode="RGB"))
    np.save(tmp_path / "rgb.npy", rgb)
    np.save(tmp_path / "rgba.npy", np.concatenate([rgb, np.full((300, 200, 1), 255)], axis=2) / 255.0)
    for name in ("rgb.npy", "rgba.npy"):
        assert_same_digit(load_image(tmp_path / name), reference, mean_tol=1e-6, max_tol=1e-5, shift=0)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((1, 1, 28, 28), np.uint8), "shape"),
        (np.zeros((28, 28, 2), np.uint8), "shape"),
        (np.zeros((3, 28, 28), np.uint8), "shape"),
        (np.zeros((0, 28), np.uint8), "shape"),
        (np.zeros(28, np.uint8), "shape"),
        (np.full((28, 28), "abc"), "dtype"),
        (np.zeros((28, 28), bool), "dtype"),
        (np.zeros((28, 28), np.complex64), "dtype"),
        (np.full((28, 28), np.nan), "NaN"),
        (np.full((28, 28), -0.5), "values"),
        (np.full((28, 28), 300.0), "values"),
        (np.full((28, 28), 1000, np.int32), "values"),
    ],
    ids=["4d", "2ch", "chw3", "empty", "1d", "str", "bool", "complex", "nan", "negative", "float300", "int1000"],
)
def test_bad_npy_raises_one_line_error(tmp_path, array, match):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    message = assert_one_line_error(path, match=match)
    assert "expected" in message


def test_object_npy_and_npz_and_garbage_raise(tmp_path):
    np.save(tmp_path / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "archive.npz", x=mnist_like_array())
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    (tmp_path / "garbage.npy").write_text("not an array\n")
    for name in ("object.npy", "archive.npy", "garbage.npy"):
        assert_one_line_error(tmp_path / name)
    assert_one_line_error(tmp_path / "object.npy", match="pickled Python objects")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (28, 28), " + b" " * 20000 + b"}\n"
    (tmp_path / "wide.npy").write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header)
    assert_one_line_error(tmp_path / "wide.npy", match="header is too large")


def test_floats_beyond_float32_are_one_line_without_warnings(tmp_path):
    np.save(tmp_path / "huge.npy", np.full((28, 28), 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_one_line_error(tmp_path / "huge.npy", match="NaN or infinity")


# ---------------------------------------------------------------- blank and unreadable files


@pytest.mark.parametrize("paper", [0, 255, 128])
def test_blank_picture_raises(tmp_path, paper):
    assert_one_line_error(save(Image.new("L", (50, 60), paper), tmp_path, "blank.png"), match="blank")


def test_noisy_blank_jpeg_raises(tmp_path):
    rng = np.random.default_rng(1)
    noise = np.clip(rng.normal(235, 6, (300, 200)), 0, 255).astype(np.uint8)
    assert_one_line_error(save(Image.fromarray(noise), tmp_path, "paper.jpg"), match="blank")


def test_fully_transparent_picture_raises(tmp_path):
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert_one_line_error(save(img, tmp_path, "transparent.png"), match="blank")


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((28, 28), np.uint8),
        np.ones((50, 40)),
        # Uniform 28x28 arrays of any level, in every layout: none is a digit taken as is.
        np.full((28, 28), 255, np.uint8),
        np.full((28, 28), 0.3, np.float32),
        np.full((1, 28, 28), 255, np.uint8),
        np.full((28, 28, 3), 255, np.uint8),
        np.zeros((28, 28, 4), np.uint8),  # fully transparent
        np.full((28, 28), 0.05, np.float32),  # dark, but no ink on it
    ],
    ids=lambda a: f"{a.shape}-{a.dtype}-{a.flat[0]}",
)
def test_blank_npy_raises(tmp_path, array):
    np.save(tmp_path / "blank.npy", array)
    assert_one_line_error(tmp_path / "blank.npy", match="blank")


def test_missing_file_raises(tmp_path):
    assert_one_line_error(tmp_path / "missing.png")
    assert_one_line_error(tmp_path / "missing.npy")


def test_not_an_image_raises(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\nsecond line\n")
    assert_one_line_error(text, match="cannot read")
    assert_one_line_error(tmp_path)  # a directory


def test_truncated_png_raises(tmp_path):
    path = save(draw_zero(), tmp_path, "whole.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:200])
    assert_one_line_error(cut)


def test_picture_bytes_are_prepared_as_the_file_is(tmp_path):
    path = save(draw_zero(ink=255, paper=0).convert("RGBA"), tmp_path, "zero.png")  # like the canvas
    np.testing.assert_array_equal(decode_picture(path.read_bytes(), "zero"), load_image(path))


def test_picture_bytes_limited_to_formats_and_pixels(tmp_path):
    jpeg = save(draw_zero(), tmp_path, "zero.jpg").read_bytes()
    decode_picture(jpeg, "zero")
    with pytest.raises(ImageError, match="^a JPEG: cannot read as an image") as error:
        decode_picture(jpeg, "a JPEG", formats=("PNG",))
    assert "_io" not in str(error.value) and "0x" not in str(error.value)  # Pillow names its file object
    png = save(draw_zero(size=(200, 300)), tmp_path, "zero.png").read_bytes()
    decode_picture(png, "zero", max_pixels=200 * 300)
    with pytest.raises(ImageError, match=r"^big: 200x300 pixels is over the limit of 59,999$"):
        decode_picture(png, "big", max_pixels=200 * 300 - 1)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------- several files


def test_load_images_stacks(tmp_path):
    paths = [save(draw_zero(), tmp_path, "zero.png"), save(draw_one(), tmp_path, "one.png")]
    np.save(tmp_path / "mnist.npy", mnist_like_array())
    paths.append(str(tmp_path / "mnist.npy"))
    batch = load_images(paths)
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == np.float32
    for image, path in zip(batch, paths, strict=False):
        np.testing.assert_array_equal(image[0], load_image(path))


def test_load_images_empty():
    batch = load_images([])
    assert batch.shape == (0, 1, 28, 28) and batch.dtype == np.float32


def test_load_images_names_the_bad_file(tmp_path):
    good = save(draw_zero(), tmp_path, "good.png")
    with pytest.raises(ImageError, match="missing.png"):
        load_images([good, tmp_path / "missing.png"])


def photographed_one(paper, ink: int = 0) -> Image.Image:
    """A vertical stroke (a "1"), 30 px wide, drawn with grey ``ink`` on ``paper`` (a 400x400 uint8 array)."""
    img = Image.fromarray(np.asarray(paper, np.uint8))
    ImageDraw.Draw(img).line((200, 80, 200, 320), fill=ink, width=30)
    return img


def assert_reads_as_a_centred_bar(image):
    """The framed "1": a bright bar 20 px tall in the middle columns, dark everywhere else."""
    columns = image.sum(axis=0)
    assert image.mean() < 0.2 and columns[12:16].max() > 15, columns
    assert columns[:10].max() < 0.5 and columns[18:].max() < 0.5, columns


@pytest.mark.parametrize(
    "case",
    ["speck", "dead pixels"],
)
def test_a_photographed_digit_keeps_its_polarity_and_background(tmp_path, case):
    """A 2x2 white speck on dim paper turned the page over: its lightest pixel beat the pencil."""
    paper = np.full((400, 400), 180, np.uint8)
    if case == "speck":
        paper[50:52, 350:352] = 255
    if case == "dead pixels":  # a camera's stuck pixels, scattered
        paper.ravel()[np.random.default_rng(0).choice(paper.size, 40, replace=False)] = 255
    image = photographed_one(paper, ink=120)
    assert_reads_as_a_centred_bar(load_image(save(image, tmp_path, "one.png")))


def huge_png(side: int) -> bytes:
    """A grey PNG of side x side black pixels, a few kilobytes compressed."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(side + 1) * side, 9)  # each row: filter byte 0, then the pixels
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_an_icon_holding_a_huge_picture_is_refused_before_it_is_decoded(tmp_path):
    """Pillow decodes an icon's largest image while opening it, before the header check: a 600 kB .ico of a
    13000x13000 PNG took 700 MB. Pillow's own limit is now ours while it reads."""
    import struct

    png = huge_png(5000)
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png
    path = tmp_path / "bomb.ico"
    path.write_bytes(icon)
    assert_one_line_error(path, match=r"holds an image over the limit of 4,194,304 pixels")


def test_32_bit_grey_of_0_to_255_and_pillows_warnings(tmp_path):
    """Mode I holding 0..255 (Pillow's own convert("I")) was divided by 65535 and called blank; Pillow's warnings
    (corrupt EXIF) reached stderr beside the answer."""
    zero = draw_zero()
    reference = load_image(save(zero, tmp_path, "zero.png"))
    np.testing.assert_allclose(load_image(save(zero.convert("I"), tmp_path, "zero.tif")), reference, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning Pillow gives would fail here
        truncated = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02\x01\x0f\x00\x02"  # 2 entries, cut inside one
        load_image(save(zero.convert("RGB"), tmp_path, "zero.jpg", exif=truncated))


def test_reading_pictures_on_several_threads_leaves_pillows_settings_as_they_were(tmp_path):
    """Each read sets Pillow's process-wide pixel limit and warning filters and restores them: interleaved
    reads restored each other's values, leaving the limit at ours and every warning silenced."""
    from concurrent.futures import ThreadPoolExecutor

    path = save(draw_zero(), tmp_path, "zero.png")
    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(load_image, [path] * 64))
    assert Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters
