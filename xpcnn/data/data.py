"""Datasets from disk or the network into checked host arrays: the MNIST / Fashion-MNIST registry, lookup,
download, the validation split (the IDX files themselves are read by `idx`).

Everything here works on plain NumPy arrays.  A loaded `Dataset` holds
images as (N, 28, 28) uint8 and labels as (N,) uint8 class indices.

Files are looked for, in order, in an explicit ``data_dir``, in
``$XPCNN_DATA_DIR/<name>``, in the cache directory (``$XDG_CACHE_HOME/xpcnn/<name>``
or ``~/.cache/xpcnn/<name>``) and in system directories (Debian's
``/usr/share/datasets/fashion-mnist``), each file gzipped as in `FILES` or
uncompressed without its ``.gz``.  Files found on disk are read as they
are; only downloads are checked against the canonical SHA-256 sums, because a
user's copy may legitimately differ from the canonical release.

Every problem with the data raises `DataError` (of `idx`) with a one-line
message that names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..base.errors import ConfigError, one_line
from ..base.files import locked_directory, open_regular, remove_temporaries
from . import download
from .idx import DataError, read_idx

__all__ = [
    "DATASETS",
    "FILES",
    "Dataset",
    "DatasetSpec",
    "DownloadError",
    "cache_dir",
    "download_files",
    "find_data_dir",
    "get_spec",
    "load_dataset",
    "split_validation",
]


class DownloadError(DataError):
    """No mirror delivered a file with the expected checksum."""


# ---------------------------------------------------------------------------
# Registry.

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from: its four `FILES`, class names, mirrors, checksums.

    `mirrors` are base URLs tried in turn (file name appended); `sha256` maps
    each file name to the hex SHA-256 that a download must have;
    `system_dirs` are extra directories searched after the cache.
    """

    name: str
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    sha256: Mapping[str, str]
    system_dirs: tuple[Path, ...] = ()


# SHA-256 sums of the .gz files, from tensorflow/datasets
# tensorflow_datasets/url_checksums/mnist.txt and fashion_mnist.txt.  They
# agree with keras (keras/src/datasets/fashion_mnist.py, FILE_HASHES) and
# torchvision's prototype datasets (_CHECKSUMS for MNIST and FashionMNIST).
# Mirrors: torchvision.datasets.MNIST / FashionMNIST (ossci-datasets, the
# fashion-mnist S3 website), TFDS (cvdf-datasets) and keras (tf-keras-datasets).
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        classes=tuple(str(digit) for digit in range(10)),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        sha256={
            TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        ),
        sha256={
            TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """Return the registered `DatasetSpec` called `name`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


# ---------------------------------------------------------------------------
# Lookup and download.


def cache_dir(name: str) -> Path | None:
    """Where dataset `name` is downloaded: ``$XDG_CACHE_HOME/xpcnn/<name>`` or ``~/.cache/xpcnn/<name>``; None
    where there is no home (no HOME and no user entry: a container run as an arbitrary user id; an empty or
    relative HOME)."""
    xdg, home = os.environ.get("XDG_CACHE_HOME", ""), os.environ.get("HOME")
    if os.path.isabs(xdg):
        return Path(xdg) / "xpcnn" / name
    if home is not None and not os.path.isabs(home):  # empty or relative: as the cache's root, / or the cwd
        return None
    try:
        return Path.home() / ".cache" / "xpcnn" / name
    except RuntimeError:
        return None


# How the messages that ask for the files name their two forms (`_locate`).
BOTH_FORMS = "gzipped, or uncompressed without .gz"


def _locate(directory: Path, file: str) -> Path:
    """Where ``directory`` holds ``file``: as named (gzipped), else uncompressed without ``.gz`` (as the original
    site's files unpack and torchvision's raw folders keep them), else the path as named, which does not exist.
    `read_idx` reads both forms."""
    unpacked = directory / file.removesuffix(".gz")
    if _exists(unpacked) and not _exists(directory / file):  # a FIFO there is refused when read
        return unpacked
    return directory / file


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; False, not an error, where it cannot be looked at (a directory without search
    permission, a name too long): such a place is not where the files are, and the lookup goes on."""
    return os.path.exists(path)


def _where_to_put(spec: DatasetSpec, cache: Path, files: str = "") -> str:
    """The end of the messages that ask for the files: where `find_data_dir` looks, ``cache`` the download folder;
    ``files`` goes before their names."""
    return (
        f"put {files}{', '.join(FILES)} ({BOTH_FORMS}) in a directory and pass --data-dir DIR, "
        f"or put them in $XPCNN_DATA_DIR/{spec.name}, or in {cache}"
    )


def _missing(directory: Path, files: tuple[str, ...] = FILES) -> list[str]:
    return [file for file in files if not _exists(_locate(directory, file))]


def holds_dataset(directory: str | os.PathLike, files: tuple[str, ...] = FILES) -> bool:
    """Whether ``directory`` holds the four files of a dataset (or the ``files`` named, e.g. `TEST_FILES`)."""
    return not _missing(Path(directory), files)


def find_data_dir(
    spec: DatasetSpec, data_dir: str | os.PathLike | None = None, files: tuple[str, ...] = FILES
) -> Path | None:
    """The first directory that holds all four files (or the ``files`` named, e.g. `TEST_FILES`), or None.

    With an explicit `data_dir`, only that directory counts, and missing files
    raise `DataError`.  Otherwise: ``$XPCNN_DATA_DIR/<name>`` (a root with one
    folder per dataset, as torchvision's ``root``), then `cache_dir`, then
    ``spec.system_dirs``.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        if not os.path.isdir(directory):
            raise DataError(f"{directory}: no such directory (it should hold the {spec.name} files)")
        missing = _missing(directory, files)
        if missing:
            raise DataError(f"{directory}: missing {spec.name} files: {', '.join(missing)} ({BOTH_FORMS})")
        return directory
    candidates = []
    env_dir = os.environ.get("XPCNN_DATA_DIR")
    if env_dir:
        candidates.append(Path(env_dir) / spec.name)
    candidates += [cache_dir(spec.name), *spec.system_dirs]
    return next(
        (directory for directory in candidates if directory is not None and not _missing(directory, files)),
        None,
    )


def download_files(
    spec: DatasetSpec,
    directory: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = download.TIMEOUT,
) -> Path:
    """Download the files missing from `directory`, trying ``spec.mirrors`` in turn.

    Each file is checked against ``spec.sha256`` and renamed into place only
    when it matches.  Raises `DownloadError` when every mirror fails for a
    file.  Returns `directory` as a Path.  Another process downloading into `directory` is waited for; a
    killed one's partial files are removed.  A download that fails removes the folders it made, still empty.
    """
    directory = Path(directory)
    while True:
        made = [folder for folder in (directory, *directory.parents) if not folder.exists()]  # deepest first
        directory.mkdir(parents=True, exist_ok=True)
        with locked_directory(directory, wait=True):  # one download at a time: a second finds the files there
            if not directory.is_dir():  # removed by a download that failed while this one waited: again
                continue
            try:
                remove_temporaries(directory, FILES)  # what a killed download left
                return _download_missing(spec, directory, progress, timeout)
            except BaseException:  # Ctrl-C included: no empty cache folder is left to puzzle over
                for folder in made:  # while holding the lock, so that a download waiting for it sees
                    with contextlib.suppress(OSError):  # not empty: another download's files, or the user's
                        folder.rmdir()
                raise


def _download_missing(spec: DatasetSpec, directory: Path, progress: bool, timeout: float) -> Path:
    """`download_files`' work, holding ``directory``'s lock."""
    mirrors = list(spec.mirrors)
    for file in _missing(directory):
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + file
            try:
                download.fetch(url, directory / file, spec.sha256[file], progress=progress, timeout=timeout)
            except (OSError, http.client.HTTPException, ValueError) as error:
                failures.append(f"{url}: {one_line(error) or type(error).__name__}")
                continue
            mirrors.remove(mirror)
            mirrors.insert(0, mirror)  # a mirror that worked is tried first for the next file
            break
        else:
            raise DownloadError(
                f"{file}: could not download {spec.name} ({'; '.join(failures) or 'no mirrors'}); "
                f"{_where_to_put(spec, directory, 'the four files ')}"
            )
    return directory


# ---------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: images (N, 28, 28) uint8, labels (N,) uint8 in range(len(classes)).

    ``directory`` is where its files were read, ``sha256`` each file's digest as stored (the name in `FILES` ->
    hex) and ``content_sha256`` the digest of the array it holds (`array_sha256`), the same whether the file is
    gzipped or not: so that a run can record which data it used.
    """

    name: str
    classes: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: Path | None = None
    sha256: dict = dataclasses.field(default_factory=dict)
    content_sha256: dict = dataclasses.field(default_factory=dict)

    def record(self) -> dict:
        """What a run stores of its data: the dataset, the directory (absolute) and the files' SHA-256, as
        stored and of their content."""
        directory = str(self.directory.resolve()) if self.directory else None
        return {
            "dataset": self.name,
            "directory": directory,
            "sha256": dict(self.sha256),
            "content_sha256": dict(self.content_sha256),
        }


TEST_FILES = (TEST_IMAGES, TEST_LABELS)


def other_files(recorded: dict | None, dataset: Dataset, files=FILES) -> list[str]:
    """The ``files`` whose content differs from a run's ``recorded`` data (``Dataset.record``); [] if none was.

    Runs recorded before content digests compare the files' digests as stored."""
    recorded = recorded or {}
    key = "content_sha256" if recorded.get("content_sha256") else "sha256"
    digests, ours = recorded.get(key), getattr(dataset, key)
    return [name for name in files if digests.get(name) != ours.get(name)] if digests else []


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order): the same for an IDX file gzipped or not."""
    digest = hashlib.sha256(f"{array.dtype.str} {array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as file:
        while chunk := file.read(1 << 16):
            digest.update(chunk)
    return digest.hexdigest()


IMAGE_SIZE = (28, 28)  # what every model takes
BYTES_PER_PIXEL = 5  # a pixel's memory in training: the uint8 read here, and its float32 on the device or host


def available_memory() -> int | None:
    """Bytes this process can still take, by Linux's MemAvailable and a cgroup v2 limit where one is set;
    None where neither can be read (another system)."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
            found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            found.append(int(limit) - int(used))
    return min(found) if found else None


def _read_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split: at least one image, images (N, 28, 28) uint8 and labels (N,) uint8 < num_classes.

    The shapes and dtypes are checked on each file's header, before its data is read: a header that declares
    a billion labels is refused without inflating them.
    """

    def check_images(dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or dtype != np.uint8:
            raise DataError(f"{images_path}: expected 3-D uint8 images, found {len(shape)}-D {dtype}")
        if shape[1:] != IMAGE_SIZE:
            raise DataError(f"{images_path}: expected 28x28 images, found {shape[1]}x{shape[2]}")
        if shape[0] == 0:
            raise DataError(f"{images_path}: holds no images")
        needed, available = math.prod(shape) * BYTES_PER_PIXEL, available_memory()
        if available is not None and needed > available:  # a small gzip may declare gigabytes: refuse, not swap
            raise DataError(
                f"{images_path}: its {shape[0]:,} images need about {needed / 2**30:.1f} GiB of memory to train on, "
                f"and {available / 2**30:.1f} GiB is free"
            )

    def check_labels(dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if len(shape) != 1 or dtype != np.uint8:
            raise DataError(f"{labels_path}: expected 1-D uint8 labels, found {len(shape)}-D {dtype}")
        if shape[0] != len(images):
            raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {shape[0]} labels")

    images = read_idx(images_path, check_images)
    labels = read_idx(labels_path, check_labels)
    if labels.max() >= num_classes:
        raise DataError(
            f"{labels_path}: label {labels.max()} out of range for {num_classes} classes (images in {images_path})"
        )
    return images, labels


def load_dataset(
    name: str | DatasetSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    test_only: bool = False,
) -> Dataset:
    """Find (or download into the cache) and load a dataset.

    `name` is a registered name (see `DATASETS`) or a `DatasetSpec`.  See
    `find_data_dir` for where files are looked for; when none is found and
    `download` is true, the files are downloaded into `cache_dir`.  A file
    there both gzipped and unpacked is read from its ``.gz``; DataError where
    the two hold different data (one edited or replaced, the other stale).
    With `test_only`, only the test split's files are needed and read (as
    torchvision's ``train=False``): the training arrays are then empty.
    """
    spec = get_spec(name) if isinstance(name, str) else name
    files = TEST_FILES if test_only else FILES
    directory = find_data_dir(spec, data_dir, files)
    if directory is None:
        cache = cache_dir(spec.name)
        if cache is None:
            raise DataError(
                f"{spec.name} not found, and no home folder to download it into (set HOME or XDG_CACHE_HOME); "
                "or give --data-dir, or set XPCNN_DATA_DIR"
            )
        if not download:
            raise DataError(f"{spec.name} not found (downloads disabled); {_where_to_put(spec, cache)}")
        directory = download_files(spec, cache, progress=progress)

    paths = {file: _locate(directory, file) for file in files}
    test_images, test_labels = _read_split(paths[TEST_IMAGES], paths[TEST_LABELS], len(spec.classes))
    if test_only:
        train_images, train_labels = test_images[:0], test_labels[:0]
    else:
        train_images, train_labels = _read_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS], len(spec.classes))
        if train_images.min() == train_images.max():
            raise DataError(f"{paths[TRAIN_IMAGES]}: every pixel is {train_images.min()}: nothing to learn from")
    sha256 = {name: file_sha256(path) for name, path in paths.items()}
    arrays = {
        TRAIN_IMAGES: train_images,
        TRAIN_LABELS: train_labels,
        TEST_IMAGES: test_images,
        TEST_LABELS: test_labels,
    }
    content_sha256 = {name: array_sha256(arrays[name]) for name in files}
    for name, path in paths.items():  # the .gz is read where both forms are there: the other must agree
        unpacked = path.with_suffix("")
        if (
            path.suffix == ".gz"
            and os.path.isfile(unpacked)
            and array_sha256(read_idx(unpacked)) != content_sha256[name]
        ):
            raise DataError(f"{path} and {unpacked} hold different data: remove the one that is out of date")
    return Dataset(
        spec.name, spec.classes, train_images, train_labels, test_images, test_labels, directory, sha256, content_sha256
    )


def split_validation(
    images: np.ndarray, labels: np.ndarray, size: int | float, seed: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out `size` examples, chosen by ``np.random.default_rng(seed)``.

    `size` is a count in 1..N-1 or a fraction in (0, 1) of N = len(images).
    Returns new arrays ``(train_images, train_labels, val_images, val_labels)``,
    each part in its original order.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if isinstance(size, (bool, np.bool_)):
        raise ConfigError(f"validation size must be a count or a fraction, not {size!r}", "validation")
    if isinstance(size, (int, np.integer)):
        count = int(size)
    elif isinstance(size, (float, np.floating)) and 0 < size < 1:
        count = round(float(size) * n)
    else:
        raise ConfigError(f"validation size must be a count or a fraction in (0, 1), not {size!r}", "validation")
    if not 0 < count < n:
        need = f"need 1 to {n - 1}" if n > 1 else "one example leaves none to hold out"
        raise ConfigError(f"validation size {size!r} holds out {count} of {n} examples; {need}", "validation")

    order = np.random.default_rng(seed).permutation(n)
    val = np.sort(order[:count])
    train = np.sort(order[count:])
    return images[train], labels[train], images[val], labels[val]
