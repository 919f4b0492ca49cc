"""Random affine and elastic data augmentation, flips and crops, on the device, on the Array API standard only.

Three layers, lowest first:

* :func:`affine_sample` warps a batch ``(B, C, H, W)`` with given sampling
  matrices ``(B, 2, 3)``, plus an optional per-pixel displacement, by
  bilinear interpolation; :func:`flip_and_crop` mirrors and crops a batch
  with given per-image choices (one gather);
* :func:`affine_matrices` builds those matrices from per-image rotation,
  scale, shear and shift; :func:`elastic_displacement` builds smooth random
  displacement fields (Simard et al., 2003) from uniform noise;
* :class:`Augmentation` draws the per-image parameters from a
  :meth:`xpcnn.backends.backend.Backend.generator` and applies them: the warp first,
  then the flip and the crop.

Conventions
-----------
Coordinates are in pixels, ``x`` along the columns (to the right, axis -1),
``y`` along the rows (downwards, axis -2), origin at the image centre
``((W - 1) / 2, (H - 1) / 2)``; pixel ``[row, col]`` sits at
``(col - (W - 1) / 2, row - (H - 1) / 2)``.  This is the convention of
``torch.nn.functional.affine_grid`` / ``grid_sample`` with
``align_corners=True``, in pixels instead of [-1, 1].

A sampling matrix ``M = [[a, b, tx], [c, d, ty]]`` maps an *output* pixel to
the *input* point it reads (inverse mapping, as in ``scipy.ndimage`` and
``grid_sample``): ``out(x, y) = in(a*x + b*y + tx, c*x + d*y + ty)``.

Each of the four bilinear neighbours that falls outside the input reads
``fill`` (like ``grid_sample(padding_mode="zeros")`` on ``images - fill``,
plus ``fill``; ``scipy.ndimage``'s ``mode="grid-constant"``), so the border
fades smoothly into the background.

The forward transform of :func:`affine_matrices` is
``p_out = R(rotation) @ scale @ Shear(shear) @ p_in + shift``: shear first,
then scale, then rotation about the centre, then translation.  A positive
rotation turns the image counter-clockwise *as displayed* (row 0 at the
top), so 90 degrees equals ``np.rot90(image)``; a positive shift moves the
content right (x) and down (y); a positive shear moves the lower rows right
(``x_out = x_in + tan(shear) * y_in``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from array_api_compat import array_namespace, device

ELASTIC_SIGMA = (0.1, 100.0)  # pixels; outside, the Gaussian underflows, overflows or is meaningless on 28 pixels
MAX_ELASTIC = 1000.0  # pixels: a larger displacement moves every pixel off the image
MAX_SHIFT = 1000.0  # pixels: likewise


def affine_sample(images, matrices, fill: float = 0.0, displacement=None):
    """Warp each image of ``images`` (B, C, H, W) by its sampling matrix ``matrices[b]`` (2, 3).

    ``out[b, :, y, x]`` is ``images[b]`` bilinearly interpolated at
    ``matrices[b] @ (x, y, 1)`` (centred pixel coordinates, see the module
    docstring), plus ``displacement[b, :, y, x]`` (x then y, in pixels) when a
    displacement (B, 2, H, W) is given; neighbours outside the image read
    ``fill``.  ``matrices`` and ``displacement`` are cast to the images'
    dtype.  Returns a new array of the same shape, dtype and device.  Fully
    vectorised: one integer index array and four ``take`` gathers on the
    flattened batch.
    """
    xp = array_namespace(images, matrices)
    if images.ndim != 4:
        raise ValueError(f"affine_sample: expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    if matrices.ndim != 3 or tuple(matrices.shape[1:]) != (2, 3) or matrices.shape[0] not in (1, b):
        raise ValueError(f"affine_sample: expected matrices of shape ({b}, 2, 3), got {tuple(matrices.shape)}")
    dtype, dev = images.dtype, device(images)
    if h * w > 2**24:
        raise ValueError(f"affine_sample: images of {h}x{w} pixels are too large (at most 2**24 pixels)")
    if matrices.dtype != dtype:
        matrices = xp.astype(matrices, dtype)
    cx, cy = (w - 1) / 2, (h - 1) / 2

    # Sampling grid (B, H, W) in absolute input pixel coordinates.
    xs = xp.reshape(xp.arange(w, dtype=dtype, device=dev) - cx, (1, 1, w))
    ys = xp.reshape(xp.arange(h, dtype=dtype, device=dev) - cy, (1, h, 1))
    m = xp.reshape(matrices, (-1, 6, 1, 1))  # rows (a, b, tx, c, d, ty), each (B, 1, 1)
    src_x = m[:, 0, ...] * xs + m[:, 1, ...] * ys + (m[:, 2, ...] + cx)
    src_y = m[:, 3, ...] * xs + m[:, 4, ...] * ys + (m[:, 5, ...] + cy)
    if displacement is not None:
        if tuple(displacement.shape) != (b, 2, h, w):
            raise ValueError(
                f"affine_sample: expected a displacement of shape ({b}, 2, {h}, {w}), got {tuple(displacement.shape)}"
            )
        if displacement.dtype != dtype:
            displacement = xp.astype(displacement, dtype)
        src_x = src_x + displacement[:, 0, ...]
        src_y = src_y + displacement[:, 1, ...]

    def neighbours(src, size):
        """Lower neighbour (B, H, W, integral floats) and the tent weights of it and the next pixel along one axis.

        The lower index is clipped to [0, size - 2] so that both neighbours are real pixels; a
        neighbour's weight ``max(0, 1 - |src - index|)`` is then exactly bilinear inside the image
        and zero for the pixels that stand in for points outside it (their weight goes to ``fill``).
        """
        lo = xp.clip(xp.floor(src), 0.0, float(max(size - 2, 0)))
        frac = src - lo
        w_lo = xp.clip(1.0 - xp.abs(frac), min=0.0)
        w_hi = xp.clip(1.0 - xp.abs(frac - 1.0), min=0.0) if size > 1 else xp.zeros_like(w_lo)
        return lo, w_lo[:, None, ...], w_hi[:, None, ...]  # weights (B, 1, H, W)

    ix, wx0, wx1 = neighbours(src_x, w)
    iy, wy0, wy1 = neighbours(src_y, h)

    # Flat index of the top-left neighbour in the (B*C*H*W,) batch; the other three neighbours
    # are at +1, +W, +W+1, read as the same index into views of the batch starting there.
    offsets = xp.reshape(xp.arange(b * c, dtype=xp.int64, device=dev) * (h * w), (b, c, 1, 1))
    pixel = xp.astype(iy * w + ix, xp.int64)  # exact in float32 below 2**24 pixels per image
    index = xp.reshape(offsets + pixel[:, None, ...], (-1,))
    flat = xp.reshape(images, (-1,))
    dx, dy = min(1, w - 1), w * min(1, h - 1)  # a one-pixel axis has no second neighbour (zero weight)

    def gather(start):
        return xp.reshape(xp.take(flat[start:], index), (b, c, h, w))

    out = wy0 * (wx0 * gather(0) + wx1 * gather(dx)) + wy1 * (wx0 * gather(dy) + wx1 * gather(dy + dx))
    if fill != 0:
        # The weight of the neighbours that fell outside the image, times fill.
        out = out + float(fill) * (1.0 - (wy0 + wy1) * (wx0 + wx1))
    return out


def flip_and_crop(images, flips, tops, lefts, padding: int, fill: float = 0.0):
    """Mirror and crop each image of ``images`` (B, C, H, W) by its own choices, as torchvision's
    ``RandomHorizontalFlip`` then ``RandomCrop((H, W), padding)`` with those draws.

    Image ``b`` is mirrored left to right (its columns reversed) where ``flips[b]`` ((B,) booleans, or None
    for no flips), then padded with ``padding`` pixels of ``fill`` on every side and cropped back to H x W
    with its top-left corner at row ``tops[b]``, column ``lefts[b]`` of the padded image ((B,) integers in
    [0, 2 * padding]; ``padding - tops[b]`` is how far the content moves down).  With ``padding`` 0 it only
    mirrors (``tops`` and ``lefts`` are not read).  Vectorised: one integer index and one ``take`` on the
    flattened batch, pixels from outside the image then set to ``fill`` with one ``where``.
    """
    xp = array_namespace(images)
    if images.ndim != 4:
        raise ValueError(f"flip_and_crop: expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if not (isinstance(padding, int) and padding >= 0):
        raise ValueError(f"flip_and_crop: padding must be an int >= 0, got {padding!r}")
    b, c, h, w = images.shape
    if padding == 0:
        return images if flips is None else xp.where(xp.reshape(flips, (b, 1, 1, 1)), xp.flip(images, axis=-1), images)
    dev = device(images)
    rows = xp.reshape(xp.arange(h, dtype=xp.int64, device=dev), (1, h, 1)) + xp.reshape(tops - padding, (b, 1, 1))
    cols = xp.reshape(xp.arange(w, dtype=xp.int64, device=dev), (1, 1, w)) + xp.reshape(lefts - padding, (b, 1, 1))
    if flips is not None:  # column x of the mirrored image is column W - 1 - x of the image
        cols = xp.where(xp.reshape(flips, (b, 1, 1)), (w - 1) - cols, cols)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (B, H, W)
    pixel = xp.clip(rows, 0, h - 1) * w + xp.clip(cols, 0, w - 1)  # (B, H, W)
    offsets = xp.reshape(xp.arange(b * c, dtype=xp.int64, device=dev) * (h * w), (b, c, 1, 1))
    index = xp.reshape(offsets + pixel[:, None, ...], (-1,))
    out = xp.reshape(xp.take(xp.reshape(images, (-1,)), index), (b, c, h, w))
    return xp.where(inside[:, None, ...], out, float(fill))


def erase(images, tops, lefts, heights, widths, fill: float = 0.0):
    """Set one rectangle of each image of ``images`` (B, C, H, W) to ``fill``, in every channel.

    Image ``b``'s rectangle has its top-left corner at row ``tops[b]``, column ``lefts[b]`` and is
    ``heights[b]`` x ``widths[b]`` pixels ((B,) integers; a height or width of 0 erases nothing), as
    torchvision's ``F.erase``.  One ``where`` over a (B, H, W) mask built from the four.
    """
    xp = array_namespace(images)
    if images.ndim != 4:
        raise ValueError(f"erase: expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    dev = device(images)
    rows = xp.reshape(xp.arange(h, dtype=xp.int64, device=dev), (1, h, 1))
    cols = xp.reshape(xp.arange(w, dtype=xp.int64, device=dev), (1, 1, w))

    def span(start, length, index):
        start = xp.reshape(start, (b, 1, 1))
        return (index >= start) & (index < start + xp.reshape(length, (b, 1, 1)))

    inside = span(tops, heights, rows) & span(lefts, widths, cols)  # (B, H, W)
    return xp.where(inside[:, None, ...], float(fill), images)


def affine_matrices(rotation, scale, shear, shift_x, shift_y):
    """Sampling matrices (B, 2, 3) of per-image forward transforms, each argument a (B,) array.

    ``rotation`` and ``shear`` in degrees, ``scale`` a factor (1 = unchanged),
    shifts in pixels; see the module docstring for directions.  The result
    inverts ``p_out = R @ scale @ Shear @ p_in + shift`` in closed form, in the
    arguments' dtype and on their device.
    """
    xp = array_namespace(rotation, scale, shear, shift_x, shift_y)
    theta = rotation * (math.pi / 180)
    cos, sin = xp.cos(theta), xp.sin(theta)
    k = xp.tan(shear * (math.pi / 180))
    inv_scale = 1.0 / scale
    # Inverse linear part: Shear^-1 @ R^-1 / scale, with R = [[cos, sin], [-sin, cos]] (y down).
    a = (cos - k * sin) * inv_scale
    b = (-sin - k * cos) * inv_scale
    c = sin * inv_scale
    d = cos * inv_scale
    tx = -(a * shift_x + b * shift_y)
    ty = -(c * shift_x + d * shift_y)
    return xp.stack([xp.stack([a, b, tx], axis=-1), xp.stack([c, d, ty], axis=-1)], axis=-2)


def elastic_displacement(noise, alpha: float, sigma: float):
    """Smooth random displacement fields (B, 2, H, W), in pixels, from ``noise`` (B, 2, H, W).

    Each field ``noise[b, k]`` (uniform in [-1, 1) for the elastic distortions
    of Simard et al., 2003) is convolved with a Gaussian of standard deviation
    ``sigma`` pixels along both axes, with zeros outside the image, and scaled
    by ``alpha``.  The convolution is two matrix products with the (symmetric)
    Gaussian matrices ``G[i, j] = exp(-(i - j)^2 / (2 sigma^2)) / Z``:
    ``alpha * G_H @ noise @ G_W``, where ``Z`` makes the kernel's weights over its offsets -(n-1)..n-1 sum to 1
    (as ``scipy.ndimage.gaussian_filter``'s do): a narrow Gaussian averages the noise, never amplifies it.
    """
    xp = array_namespace(noise)
    if noise.ndim != 4 or noise.shape[1] != 2:
        raise ValueError(f"elastic_displacement: expected noise of shape (B, 2, H, W), got {tuple(noise.shape)}")
    if not sigma > 0:
        raise ValueError(f"elastic_displacement: sigma must be > 0, got {sigma!r}")
    h, w = noise.shape[2:]

    def gaussian_matrix(size):
        index = xp.arange(size, dtype=noise.dtype, device=device(noise))
        distance = index[:, None] - index[None, :]
        offsets = xp.arange(-(size - 1), size, dtype=noise.dtype, device=device(noise))
        total = xp.sum(xp.exp(offsets * offsets * (-0.5 / sigma**2)))  # sqrt(2 pi) sigma, for sigma over ~1 px
        return xp.exp(distance * distance * (-0.5 / sigma**2)) / total

    return float(alpha) * xp.matmul(xp.matmul(gaussian_matrix(h), noise), gaussian_matrix(w))


@dataclass(frozen=True)
class Augmentation:
    """Random per-image affine transform, drawn uniformly in the given ranges; flips and crops.

    ``max_shift`` pixels (each of x and y uniform in [-max_shift, max_shift]),
    ``max_rotation`` degrees, ``max_scale`` relative (scale uniform in
    [1 - max_scale, 1 + max_scale]), ``max_shear`` degrees; with
    ``elastic_alpha`` > 0, each image is also distorted by an
    :func:`elastic_displacement` of scale ``elastic_alpha`` pixels and
    smoothness ``elastic_sigma`` pixels.  After that warp, with ``flip`` each
    image is mirrored left to right with probability 1/2, and with ``crop`` > 0
    padded by ``crop`` pixels of background and cropped back at a uniformly
    drawn offset (torchvision's ``RandomHorizontalFlip()`` and
    ``RandomCrop(size, padding=crop)``; see :func:`flip_and_crop`).  Last, with
    ``erase`` > 0, each image has one rectangle set to the background with
    probability ``erase`` (torchvision's ``RandomErasing(p=erase)``, its
    default area of 2-33% of the image and aspect ratio 0.3-3.3; see
    :meth:`erase_boxes` and :func:`erase`).  Call it on
    a batch with a generator from :meth:`xpcnn.backends.backend.Backend.generator`::

        augment = Augmentation(max_shift=2, max_rotation=10, max_scale=0.1)
        images = augment(images, backend.generator(seed, epoch, step), fill=background)

    With all ranges zero, no flip, no crop and no erasing it returns its input unchanged
    (the same object) and draws nothing from the generator.
    """

    max_shift: float = 2.0
    max_rotation: float = 10.0
    max_scale: float = 0.1
    max_shear: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    flip: bool = False
    crop: int = 0
    erase: float = 0.0

    LIMITS = {  # past these the draws overflow float32, or wipe the image: a setting's largest meaningful value
        "max_shift": MAX_SHIFT,
        "max_rotation": 360.0,
        "elastic_alpha": MAX_ELASTIC,
    }
    ERASE_AREA = (0.02, 0.33)  # of the image, as torchvision's RandomErasing's scale
    ERASE_RATIO = (0.3, 3.3)  # height / width, drawn uniformly in its logarithm

    def __post_init__(self):
        for name in ("max_shift", "max_rotation", "max_scale", "max_shear", "elastic_alpha", "elastic_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Augmentation: {name} must be a finite number >= 0, got {value!r}")
        for name, limit in self.LIMITS.items():
            if getattr(self, name) > limit:
                raise ValueError(f"Augmentation: {name} must be at most {limit:g}, got {getattr(self, name)!r}")
        low, high = ELASTIC_SIGMA
        if not low <= self.elastic_sigma <= high:
            raise ValueError(f"Augmentation: elastic_sigma must be in [{low:g}, {high:g}], got {self.elastic_sigma!r}")
        if self.max_scale >= 1:
            raise ValueError(f"Augmentation: max_scale must be < 1, got {self.max_scale!r}")
        if self.max_shear >= 90:
            raise ValueError(f"Augmentation: max_shear must be < 90 degrees, got {self.max_shear!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"Augmentation: flip must be True or False, got {self.flip!r}")
        if not (isinstance(self.crop, int) and not isinstance(self.crop, bool) and self.crop >= 0):
            raise ValueError(f"Augmentation: crop must be an int >= 0 (pixels of padding), got {self.crop!r}")
        if not (isinstance(self.erase, int | float) and not isinstance(self.erase, bool) and 0 <= self.erase <= 1):
            raise ValueError(f"Augmentation: erase must be a probability in [0, 1], got {self.erase!r}")

    @property
    def warps(self) -> bool:
        """Whether it warps the images (an affine transform or an elastic distortion)."""
        return bool(self.max_shift or self.max_rotation or self.max_scale or self.max_shear or self.elastic_alpha)

    @property
    def is_identity(self) -> bool:
        return not (self.warps or self.flip or self.crop or self.erase)

    def matrices(self, n: int, generator, dtype):
        """Draw ``n`` sampling matrices (n, 2, 3): one ``generator.random((n, 5), dtype)`` call."""
        u = 2.0 * generator.random((n, 5), dtype) - 1.0  # uniform in [-1, 1)
        return affine_matrices(
            rotation=u[:, 0] * float(self.max_rotation),
            scale=1.0 + u[:, 1] * float(self.max_scale),
            shear=u[:, 2] * float(self.max_shear),
            shift_x=u[:, 3] * float(self.max_shift),
            shift_y=u[:, 4] * float(self.max_shift),
        )

    def flips_and_crops(self, n: int, generator, dtype):
        """Draw ``n`` images' (flips (n,) bool or None, tops (n,), lefts (n,) int64) for :func:`flip_and_crop`:
        one ``generator.random((n, 3), dtype)`` call; each choice uniform (a flip with probability 1/2,
        each offset in [0, 2 * crop])."""
        u = generator.random((n, 3), dtype)
        xp = array_namespace(u)
        flips = u[:, 0] < 0.5 if self.flip else None
        positions = 2 * self.crop + 1
        offsets = xp.clip(xp.astype(xp.floor(u[:, 1:] * float(positions)), xp.int64), 0, positions - 1)
        return flips, offsets[:, 0], offsets[:, 1]

    def erase_boxes(self, size: tuple[int, int], n: int, generator, dtype):
        """Draw ``n`` rectangles on an image of ``size`` (H, W) for :func:`erase`: (tops, lefts, heights,
        widths), each (n,) int64; one ``generator.random((n, 5), dtype)`` call.

        Image ``b`` is erased with probability ``erase`` (else its height is 0).  Its rectangle covers a
        fraction of the image uniform in ``ERASE_AREA``, at an aspect ratio (height / width) log-uniform
        in ``ERASE_RATIO``, each side rounded and clipped to the image (torchvision draws again instead,
        up to 10 times), at a uniformly drawn position inside the image.
        """
        h, w = size
        u = generator.random((n, 5), dtype)
        xp = array_namespace(u)
        (low, high), (narrow, wide) = self.ERASE_AREA, self.ERASE_RATIO
        area = (low + u[:, 1] * (high - low)) * float(h * w)
        ratio = xp.exp(math.log(narrow) + u[:, 2] * (math.log(wide) - math.log(narrow)))

        def side(length, limit):
            return xp.clip(xp.astype(xp.round(length), xp.int64), 1, limit)

        heights, widths = side(xp.sqrt(area * ratio), h), side(xp.sqrt(area / ratio), w)

        def position(v, free):  # uniform over the free + 1 positions
            return xp.clip(xp.astype(xp.floor(v * xp.astype(free + 1, dtype)), xp.int64), 0, free)

        tops, lefts = position(u[:, 3], h - heights), position(u[:, 4], w - widths)
        return tops, lefts, xp.where(u[:, 0] < float(self.erase), heights, 0), widths

    def __call__(self, images, generator, fill: float = 0.0):
        """Augment ``images`` (B, C, H, W), each image with its own random transform.

        Draws the matrices first (when it warps), then (only when ``elastic_alpha`` > 0) the
        elastic noise with one ``generator.random((B, 2, H, W), dtype)`` call, then (with ``flip``
        or ``crop``) the flips and crop offsets (:meth:`flips_and_crops`), then (with ``erase``) the
        rectangles to erase (:meth:`erase_boxes`).
        """
        if self.is_identity:
            return images
        if self.warps:
            matrices = self.matrices(images.shape[0], generator, images.dtype)
            displacement = None
            if self.elastic_alpha:
                noise = 2.0 * generator.random((images.shape[0], 2, *images.shape[-2:]), images.dtype) - 1.0
                displacement = elastic_displacement(noise, self.elastic_alpha, self.elastic_sigma)
            images = affine_sample(images, matrices, fill, displacement)
        if self.flip or self.crop:
            flips, tops, lefts = self.flips_and_crops(images.shape[0], generator, images.dtype)
            images = flip_and_crop(images, flips, tops, lefts, self.crop, fill)
        if self.erase:
            boxes = self.erase_boxes(tuple(images.shape[-2:]), images.shape[0], generator, images.dtype)
            images = erase(images, *boxes, fill)
        return images
