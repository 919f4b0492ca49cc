"""Random affine and elastic augmentation, flips and crops, erasing: exact special cases, independent oracles, seeding
and statistics."""

import numpy as np
import pytest

from xpcnn.backends.backend import get_backend, to_host
from xpcnn.data.augment import (
    Augmentation,
    affine_matrices,
    affine_sample,
    elastic_displacement,
    erase,
    flip_and_crop,
)

FLOATS = ["float32", "float64"]


def to_backend(backend, array, dtype="float64"):
    return backend.asarray(np.asarray(array), getattr(backend.xp, dtype))


def matrices_for(backend, dtype="float64", rotation=0.0, scale=1.0, shear=0.0, shift_x=0.0, shift_y=0.0, n=1):
    """Sampling matrices (n, 2, 3) of one forward transform repeated n times, built on ``backend``."""
    args = [
        to_backend(backend, np.full(n, value, np.float64), dtype)
        for value in (rotation, scale, shear, shift_x, shift_y)
    ]
    return affine_matrices(*args)


def random_images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def dtype_name(array) -> str:
    return str(array.dtype).rsplit(".", 1)[-1]


# --- identity, shapes, dtypes, devices ---


@pytest.mark.parametrize("dtype", FLOATS)
def test_zero_ranges_return_the_input_unchanged(backend, dtype):
    images = to_backend(backend, random_images((3, 1, 6, 5)), dtype)
    out = Augmentation(max_shift=0, max_rotation=0, max_scale=0, max_shear=0)(images, backend.generator(0), fill=-0.4)
    assert out is images
    assert Augmentation(0, 0, 0, 0).is_identity and not Augmentation().is_identity


@pytest.mark.parametrize("dtype", FLOATS)
def test_identity_matrix_samples_every_pixel_exactly(backend, dtype):
    host = random_images((2, 3, 5, 7))
    out = affine_sample(to_backend(backend, host, dtype), matrices_for(backend, dtype, n=2), fill=-0.42)
    np.testing.assert_array_equal(to_host(out), host.astype(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_shape_dtype_and_device_are_preserved(backend, dtype):
    images = to_backend(backend, random_images((4, 2, 9, 8)), dtype)
    out = Augmentation(max_shift=2, max_rotation=20, max_scale=0.2, max_shear=10)(images, backend.generator(1), -0.42)
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert out.device == images.device
    assert np.all(np.isfinite(to_host(out)))


def test_float64_matrices_are_cast_to_float32_images(backend):
    images = to_backend(backend, random_images((2, 1, 5, 5)), "float32")
    out = affine_sample(images, matrices_for(backend, "float64", rotation=30, n=2), fill=0.5)
    assert out.dtype == backend.xp.float32


def test_bad_shapes_and_ranges_raise_value_error():
    with pytest.raises(ValueError, match=r"images of shape \(B, C, H, W\)"):
        affine_sample(np.zeros((2, 5, 5)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"matrices of shape \(2, 2, 3\)"):
        affine_sample(np.zeros((2, 1, 5, 5)), np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match=r"displacement of shape \(2, 2, 5, 5\)"):
        affine_sample(np.zeros((2, 1, 5, 5)), np.zeros((2, 2, 3)), displacement=np.zeros((2, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"noise of shape \(B, 2, H, W\)"):
        elastic_displacement(np.zeros((2, 3, 5, 5)), 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        elastic_displacement(np.zeros((2, 2, 5, 5)), 1.0, 0.0)
    bad = (
        {"max_shift": -1},
        {"max_rotation": float("nan")},
        {"max_scale": 1.0},
        {"max_shear": 90},
        {"elastic_alpha": -1.0},
        {"elastic_alpha": float("inf")},
        {"elastic_sigma": 0.0},
        {"max_shift": 1e39},  # past float32: NaN sampling points became index -2**63
        {"max_rotation": 1e39},
        {"elastic_alpha": 1e300},
        {"elastic_sigma": 1e-20},
        {"elastic_sigma": 1e300},
    )
    for kwargs in bad:
        with pytest.raises(ValueError, match="Augmentation"):
            Augmentation(**kwargs)


# --- seeding ---


def test_same_seed_same_output_other_seed_other_output(backend):
    images = to_backend(backend, random_images((4, 1, 10, 10)), "float32")
    augment = Augmentation(max_shift=2, max_rotation=10, max_scale=0.1, max_shear=5)
    first = to_host(augment(images, backend.generator(7, 0, 3), fill=-0.42))
    again = to_host(augment(images, backend.generator(7, 0, 3), fill=-0.42))
    other = to_host(augment(images, backend.generator(7, 0, 4), fill=-0.42))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    # Each image gets its own transform: identical inputs give different outputs.
    same = to_backend(backend, np.repeat(random_images((1, 1, 10, 10)), 4, axis=0), "float32")
    out = to_host(augment(same, backend.generator(0), fill=0.0))
    assert not np.allclose(out[0], out[1])


# --- exact special cases ---


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shift_x, shift_y", [(2, -1), (-3, 0), (0, 4), (1, 1)])
def test_integer_shift_moves_content_exactly_with_fill_entering_from_the_edge(backend, dtype, shift_x, shift_y):
    host = random_images((2, 2, 6, 7))
    fill = -0.42
    m = matrices_for(backend, dtype, shift_x=shift_x, shift_y=shift_y, n=2)
    out = to_host(affine_sample(to_backend(backend, host, dtype), m, fill=fill))
    # Positive x moves content right, positive y moves it down: out[r, c] = in[r - shift_y, c - shift_x].
    expected = np.full(host.shape, fill, dtype=dtype)
    h, w = host.shape[2:]
    src_rows = slice(max(0, -shift_y), h - max(0, shift_y))
    src_cols = slice(max(0, -shift_x), w - max(0, shift_x))
    dst_rows = slice(max(0, shift_y), h - max(0, -shift_y))
    dst_cols = slice(max(0, shift_x), w - max(0, -shift_x))
    expected[:, :, dst_rows, dst_cols] = host.astype(dtype)[:, :, src_rows, src_cols]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("size", [4, 5])
def test_rotation_by_90_degrees_is_np_rot90(backend, size):
    """Positive angles turn the image counter-clockwise as displayed (row 0 on top), like np.rot90."""
    host = random_images((2, 1, size, size))
    images = to_backend(backend, host)
    for angle, k in ((90, 1), (-90, -1), (180, 2)):
        out = to_host(affine_sample(images, matrices_for(backend, rotation=angle, n=2), fill=3.0))
        np.testing.assert_allclose(out, np.rot90(host, k=k, axes=(2, 3)), rtol=0, atol=1e-9)


def test_half_pixel_shift_averages_the_two_neighbours(backend):
    host = random_images((2, 1, 4, 5))
    fill = -0.42
    images = to_backend(backend, host)
    # Sampling matrix with tx = +0.5: out[..., c] reads in[..., c + 0.5].
    m = to_backend(backend, np.tile(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]), (2, 1, 1)))
    out = to_host(affine_sample(images, m, fill=fill))
    right = np.concatenate([host[..., 1:], np.full(host.shape[:-1] + (1,), fill)], axis=-1)
    np.testing.assert_allclose(out, (host + right) / 2, rtol=0, atol=1e-12)
    # Same along y (ty = -0.5: out[r] reads in[r - 0.5], the fill enters at the top).
    m = to_backend(backend, np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -0.5]]), (2, 1, 1)))
    out = to_host(affine_sample(images, m, fill=fill))
    up = np.concatenate([np.full(host.shape[:2] + (1, host.shape[3]), fill), host[:, :, :-1]], axis=2)
    np.testing.assert_allclose(out, (host + up) / 2, rtol=0, atol=1e-12)


def test_shear_and_scale_directions(backend):
    """A positive shear moves lower rows right; a scale of 2 doubles distances from the centre."""
    host = np.zeros((1, 1, 5, 5))
    host[0, 0, 3, 2] = 1.0  # one row below the centre (2, 2)
    images = to_backend(backend, host)
    out = to_host(affine_sample(images, matrices_for(backend, shear=45.0), fill=0.0))
    assert out[0, 0, 3, 3] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)
    out = to_host(affine_sample(images, matrices_for(backend, scale=2.0), fill=0.0))
    assert out[0, 0, 4, 2] == pytest.approx(1.0)  # moved from 1 to 2 rows below the centre


# --- oracle: torch's affine_grid + grid_sample ---


def torch_affine_sample(host_images, host_matrices, fill, host_displacement=None):
    """The same warp with torch: centred pixel coordinates -> [-1, 1] with align_corners=True.

    Neighbours outside the image read ``fill``: grid_sample's zero padding on ``images - fill``, plus ``fill``.
    A displacement (B, 2, H, W) in pixels is added to affine_grid's grid in [-1, 1] units.
    """
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    b, c, h, w = host_images.shape
    half = np.array([(w - 1) / 2, (h - 1) / 2])
    linear = host_matrices[:, :, :2] * half[None, None, :] / half[None, :, None]  # D^-1 L D
    theta = np.concatenate([linear, host_matrices[:, :, 2:] / half[None, :, None]], axis=2)
    grid = f.affine_grid(torch.from_numpy(theta), [b, c, h, w], align_corners=True)
    if host_displacement is not None:
        grid = grid + torch.from_numpy(np.moveaxis(host_displacement, 1, -1) / half)
    shifted = torch.from_numpy(host_images - fill)
    out = f.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.numpy() + fill


@pytest.mark.parametrize("fill", [0.0, -0.42])
def test_matches_torch_grid_sample_in_float64(fill):
    host = random_images((6, 2, 9, 11), seed=3)
    augment = Augmentation(max_shift=4, max_rotation=60, max_scale=0.4, max_shear=30)
    numpy_backend = get_backend("numpy")
    m = to_host(augment.matrices(6, numpy_backend.generator(5), np.float64))
    out = affine_sample(host, m, fill=fill)
    expected = torch_affine_sample(host, m, fill)
    assert np.any(out == fill)  # some samples fell fully outside and took the fill value
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_backend_matches_torch(backend, dtype):
    host = random_images((3, 1, 8, 7), seed=4)
    augment = Augmentation(max_shift=3, max_rotation=45, max_scale=0.3, max_shear=20)
    m = augment.matrices(3, backend.generator(2), backend.xp.float64)
    out = to_host(affine_sample(to_backend(backend, host, dtype), m, fill=-0.42))
    assert dtype_name(out) == dtype
    expected = torch_affine_sample(host, to_host(m), -0.42)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 if dtype == "float32" else 1e-10)


# --- statistics ---


def test_drawn_transforms_stay_within_the_ranges(backend):
    """The centre of mass of a centred blob moves by at most max_shift per axis; the ranges are used."""
    n, size, max_shift = 256, 21, 2.0
    coords = np.arange(size) - (size - 1) / 2
    blob = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 1.5**2))
    images = to_backend(backend, np.broadcast_to(blob, (n, 1, size, size)), "float32")
    augment = Augmentation(max_shift=max_shift, max_rotation=15, max_scale=0.1, max_shear=5)
    out = to_host(augment(images, backend.generator(11), fill=0.0)).astype(np.float64)[:, 0]
    mass = out.sum(axis=(1, 2))
    com_x = (out * coords[None, None, :]).sum(axis=(1, 2)) / mass
    com_y = (out * coords[None, :, None]).sum(axis=(1, 2)) / mass
    for com in (com_x, com_y):
        assert np.max(np.abs(com)) <= max_shift + 0.05
        assert com.max() > 0.8 * max_shift and com.min() < -0.8 * max_shift
        assert abs(com.mean()) < 0.25
    # Scale in [0.9, 1.1] changes the blob's mass (area) by a factor in [0.81, 1.21].
    ratio = mass / blob.sum()
    assert ratio.min() > 0.8 - 0.02 and ratio.max() < 1.21 + 0.02
    assert ratio.min() < 0.86 and ratio.max() > 1.15


def test_drawn_parameters_are_uniform_in_the_ranges():
    """Recover rotation and scale from drawn matrices (shear 0): uniform over the whole range."""
    numpy_backend = get_backend("numpy")
    augment = Augmentation(max_shift=1.5, max_rotation=10, max_scale=0.2, max_shear=0)
    m = augment.matrices(2000, numpy_backend.generator(0), np.float64)
    linear = m[:, :, :2]
    scale = 1 / np.sqrt(np.linalg.det(linear))
    angle = np.degrees(np.arctan2(linear[:, 1, 0], linear[:, 0, 0]))
    shift = -np.einsum("bij,bj->bi", np.linalg.inv(linear), m[:, :, 2])
    for values, low, high in ((angle, -10, 10), (scale, 0.8, 1.2), (shift[:, 0], -1.5, 1.5), (shift[:, 1], -1.5, 1.5)):
        assert values.min() >= low - 1e-9 and values.max() <= high + 1e-9
        span = high - low
        assert values.min() < low + 0.02 * span and values.max() > high - 0.02 * span
        assert abs(values.mean() - (low + high) / 2) < 0.05 * span


# --- edge cases and other namespaces ---


@pytest.mark.parametrize("shape", [(2, 1, 1, 5), (2, 1, 5, 1), (2, 1, 1, 1)])
def test_one_pixel_axes(backend, shape):
    host = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1
    images = to_backend(backend, host)
    np.testing.assert_array_equal(to_host(affine_sample(images, matrices_for(backend, n=2), fill=-1.0)), host)
    # Half a pixel right and down: the mean of the 2x2 block below-right, fill beyond the edges.
    m = to_backend(backend, np.tile(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]), (2, 1, 1)))
    out = to_host(affine_sample(images, m, fill=-1.0))
    padded = np.pad(host, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-1.0)
    expected = (padded[:, :, :-1, :-1] + padded[:, :, :-1, 1:] + padded[:, :, 1:, :-1] + padded[:, :, 1:, 1:]) / 4
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_runs_on_torch_tensors():
    torch = pytest.importorskip("torch")
    host = random_images((3, 2, 6, 7))
    m = Augmentation(2, 30, 0.2, 10).matrices(3, get_backend("numpy").generator(0), np.float64)
    expected = affine_sample(host, m, fill=-0.42)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        out = affine_sample(torch.from_numpy(host).to(dtype), torch.from_numpy(m), fill=-0.42)
        assert out.dtype == dtype and tuple(out.shape) == host.shape
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=atol)


# --- elastic distortion ---


def numpy_gaussian_smoothing(noise, sigma):
    """Oracle: np.convolve with the sampled, untruncated Gaussian (its weights summing to 1) along each image axis,
    zeros outside."""

    def along(axis, array):
        n = array.shape[axis]
        t = np.arange(-(n - 1), n)
        kernel = np.exp(-(t**2) / (2 * sigma**2))
        kernel /= kernel.sum()
        return np.apply_along_axis(lambda v: np.convolve(v, kernel)[n - 1 : 2 * n - 1], axis, array)

    return along(-1, along(-2, noise))


@pytest.mark.parametrize("dtype", FLOATS)
def test_elastic_displacement_is_a_scaled_gaussian_convolution(backend, dtype):
    noise = np.random.default_rng(5).uniform(-1, 1, size=(3, 2, 9, 7))
    out = to_host(elastic_displacement(to_backend(backend, noise, dtype), 34.0, 2.5))
    assert dtype_name(out) == dtype and out.shape == noise.shape
    expected = 34.0 * numpy_gaussian_smoothing(noise, 2.5)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0, 4.0])
def test_elastic_smoothing_is_scipys_gaussian_filter_and_never_amplifies(sigma):
    """The kernel was scaled as the continuous Gaussian's density: at sigma 0.1 it multiplied the noise by 16."""
    ndimage = pytest.importorskip("scipy.ndimage")
    noise = np.random.default_rng(0).uniform(-1, 1, (1, 2, 28, 28))
    out = elastic_displacement(noise, 1.0, sigma)
    for k in range(2):
        expected = ndimage.gaussian_filter(noise[0, k], sigma, mode="constant", cval=0.0, truncate=28 / sigma)
        np.testing.assert_allclose(out[0, k], expected, atol=1e-12)
    assert np.abs(out).max() <= 1.0


def test_elastic_displacement_is_in_pixels():
    """The kernel integrates to one: a constant field of ones becomes alpha away from the border."""
    out = elastic_displacement(np.ones((1, 2, 40, 40)), 3.0, 2.0)
    np.testing.assert_allclose(out[:, :, 18:22, 18:22], 3.0, rtol=1e-9)
    assert out[0, 0, 0, 0] < 3.0 * 0.6  # zeros outside the image: half the kernel's mass is missing per axis


@pytest.mark.parametrize("dtype", FLOATS)
def test_constant_displacement_is_a_shift(backend, dtype):
    """Displacing every sampling point by (+2, -1) pixels reads in[r - 1, c + 2]: a shift by (-2, +1)."""
    host = random_images((2, 2, 6, 7))
    images = to_backend(backend, host, dtype)
    displacement = np.zeros((2, 2, 6, 7))
    displacement[:, 0], displacement[:, 1] = 2.0, -1.0
    out = affine_sample(images, matrices_for(backend, dtype, n=2), -0.42, to_backend(backend, displacement, dtype))
    shifted = affine_sample(images, matrices_for(backend, dtype, shift_x=-2, shift_y=1, n=2), fill=-0.42)
    np.testing.assert_array_equal(to_host(out), to_host(shifted))


@pytest.mark.parametrize("dtype", FLOATS)
def test_affine_plus_elastic_matches_torch_grid_sample(backend, dtype):
    host = random_images((4, 2, 12, 10), seed=6)
    augment = Augmentation(max_shift=2, max_rotation=20, max_scale=0.2, max_shear=10, elastic_alpha=20, elastic_sigma=3)
    m = to_host(augment.matrices(4, get_backend("numpy").generator(1), np.float64))
    noise = np.random.default_rng(2).uniform(-1, 1, size=(4, 2, 12, 10))
    displacement = to_host(elastic_displacement(noise, 20.0, 3.0))
    assert np.abs(displacement).max() > 1.0  # strong enough to move whole pixels
    args = (to_backend(backend, m, dtype), -0.42, to_backend(backend, displacement, dtype))
    out = to_host(affine_sample(to_backend(backend, host, dtype), *args))
    expected = torch_affine_sample(host, m, -0.42, displacement)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 if dtype == "float32" else 1e-10)


def test_elastic_draws_after_the_matrices_and_is_seeded(backend):
    images = to_backend(backend, random_images((3, 1, 10, 10)), "float32")
    elastic = Augmentation(elastic_alpha=30, elastic_sigma=3)
    assert not elastic.is_identity and not Augmentation(0, 0, 0, 0, elastic_alpha=1).is_identity
    first = to_host(elastic(images, backend.generator(4, 1), fill=-0.42))
    np.testing.assert_array_equal(first, to_host(elastic(images, backend.generator(4, 1), fill=-0.42)))
    assert not np.allclose(first, to_host(elastic(images, backend.generator(4, 2), fill=-0.42)))
    # The affine part is unchanged by the elastic option: same matrices from the same generator state.
    generator = backend.generator(4, 1)
    m = elastic.matrices(3, generator, backend.xp.float32)
    noise = 2.0 * generator.random((3, 2, 10, 10), backend.xp.float32) - 1.0
    expected = affine_sample(images, m, -0.42, elastic_displacement(noise, 30, 3))
    np.testing.assert_array_equal(first, to_host(expected))
    plain = to_host(Augmentation()(images, backend.generator(4, 1), fill=-0.42))
    np.testing.assert_array_equal(plain, to_host(affine_sample(images, m, fill=-0.42)))
    assert not np.allclose(first, plain)


def test_elastic_displacement_has_the_expected_spread():
    """Away from the border, smoothing uniform noise (variance 1/3) with a unit-mass Gaussian of
    standard deviation sigma leaves variance (1/3) / (4 pi sigma^2): alpha 34, sigma 4 move a pixel
    by 1.38 pixels (standard deviation) per axis, with zero mean."""
    alpha, sigma = 34.0, 4.0
    noise = np.random.default_rng(0).uniform(-1, 1, size=(4000, 2, 40, 40))
    centre = elastic_displacement(noise, alpha, sigma)[:, :, 20, 20]
    expected = alpha / np.sqrt(12 * np.pi) / sigma
    assert expected == pytest.approx(1.384, abs=1e-3)
    np.testing.assert_allclose(centre.std(axis=0), expected, rtol=0.05)
    assert np.abs(centre.mean(axis=0)).max() < 0.1


# --- horizontal flips and random crops ---


def padded_crop(host, flips, tops, lefts, padding, fill):
    """Oracle, torchvision's way: mirror (np.flip), pad with ``fill`` (np.pad), slice each image's H x W window."""
    h, w = host.shape[2:]
    out = np.empty_like(host)
    for b in range(host.shape[0]):
        image = host[b, :, :, ::-1] if flips[b] else host[b]
        padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)), constant_values=fill)
        out[b] = padded[:, tops[b] : tops[b] + h, lefts[b] : lefts[b] + w]
    return out


def int_array(backend, values):
    return backend.asarray(np.asarray(values, np.int64))


def bool_array(backend, values):
    return backend.asarray(np.asarray(values, bool))


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_flip_reverses_the_columns_of_the_flipped_images_only(backend, dtype):
    host = np.array([[[[1, 2, 3], [4, 5, 6]]], [[[7, 8, 9], [10, 11, 12]]]], np.float64)  # (2, 1, 2, 3)
    out = flip_and_crop(to_backend(backend, host, dtype), bool_array(backend, [True, False]), None, None, 0)
    assert out.dtype == getattr(backend.xp, dtype)
    np.testing.assert_array_equal(to_host(out), [[[[3, 2, 1], [6, 5, 4]]], [[[7, 8, 9], [10, 11, 12]]]])


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_crop_shifts_the_image_and_the_background_fills_in(backend, dtype):
    """Padding 1, crop at (top, left) of the padded image: (1, 1) is the image itself, (0, 2) moves it down and
    left by a pixel, (2, 0) up and right; fill enters from the edges."""
    host = np.arange(1, 13, dtype=np.float64).reshape(1, 1, 3, 4).repeat(3, axis=0)
    fill = -0.5
    out = to_host(
        flip_and_crop(
            to_backend(backend, host, dtype),
            None,
            int_array(backend, [1, 0, 2]),
            int_array(backend, [1, 2, 0]),
            1,
            fill,
        )
    )
    f = fill
    expected = [
        [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
        [[f, f, f, f], [2, 3, 4, f], [6, 7, 8, f]],
        [[f, 5, 6, 7], [f, 9, 10, 11], [f, f, f, f]],
    ]
    np.testing.assert_array_equal(out[:, 0], np.array(expected, dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_flips_and_crops_match_padding_and_slicing(backend, dtype):
    """Every offset of padding 2, flipped or not, several channels, against the torchvision-style oracle."""
    positions = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)]
    host = random_images((len(positions), 2, 5, 6))
    tops, lefts, flips = (np.array(values) for values in zip(*positions, strict=True))
    out = flip_and_crop(
        to_backend(backend, host, dtype),
        bool_array(backend, flips),
        int_array(backend, tops),
        int_array(backend, lefts),
        2,
        fill=0.25,
    )
    np.testing.assert_array_equal(to_host(out), padded_crop(host.astype(dtype), flips, tops, lefts, 2, 0.25))


class FixedDraws:
    """A generator adapter whose ``random`` returns the given uniforms (and records the shapes asked for)."""

    def __init__(self, backend, *draws):
        self.backend, self.draws, self.shapes = backend, list(draws), []

    def random(self, shape, dtype):
        self.shapes.append(shape)
        return self.backend.asarray(np.asarray(self.draws.pop(0), np.float64), dtype)


def test_the_draws_are_one_uniform_call_mapped_to_fair_choices(backend):
    """u < 1/2 flips; offset k of the 2p + 1 is floor(u * (2p + 1)); u just below 1 is the last, never past it."""
    u = [[0.0, 0.0, 0.1999], [0.4999, 0.2, 0.9999999], [0.5, 0.5, 0.7999], [0.9999999, 0.8, 0.6]]
    generator = FixedDraws(backend, u)
    flips, tops, lefts = Augmentation(0, 0, 0, 0, flip=True, crop=2).flips_and_crops(4, generator, backend.xp.float32)
    assert generator.shapes == [(4, 3)]
    assert to_host(flips).tolist() == [True, True, False, False]
    assert to_host(tops).tolist() == [0, 1, 2, 4] and to_host(lefts).tolist() == [0, 4, 3, 3]
    flips, tops, _ = Augmentation(0, 0, 0, 0, crop=1).flips_and_crops(4, FixedDraws(backend, u), backend.xp.float64)
    assert flips is None and to_host(tops).tolist() == [0, 0, 1, 2]


def test_augmentation_flips_and_crops_after_the_warp_from_the_same_generator(backend):
    """The warp draws first (matrices, then elastic noise), then one (B, 3) call for the flips and crops."""
    images = to_backend(backend, random_images((5, 1, 8, 8)), "float32")
    augment = Augmentation(max_shift=1, max_rotation=10, elastic_alpha=5, flip=True, crop=3)
    out = to_host(augment(images, backend.generator(2, 1), fill=-0.42))
    generator = backend.generator(2, 1)
    m = augment.matrices(5, generator, backend.xp.float32)
    noise = 2.0 * generator.random((5, 2, 8, 8), backend.xp.float32) - 1.0
    warped = affine_sample(images, m, -0.42, elastic_displacement(noise, 5, 4.0))
    flips, tops, lefts = augment.flips_and_crops(5, generator, backend.xp.float32)
    np.testing.assert_array_equal(out, to_host(flip_and_crop(warped, flips, tops, lefts, 3, -0.42)))
    expected = padded_crop(to_host(warped), to_host(flips), to_host(tops), to_host(lefts), 3, np.float32(-0.42))
    np.testing.assert_array_equal(out, expected)
    # flips and crops alone draw only their own call, and warp nothing
    alone = Augmentation(0, 0, 0, 0, flip=True, crop=3)
    assert not alone.is_identity and not alone.warps
    generator = FixedDraws(backend, [[0.1, 0.0, 0.99]] * 5)
    out = to_host(alone(images, generator, fill=-0.42))
    assert generator.shapes == [(5, 3)]
    host = to_host(images)
    np.testing.assert_array_equal(out, padded_crop(host, [True] * 5, [0] * 5, [6] * 5, 3, np.float32(-0.42)))


def test_flips_and_crops_are_seeded_and_per_image(backend):
    augment = Augmentation(0, 0, 0, 0, flip=True, crop=4)
    same = to_backend(backend, np.repeat(random_images((1, 1, 10, 10)), 8, axis=0), "float32")
    first = to_host(augment(same, backend.generator(7, 0, 3), fill=-0.42))
    np.testing.assert_array_equal(first, to_host(augment(same, backend.generator(7, 0, 3), fill=-0.42)))
    assert not np.array_equal(first, to_host(augment(same, backend.generator(7, 0, 4), fill=-0.42)))
    assert len({image.tobytes() for image in first}) > 1  # each image its own draws


def test_flips_and_crops_are_fair():
    """Over many images: flipped about half the time, each of the 2p + 1 offsets about equally often."""
    backend = get_backend("numpy")
    flips, tops, lefts = Augmentation(0, 0, 0, 0, flip=True, crop=2).flips_and_crops(
        50_000, backend.generator(0), np.float32
    )
    assert abs(flips.mean() - 0.5) < 0.01
    for offsets in (tops, lefts):
        np.testing.assert_allclose(np.bincount(offsets, minlength=5) / 50_000, 0.2, atol=0.01)
        assert offsets.min() == 0 and offsets.max() == 4


def test_flip_and_crop_arguments_are_checked():
    with pytest.raises(ValueError, match=r"flip_and_crop: expected images of shape \(B, C, H, W\)"):
        flip_and_crop(np.zeros((2, 5, 5)), None, None, None, 0)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        flip_and_crop(np.zeros((2, 1, 5, 5)), None, np.zeros(2, np.int64), np.zeros(2, np.int64), -1)
    for kwargs in ({"flip": 1}, {"crop": -1}, {"crop": 1.5}, {"crop": True}):
        with pytest.raises(ValueError, match="Augmentation: (flip|crop)"):
            Augmentation(**kwargs)
    images = np.zeros((2, 1, 5, 5), np.float32)
    assert flip_and_crop(images, None, None, None, 0) is images


def test_flips_and_crops_in_a_compiled_jax_function_equal_eager():
    """Under jax.jit the draws come from a traced key: the same images as the same key run eagerly."""
    jax = pytest.importorskip("jax")
    from xpcnn.base.rng import JaxGenerator

    backend = get_backend("jax", "cpu")
    images = to_backend(backend, random_images((6, 1, 9, 9)), "float32")
    key = jax.random.key(3)
    for augment, tolerance in (
        (Augmentation(0, 0, 0, 0, flip=True, crop=2), 0),
        (Augmentation(1, flip=True, crop=2), 1e-5),
        (Augmentation(0, 0, 0, 0, flip=True, crop=2, erase=0.5), 0),
    ):

        def run(x, key, augment=augment):
            return augment(x, JaxGenerator.from_key(key), fill=-0.42)

        compiled = to_host(jax.jit(run)(images, key))
        np.testing.assert_allclose(compiled, to_host(run(images, key)), rtol=0, atol=tolerance)  # XLA's warp rounds
        assert not np.array_equal(compiled, to_host(jax.jit(run)(images, jax.random.key(4))))


# --- random erasing ---


def erased(host, tops, lefts, heights, widths, fill):
    """Oracle, torchvision's ``F.erase`` way: each image's rectangle set by slicing, in every channel."""
    out = host.copy()
    for image, top, left, height, width in zip(out, tops, lefts, heights, widths, strict=True):
        image[:, top : top + height, left : left + width] = fill
    return out


@pytest.mark.parametrize("dtype", FLOATS)
def test_erase_matches_slicing(backend, dtype):
    """Every position of several sizes on a 5 x 6 image, edges, the whole image, and empty rectangles."""
    sizes = ((1, 1), (2, 3), (5, 1), (3, 6))
    boxes = [(top, left, h, w) for h, w in sizes for top in range(6 - h) for left in range(7 - w)]
    boxes += [(0, 0, 5, 6), (2, 3, 0, 2), (1, 1, 3, 0)]
    host = random_images((len(boxes), 2, 5, 6))
    columns = [np.array(values) for values in zip(*boxes, strict=True)]
    out = erase(to_backend(backend, host, dtype), *(int_array(backend, c) for c in columns), fill=-0.42)
    assert out.dtype == getattr(backend.xp, dtype)
    np.testing.assert_array_equal(to_host(out), erased(host.astype(dtype), *columns, np.asarray(-0.42, dtype)))


def test_erase_boxes_map_one_uniform_call_to_rectangles(backend):
    """u0 < p erases; the area fraction and log aspect ratio are linear in u1, u2; sides are rounded and clipped to
    the image; the corner is floor(u * (free + 1)) of the free positions, never past the last."""
    u = [
        [0.0, 0.0, 0.5, 0.0, 0.0],  # 2% of 28 x 28 = 15.68 px at ratio 1 (log-midpoint of 0.3, 3.3): 4 x 4
        [0.4999, 1.0, 1.0, 0.9999999, 0.9999999],  # 33% at ratio 3.3: 29 x 9, clipped to 28 x 9, placed last
        [0.5, 0.5, 0.5, 0.5, 0.5],  # not erased (p = 0.5): height 0
        [0.2, 1.0, 0.0, 0.5, 0.5],  # 33% at ratio 0.3: 9 x 29 clipped to 9 x 28
    ]
    generator = FixedDraws(backend, u)
    tops, lefts, heights, widths = (
        to_host(a).tolist()
        for a in Augmentation(0, 0, 0, 0, erase=0.5).erase_boxes((28, 28), 4, generator, backend.xp.float64)
    )
    assert generator.shapes == [(4, 5)]
    # 17.5% at ratio 1: 11.7 -> 12 px a side, at floor(0.5 * 17) = 8 of the 17 positions; 9 rows: 10 of 20
    assert heights == [4, 28, 0, 9] and widths == [4, 9, 12, 28]
    assert tops == [0, 0, 8, 10] and lefts == [0, 19, 8, 0]


def test_erased_rectangles_are_fair_and_inside_the_image():
    """Over many images: erased with probability p, the area fraction uniform in 2-33% where nothing is clipped,
    the aspect ratio log-uniform, every rectangle inside the image."""
    backend = get_backend("numpy")
    n, size = 50_000, (28, 24)
    tops, lefts, heights, widths = Augmentation(0, 0, 0, 0, erase=0.3).erase_boxes(
        size, n, backend.generator(0), np.float64
    )
    erased_ = heights > 0
    assert abs(erased_.mean() - 0.3) < 0.01
    assert (tops >= 0).all() and (lefts >= 0).all() and (tops + heights <= 28).all() and (lefts + widths <= 24).all()
    assert (widths >= 1).all() and (heights[erased_] >= 1).all()
    area = heights[erased_] * widths[erased_] / (28 * 24)
    assert 0.01 < area.min() and area.max() < 0.4  # rounding moves the 2% and 33% bounds a little
    ratio = np.log(heights[erased_] / widths[erased_])
    assert abs(np.median(ratio)) < 0.05  # log-uniform on [log 0.3, log 3.3], about 0, before rounding
    for corner, free in ((tops, 28 - heights), (lefts, 24 - widths)):  # uniform over the free + 1 positions
        common = np.bincount(free[erased_]).argmax()  # the commonest number of free positions but one
        chosen = corner[erased_ & (free == common)]
        share, expected = np.bincount(chosen, minlength=common + 1) / chosen.size, 1 / (common + 1)
        assert chosen.max() == common
        np.testing.assert_allclose(share, expected, atol=4 * np.sqrt(expected / chosen.size))


def test_augmentation_erases_last_from_the_same_generator(backend):
    """Flips and crops draw first, then one (B, 5) call for the rectangles; the erased pixels are background."""
    images = to_backend(backend, random_images((6, 2, 10, 10)), "float32")
    augment = Augmentation(0, 0, 0, 0, flip=True, crop=2, erase=0.5)
    out = to_host(augment(images, backend.generator(5, 2), fill=-0.42))
    generator = backend.generator(5, 2)
    flips, tops, lefts = augment.flips_and_crops(6, generator, backend.xp.float32)
    boxes = [to_host(a) for a in augment.erase_boxes((10, 10), 6, generator, backend.xp.float32)]
    cropped = padded_crop(to_host(images), to_host(flips), to_host(tops), to_host(lefts), 2, np.float32(-0.42))
    np.testing.assert_array_equal(out, erased(cropped, *boxes, np.float32(-0.42)))
    assert 0 < (boxes[2] > 0).sum() < 6  # some images erased, some not, by these draws
    assert not Augmentation(0, 0, 0, 0, erase=0.1).is_identity


def test_erase_arguments_are_checked():
    with pytest.raises(ValueError, match=r"erase: expected images of shape \(B, C, H, W\)"):
        erase(np.zeros((2, 5, 5)), *[np.zeros(2, np.int64)] * 4)
    for value in (-0.1, 1.5, True, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="Augmentation: erase must be a probability"):
            Augmentation(erase=value)
