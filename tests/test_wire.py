"""Wire contract: round trips for every message, strict decoding, garbage in -> DecodeError only."""

from __future__ import annotations

import contextlib
import json
import typing

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetpipe import wire
from fleetpipe.codec import EncodedTensor, decode_tensor, encode_tensor
from fleetpipe.errors import DecodeError, EncodeError, VersionMismatch
from fleetpipe.wire import (
    Activation,
    EmulationControl,
    ErrorReport,
    Hop,
    Message,
    Metrics,
    NodeBirth,
    NodeDeath,
    NodeHealth,
    NodeProfile,
    PartReply,
    PartRequest,
    Plan,
    PlannerState,
    PlanStage,
    Result,
    SliceChunk,
    SliceRequest,
    SplitAssign,
    SplitPart,
    SplitUnit,
    StageAssign,
    decode,
    encode,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
frame_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
hashes = st.from_regex(r"[0-9a-f]{8,64}", fullmatch=True)
text = st.text(max_size=40)
label_text = st.text(min_size=1, max_size=30)
nat = st.integers(0, 2**63 - 1)
small = st.integers(0, 1000)
pos_float = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)
ts = st.floats(0, 4e9, allow_nan=False)
bits = st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16, 32])


@st.composite
def tensors(draw: st.DrawFn) -> EncodedTensor:
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dtype = draw(st.sampled_from(["float32", "float16", "int64", "bool"]))
    x = np.asarray(draw(st.integers(0, 2**31)) % 7 + np.arange(int(np.prod(shape))), dtype).reshape(shape)
    b = draw(bits) if dtype.startswith("float") else 32
    axis = draw(st.sampled_from([None, 0])) if b <= 8 and x.ndim else None
    return encode_tensor(x, b, axis=axis)


tensor_lists = st.lists(st.tuples(label_text, tensors()), max_size=3, unique_by=lambda p: p[0]).map(tuple)
hops = st.lists(st.builds(Hop, small, names, ts, pos_float, ts), max_size=3).map(tuple)
float_maps = st.dictionaries(text, pos_float, max_size=4)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(0, 4))
    stages, first = [], 0
    for i in range(n):
        last = first + draw(st.integers(0, 5))
        nodes = tuple(draw(st.lists(names, min_size=1, max_size=3, unique=True)))
        stages.append(PlanStage(i, first, last, nodes, draw(bits), draw(st.one_of(st.just(""), hashes)),
                                tuple(draw(st.lists(label_text, max_size=2))), ("out",), draw(pos_float)))
        first = last + 1
    if not stages and draw(st.booleans()):  # the planner says the fleet cannot run the model
        return Plan(draw(names), draw(nat), draw(label_text), (), draw(ts), planner_id=draw(names),
                    status="infeasible", detail=draw(text))
    return Plan(draw(names), draw(nat), draw(label_text), tuple(stages), draw(ts), draw(pos_float),
                draw(pos_float), draw(st.just("") | names))


@st.composite
def splits(draw: st.DrawFn, first: int, last: int, lead: str) -> SplitAssign:
    """A split of layers ``first..last`` led by ``lead``: lead-only and split units in sequence."""
    bounds = sorted(set(draw(st.lists(st.integers(first + 1, last), max_size=3)))) if last > first else []
    units = []
    for a, b in zip([first, *bounds], [*[x - 1 for x in bounds], last], strict=True):
        kind = draw(st.sampled_from(["", "spatial", "channel", "tensor"]))
        parts: tuple[SplitPart, ...] = ()
        merges: tuple[tuple[str, str, int], ...] = ()
        if kind:
            others = draw(st.lists(names.filter(lambda n: n != lead), min_size=1, max_size=3, unique=True))
            parts = tuple(SplitPart(n, draw(hashes), draw(nat), tuple(draw(st.lists(
                st.tuples(label_text, st.integers(0, 4), st.integers(0, 10), st.integers(11, 99)), max_size=2))))
                for n in [lead, *others])
            merges = (("y", draw(st.sampled_from(["concat", "sum", "first"])), draw(st.integers(0, 3))),)
        units.append(SplitUnit(a, b, kind, draw(hashes), draw(nat), ("x",), ("y",), parts, merges, draw(pos_float)))
    return SplitAssign(lead, tuple(units), draw(pos_float), draw(pos_float))


@st.composite
def assigns(draw: st.DrawFn) -> StageAssign:
    n = draw(st.integers(1, 8))
    stage = draw(st.integers(0, n - 1))
    first = draw(small)
    last = first + draw(small)
    nxt = stage + 1 if stage + 1 < n else None
    node = draw(names)
    split = draw(st.none() | splits(first, last, node))
    return StageAssign(draw(names), node, draw(nat), stage, n, first, last,
                       draw(label_text), draw(hashes), draw(nat), draw(ts), ("a",), ("b", "c"), draw(bits),
                       nxt, None, split)


MESSAGES: dict[type, st.SearchStrategy[typing.Any]] = {
    NodeBirth: st.builds(NodeBirth, names, names, nat, ts, text, st.integers(1, 256), nat,
                         st.lists(text, max_size=3).map(tuple), st.lists(text, max_size=3).map(tuple), text,
                         st.floats(0.001, 1e6), st.floats(0, 100),
                         st.none() | st.floats(0.001, 1e5), st.none() | float_maps),
    NodeDeath: st.builds(NodeDeath, names, names, nat, ts, text),
    PlannerState: st.builds(PlannerState, names, names, nat, st.booleans(), ts, text),
    NodeHealth: st.builds(NodeHealth, names, names, nat, ts, pos_float, nat, small, nat, nat, nat,
                          st.none() | small, nat, pos_float, pos_float, pos_float, bits,
                          st.none() | pos_float, st.none() | pos_float),
    Plan: plans(),
    StageAssign: assigns(),
    Activation: st.builds(Activation, names, nat, frame_ids, names, small, tensor_lists,
                          st.just("fleetpipe/v1/lab/result/c1"), ts, hops),
    Result: st.builds(Result, names, frame_ids, names, nat, tensor_lists, ts, hops, st.booleans(),
                      st.none() | small),
    ErrorReport: st.builds(ErrorReport, names, names, label_text, text, ts, st.none() | frame_ids),
    SliceChunk: st.integers(1, 10).flatmap(
        lambda c: st.builds(SliceChunk, hashes, st.integers(0, c - 1), st.just(c), st.binary(max_size=64))
    ),
    SliceRequest: st.builds(SliceRequest, names, names, hashes),
    Metrics: st.builds(Metrics, names, names, ts, float_maps),
    EmulationControl: st.builds(EmulationControl, names, names, ts,
                                st.none() | st.floats(1.0, 100.0), st.none() | st.floats(0.001, 1e5)),
    PartRequest: st.builds(PartRequest, names, nat, small, frame_ids, small, small, names, tensor_lists, ts),
    PartReply: st.builds(PartReply, names, nat, small, frame_ids, small, small, names, tensor_lists, pos_float,
                         ts, st.text(max_size=40)),
    NodeProfile: st.tuples(small, st.integers(0, 20)).flatmap(lambda fl: st.builds(
        NodeProfile, names, names, ts, hashes, st.just(fl[0]), st.just(fl[0] + fl[1]),
        st.lists(pos_float, min_size=fl[1] + 1, max_size=fl[1] + 1).map(tuple), st.integers(1, 64))),
}
any_message = st.one_of(*MESSAGES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGES) == set(typing.get_args(Message)) == set(wire.MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
def test_roundtrip(cls: type) -> None:
    @SETTINGS
    @given(MESSAGES[cls])
    def check(msg: typing.Any) -> None:
        data = encode(msg)
        assert isinstance(data, bytes)
        assert wire.is_binary(data) == cls.BINARY
        out = decode(data)
        assert type(out) is cls
        assert out == msg
        assert encode(out) == data

    check()


@SETTINGS
@given(any_message.filter(lambda m: not m.BINARY))
def test_control_messages_are_readable_json(msg: typing.Any) -> None:
    body = json.loads(encode(msg))
    assert body["v"] == wire.WIRE_VERSION and body["type"] == msg.TAG


def test_activation_tensors_decode_to_arrays() -> None:
    x = np.random.default_rng(0).standard_normal((1, 8, 4, 4)).astype(np.float32)
    msg = Activation("lab", 3, "f-1", "cli", 1, (("x", encode_tensor(x)), ("q", encode_tensor(x, 4))),
                     "fleetpipe/v1/lab/result/cli", 1.0)
    out = decode(encode(msg))
    assert isinstance(out, Activation)
    np.testing.assert_array_equal(decode_tensor(out.tensors[0][1]), x)
    assert np.max(np.abs(decode_tensor(out.tensors[1][1]) - x)) <= out.tensors[1][1].scale / 2 + 1e-6


# ------------------------------------------------------------------------------------ garbage in


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_decode_error_only(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100).map(lambda b: b"{" + b))
def test_random_json_ish_bytes_raise_decode_error_only(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message, st.data())
def test_truncations_and_bit_flips_raise_decode_error_only(msg: typing.Any, data: st.DataObject) -> None:
    enc = encode(msg)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(DecodeError):
        decode(enc[:cut])
    flipped = bytearray(enc)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(enc) - 1))
        flipped[i] ^= 1 << data.draw(st.integers(0, 7))
    with contextlib.suppress(DecodeError):
        decode(bytes(flipped))


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                    | st.text(max_size=5) | st.binary(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=12),
       st.sampled_from(sorted(wire.MESSAGE_TYPES)))
def test_well_formed_but_wrong_bodies(body: typing.Any, tag: str) -> None:
    env = {"v": 1, "type": tag, "fleet": body, "tensors": body, "stages": body, "data": body}
    if isinstance(body, dict):
        env.update(body)
        env["v"], env["type"] = 1, tag
    for data in (msgpack.packb(env, use_bin_type=True), json.dumps(env, default=repr).encode()):
        with contextlib.suppress(DecodeError):
            decode(data)


def _control() -> NodeDeath:
    return NodeDeath("lab", "pi-1", 7, 1.0, "lost")


def _body(msg: typing.Any) -> dict[str, typing.Any]:
    return json.loads(encode(msg))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version"),
        ({"type": "nope"}, "unknown message type"),
        ({"seq": "7"}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": -1}, "seq"),
        ({"node_id": "bad/id"}, "node_id"),
        ({"node_id": "+"}, "node_id"),
        ({"extra": 1}, "unknown fields"),
        ({"ts": 1e400}, "finite"),
    ],
)
def test_bad_fields_named(change: dict[str, typing.Any], match: str) -> None:
    body = {**_body(_control()), **change}
    with pytest.raises(DecodeError, match=match) as info:
        decode(json.dumps(body).encode())
    assert ("version" in match) == isinstance(info.value, VersionMismatch)


def test_missing_fields_and_versions() -> None:
    body = _body(_control())
    del body["seq"]
    with pytest.raises(DecodeError, match="missing fields"):
        decode(json.dumps(body).encode())
    for v in (None, "1", 1.0):
        with pytest.raises(DecodeError, match="version") as info:
            decode(json.dumps({**_body(_control()), "v": v}).encode())
        assert not isinstance(info.value, VersionMismatch)
    with pytest.raises(DecodeError, match="non-finite"):
        decode(b'{"v":1,"type":"node_death","ts":NaN}')


def test_encoding_kind_must_match() -> None:
    with pytest.raises(DecodeError, match="must be JSON"):
        decode(msgpack.packb(_body(_control())))
    chunk = SliceChunk("abcdef12", 0, 1, b"x")
    body = msgpack.unpackb(encode(chunk))
    body["data"] = "x"
    with pytest.raises(DecodeError, match="must be msgpack"):
        decode(json.dumps(body).encode())


def test_oversize_and_non_bytes() -> None:
    data = encode(_control())
    with pytest.raises(DecodeError, match="max_bytes"):
        decode(data, max_bytes=len(data) - 1)
    assert decode(data, max_bytes=len(data)) == _control()
    with pytest.raises(DecodeError, match="empty"):
        decode(b"")
    with pytest.raises(DecodeError):
        decode("text")  # type: ignore[arg-type]
    assert decode(memoryview(data)) == decode(bytearray(data)) == _control()


def test_tensor_byte_count_checked() -> None:
    msg = Activation("lab", 0, "f", "c", 0, (("x", encode_tensor(np.ones(4, np.float32))),), "r/t", 0.0)
    body = msgpack.unpackb(encode(msg))
    body["tensors"][0][1]["data"] = b"\x00" * 15
    with pytest.raises(DecodeError, match=r"tensors\[0\]"):
        decode(msgpack.packb(body, use_bin_type=True))
    body["tensors"][0][1]["data"] = b"\x00" * 16
    body["tensors"][0][1]["shape"] = [2**20, 2**20]
    with pytest.raises(DecodeError, match="elements"):
        decode(msgpack.packb(body, use_bin_type=True))
    body["tensors"][0] = ["x"]
    with pytest.raises(DecodeError):
        decode(msgpack.packb(body, use_bin_type=True))


# ------------------------------------------------------------------------------------ validation


def test_constructor_validation() -> None:
    with pytest.raises(TypeError):
        NodeDeath("lab", "n", "1", 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NodeDeath("lab", "n" * 65, 1, 0.0)
    with pytest.raises(ValueError):
        NodeDeath("la b", "n", 1, 0.0)
    with pytest.raises(ValueError):
        NodeHealth("lab", "n", 1, 0.0, bits=9)
    with pytest.raises(ValueError):
        PlanStage(0, 3, 2, ("a",))
    with pytest.raises(ValueError):
        PlanStage(0, 0, 2, ())
    with pytest.raises(ValueError, match="does not start"):
        Plan("lab", 0, "m", (PlanStage(0, 0, 2, ("a",)), PlanStage(1, 4, 5, ("b",))), 0.0)
    with pytest.raises(ValueError, match="index"):
        Plan("lab", 0, "m", (PlanStage(1, 0, 2, ("a",)),), 0.0)
    with pytest.raises(ValueError):
        StageAssign("lab", "n", 0, 2, 2, 0, 1, "m", "h", 0, 0.0)
    with pytest.raises(ValueError):
        SliceChunk("abc", 3, 3, b"")
    with pytest.raises(ValueError, match="duplicate"):
        t = encode_tensor(np.zeros(1, np.float32))
        Activation("lab", 0, "f", "c", 0, (("x", t), ("x", t)), "r", 0.0)
    with pytest.raises(ValueError, match="reply_to"):
        Activation("lab", 0, "f", "c", 0, (), "a/+/b", 0.0)
    with pytest.raises(TypeError):
        Metrics("lab", "n", 0.0, {"a": "1"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        Metrics("lab", "n", 0.0, {"a": float("nan")})


def test_coercions_and_immutability() -> None:
    b = NodeBirth("lab", "n", 1, 2, "x86_64", 2, 10, ["onnx"], [], "x86", 3,  # type: ignore[arg-type]
                  profile={"l0": 1})
    assert b.ts == 2.0 and isinstance(b.ts, float)
    assert b.runtimes == ("onnx",)
    assert b.profile is not None
    with pytest.raises(TypeError):
        b.profile["l1"] = 2.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        b.seq = 2  # type: ignore[misc]


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(EncodeError):
        encode(PlanStage(0, 0, 0, ("a",)))  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        encode({"v": 1})  # type: ignore[arg-type]


def test_framing_does_not_copy_via_tobytes() -> None:
    x = np.zeros((1, 64, 56, 56), np.float32)
    t = encode_tensor(x)
    assert isinstance(t.data, memoryview) and np.shares_memory(np.frombuffer(t.data, np.uint8), x)
    msg = Activation("lab", 0, "f", "c", 0, (("x", t),), "r", 0.0)
    data = encode(msg)
    assert len(data) - x.nbytes < 400


# ------------------------------------------------------------------------- framed data messages


def _big_activation() -> Activation:
    x = np.random.default_rng(1).standard_normal((1, 16, 9, 9)).astype(np.float32)
    return Activation("lab", 2, "f-9", "cli", 1, (("x", encode_tensor(x)), ("q", encode_tensor(x, 8)),
                                                  ("s", encode_tensor(x[0, 0, 0, :3]))),
                      "fleetpipe/v1/lab/result/cli", 1.0)


def test_big_payloads_are_framed_once_and_decoded_in_place() -> None:
    msg = _big_activation()
    data = encode(msg)
    assert isinstance(data, bytes) and data[:2] == b"\x92\xc6"
    # Any msgpack reader sees [blob, envelope]; the small tensor stays inline, the big ones are references.
    blob, env = msgpack.unpackb(data, raw=False, strict_map_key=False)
    refs = [t["data"] for _, t in env["tensors"]]
    assert [type(r) for r in refs] == [msgpack.ExtType, msgpack.ExtType, bytes]
    big = msg.tensors[0][1].nbytes + msg.tensors[1][1].nbytes
    assert big <= len(blob) < big + 2 * 16  # the two payloads, each padded to a 16-byte boundary
    out = decode(data)
    assert isinstance(out, Activation)
    base = np.frombuffer(data, np.uint8)
    for (name, t), (_, t0) in zip(out.tensors, msg.tensors, strict=True):
        assert bytes(t.data) == bytes(t0.data), name
    raw = out.tensors[0][1]
    assert isinstance(raw.data, memoryview) and np.shares_memory(np.frombuffer(raw.data, np.uint8), base)
    arr = decode_tensor(raw)
    assert np.shares_memory(arr, base) and arr.ctypes.data % 16 == 0  # aligned, so frombuffer did not copy
    np.testing.assert_array_equal(arr, decode_tensor(msg.tensors[0][1]))
    assert out == decode(bytes(data)) and len(data) - sum(t.nbytes for _, t in msg.tensors) < 400


def test_framed_garbage_raises_decode_error_only() -> None:
    data = encode(_big_activation())
    blob_len = int.from_bytes(data[2:6], "big")
    for cut in (1, 5, 6, 7, 6 + blob_len - 1, 6 + blob_len, 6 + blob_len + 1, len(data) - 1):
        with pytest.raises(DecodeError):
            decode(data[:cut])
    bad_len = data[:2] + (blob_len + 10**6).to_bytes(4, "big") + data[6:]
    with pytest.raises(DecodeError, match="truncated frame"):
        decode(bad_len)
    env_at = 6 + blob_len
    rng = np.random.default_rng(0)
    for _ in range(300):  # flips in the envelope, where the references live
        flipped = bytearray(data)
        i = int(rng.integers(env_at, len(data)))
        flipped[i] ^= 1 << int(rng.integers(0, 8))
        with contextlib.suppress(DecodeError):
            decode(bytes(flipped))
    ref = msgpack.ExtType(wire.REF_EXT, (0).to_bytes(8, "big") + (blob_len + 1).to_bytes(8, "big"))
    env = msgpack.packb({"v": 1, "type": "slice_chunk", "x": ref})
    with pytest.raises(DecodeError, match="outside a blob"):
        decode(data[:env_at] + env)
    other = msgpack.packb({"v": 1, "type": "slice_chunk", "x": msgpack.ExtType(7, b"\0" * 16)})
    with pytest.raises(DecodeError, match="unknown ext type"):
        decode(data[:env_at] + other)


def _unit(kind: str = "spatial", parts: tuple[str, ...] = ("a", "b")) -> SplitUnit:
    return SplitUnit(0, 2, kind, "ab12", 10, ("x",), ("y",), tuple(SplitPart(n, "cd34", 5) for n in parts),
                     (("y", "concat", 2),) if kind else ())


def test_split_assign_validation() -> None:
    split = SplitAssign("a", (_unit(),))
    assign = StageAssign("lab", "b", 1, 0, 1, 0, 2, "m", "ab12", 10, 0.0, split=split)
    assert decode(encode(assign)) == assign
    with pytest.raises(ValueError, match="no role"):
        StageAssign("lab", "c", 1, 0, 1, 0, 2, "m", "ab12", 10, 0.0, split=split)
    with pytest.raises(ValueError, match="cover"):
        StageAssign("lab", "a", 1, 0, 1, 0, 3, "m", "ab12", 10, 0.0, split=split)
    with pytest.raises(ValueError, match="lead computes"):
        SplitAssign("z", (_unit(),))
    with pytest.raises(ValueError, match=">= 2 nodes"):
        _unit(parts=("a",))
    with pytest.raises(ValueError, match=">= 2 nodes"):
        _unit(parts=("a", "a"))
    tiled = SplitAssign("a", (_unit(parts=("a", "a", "b", "b")),))  # two row tiles per node (Galaxy+ overlap)
    tiled_assign = StageAssign("lab", "b", 1, 0, 1, 0, 2, "m", "ab12", 10, 0.0, split=tiled)
    assert decode(encode(tiled_assign)) == tiled_assign
    with pytest.raises(ValueError, match="one merge per output"):
        SplitUnit(0, 2, "tensor", "ab12", 10, ("x",), ("y",), (SplitPart("a", "cd", 1), SplitPart("b", "cd", 1)))
    with pytest.raises(ValueError, match="does not follow"):
        SplitAssign("a", (_unit(), _unit()))
    with pytest.raises(ValueError, match="bad range"):
        SplitPart("a", "cd34", 5, (("x", 2, 4, 4),))
    with pytest.raises(TypeError):
        SplitAssign("a", (_unit(),), part_timeout_ms="soon")  # type: ignore[arg-type]


def test_node_profile_checks_its_layer_times() -> None:
    ok = NodeProfile("lab", "pi-1", 1.0, "abc123", 2, 4, (0.5, 1.0, 2.0), 2)
    assert decode(encode(ok)) == ok
    with pytest.raises(ValueError, match="layer_ms has 3 times"):
        NodeProfile("lab", "pi-1", 1.0, "abc123", 2, 5, (0.5, 1.0, 2.0))
    with pytest.raises(ValueError, match="finite"):
        NodeProfile("lab", "pi-1", 1.0, "abc123", 0, 0, (float("nan"),))
    with pytest.raises(ValueError, match="threads"):
        NodeProfile("lab", "pi-1", 1.0, "abc123", 0, 0, (1.0,), 0)
    with pytest.raises(ValueError, match="model_id"):
        NodeProfile("lab", "pi-1", 1.0, "", 0, 0, (1.0,))
    with pytest.raises(ValueError, match="first_layer"):
        NodeProfile("lab", "pi-1", 1.0, "abc123", -1, 0, (1.0, 1.0))
