"""Saved model and index folders: tamper-evident, validated on load, never a silent change (fuzzed with hypothesis)."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellular
from cellular import CELLULAR

FILES = ("model.json", "model.pt", "reference_index/index.json", "reference_index/arrays.npz")


@pytest.fixture(scope="module")
def saved(symphony_model, symphony_split, tmp_path_factory):
    """A model with its reference index, saved once; each example damages a copy of it."""
    train, test = symphony_split
    model = CELLULAR.load(_save(symphony_model, tmp_path_factory.mktemp("source")))
    model.build_reference_index(train)
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    cells = test[:40].copy()
    return path, cells, model.get_latent_representation(cells), model.fingerprint, model.reference_index_.embedding


def _save(model, folder):
    model.save(folder / "model")
    return folder / "model"


def _json_paths(value, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for position, item in enumerate(value[:5]):
            yield from _json_paths(item, (*prefix, position))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=5,
)


@st.composite
def mutations(draw):
    target = draw(st.sampled_from(FILES))
    kinds = ["flip", "truncate", "append"] + (["edit", "delete", "nudge"] if target.endswith(".json") else [])
    kind = draw(st.sampled_from(kinds))
    return target, kind, draw(st.integers(0, 2**31 - 1)), draw(json_values)


def _get(document, path):
    for key in path:
        document = document[key]
    return document


def _mutate(folder, target, kind, seed, value):
    path = folder / target
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    if kind == "flip":
        data[rng.integers(len(data))] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        data = data[: rng.integers(len(data))]
    elif kind == "append":
        data += bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
    else:
        document = json.loads(data)
        paths = [p for p in _json_paths(document) if p]
        if kind == "nudge":  # a plausible value where a number was: the edit a schema cannot catch
            paths = [
                p
                for p in paths
                if isinstance(_get(document, p), int | float) and not isinstance(_get(document, p), bool)
            ]
        where = paths[rng.integers(len(paths))]
        parent = _get(document, where[:-1])
        if kind == "delete":
            del parent[where[-1]]
        elif kind == "nudge":
            parent[where[-1]] = type(parent[where[-1]])(parent[where[-1]] * 2 + 1)
        else:
            parent[where[-1]] = value
        data = bytearray(json.dumps(document).encode())
    path.write_bytes(bytes(data))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations())
def test_damaged_files_fail_clearly_or_load_exactly(saved, mutation, tmp_path_factory):
    source, cells, embedding, fingerprint, reference = saved
    folder = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(source, folder)
    _mutate(folder, *mutation)
    try:
        model = CELLULAR.load(folder)
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        assert str(folder) in message, message  # names the file (or its folder)
        assert "weights_only=False" not in message
        return
    # Whatever loaded is exactly what was saved: saved again, it gives the same metadata and arrays.
    assert model.fingerprint == fingerprint
    np.testing.assert_array_equal(model.get_latent_representation(cells), embedding)
    resaved = folder.parent / "resaved"
    model.save(resaved)
    for name in ("model.json", "reference_index/index.json"):
        assert _content(source / name) == _content(resaved / name), name
    _assert_same_tensors(source / "model.pt", resaved / "model.pt")
    with (
        np.load(source / "reference_index/arrays.npz") as before,
        np.load(resaved / "reference_index/arrays.npz") as after,
    ):
        assert before.files == after.files
        for name in before.files:
            np.testing.assert_array_equal(before[name], after[name])


def _content(path):
    """The metadata without the records that depend on file bytes (compared through the arrays instead)."""
    document = json.loads(path.read_text())
    return {key: value for key, value in document.items() if key not in ("files", "metadata_sha256")}


def _assert_same_tensors(before, after):
    import torch

    first, second = torch.load(before, weights_only=True), torch.load(after, weights_only=True)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_intact_folders_round_trip_and_record_their_files(saved):
    source, cells, embedding, fingerprint, reference = saved
    metadata = json.loads((source / "model.json").read_text())
    assert set(metadata["files"]) == {"model.pt"} and len(metadata["metadata_sha256"]) == 64
    index_metadata = json.loads((source / "reference_index" / "index.json").read_text())
    assert index_metadata["model_fingerprint"] == fingerprint
    assert set(index_metadata["arrays"]) >= {"embedding", "cell_names", "calibration", "label_codes_0"}
    model = CELLULAR.load(source)
    np.testing.assert_array_equal(model.get_latent_representation(cells), embedding)
    index = cellular.ReferenceIndex.load(source / "reference_index")
    np.testing.assert_array_equal(index.embedding, reference)
