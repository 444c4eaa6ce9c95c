"""Slices are refused before any runtime sees them, and assignments must carry the planner's signature."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import onnx
import pytest

from fleetpipe import signing, wire
from fleetpipe.errors import ConfigError, UntrustedSlice
from fleetpipe.node.runtime.verify import SliceLimits, checked_kind, verify_slice

from . import forged


def test_external_data_is_refused_before_loading() -> None:
    data = forged.external_data_slice()
    assert len(data) < 204  # the red team's slice was 204 bytes
    with pytest.raises(UntrustedSlice, match=r"external data .*README\.md"):
        checked_kind(data, SliceLimits())


def test_fake_runtime_only_when_the_local_config_allows_it() -> None:
    data = forged.fake_runtime_slice()
    with pytest.raises(UntrustedSlice, match="fake-runtime"):
        checked_kind(data, SliceLimits())
    assert checked_kind(data, SliceLimits(allow_fake=True)) == "fake"


@pytest.mark.parametrize("make, why", [(forged.custom_domain_slice, "domain 'com.evil'"),
                                       (forged.huge_declared_slice, "declares .* bytes")])
def test_operator_set_and_declared_sizes_are_bounded(make: object, why: str) -> None:
    with pytest.raises(UntrustedSlice, match=why):
        checked_kind(make(), SliceLimits())  # type: ignore[operator]


def test_model_local_functions_and_size_limit() -> None:
    from onnx import helper

    model = onnx.ModelProto()
    model.ParseFromString(forged.custom_domain_slice())
    del model.opset_import[1]
    model.graph.node[0].domain = ""
    model.functions.append(helper.make_function("", "F", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                                [helper.make_opsetid("", 13)]))
    with pytest.raises(UntrustedSlice, match="function"):
        verify_slice(model.SerializeToString(), "onnx", SliceLimits())
    with pytest.raises(UntrustedSlice, match="exceeds"):
        verify_slice(b"\x08" * 100, "onnx", SliceLimits(max_bytes=99))


def test_tflite_buffer_outside_the_file_is_refused() -> None:
    pytest.importorskip("ai_edge_litert")
    with pytest.raises(UntrustedSlice, match="outside"):
        checked_kind(forged.tflite_outside_buffer(), SliceLimits())


def test_a_real_zoo_slice_passes() -> None:
    from fleetpipe.models import zoo

    data = zoo.build("resnet18", width=0.25, resolution=32, num_classes=10).SerializeToString()
    assert checked_kind(data, SliceLimits()) == "onnx"


def _assign(**over: object) -> wire.StageAssign:
    base = dict(fleet="f", node_id="n1", epoch=3, stage=0, n_stages=1, first_layer=0, last_layer=4, model_id="m",
                slice_hash="a" * 64, slice_size=1000, ts=time.time(), input_names=("x",), output_names=("y",))
    return wire.StageAssign(**{**base, **over})  # type: ignore[arg-type]


def test_signed_assignments_verify_and_forgeries_do_not(tmp_path: Path) -> None:
    pem, pub = signing.generate_keypair()
    (tmp_path / "k").write_bytes(pem)
    (tmp_path / "o").write_bytes(signing.generate_keypair()[0])
    priv, other = signing.load_private_key(tmp_path / "k"), signing.load_private_key(tmp_path / "o")
    key = signing.load_public_key(pub)
    signed = signing.sign_assign(_assign(), priv)
    again = wire.decode(wire.encode(signed))  # what the node gets off the wire
    signing.verify_assign(again, key)
    with pytest.raises(UntrustedSlice, match="unsigned"):
        signing.verify_assign(_assign(), key)
    with pytest.raises(UntrustedSlice, match="bad signature"):
        signing.verify_assign(signing.sign_assign(_assign(), other), key)
    for change in ({"slice_hash": "b" * 64}, {"node_id": "n2"}, {"epoch": 4}, {"fleet": "g"}, {"slice_size": 1}):
        with pytest.raises(UntrustedSlice, match="bad signature"):
            signing.verify_assign(dataclasses.replace(signed, **change), key)
    with pytest.raises(ConfigError):
        signing.load_public_key("not base64!")
