"""Turn a user's image file into an input like a model's training images.

:func:`load_image` reads a picture (anything Pillow opens) or a ``.npy`` array
and returns a float32 array of shape (28, 28) with values in [0, 1]: bright
ink on a dark background, prepared the way the MNIST creators prepared their
digits (:data:`DIGITS`):

1. reduce to lightness in [0, 1]; transparent pixels are composited onto a
   backdrop that contrasts with the opaque ink (white behind dark ink, black
   behind light ink);
2. find the background from the image border (median of the border pixels)
   and invert if the ink is darker than the background;
3. subtract the background, estimate the noise from the border and crop to
   the bounding box of the pixels that are clearly ink;
4. scale so that the longer side is 20 px (antialiased, aspect kept);
5. paste into a 28x28 canvas with the ink's centre of mass at (14, 14);
6. stretch the intensities so the strongest ink is 1.

A :class:`Framing` changes steps 3-5 for other training images: Fashion-MNIST's
clothing (:data:`CLOTHING`) is trimmed to everything that is not background,
scaled to fill the 28 px and centred by its box, as Zalando prepared it; and a
model trained on dark ink on a light background gets the result inverted.
A 28x28 ``.npy`` array whose background is already the model's is taken as is.
:func:`decode_picture` does the same for a picture's bytes (``xpcnn serve``).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import threading
import warnings
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from ..base.errors import XpcnnError
from ..base.files import NotRegularFileError, open_regular

SIZE = 28  # side of the output canvas
DIGIT_SIZE = 20  # longer side of the digit's bounding box inside the canvas
CENTRE = 14.0  # where the centre of mass goes (row and column index)

MIN_CONTRAST = 0.08  # ink must stand out from the background by this much (of the full range)
NOISE_SIGMAS = 3.0  # noise floor = this many standard deviations of the border; ink must exceed twice it
INK_FRACTION = 0.25  # pixels above this fraction of the strongest ink count for the bounding box

UNIT_SLACK = 1e-3  # floats this far outside [0, 1] are its rounding (1.0000001), not 0..255 or an error
MAX_PIXELS = 2048 * 2048  # bigger pictures are refused from their header, before decoding (predict and serve)
# Pillow's pixel limit and the warning filters are process-wide: one reader at a time changes them.
_PILLOW_SETTINGS = threading.Lock()
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"


class ImageError(XpcnnError, ValueError):
    """An input file that cannot be turned into a digit image."""


@dataclasses.dataclass(frozen=True)
class Framing:
    """How a model's training images frame their subject, so that a picture is prepared as they were.

    ``size``: the longer side of the subject's box in pixels; ``centre_of_mass``: centred by the ink's centre of
    mass (else by its box); ``ink_fraction``: pixels above this fraction of the strongest ink make the box;
    ``light_background``: the images are dark on light (the prepared picture is inverted at the end).
    """

    size: int = DIGIT_SIZE
    centre_of_mass: bool = True
    ink_fraction: float = INK_FRACTION
    light_background: bool = False


DIGITS = Framing()  # MNIST: a 20 px box, centred by its centre of mass
CLOTHING = Framing(size=SIZE, centre_of_mass=False, ink_fraction=0.05)  # Fashion-MNIST: trimmed, filling 28 px
FRAMINGS = {"fashion-mnist": CLOTHING}  # a dataset's pictures not named here are framed as MNIST's digits


def framing_for(dataset: str, light_background: bool = False) -> Framing:
    """The framing of a model trained on ``dataset`` (a name), of dark ink on light where ``light_background``."""
    return dataclasses.replace(FRAMINGS.get(dataset, DIGITS), light_background=light_background)


def load_image(path: str | os.PathLike, framing: Framing = DIGITS) -> np.ndarray:
    """Read one image file (picture or ``.npy``) as an input framed as ``framing`` says (default: MNIST's digits).

    Returns float32 of shape (28, 28), values in [0, 1], background 0 and ink
    up to 1 (the reverse for a light background).  Raises :class:`ImageError` (one line, naming the file) for files
    that cannot be read, unsupported arrays and blank images.
    """
    name = os.fspath(path)
    try:
        file = open_regular(name)
    except NotRegularFileError as error:
        raise ImageError(str(error)) from None
    except OSError as error:
        raise ImageError(f"{name}: cannot open: {error.strerror or _one_line(error)}") from None
    with file:
        if name.lower().endswith(".npz"):
            raise ImageError(f"{name}: a .npz archive holds several arrays: save one image with np.save, as .npy")
        if name.lower().endswith(".npy"):
            lightness = _read_npy(file, name)
            if lightness.shape == (SIZE, SIZE) and _light_background(lightness) == framing.light_background:
                if lightness.max() - lightness.min() < MIN_CONTRAST:  # uniform: no level of it is ink
                    raise ImageError(f"{name}: the image is blank (no ink found)")
                return lightness  # a dataset's image
        else:
            lightness = _read_picture(file, name, max_pixels=MAX_PIXELS)
    return _frame(lightness, name, framing)


def decode_picture(
    data: bytes,
    name: str,
    formats: tuple[str, ...] | None = None,
    max_pixels: int | None = None,
    framing: Framing = DIGITS,
) -> np.ndarray:
    """A picture file's content as an input, prepared exactly as :func:`load_image` prepares a file.

    ``formats`` limits the Pillow formats tried (e.g. ``("PNG",)``); ``max_pixels``
    refuses larger pictures before their pixels are decoded.  ``name`` stands
    for the picture in messages.  Returns float32 (28, 28) in [0, 1].
    """
    return _frame(_read_picture(io.BytesIO(data), name, formats, max_pixels), name, framing)


def load_images(paths: Iterable[str | os.PathLike], framing: Framing = DIGITS) -> np.ndarray:
    """Read several image files with :func:`load_image`.

    Returns float32 of shape (N, 1, 28, 28), values in [0, 1].
    """
    images = [load_image(path, framing)[None] for path in paths]
    if not images:
        return np.zeros((0, 1, SIZE, SIZE), dtype=np.float32)
    return np.stack(images)


def _read_picture(
    source: BinaryIO, name: str, formats: tuple[str, ...] | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Open a picture (a file object) with Pillow; return its lightness, float32 (H, W) in [0, 1].

    Float pictures (mode F, e.g. a TIFF) are taken as [0, 1] lightness, or 0..255 if any value is above 1.
    """
    with _PILLOW_SETTINGS:
        return _read_picture_alone(source, name, formats, max_pixels)


def _read_picture_alone(
    source: BinaryIO, name: str, formats: tuple[str, ...] | None, max_pixels: int | None
) -> np.ndarray:
    """:func:`_read_picture`'s work, holding the lock on Pillow's process-wide settings it changes."""
    limit = Image.MAX_IMAGE_PIXELS
    allowed = max_pixels if max_pixels is not None else limit
    try:
        with warnings.catch_warnings():  # Pillow's warnings (corrupt EXIF...) are not the user's to read
            warnings.simplefilter("ignore")
            # Pillow's own check, at our limit, also guards what it decodes while opening (an icon's largest
            # image, refused over twice the limit) and after (an ICNS whose header understates it).
            Image.MAX_IMAGE_PIXELS = allowed
            with Image.open(source, formats=formats) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    # Opening reads only the header: refuse before a small file inflates to gigabytes.
                    raise ImageError(f"{name}: {img.width}x{img.height} pixels is over the limit of {max_pixels:,}")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return _lightness(ImageOps.exif_transpose(img), name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: holds an image over the limit of {allowed:,} pixels") from None
    except Exception as error:  # Pillow raises many kinds (OSError, SyntaxError, struct.error...)
        raise ImageError(f"{name}: cannot read as an image ({_one_line(error)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _lightness(img: Image.Image, name: str) -> np.ndarray:
    """An opened picture's lightness, float32 (H, W) in [0, 1]."""
    if img.mode == "I":  # 32-bit integer grey: 0..255 as Pillow converts it, or 16 bits' range
        values = np.asarray(img, dtype=np.float32)
        return np.clip(values / (255 if values.max() <= 255 else 65535), 0, 1)
    if img.mode.startswith("I"):  # 16-bit integer grey
        return np.clip(np.asarray(img, dtype=np.float32) / 65535, 0, 1)
    if img.mode == "F":  # 32-bit float grey: converting to "L" would clip [0, 1] to black
        return _float_lightness(np.asarray(img, dtype=np.float32), name)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255
        return _composite(rgba[..., :3], rgba[..., 3])
    return np.asarray(img.convert("L"), dtype=np.float32) / 255


def _float_lightness(values: np.ndarray, name: str) -> np.ndarray:
    """Float grey values as lightness in [0, 1]: taken as [0, 1] (rounding just past it clipped), or as 0..255
    if any is above 1."""
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: contains NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < -UNIT_SLACK or high > 255:
        raise ImageError(f"{name}: values span {low:g}..{high:g}; expected floats in [0, 1] or 0..255")
    return values / 255 if high > 1 + UNIT_SLACK else np.clip(values, 0, 1)


def _declared_values(file: BinaryIO) -> int | None:
    """How many values a ``.npy`` header declares (None where it cannot tell: np.load then says why), read
    before the data as pictures' sizes are; the file is left where it was."""
    start = file.tell()
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        reader = readers.get(np.lib.format.read_magic(file))
        return None if reader is None else math.prod(reader(file)[0])
    except (ValueError, TypeError, EOFError, OSError, SyntaxError):
        return None
    finally:
        file.seek(start)


def _read_npy(file: BinaryIO, name: str) -> np.ndarray:
    """Load a ``.npy`` array; return its lightness, float32 (H, W) in [0, 1].

    Accepts (H, W), (1, H, W), (H, W, 1) grey and (H, W, 3) RGB / (H, W, 4)
    RGBA; integers in 0..255, floats in [0, 1] (or in 0..255 if any value is
    above 1).
    """
    expected = (
        "expected a 2-D (H, W), (1, H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array "
        "of uint8 in 0..255 or floats in [0, 1]"
    )
    declared = _declared_values(file)
    if declared is not None and declared > 4 * MAX_PIXELS:  # (H, W, 4) at most
        raise ImageError(f"{name}: an array of {declared:,} values is over the limit of {4 * MAX_PIXELS:,}")
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as error:
        if "max_header_size" in str(error):  # NumPy's message would suggest trusting the file
            raise ImageError(f"{name}: its .npy header is too large for an array of numbers") from None
        if "allow_pickle" in str(error):  # NumPy's message would suggest unpickling it
            raise ImageError(f"{name}: holds pickled Python objects, not an array of numbers") from None
        raise ImageError(f"{name}: cannot read as a .npy array ({_one_line(error)})") from None
    except Exception as error:  # OSError, EOFError... from a bad file
        raise ImageError(f"{name}: cannot read as a .npy array ({_one_line(error)})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive renamed .npy
        raise ImageError(f"{name}: not a single array; {expected}")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or array.size == 0:
        raise ImageError(f"{name}: got shape {array.shape}; {expected}")
    if array.dtype.kind not in "uif":
        raise ImageError(f"{name}: got dtype {array.dtype}; {expected}")

    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf: refused below
        values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: contains NaN or infinity; {expected}")
    low, high = values.min(), values.max()
    if array.dtype.kind in "ui" or high > 1 + UNIT_SLACK:
        if low < 0 or high > 255:
            raise ImageError(f"{name}: values span {low:g}..{high:g}; {expected}")
        values /= 255
    elif low < -UNIT_SLACK:
        raise ImageError(f"{name}: values span {low:g}..{high:g}; {expected}")
    else:
        values = np.clip(values, 0, 1)

    if values.ndim == 2:
        return values
    alpha = values[..., 3] if values.shape[2] == 4 else np.ones(values.shape[:2], np.float32)
    return _composite(values[..., :3], alpha)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten RGB (H, W, 3) with alpha (H, W), both in [0, 1], to lightness (H, W).

    If most of the border is transparent the backdrop contrasts with the
    opaque content: white behind dark ink, black behind light ink.  Otherwise
    (an opaque picture with a few holes) the backdrop is white.
    """
    luma = rgb @ LUMA
    backdrop = 1.0
    if np.median(_border(alpha)) < 0.5 and alpha.sum() > 0:
        ink_lightness = (luma * alpha).sum() / alpha.sum()
        backdrop = 1.0 if ink_lightness < 0.5 else 0.0
    return (alpha * luma + (1 - alpha) * backdrop).astype(np.float32)


def _frame(lightness: np.ndarray, name: str, framing: Framing) -> np.ndarray:
    """Lightness (H, W) in [0, 1] -> float32 (28, 28) in [0, 1], framed as ``framing`` says."""
    ink = 1 - lightness if _light_background(lightness) else lightness
    border = _border(ink)
    background = np.median(border)
    noise = NOISE_SIGMAS * 1.4826 * np.median(np.abs(border - background))  # robust sigma from the MAD
    contrast = ink - background
    peak = contrast.max()
    if peak <= max(MIN_CONTRAST, 2 * noise):
        raise ImageError(f"{name}: the image is blank (no ink found)")

    rows, cols = np.nonzero(contrast > max(framing.ink_fraction * peak, 2 * noise))
    crop = contrast[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    crop = np.clip(crop - noise, 0, None)

    height, width = crop.shape
    scale = framing.size / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # BILINEAR in Pillow widens its filter when shrinking, so it antialiases; it never overshoots.
    digit = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(new_size, Image.Resampling.BILINEAR))

    if framing.centre_of_mass:
        total = digit.sum()
        centre_row = digit.sum(axis=1) @ np.arange(digit.shape[0]) / total
        centre_col = digit.sum(axis=0) @ np.arange(digit.shape[1]) / total
        top = min(max(math.floor(CENTRE - centre_row + 0.5), 0), SIZE - digit.shape[0])
        left = min(max(math.floor(CENTRE - centre_col + 0.5), 0), SIZE - digit.shape[1])
    else:  # the box in the middle
        top, left = (SIZE - digit.shape[0]) // 2, (SIZE - digit.shape[1]) // 2
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    canvas /= canvas.max()
    return 1 - canvas if framing.light_background else canvas


def _light_background(lightness: np.ndarray) -> bool:
    """True if the ink is darker than the background (the border's median).

    Compares how far the darkest and the lightest pixels lie from the background, so dim photos of paper (grey
    background) count as light too.  Each extreme is that of the darkest or lightest thousandth of the pixels
    (up to 50 of them): a speck or a dead pixel of the other polarity does not turn a large picture over.
    """
    background = np.median(_border(lightness))
    values = lightness.ravel()
    k = min(50, values.size // 1000)  # 0 for an image the size of a dataset's: its true extremes
    darkest, lightest = np.partition(values, [k, values.size - 1 - k])[[k, values.size - 1 - k]]
    return bool(background - darkest > lightest - background)


def _border(array: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of a 2-D array, flattened."""
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def _one_line(error: Exception) -> str:
    """An exception as one short line: its first line of text without the reprs of Python objects (Pillow's
    "cannot identify image file <_io.BytesIO object at 0x7f...>"), or its type."""
    text = re.sub(r"\s*<_io\.[^>]*>", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
