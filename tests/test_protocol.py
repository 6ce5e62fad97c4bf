"""The wire encoding: orjson where it can, the json module for what orjson refuses."""

from __future__ import annotations

import json
import uuid

import pytest

from famulus.ipc.protocol import Event, ProtocolError, decode_event, dumps, loads, new_id


def test_new_id_is_a_uuid4_in_hex() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("obj", [
    {"path": "/tmp/Zürich.txt", "n": 1.5, "nested": {"a": [1, None, True]}},
    {"path": "/tmp/bad \udc80 name.txt"},  # a file name that is not valid UTF-8
    {"big": 2 ** 70},
    {1: "key that is not a string"},
])
def test_dumps_round_trips_what_orjson_refuses(obj: dict[object, object]) -> None:
    encoded = dumps(obj)
    encoded.decode("utf-8")  # always valid UTF-8 on the wire
    assert loads(encoded) == json.loads(json.dumps(obj))


def test_dumps_writes_non_finite_numbers_as_null() -> None:
    # null, because strict JSON parsers in other languages reject NaN.
    assert loads(dumps({"x": float("nan"), "y": float("inf")})) == {"x": None, "y": None}


def test_loads_accepts_json_from_other_programs() -> None:
    assert loads(b'"\\ud800"') == "\ud800"
    nan = loads(b"NaN")
    assert nan != nan
    # Past 64 bits orjson returns a float, and handlers that expect an integer reject it.
    assert loads(b"123456789012345678901234567890") == pytest.approx(1.2345678901234568e29)


@pytest.mark.parametrize("text", [b"", b"{", b"\xff\xfe", b"[" * 100_000])
def test_loads_raises_value_or_recursion_error(text: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)):
        loads(text)


def test_deeply_nested_event_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_event([b"job.done", b"[" * 100_000])


def test_event_frames_decode_to_the_same_event() -> None:
    event = Event(seq=7, id=new_id(), cause=None, ts=1733337600.5, topic="job.done",
                  body={"job": 3, "path": "/tmp/\udc80.txt"})
    assert decode_event(event.frames()) == event
