"""Property tests: any mutation of a checkpoint, its metadata or an IDX file ends in xpcnn's own error, or loads."""

import io
import json
import zipfile

import numpy as np
import pytest

from xpcnn.backends.backend import get_backend
from xpcnn.data.checkpoint import CheckpointError, load_checkpoint
from xpcnn.data.data import load_dataset
from xpcnn.data.idx import DataError, read_idx, write_idx
from xpcnn.training import runs
from xpcnn.training.config import TrainConfig

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))


@pytest.fixture(scope="module")
def checkpoint_bytes(synthetic_dir, tmp_path_factory) -> bytes:
    """A real checkpoint of a tiny run."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    config = TrainConfig(model="seed", epochs=1, batch_size=200, seed=0)
    runs.train_run(config, get_backend("numpy"), load_dataset("mnist", synthetic_dir), out)
    return (out / "checkpoint.npz").read_bytes()


def use(path):
    """What the commands do with a checkpoint: load it, read its configuration, build the model."""
    checkpoint = load_checkpoint(path)
    runs.checkpoint_config(checkpoint)
    runs.model_from_checkpoint(checkpoint, get_backend("numpy"))


@FUZZ
@given(data=st.data())
def test_any_damaged_checkpoint_file_is_a_checkpoint_error(checkpoint_bytes, tmp_path_factory, data):
    damaged = bytearray(checkpoint_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    damaged = damaged[: data.draw(st.integers(0, len(damaged)))]
    path = tmp_path_factory.mktemp("damaged") / "checkpoint.npz"
    path.write_bytes(bytes(damaged))
    try:
        use(path)
    except CheckpointError:
        pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


def leaves(value, path=()):
    """Every (path, value) in a JSON document, containers included."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaves(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from leaves(child, (*path, index))


def replaced(document, path, value):
    if not path:
        return value
    head, *rest = path
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[head] = replaced(document[head], rest, value)
    return copy


@FUZZ
@given(data=st.data())
def test_any_changed_metadata_value_is_a_checkpoint_error(checkpoint_bytes, tmp_path_factory, data):
    with np.load(io.BytesIO(checkpoint_bytes)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays["meta.json"].tobytes())
    places = [path for path, _ in leaves(meta) if path and path[0] != "format"]
    where = data.draw(st.sampled_from(places))
    meta = replaced(meta, where, data.draw(JSON))
    if data.draw(st.booleans()):  # or drop a key
        parent = meta
        for key in where[:-1]:
            parent = parent[key]
        if isinstance(parent, dict):
            parent.pop(where[-1], None)
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = tmp_path_factory.mktemp("meta") / "checkpoint.npz"
    with open(path, "wb") as out:
        np.savez(out, **arrays)
    try:
        use(path)
    except CheckpointError:
        pass


def test_a_pickled_array_in_a_checkpoint_is_refused_without_unpickling(checkpoint_bytes, tmp_path):
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(checkpoint_bytes)
    with zipfile.ZipFile(path, "a") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
        archive.writestr("model/payload.npy", buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a readable xpcnn checkpoint"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def idx_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("idx") / "images-idx3-ubyte"
    write_idx(path, np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_any_damaged_idx_header_is_a_data_error(idx_bytes, tmp_path_factory, data):
    damaged = bytearray(idx_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, 15))] = data.draw(st.integers(0, 255))
    damaged = damaged[: data.draw(st.integers(0, len(damaged)))]
    path = tmp_path_factory.mktemp("damaged-idx") / "images-idx3-ubyte"
    path.write_bytes(bytes(damaged))
    try:
        array = read_idx(path)
    except DataError:
        return
    assert array.size * array.itemsize == len(damaged) - 4 - 4 * array.ndim
