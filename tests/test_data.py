"""Tests for xpcnn.data.data: IDX files, lookup order, downloads from a local server, splits.

Everything runs on files written into tmp_path and on a local HTTP server on
127.0.0.1; only `test_real_mnist` reads the offline MNIST copy, when present.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import write_synthetic_mnist

from xpcnn.base import files
from xpcnn.data import data, download
from xpcnn.data.data import (
    FILES,
    DatasetSpec,
    DownloadError,
    find_data_dir,
    load_dataset,
    split_validation,
)
from xpcnn.data.idx import DataError, read_idx, write_idx

CLASSES = tuple("0123456789")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the user's cache, $XPCNN_DATA_DIR or a proxy."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("XPCNN_DATA_DIR", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def make_dataset_dir(directory: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """Write the four files of a small synthetic dataset; return the arrays by file name."""
    write_synthetic_mnist(directory, n_train, n_test, seed)
    return {file: read_idx(directory / file) for file in FILES}


def spec_for(files: dict[str, bytes], mirrors: tuple[str, ...] = ()) -> DatasetSpec:
    """A spec whose checksums are those of `files` (file name -> .gz bytes)."""
    sha256 = {file: hashlib.sha256(content).hexdigest() for file, content in files.items()}
    return DatasetSpec(name="tiny", classes=CLASSES, mirrors=mirrors, sha256=sha256)


def assert_one_line_naming(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


# ---------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (2, 1, 3, 2)])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape and back.flags.writeable
    np.testing.assert_array_equal(back, array)
    assert path.read_bytes().startswith(b"\x1f\x8b") == (suffix == ".gz")
    assert list(tmp_path.iterdir()) == [path]


def test_idx_header_bytes(tmp_path):
    write_idx(tmp_path / "a", np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8))
    assert (tmp_path / "a").read_bytes() == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    write_idx(tmp_path / "b", np.array([1, -2], dtype="<i2"))
    assert (tmp_path / "b").read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0, 1, 0xFF, 0xFE])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_holds_the_data_once(tmp_path, suffix):
    """Reading allocates the data's size and little more, gzipped or not: a large file is not held twice."""
    path = tmp_path / f"big.idx{suffix}"
    write_idx(path, np.ones((20_000, 28, 28), np.uint8))  # 15.7 MB
    tracemalloc.start()
    try:
        array = read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert array.shape == (20_000, 28, 28) and array.min() == 1
    assert peak < 1.5 * array.nbytes  # it was 3.4 times from a .gz


def test_idx_big_endian_input(tmp_path):
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


def test_idx_gzip_detected_by_magic_not_suffix(tmp_path):
    array = np.arange(10, dtype=np.int32)
    write_idx(tmp_path / "a.gz", array)
    (tmp_path / "a.gz").rename(tmp_path / "gzipped-without-suffix")
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped-without-suffix"), array)
    write_idx(tmp_path / "raw", array)
    (tmp_path / "raw").rename(tmp_path / "raw-named.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-named.gz"), array)


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape) + payload


def bad_crc(content: bytes) -> bytes:
    compressed = bytearray(gzip.compress(content))
    compressed[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    return bytes(compressed)


BAD_IDX = {
    "empty": (b"", "not an IDX file"),
    "wrong-magic": (b"\x01\x02" + idx_bytes(8, (3,), b"abc")[2:], "bad magic number"),
    "unknown-dtype": (idx_bytes(0x07, (3,), b"abc"), "unknown IDX data type code 0x07"),
    "zero-dims": (bytes([0, 0, 8, 0]), "dimension count 0"),
    "five-dims": (idx_bytes(8, (1, 1, 1, 1, 1), b"a"), "dimension count 5"),
    "truncated-header": (idx_bytes(8, (2, 3), b"")[:9], "truncated IDX header"),
    "truncated-payload": (idx_bytes(8, (10,), bytes(9)), "truncated IDX file: expected 10 items, found 9"),
    "truncated-int32": (idx_bytes(0x0C, (4,), bytes(15)), "expected 4 items, found 3"),
    "trailing-bytes": (idx_bytes(8, (2, 2), bytes(6)), "2 trailing bytes"),
}
BAD_GZIP = {
    "bad-crc": bad_crc(idx_bytes(8, (3,), b"abc")),
    "truncated-gzip": gzip.compress(idx_bytes(8, (100,), bytes(range(100))))[:-12],
    "garbage-after-magic": b"\x1f\x8b" + bytes(30),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(BAD_IDX))
def test_bad_idx(tmp_path, case, compress):
    content, expected = BAD_IDX[case]
    path = tmp_path / f"{case}-idx1-ubyte"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError) as error:
        read_idx(path)
    assert expected in assert_one_line_naming(error, str(path))


@pytest.mark.parametrize("case", list(BAD_GZIP))
def test_corrupt_gzip(tmp_path, case):
    path = tmp_path / f"{case}.gz"
    path.write_bytes(BAD_GZIP[case])
    with pytest.raises(DataError) as error:
        read_idx(path)
    assert "corrupt gzip stream" in assert_one_line_naming(error, str(path))


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError) as error:
        read_idx(tmp_path / "nope.gz")
    assert_one_line_naming(error, "nope.gz")


@pytest.mark.parametrize("array", [np.zeros(3, np.int64), np.zeros(3, bool), np.zeros((1,) * 5, np.uint8)])
def test_write_idx_rejects(tmp_path, array):
    with pytest.raises(DataError):
        write_idx(tmp_path / "a.gz", array)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_write_idx_gz_failing_midway_leaves_nothing(tmp_path, monkeypatch, interrupt):
    path = tmp_path / "old.gz"
    path.write_bytes(b"old content")
    real_write = gzip.GzipFile.write
    calls = []

    def failing_write(self, chunk):
        calls.append(len(chunk))
        if len(calls) >= 2:  # after the header went out, the payload fails
            raise interrupt
        return real_write(self, chunk)

    monkeypatch.setattr(gzip.GzipFile, "write", failing_write)
    with pytest.raises(type(interrupt)):
        write_idx(path, np.zeros((50, 28, 28), np.uint8))
    assert calls and path.read_bytes() == b"old content"
    assert list(tmp_path.iterdir()) == [path]
    with pytest.raises(type(interrupt)):
        write_idx(tmp_path / "new.gz", np.zeros(5, np.uint8))
    assert list(tmp_path.iterdir()) == [path]


def test_write_idx_raw_failing_before_rename_leaves_nothing(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        write_idx(tmp_path / "raw-idx", np.zeros(5, np.uint8))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Registry


def test_registry():
    assert set(data.DATASETS) == {"mnist", "fashion-mnist"}
    for name, spec in data.DATASETS.items():
        assert spec.name == name and len(spec.classes) == 10
        assert len(spec.mirrors) >= 2
        assert set(spec.sha256) == set(FILES)
        assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in spec.sha256.values())
    assert data.DATASETS["mnist"].classes == CLASSES
    assert data.DATASETS["fashion-mnist"].classes[0] == "T-shirt/top"
    assert data.DATASETS["fashion-mnist"].classes[9] == "Ankle boot"
    assert Path("/usr/share/datasets/fashion-mnist") in data.DATASETS["fashion-mnist"].system_dirs


def test_unknown_dataset():
    with pytest.raises(DataError) as error:
        load_dataset("cifar-10")
    assert_one_line_naming(error, "cifar-10", "mnist", "fashion-mnist")


# ---------------------------------------------------------------------------
# Lookup order and checks


def test_cache_dir(tmp_path, monkeypatch):
    assert data.cache_dir("mnist") == tmp_path / "cache" / "xpcnn" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir("mnist") == tmp_path / "home" / ".cache" / "xpcnn" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert data.cache_dir("mnist") == tmp_path / "home" / ".cache" / "xpcnn" / "mnist"
    for home in ("", "relative"):  # not a folder to make .cache in: / or the working directory would be
        monkeypatch.setenv("HOME", home)
        assert data.cache_dir("mnist") is None


def test_load_dataset(tmp_path):
    arrays = make_dataset_dir(tmp_path / "d")
    dataset = load_dataset(spec_for({}), tmp_path / "d", download=False)
    assert dataset.name == "tiny" and dataset.classes == CLASSES
    np.testing.assert_array_equal(dataset.train_images, arrays[data.TRAIN_IMAGES])
    np.testing.assert_array_equal(dataset.train_labels, arrays[data.TRAIN_LABELS])
    np.testing.assert_array_equal(dataset.test_images, arrays[data.TEST_IMAGES])
    np.testing.assert_array_equal(dataset.test_labels, arrays[data.TEST_LABELS])
    assert dataset.train_images.dtype == np.uint8 and dataset.test_labels.shape == (5,)


def test_lookup_order(tmp_path, monkeypatch):
    spec = spec_for({})
    make_dataset_dir(tmp_path / "explicit", n_train=11)
    make_dataset_dir(tmp_path / "env", n_train=12)
    make_dataset_dir(tmp_path / "env-parent" / "tiny", n_train=13)
    make_dataset_dir(tmp_path / "cache" / "xpcnn" / "tiny", n_train=14)
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "env"))
    assert len(load_dataset(spec, tmp_path / "explicit", download=False).train_labels) == 11
    # $XPCNN_DATA_DIR is a root with one folder per dataset: files directly in it are not any dataset's
    assert len(load_dataset(spec, download=False).train_labels) == 14
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "env-parent"))
    assert len(load_dataset(spec, download=False).train_labels) == 13
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "empty"))
    assert len(load_dataset(spec, download=False).train_labels) == 14
    monkeypatch.delenv("XPCNN_DATA_DIR")
    assert len(load_dataset(spec, download=False).train_labels) == 14


def test_images_that_would_not_fit_in_memory_are_refused_from_the_header(tmp_path, monkeypatch):
    """A small gzip may declare gigabytes of images: refused before they are inflated, not left to swap or to
    the OOM killer."""
    make_dataset_dir(tmp_path, n_train=300, n_test=5)
    monkeypatch.setattr(data, "available_memory", lambda: 2**20)  # 300 images need 300 * 784 * 5 bytes
    read = []
    monkeypatch.setattr(data, "read_idx", lambda path, check=None: read.append(path) or read_idx(path, check))
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path, download=False)
    assert_one_line_naming(error, data.TRAIN_IMAGES.removesuffix(".gz"), "300 images need about 0.0 GiB")
    assert "1.0 GiB" not in str(error.value) and "0.0 GiB is free" in str(error.value)
    monkeypatch.setattr(data, "available_memory", lambda: 2**21)
    assert len(load_dataset(spec_for({}), tmp_path, download=False).train_labels) == 300


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux's /proc/meminfo")
def test_available_memory_is_read_on_linux():
    assert 0 < data.available_memory() < 2**50


def test_a_place_that_cannot_be_looked_at_is_passed_over(tmp_path, monkeypatch):
    """A name too long (or, for a user other than root, a directory without search permission) is not where
    the files are: the lookup goes on past it instead of stopping with the system's error."""
    spec = spec_for({})
    make_dataset_dir(tmp_path / "cache" / "xpcnn" / "tiny", n_train=14)
    too_long = tmp_path / ("x" * 5000)
    monkeypatch.setenv("XPCNN_DATA_DIR", str(too_long))
    assert len(load_dataset(spec, download=False).train_labels) == 14
    assert not data.holds_dataset(too_long)
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(spec, too_long, download=False)
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(spec, tmp_path / "nowhere", download=False)


def test_one_datasets_files_are_not_served_as_another(tmp_path, monkeypatch):
    make_dataset_dir(tmp_path / "root" / "tiny")
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "root"))
    other = DatasetSpec("other", CLASSES, (), {})
    with pytest.raises(DataError, match="other not found") as error:
        load_dataset(other, download=False)
    assert data.BOTH_FORMS in str(error.value)
    loaded = load_dataset(spec_for({}), download=False)
    assert loaded.directory == tmp_path / "root" / "tiny"
    assert (
        loaded.record()["sha256"][data.TRAIN_IMAGES]
        == hashlib.sha256((tmp_path / "root" / "tiny" / data.TRAIN_IMAGES).read_bytes()).hexdigest()
    )


def test_incomplete_dirs_are_skipped(tmp_path, monkeypatch):
    make_dataset_dir(tmp_path / "env" / "tiny")
    (tmp_path / "env" / "tiny" / data.TEST_LABELS).unlink()
    make_dataset_dir(tmp_path / "system", n_train=15)
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "env"))
    spec = DatasetSpec("tiny", CLASSES, (), {}, system_dirs=(tmp_path / "system",))
    assert len(load_dataset(spec, download=False).train_labels) == 15


def test_explicit_data_dir_missing_files(tmp_path):
    make_dataset_dir(tmp_path / "cache" / "xpcnn" / "tiny")  # must not be used as a fallback
    make_dataset_dir(tmp_path / "d")
    (tmp_path / "d" / data.TRAIN_LABELS).unlink()
    (tmp_path / "d" / data.TEST_IMAGES).unlink()
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path / "d")
    message = assert_one_line_naming(error, str(tmp_path / "d"), data.TRAIN_LABELS, data.TEST_IMAGES)
    assert data.TRAIN_IMAGES not in message


@pytest.mark.parametrize("uncompressed", [[data.TRAIN_IMAGES], list(FILES)])
def test_uncompressed_files_are_found_and_read(tmp_path, uncompressed):
    arrays = make_dataset_dir(tmp_path / "d")
    for file in uncompressed:
        write_idx(tmp_path / "d" / file.removesuffix(".gz"), arrays[file])
        (tmp_path / "d" / file).unlink()
    spec = spec_for({})
    assert find_data_dir(spec, tmp_path / "d") == tmp_path / "d"
    dataset = load_dataset(spec, tmp_path / "d")
    np.testing.assert_array_equal(dataset.train_images, arrays[data.TRAIN_IMAGES])
    np.testing.assert_array_equal(dataset.test_labels, arrays[data.TEST_LABELS])
    raw = (tmp_path / "d" / data.TRAIN_IMAGES.removesuffix(".gz")).read_bytes()
    assert dataset.sha256[data.TRAIN_IMAGES] == hashlib.sha256(raw).hexdigest()


def test_a_gzipped_file_is_read_before_an_uncompressed_one(tmp_path):
    """Its digest is the one a run records (an unpacked copy that differs is refused: see below)."""
    arrays = make_dataset_dir(tmp_path / "d")
    write_idx(tmp_path / "d" / data.TRAIN_LABELS.removesuffix(".gz"), arrays[data.TRAIN_LABELS])
    dataset = load_dataset(spec_for({}), tmp_path / "d")
    gzipped = hashlib.sha256((tmp_path / "d" / data.TRAIN_LABELS).read_bytes()).hexdigest()
    assert dataset.sha256[data.TRAIN_LABELS] == gzipped


def test_a_missing_file_names_both_forms(tmp_path):
    make_dataset_dir(tmp_path / "d")
    (tmp_path / "d" / data.TEST_LABELS).unlink()
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path / "d")
    assert data.BOTH_FORMS in assert_one_line_naming(error, data.TEST_LABELS)


def test_without_a_home_the_cache_is_skipped_and_a_download_is_refused_in_one_line(tmp_path, monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", no_home)  # no HOME and no user entry: a container's arbitrary user id
    assert data.cache_dir("tiny") is None
    make_dataset_dir(tmp_path / "env" / "tiny")
    monkeypatch.setenv("XPCNN_DATA_DIR", str(tmp_path / "env"))
    assert find_data_dir(spec_for({})) == tmp_path / "env" / "tiny"
    monkeypatch.delenv("XPCNN_DATA_DIR")
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}))
    assert_one_line_naming(error, "tiny not found", "HOME", "--data-dir", "XPCNN_DATA_DIR")


def test_nothing_found_without_download(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), download=False)
    assert_one_line_naming(error, "tiny", "--data-dir", "XPCNN_DATA_DIR", str(tmp_path / "cache"))


def test_count_mismatch(tmp_path):
    make_dataset_dir(tmp_path)
    write_idx(tmp_path / data.TEST_LABELS, np.zeros(4, np.uint8))
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path)
    assert_one_line_naming(error, data.TEST_IMAGES, data.TEST_LABELS, "5 images", "4 labels")


def test_a_labels_header_that_declares_more_labels_than_images_is_refused_before_reading(tmp_path):
    make_dataset_dir(tmp_path)
    # A million labels declared, four bytes there: refused on the header's count, not read as a truncated file.
    (tmp_path / data.TEST_LABELS).write_bytes(gzip.compress(idx_bytes(8, (10**6,), bytes(4))))
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path)
    assert_one_line_naming(error, data.TEST_IMAGES, data.TEST_LABELS, "5 images", "1000000 labels")


def test_label_out_of_range(tmp_path):
    make_dataset_dir(tmp_path)
    write_idx(tmp_path / data.TRAIN_LABELS, np.array([0, 1, 10] + [0] * 9, np.uint8))
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path)
    assert_one_line_naming(error, data.TRAIN_LABELS, "label 10")


def test_a_gzip_bomb_stops_at_the_size_its_header_declares(tmp_path):
    """A small header followed by a huge run of zeros: decompression stops just past the declared size."""
    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb") as out:
        out.write(idx_bytes(8, (10,), bytes(10)))
        for _ in range(64):
            out.write(bytes(2**20))  # 64 MiB that the header does not declare
    with pytest.raises(DataError, match="at least 1048576 trailing bytes"):
        read_idx(path)
    declared_too_much = tmp_path / "huge-idx3-ubyte"
    declared_too_much.write_bytes(idx_bytes(8, (60000, 60000, 1000), b""))
    with pytest.raises(DataError, match="more than xpcnn reads"):
        read_idx(declared_too_much)


@pytest.mark.parametrize(
    "file, array, expected",
    [
        (data.TRAIN_IMAGES, np.zeros((12, 784), np.uint8), "3-D uint8 images"),
        (data.TRAIN_IMAGES, np.zeros((12, 28, 28), np.float32), "3-D uint8 images"),
        (data.TEST_LABELS, np.zeros((5, 1), np.uint8), "1-D uint8 labels"),
        (data.TEST_IMAGES, np.zeros((5, 32, 32), np.uint8), "expected 28x28 images, found 32x32"),
        (data.TRAIN_IMAGES, np.zeros((12, 32, 32), np.uint8), "expected 28x28 images, found 32x32"),
        (data.TEST_IMAGES, np.zeros((0, 28, 28), np.uint8), "holds no images"),
        (data.TRAIN_IMAGES, np.full((12, 28, 28), 7, np.uint8), "every pixel is 7: nothing to learn from"),
    ],
)
def test_bad_shapes(tmp_path, file, array, expected):
    make_dataset_dir(tmp_path)
    write_idx(tmp_path / file, array)
    if file == data.TEST_IMAGES:  # as many labels as images, so that the shape is what is wrong
        write_idx(tmp_path / data.TEST_LABELS, np.zeros(len(array), np.uint8))
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path)
    assert_one_line_naming(error, file, expected)


# ---------------------------------------------------------------------------
# Downloads from a local HTTP server


STREAMED = {"endless": None, "drip": None, "huge": str(10**12), "odd-length": "abc"}  # kind -> Content-Length


class Mirrors:
    """A local HTTP server; GET /<kind>/<file> serves `files` according to kind.

    good: the file; missing: 404; corrupt: the file with one byte flipped;
    short: the full Content-Length but only half the body; endless: zeros without end and no Content-Length;
    huge: a Content-Length of a terabyte; drip: the file a few bytes at a time; odd-length: the file with a
    Content-Length that is not a number; slow-headers: a status line, then a header a byte every 50 ms.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        mirrors = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirrors.requests.append(self.path)
                _, kind, file = self.path.split("/", 2)
                body = mirrors.files.get(file)
                if kind == "missing" or body is None:
                    self.send_error(404)
                    return
                if kind == "corrupt":
                    body = body[:-1] + bytes([body[-1] ^ 1])
                if kind == "slow-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    with contextlib.suppress(OSError):  # the client hangs up
                        for byte in b"X-Slow: " + b"a" * 200:
                            self.wfile.write(bytes([byte]))
                            time.sleep(0.05)
                    self.close_connection = True
                    return
                if kind in STREAMED:
                    self.send_response(200)
                    if kind != "endless":
                        self.send_header("Content-Length", STREAMED[kind] or str(len(body)))
                    self.end_headers()
                    with contextlib.suppress(OSError):  # the client hangs up
                        while kind == "endless":
                            self.wfile.write(bytes(1 << 16))
                        step = 16 if kind == "drip" else len(body)
                        for i in range(0, len(body), step):
                            self.wfile.write(body[i : i + step])
                            self.wfile.flush()
                            time.sleep(0.01 if kind == "drip" else 0)
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if kind == "short" else body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, kind: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{kind}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def mirrors(tmp_path):
    server = Mirrors()
    arrays = make_dataset_dir(tmp_path / "origin", n_train=20, n_test=6, seed=3)
    server.files = {file: (tmp_path / "origin" / file).read_bytes() for file in FILES}
    server.arrays = arrays
    yield server
    server.close()


def cache_files(tmp_path) -> list[Path]:
    cache = tmp_path / "cache"
    return sorted(path for path in cache.rglob("*") if path.is_file()) if cache.exists() else []


@pytest.mark.parametrize("bad", ["missing", "corrupt", "short"])
def test_download_falls_back_to_second_mirror(tmp_path, mirrors, bad, capsys):
    spec = spec_for(mirrors.files, (mirrors.url(bad), mirrors.url("good")))
    dataset = load_dataset(spec, progress=False)
    np.testing.assert_array_equal(dataset.train_images, mirrors.arrays[data.TRAIN_IMAGES])
    np.testing.assert_array_equal(dataset.test_labels, mirrors.arrays[data.TEST_LABELS])
    cache = tmp_path / "cache" / "xpcnn" / "tiny"
    assert cache_files(tmp_path) == sorted(cache / file for file in FILES)
    for file in FILES:
        assert hashlib.sha256((cache / file).read_bytes()).hexdigest() == spec.sha256[file]
    assert mirrors.requests[:2] == [f"/{bad}/{FILES[0]}", f"/good/{FILES[0]}"]
    assert mirrors.requests[2:] == [f"/good/{file}" for file in FILES[1:]]  # the good mirror goes first
    assert capsys.readouterr().err == ""
    # Now cached: a second load needs no network.
    load_dataset(spec, progress=False)
    assert len(mirrors.requests) == 5


def test_download_progress_goes_to_stderr(mirrors, capsys):
    load_dataset(spec_for(mirrors.files, (mirrors.url("good"),)))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Downloading" in captured.err and FILES[0] in captured.err


def test_download_all_mirrors_bad(tmp_path, mirrors):
    spec = spec_for(mirrors.files, (mirrors.url("missing"), mirrors.url("corrupt"), mirrors.url("short")))
    with pytest.raises(DownloadError) as error:
        load_dataset(spec, progress=False)
    message = assert_one_line_naming(error, FILES[0], "--data-dir", "XPCNN_DATA_DIR", str(tmp_path / "cache"))
    assert "404" in message and "SHA-256 mismatch" in message and data.BOTH_FORMS in message
    assert f"ended after {len(mirrors.files[FILES[0]]) // 2:,} of the" in message  # the short one
    assert isinstance(error.value, DataError)
    assert not (tmp_path / "cache").exists()  # nor the folders the download made: nothing is left


def test_download_unreachable_mirror(tmp_path, mirrors):
    spec = spec_for(mirrors.files, ("http://127.0.0.1:1/", mirrors.url("good")))
    load_dataset(spec, progress=False)
    assert len(cache_files(tmp_path)) == 4


def test_a_mirror_that_sends_too_much_or_too_slowly_is_left_for_the_next(tmp_path, mirrors, monkeypatch):
    """A broken mirror or a captive portal neither fills the disk nor hangs the run: each file has a byte
    limit and a deadline, and whatever it sent is gone."""
    monkeypatch.setattr(download, "MAX_BYTES", 1 << 20)
    monkeypatch.setattr(download, "DEADLINE", 0.2)
    spec = spec_for(mirrors.files, (mirrors.url("endless"), mirrors.url("huge"), mirrors.url("drip")))
    with pytest.raises(DownloadError) as error:
        load_dataset(spec, progress=False)
    message = assert_one_line_naming(error, FILES[0])
    assert "sent over 1,048,576 bytes" in message and "declares 1,000,000,000,000 bytes" in message
    assert "took longer than 0.2 s" in message
    assert not (tmp_path / "cache").exists()


def test_a_mirror_that_drips_its_headers_is_cut_at_the_deadline(tmp_path, mirrors, monkeypatch):
    """Each header byte comes well within the per-read timeout; the deadline still holds."""
    monkeypatch.setattr(download, "DEADLINE", 0.3)
    spec = spec_for(mirrors.files, (mirrors.url("slow-headers"), mirrors.url("good")))
    started = time.monotonic()
    load_dataset(spec, progress=False)
    assert time.monotonic() - started < 5  # the slow mirror alone would take 10 s a file
    assert len(cache_files(tmp_path)) == 4
    with pytest.raises(DataError, match=r"^took longer than 0.3 s \(0 bytes received\)$"):
        download.fetch(mirrors.url("slow-headers") + FILES[0], tmp_path / "one", "0" * 64, progress=False, timeout=5)
    assert not (tmp_path / "one").exists()


def test_a_failed_download_keeps_the_files_it_got_and_folders_that_were_there(tmp_path, mirrors):
    (tmp_path / "cache").mkdir()
    spec = spec_for(mirrors.files, (mirrors.url("good"),))
    spec = dataclasses.replace(spec, sha256=dict(spec.sha256, **{FILES[-1]: "0" * 64}))  # the last one mismatches
    with pytest.raises(DownloadError):
        load_dataset(spec, progress=False)
    cache = tmp_path / "cache" / "xpcnn" / "tiny"
    assert cache_files(tmp_path) == sorted(cache / file for file in FILES[:-1])  # not fetched again next time


def test_a_content_length_that_is_not_a_number_does_not_stop_a_download(tmp_path, mirrors):
    dataset = load_dataset(spec_for(mirrors.files, (mirrors.url("odd-length"),)), progress=True)
    np.testing.assert_array_equal(dataset.train_images, mirrors.arrays[data.TRAIN_IMAGES])


def test_a_killed_downloads_parts_are_removed_and_a_second_download_waits(tmp_path, mirrors):
    cache = tmp_path / "cache" / "xpcnn" / "tiny"
    cache.mkdir(parents=True)
    stale = cache / f".{FILES[0]}.k1ll3d{files.TEMPORARY_SUFFIX}"
    stale.write_bytes(b"half a file")
    spec = spec_for(mirrors.files, (mirrors.url("good"),))
    with files.locked_directory(cache):  # another download in progress: this one waits for it
        waiting = threading.Thread(target=load_dataset, args=(spec,), kwargs={"progress": False})
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and mirrors.requests == [] and stale.exists()
        for file in FILES:  # what the other download wrote
            (cache / file).write_bytes(mirrors.files[file])
    waiting.join(10)
    assert not waiting.is_alive() and mirrors.requests == []  # the files were there once it had the lock
    assert not stale.exists()


def test_download_fetches_only_missing_files(tmp_path, mirrors):
    cache = tmp_path / "cache" / "xpcnn" / "tiny"
    cache.mkdir(parents=True)
    for file in FILES[:2]:
        (cache / file).write_bytes(mirrors.files[file])
    load_dataset(spec_for(mirrors.files, (mirrors.url("good"),)), progress=False)
    assert mirrors.requests == [f"/good/{file}" for file in FILES[2:]]


def test_files_on_disk_are_not_checksummed(tmp_path, mirrors):
    # The spec's checksums match nothing on disk, and yet the copy loads.
    make_dataset_dir(tmp_path / "d", seed=9)
    load_dataset(spec_for(mirrors.files, (mirrors.url("good"),)), tmp_path / "d")
    assert mirrors.requests == []


# ---------------------------------------------------------------------------
# Validation split


def test_split_validation_count():
    images = np.arange(50 * 4).reshape(50, 2, 2)
    labels = np.arange(50)
    train_x, train_y, val_x, val_y = split_validation(images, labels, 10, seed=0)
    assert train_x.shape == (40, 2, 2) and val_x.shape == (10, 2, 2)
    assert sorted(np.concatenate([train_y, val_y])) == list(range(50))
    np.testing.assert_array_equal(train_x, images[train_y])
    np.testing.assert_array_equal(val_x, images[val_y])
    assert list(val_y) == sorted(val_y) and list(train_y) == sorted(train_y)
    assert list(val_y) != list(range(10))


def test_split_validation_fraction_and_seed():
    images, labels = np.zeros((50, 2, 2)), np.arange(50)
    assert len(split_validation(images, labels, 0.2, seed=0)[3]) == 10
    np.testing.assert_array_equal(
        split_validation(images, labels, 0.2, seed=7)[3], split_validation(images, labels, 10, seed=7)[3]
    )
    assert list(split_validation(images, labels, 10, seed=7)[3]) != list(
        split_validation(images, labels, 10, seed=8)[3]
    )


@pytest.mark.parametrize("size", [0, -1, 50, 51, 0.0, 1.0, 1.5, -0.5, 0.001, True, "10", None])
def test_split_validation_bad_size(size):
    with pytest.raises(ValueError):
        split_validation(np.zeros((50, 2, 2)), np.zeros(50), size, seed=0)


def test_one_example_has_none_to_hold_out():
    with pytest.raises(ValueError, match=r"holds out 1 of 1 examples; one example leaves none to hold out$"):
        split_validation(np.zeros((1, 2, 2)), np.zeros(1), 1, seed=0)


def test_split_validation_length_mismatch():
    with pytest.raises(ValueError):
        split_validation(np.zeros((50, 2, 2)), np.zeros(49), 5, seed=0)


# ---------------------------------------------------------------------------
# The offline MNIST copy (checksums differ from the canonical ones by design)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(mnist_dir):
    dataset = load_dataset("mnist", data_dir=mnist_dir, download=False)
    assert dataset.classes == CLASSES
    assert dataset.train_images.shape == (60000, 28, 28) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (10000, 28, 28) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.shape == (60000,) and dataset.test_labels.shape == (10000,)
    assert np.bincount(dataset.train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(dataset.test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert dataset.train_images.max() == 255 and dataset.train_images.min() == 0


def test_a_file_in_both_forms_must_hold_the_same_data(tmp_path):
    """The .gz is read where both are there: an unpacked file edited since was passed over without a word."""
    arrays = make_dataset_dir(tmp_path)
    labels = arrays[data.TEST_LABELS]
    unpacked = tmp_path / data.TEST_LABELS.removesuffix(".gz")
    write_idx(unpacked, labels)  # gunzip -k: the same data twice
    np.testing.assert_array_equal(load_dataset(spec_for({}), tmp_path).test_labels, labels)
    write_idx(unpacked, (labels + 1) % 10)
    with pytest.raises(DataError) as error:
        load_dataset(spec_for({}), tmp_path)
    assert_one_line_naming(error, str(tmp_path / data.TEST_LABELS), str(unpacked), "hold different data")


def test_a_download_waiting_while_another_fails_starts_again_in_a_folder_that_is_there(tmp_path, monkeypatch):
    """The failing download removed the folder it made after letting go of its lock, so the one waiting for
    the lock found no folder and every mirror failed with 'No such file or directory'."""
    import threading

    first_started = threading.Event()

    def fetch(url, dest, sha256, *, progress, timeout):
        if threading.current_thread().name == "first":
            first_started.set()
            time.sleep(0.5)  # the second is waiting for the lock meanwhile
            raise OSError("mirror down")
        with files.atomic_output(dest) as out:
            out.write(b"x")

    monkeypatch.setattr(download, "fetch", fetch)
    spec = DatasetSpec("tiny", CLASSES, ("http://mirror/",), {file: "0" * 64 for file in FILES})
    target = tmp_path / "cache" / "xpcnn" / "tiny"
    outcomes = {}

    def run():
        try:
            data.download_files(spec, target, progress=False)
            outcomes[threading.current_thread().name] = "downloaded"
        except DownloadError as error:
            outcomes[threading.current_thread().name] = str(error)

    first = threading.Thread(target=run, name="first")
    second = threading.Thread(target=run, name="second")
    first.start()
    first_started.wait(10)
    second.start()
    first.join(30)
    second.join(30)
    assert "mirror down" in outcomes["first"] and outcomes["second"] == "downloaded"
    assert sorted(path.name for path in target.iterdir()) == sorted(FILES)
