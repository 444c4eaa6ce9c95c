"""Topic table, builders, parser and MQTT wildcard matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetpipe import topics
from fleetpipe.topics import SPECS, matches, parse, shared
from fleetpipe.wire import Activation, NodeBirth, NodeDeath, Plan, PlannerState, Result, StageAssign

EXPECTED = {
    "node_state": ("fleetpipe/v1/{fleet}/node/{node_id}/state", 1, True),
    "node_health": ("fleetpipe/v1/{fleet}/node/{node_id}/health", 0, False),
    "node_assign": ("fleetpipe/v1/{fleet}/node/{node_id}/assign", 1, True),
    "node_metrics": ("fleetpipe/v1/{fleet}/node/{node_id}/metrics", 0, False),
    "node_profile": ("fleetpipe/v1/{fleet}/node/{node_id}/profile", 1, True),
    "node_control": ("fleetpipe/v1/{fleet}/node/{node_id}/control", 1, False),
    "plan": ("fleetpipe/v1/{fleet}/plan", 1, True),
    "stage_in": ("fleetpipe-data/v1/{fleet}/epoch/{epoch}/stage/{stage}/in/{client_id}", 1, False),
    "part_in": ("fleetpipe-data/v1/{fleet}/epoch/{epoch}/stage/{stage}/part/{node_id}/{lead}", 1, False),
    "part_gather": ("fleetpipe-data/v1/{fleet}/epoch/{epoch}/stage/{stage}/gather/{lead}/{node_id}", 1, False),
    "result": ("fleetpipe-data/v1/{fleet}/result/{client_id}", 1, False),
    "error": ("fleetpipe/v1/{fleet}/error", 1, False),
    "slice_chunk": ("fleetpipe-data/v1/{fleet}/slice/{slice_hash}/{index}", 1, True),
    "slice_request": ("fleetpipe-data/v1/{fleet}/slice/request", 1, False),
}


def test_table() -> None:
    assert {n: (s.pattern, s.qos, s.retain) for n, s in SPECS.items()} == EXPECTED
    assert SPECS["node_state"].payload == (NodeBirth, NodeDeath, PlannerState)
    assert SPECS["plan"].payload == (Plan,)
    assert SPECS["node_assign"].payload == (StageAssign,)
    assert SPECS["stage_in"].payload == (Activation,)
    assert SPECS["result"].payload == (Result,)
    assert len({s.pattern for s in SPECS.values()}) == len(SPECS)


def test_builders_and_parse() -> None:
    cases = [
        (topics.node_state("lab", "pi-1"), "node_state", {"fleet": "lab", "node_id": "pi-1"}),
        (topics.node_health("lab", "pi-1"), "node_health", {"fleet": "lab", "node_id": "pi-1"}),
        (topics.node_assign("lab", "pi-1"), "node_assign", {"fleet": "lab", "node_id": "pi-1"}),
        (topics.node_metrics("lab", "a.b"), "node_metrics", {"fleet": "lab", "node_id": "a.b"}),
        (topics.plan("lab"), "plan", {"fleet": "lab"}),
        (topics.stage_in("lab", 7, 3, "cam"), "stage_in", {"fleet": "lab", "epoch": 7, "stage": 3, "client_id": "cam"}),
        (topics.result("lab", "cli"), "result", {"fleet": "lab", "client_id": "cli"}),
        (topics.error("lab"), "error", {"fleet": "lab"}),
        (topics.slice_chunk("lab", "ab12", 0), "slice_chunk",
         {"fleet": "lab", "slice_hash": "ab12", "index": 0}),
        (topics.slice_request("lab"), "slice_request", {"fleet": "lab"}),
    ]
    for topic, name, params in cases:
        spec, got = parse(topic)
        assert topic.startswith("fleetpipe-data/v1/lab/" if spec.data_plane else "fleetpipe/v1/lab/")
        assert spec.name == name and got == params
        assert spec.topic(**params) == topic
    assert topics.stage_in("lab", 1, 2, "cam") == "fleetpipe-data/v1/lab/epoch/1/stage/2/in/cam"
    assert topics.node_state("f", "n") == "fleetpipe/v1/f/node/n/state"


@pytest.mark.parametrize(
    "bad",
    [
        "fleetpipe/v1/lab/unknown",
        "fleetpipe/v2/lab/plan",
        "fleetpipe/v1/lab/stage/x/in",
        "fleetpipe/v1/lab/stage/01/in",
        "fleetpipe/v1/lab/stage/-1/in",
        "fleetpipe/v1/lab/node/a b/state",
        "fleetpipe/v1/lab/node//state",
        "fleetpipe/v1/lab/plan/extra",
        "fleetpipe/v1/+/plan",
        "",
        "other/topic",
    ],
)
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse(bad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: topics.node_state("lab", "a/b"),
        lambda: topics.node_state("l+b", "n"),
        lambda: topics.node_state("lab", "#"),
        lambda: topics.node_state("lab", ""),
        lambda: topics.stage_in("lab", 1, -1, "c"),
        lambda: topics.stage_in("lab", 1, True, "c"),
        lambda: topics.stage_in("lab", 1, 1, "+"),
        lambda: topics.result("lab", "x" * 65),
        lambda: topics.slice_chunk("lab", "h", 1.5),
        lambda: topics.shared("a/b", "x"),
        lambda: topics.shared("g", "a/#/b"),
        lambda: topics.shared("g", "$share/h/x"),
        lambda: SPECS["plan"].topic(fleet="lab", extra=1),
        lambda: SPECS["plan"].filter(nope="x"),
    ],
)
def test_builders_validate(call: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        call()  # type: ignore[operator]


def test_filters_and_shared() -> None:
    states = SPECS["node_state"].filter(fleet="lab")
    assert states == "fleetpipe/v1/lab/node/+/state"
    assert matches(states, topics.node_state("lab", "n1"))
    assert not matches(states, topics.node_state("other", "n1"))
    assert not matches(states, topics.node_health("lab", "n1"))
    group = topics.stage_group("lab", 1, 1)
    assert group == "lab-e1-s1"
    sub = shared(group, topics.stage_in_filter("lab", 1, 1))
    assert sub == "$share/lab-e1-s1/fleetpipe-data/v1/lab/epoch/1/stage/1/in/+"
    assert matches(sub, topics.stage_in("lab", 1, 1, "cam"))
    assert not matches(sub, topics.stage_in("lab", 1, 2, "cam"))
    assert matches(topics.fleet_filter("lab"), topics.plan("lab"))
    assert not matches(topics.fleet_filter("lab"), topics.plan("lab2"))
    assert SPECS["slice_chunk"].filter(fleet="f", slice_hash="ab") == "fleetpipe-data/v1/f/slice/ab/+"
    assert topics.spec_for(NodeDeath("f", "n", 0, 0.0)) == (SPECS["node_state"],)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b", False),
        ("a/b", "a/b/c", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a//c", True),
        ("a/+", "a/x/y", False),
        ("+", "a", True),
        ("+", "/a", False),
        ("+/+", "/a", True),
        ("/+", "/a", True),
        ("#", "a/b/c", True),
        ("#", "/", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("a/+/#", "a/b", True),
        ("a/+/#", "a", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$SYS/+", "$SYS/x", True),
        ("a/$x", "a/$x", True),
        ("+/$x", "a/$x", True),
        ("$share/g/a/+", "a/b", True),
        ("$share/g/#", "a/b", True),
        ("$share/g/#", "$SYS/b", False),
        ("$share/g/a/b", "g/a/b", False),
        ("A/b", "a/b", False),
        ("a/b/", "a/b/", True),
        ("a/b/", "a/b", False),
    ],
)
def test_matches(flt: str, topic: str, expected: bool) -> None:
    assert matches(flt, topic) is expected


BAD_FILTERS = ["a/#/b", "a#", "a/b+", "+a", "", "$share/g", "$share//a", "$share/g+/a", "a\x00"]


@pytest.mark.parametrize("flt", BAD_FILTERS)
def test_invalid_filters(flt: str) -> None:
    with pytest.raises(ValueError):
        matches(flt, "a/b")


@pytest.mark.parametrize("topic", ["a/+", "#", "", "a\x00b"])
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(ValueError):
        matches("#", topic)


level = st.sampled_from(["a", "b", "", "$x", "c1"])


@settings(max_examples=200, deadline=None)
@given(st.lists(level, min_size=1, max_size=5), st.data())
def test_matches_properties(levels: list[str], data: st.DataObject) -> None:
    topic = "/".join(levels)
    if not topic:
        return
    assert matches(topic, topic)
    # Replacing any non-first level by '+', or any suffix (after the first level) by '#', still matches.
    i = data.draw(st.integers(0, len(levels) - 1))
    plus = [*levels[:i], "+", *levels[i + 1 :]]
    hash_ = [*levels[:i], "#"]
    dollar = topic.startswith("$")
    assert matches("/".join(plus), topic) is not (dollar and i == 0)
    assert matches("/".join(hash_), topic) is not (dollar and i == 0)
    assert matches(shared("g", "/".join(plus)), topic) is not (dollar and i == 0)
    assert not matches(topic + "/extra", topic)


def test_split_stage_topics_round_trip() -> None:
    req = topics.part_in("lab", 3, 1, "pi-2", "pi-1")
    rep = topics.part_gather("lab", 3, 1, "pi-1", "pi-2")
    assert req == "fleetpipe-data/v1/lab/epoch/3/stage/1/part/pi-2/pi-1"
    assert parse(req) == (SPECS["part_in"], {"fleet": "lab", "epoch": 3, "stage": 1, "node_id": "pi-2", "lead": "pi-1"})
    assert parse(rep) == (SPECS["part_gather"],
                          {"fleet": "lab", "epoch": 3, "stage": 1, "lead": "pi-1", "node_id": "pi-2"})
    assert matches(SPECS["part_in"].filter(fleet="lab", node_id="pi-2"), req)
    assert not matches(SPECS["part_in"].filter(fleet="lab", node_id="pi-3"), req)
    assert not matches(topics.stage_in_filter("lab", 3, 1), req)


def test_check_binds_identity_to_the_topic() -> None:
    """A payload naming another node, client, lead or fleet than its topic is refused (the ACL binds topics)."""
    from fleetpipe import wire

    death = NodeDeath("lab", "n1", 0, 0.0)
    assert topics.check(topics.node_state("lab", "n1"), death)["node_id"] == "n1"
    for topic in (topics.node_state("lab", "n0"), topics.node_state("lab2", "n1"), topics.node_health("lab", "n1")):
        with pytest.raises(ValueError):
            topics.check(topic, death)
    health = wire.NodeHealth(fleet="lab", node_id="n1", seq=0, ts=0.0)
    metrics = wire.Metrics(fleet="lab", node_id="n1", ts=0.0, values={})
    with pytest.raises(ValueError):
        topics.check(topics.node_health("lab", "n0"), health)
    with pytest.raises(ValueError):
        topics.check(topics.node_metrics("lab", "n0"), metrics)
    act = wire.Activation(fleet="lab", epoch=1, frame_id="f", client_id="cam-1", stage=0, tensors=(),
                          reply_to=topics.result("lab", "cam-1"), sent_ts=0.0)
    topics.check(topics.stage_in("lab", 1, 0, "cam-1"), act)
    with pytest.raises(ValueError):
        topics.check(topics.stage_in("lab", 1, 0, "cam-2"), act)
    rep = wire.PartReply(fleet="lab", epoch=1, stage=0, frame_id="f", unit=0, part=1, node_id="n2", tensors=(),
                         compute_ms=0.0, sent_ts=0.0)
    topics.check(topics.part_gather("lab", 1, 0, "n1", "n2"), rep)
    with pytest.raises(ValueError):
        topics.check(topics.part_gather("lab", 1, 0, "n1", "n3"), rep)
    # The planner's birth belongs only on the reserved node name's state topic: a node cannot forge one on its own.
    birth = wire.PlannerState(fleet="lab", planner_id="p-1", seq=0, online=True, ts=0.0)
    assert topics.check(topics.planner_state("lab"), birth)["node_id"] == topics.PLANNER_ID
    with pytest.raises(ValueError):
        topics.check(topics.node_state("lab", "n0"), birth)


def test_data_plane_has_its_own_prefix():
    """Frames, parts, results and slices never match the control-plane filter a human watches (issue 20 item 9)."""
    data = {name for name, spec in SPECS.items() if spec.data_plane}
    assert data == {"stage_in", "part_in", "part_gather", "result", "slice_chunk", "slice_request"}
    for spec in SPECS.values():
        sample = spec.filter(fleet="lab").replace("+", "x1")
        assert matches(topics.control_filter("lab"), sample) != spec.data_plane, spec.name
        assert matches(topics.data_filter("lab"), sample) == spec.data_plane, spec.name
        assert not matches("fleetpipe/#", sample) or not spec.data_plane
