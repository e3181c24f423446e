"""Property tests of the manifest decoder: whatever manifest.json a folder holds, `read_manifest` returns
the typed manifest of the stage it names or raises BadInputError naming manifest.json; never another
exception. Inputs: random JSON documents, and real manifests (export, quantize) with one field replaced by a
random value, one key deleted, or one key added, at any depth."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.manifest import read_manifest
from qwen3_compile.storage.manifests import Manifest

FUZZ = settings(
    max_examples=150,
    deadline=1000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["export", "quantize", "lower", "build", "fp32", "int8-wo", "../x", "/etc/passwd"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def real_manifests(artifacts) -> list[dict]:
    folders = [
        artifacts.export("tiny-dense"),
        artifacts.quantized("tiny-dense", "int8-wo"),
        artifacts.lowered("tiny-moe").directory,
    ]
    return [json.loads((Path(f) / "manifest.json").read_text()) for f in folders]


def _paths(node, prefix=()):
    """Every (path, container) in a JSON document: the places a mutation can go."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _replace(document, path, value):
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    node = copy
    for step in path[:-1]:
        node = node[step]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


_DELETE = object()


def _check(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_text(text)
        try:
            manifest = read_manifest(Path(tmp))
        except BadInputError as err:
            assert "manifest.json" in str(err)
            return
        assert isinstance(manifest, Manifest)


@FUZZ
@given(document=json_values)
def test_random_documents(document):
    _check(json.dumps(document))


@FUZZ
@given(data=st.data())
def test_real_manifest_with_one_field_changed(real_manifests, data):
    document = data.draw(st.sampled_from(real_manifests))
    path = data.draw(st.sampled_from(list(_paths(document))))
    change = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if change == "replace":
        mutated = _replace(document, path, data.draw(json_values))
    elif change == "delete" and path:
        mutated = _replace(document, path, _DELETE)
    else:  # add a key beside the path's node (or at the top)
        parent = path[:-1] if path else ()
        node = document
        for step in parent:
            node = node[step]
        if not isinstance(node, dict):
            return
        key = data.draw(st.text(max_size=8))
        mutated = _replace(document, (*parent, key), data.draw(json_values))
    _check(json.dumps(mutated))
