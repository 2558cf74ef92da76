"""inferoxy.messages: typed bus headers that read and write the same msgpack maps the hand-built dicts did."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_manager.scheduler import Dispatch, ModelDrained
from inferoxy import messages as m
from inferoxy import runtime, wire
from inferoxy.protocol import ErrorCode

META = {"name": "x", "dtype": "float32", "shape": [2, 3]}

# Each message kind, as a struct and as the dict a peer builds by hand (docs/PROTOCOL.md).
SAME: list[tuple[m.Message, dict[str, Any]]] = [
    (m.Infer(id=7, model="m", version=None, timeout_ms=250, params={"priority": "high"}, tensors=[META], rid="r-7"),
     {"t": "infer", "id": 7, "model": "m", "version": None, "timeout_ms": 250, "params": {"priority": "high"},
      "tensors": [META], "rid": "r-7"}),
    (m.Cancel(id=7), {"t": "cancel", "id": 7}),
    (m.Reply(id=7, model="m", version="1", tensors=[META]),
     {"t": "reply", "id": 7, "model": "m", "version": "1", "tensors": [META]}),
    (m.Error(id=None, code=ErrorCode.BAD_INPUT, message="no"),
     {"t": "error", "id": None, "code": "bad_input", "message": "no"}),
    (m.Heartbeat(), {"t": "hb"}),
    (m.Heartbeat(epoch="e1"), {"t": "hb", "epoch": "e1"}),
    (m.Heartbeat(resync=True), {"t": "hb", "resync": True}),
    (m.ReplicaUp(replica="r1", model="m", version="1", capacity=2),
     {"t": "replica_up", "replica": "r1", "model": "m", "version": "1", "capacity": 2}),
    (m.ReplicaDown(replica="r1", reason="exit 1"), {"t": "replica_down", "replica": "r1", "reason": "exit 1"}),
    (m.ReplicaDraining(replica="r1", reason="update"),
     {"t": "replica_draining", "replica": "r1", "reason": "update"}),
    (m.ReplicaDraining(replica="r1", reason="scaled down", sessions_grace_s=60.0),
     {"t": "replica_draining", "replica": "r1", "reason": "scaled down", "sessions_grace_s": 60.0}),
    (m.ModelStatus(model="m", version="1", state="failed", reason="boom"),
     {"t": "model_status", "model": "m", "version": "1", "state": "failed", "reason": "boom"}),
    (m.ModelDrained(model="m", version="1"), {"t": "model_drained", "model": "m", "version": "1"}),
    (m.Load(models=[m.ModelLoad(model="m", version="1", queued=5, in_flight=2)]),
     {"t": "load", "models": [{"model": "m", "version": "1", "queued": 5, "in_flight": 2}]}),
    (m.Credit(replica="r1", capacity=1), {"t": "credit", "replica": "r1", "capacity": 1}),
    (m.Batch(replica="r1", batch=3, model="m", version="1",
             items=[m.BatchItem(id=1, n=1), m.BatchItem(id=2, n=1, session="s", start=True, end=True, rid="r-2")],
             tensors=[META, META], end_sessions=[4]),
     {"t": "batch", "replica": "r1", "batch": 3, "model": "m", "version": "1",
      "items": [{"id": 1, "n": 1}, {"id": 2, "n": 1, "session": "s", "start": True, "end": True, "rid": "r-2"}],
      "tensors": [META, META], "end_sessions": [4]}),
    (m.Result(replica="r1", batch=3, items=[m.ResultItem(n=1), m.ResultItem(n=0, code="session_lost", message="x")],
              tensors=[META]),
     {"t": "result", "replica": "r1", "batch": 3, "items": [{"n": 1}, {"n": 0, "code": "session_lost",
                                                                          "message": "x"}], "tensors": [META]}),
    (m.Result(replica="r1", batch=4, items=[m.ResultItem(n=1)], tensors=[META], compute_ns=1_500_000),
     {"t": "result", "replica": "r1", "batch": 4, "items": [{"n": 1}], "tensors": [META], "compute_ns": 1_500_000}),
    (m.Failed(replica="r1", batch=3, code="model_error", message="ZeroDivisionError"),
     {"t": "failed", "replica": "r1", "batch": 3, "code": "model_error", "message": "ZeroDivisionError"}),
    (m.Ready(replica="r1", model="m", version="1", capacity=2, pid=99),
     {"t": "ready", "replica": "r1", "model": "m", "version": "1", "capacity": 2, "pid": 99}),
    (m.Ready(replica="r1", model="m", version="1", capacity=2, pid=99, warmup_s=0.25),
     {"t": "ready", "replica": "r1", "model": "m", "version": "1", "capacity": 2, "pid": 99, "warmup_s": 0.25}),
    (m.Stop(), {"t": "stop"}),
]
ANY = m.Codec(*{type(struct) for struct, _ in SAME})


def test_the_one_codec_reads_every_kind() -> None:
    assert set(m.ANY.kinds) == set(ANY.kinds)
    for struct, _ in SAME:
        assert m.decode(m.encode(struct)) == struct


@pytest.mark.parametrize(("struct", "by_hand"), SAME, ids=lambda value: getattr(value, "t", None) or "")
def test_a_struct_is_the_map_a_peer_builds_by_hand(struct: m.Message, by_hand: dict[str, Any]) -> None:
    # msgpack-python (what replicas use) reads what msgspec wrote, and the other way round.
    assert msgpack.unpackb(m.encode(struct), raw=False) == by_hand
    assert ANY.decode(msgpack.packb(by_hand, use_bin_type=True)) == struct
    assert ANY.decode(wire.pack_header(by_hand)) == struct


def test_every_kind_of_docs_protocol_has_a_struct() -> None:
    from inferoxy import protocol
    kinds = {value for name, value in vars(protocol).items() if name.isupper() and isinstance(value, str)}
    assert kinds == {str(kind.__struct_config__.tag) for kind in ANY.kinds}


def test_the_proxy_sends_the_bytes_its_hand_built_dicts_did() -> None:
    # The batch manager builds structs now; a replica (plain msgpack) must see exactly the frames it saw before.
    dispatch = Dispatch("r1", 5, "m", "1", [m.BatchItem(1, 1), m.BatchItem(2, 1, session=9, start=True)],
                        [META, META], ["a", "b"], ragged=True, end_sessions=[3])
    assert m.encode(dispatch.header()) == wire.pack_header(
        {"t": "batch", "replica": "r1", "batch": 5, "model": "m", "version": "1",
         "items": [{"id": 1, "n": 1}, {"id": 2, "n": 1, "session": 9, "start": True}],
         "tensors": [META, META], "ragged": True, "end_sessions": [3]})
    plain = Dispatch("r1", 6, "m", "1", [m.BatchItem(1, 1)], [META], ["a"], end_sessions=[])
    assert m.encode(plain.header()) == wire.pack_header(
        {"t": "batch", "replica": "r1", "batch": 6, "model": "m", "version": "1", "items": [{"id": 1, "n": 1}],
         "tensors": [META]})
    assert m.encode(ModelDrained("m", "1").header()) == wire.pack_header({"t": "model_drained", "model": "m",
                                                                          "version": "1"})
    assert m.encode(m.Reply(4, "m", "1", [META])) == wire.pack_header(
        {"t": "reply", "id": 4, "model": "m", "version": "1", "tensors": [META]})
    assert m.encode(m.Error(None, ErrorCode.DEADLINE, "late")) == wire.pack_header(
        {"t": "error", "id": None, "code": "deadline", "message": "late"})
    # The request's id is new, and last: every field before it packs as it did.
    assert m.encode(m.Infer(7, "m", None, 250, {}, [META], "r-7")) == wire.pack_header(
        {"t": "infer", "id": 7, "model": "m", "version": None, "timeout_ms": 250, "params": {}, "tensors": [META],
         "rid": "r-7"})


def test_the_headers_the_runtime_builds_by_hand_decode() -> None:
    class Double:
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": inputs["x"] * 2}

    header = {"t": "batch", "replica": "r1", "batch": 5, "items": [{"id": 1, "n": 1}, {"id": 2, "n": 1}],
              "tensors": [META, META]}
    x = np.ones((2, 3), dtype=np.float32)
    frames = runtime.answer_batch(Double(), "r1", header, [("x", x), ("x", x)])  # type: ignore[arg-type]
    result = m.REPLICA_TO_TASK_MANAGER.decode(frames[0])
    assert isinstance(result, m.Result) and result.items == [m.ResultItem(1), m.ResultItem(1)]
    failed = m.REPLICA_TO_TASK_MANAGER.decode(runtime.failed_message("r1", 5, ErrorCode.MODEL_ERROR, "no")[0])
    assert failed == m.Failed("r1", 5, "model_error", "no")


def header(**fields: Any) -> bytes:
    return msgpack.packb({"t": "infer", "id": 7, "model": "m", "tensors": [META], **fields})


@pytest.mark.parametrize(("frame", "needle"), [
    (b"", "not valid msgpack"),
    (b"\xc1\xff", "not valid msgpack"),
    (msgpack.packb([1, 2]), "must be a msgpack map"),
    (msgpack.packb({1: 2}), "map keys must be strings"),
    (msgpack.packb({"id": 7}), "unknown message type None; expected one of 'infer', 'cancel', 'hb'"),
    (header(t="explode"), "unknown message type 'explode'"),
    (header(id="seven"), "'id' must be an int, got str"),
    (header(id=True), "'id' must be an int, got bool"),
    (msgpack.packb({"t": "cancel"}), "'id' must be an int; it is missing"),
    (header(model=""), "'model' must be a string of length >= 1"),
    (header(model="é" * 129), "'model' is longer than 256 bytes"),
    (header(version="v" * 257), "'version' must be a string of length <= 256"),
    (header(version=3), "'version' must be a string or null, got int"),
    (header(timeout_ms=0), "'timeout_ms' must be a number > 0.0"),
    (header(timeout_ms=m.MAX_TIMEOUT_MS + 1), "'timeout_ms' must be a number <= 86400000"),
    (header(params=[1]), "'params' must be a map or null, got a list"),
    (header(tensors={"x": 1}), "'tensors' must be a list, got a map"),
    (header(tensors=[{1: 2}]), "map keys must be strings in 'tensors[0]'"),
    (msgpack.packb({"t": "infer", "id": 7, "model": "m", "pad": "x" * wire.MAX_HEADER_BYTES}), "larger than"),
])
def test_a_malformed_header_is_a_wire_error_that_says_what_is_wrong(frame: bytes, needle: str) -> None:
    with pytest.raises(wire.WireError) as raised:
        m.BRIDGE_TO_BATCH_MANAGER.decode(frame)
    assert needle in str(raised.value)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"items": [{"n": -1}]}, "'items[0].n' must be an int >= 0"),
    ({"items": [{}]}, "'n' is required in 'items[0]'"),
    ({"items": 3}, "'items' must be a list"),
    ({"replica": ""}, "'replica' must be a string of length >= 1"),
])
def test_a_garbled_result_still_names_its_batch(fields: dict[str, Any], needle: str) -> None:
    frame = msgpack.packb({"t": "result", "replica": "r1", "batch": 3, "items": [], **fields})
    with pytest.raises(wire.WireError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        m.TASK_MANAGER_TO_BATCH_MANAGER.decode(frame)
    assert m.peek_batch(frame) == (m.BatchRef("r1", 3) if fields.get("replica") != "" else None)


def test_an_error_quotes_at_most_a_bounded_part_of_the_bad_value() -> None:
    with pytest.raises(wire.WireError) as raised:
        m.BRIDGE_TO_BATCH_MANAGER.decode(header(t="x" * 100_000))
    assert len(str(raised.value)) <= m.MAX_ERROR_CHARS and "unknown message type 'xxx" in str(raised.value)


def test_peek_id_finds_the_request_of_a_header_that_failed() -> None:
    assert m.peek_id(header(t="explode")) == 7
    assert m.peek_id(header(id=True)) is None
    assert m.peek_id(b"\xc1") is None
    assert m.peek_id(msgpack.packb([7])) is None


def test_unknown_fields_are_ignored_so_a_newer_peer_may_add_one() -> None:
    assert m.BRIDGE_TO_BATCH_MANAGER.decode(msgpack.packb({"t": "cancel", "id": 1, "why": "bored"})) == m.Cancel(1)


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
                    | st.binary(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20))
def test_any_msgpack_is_a_message_or_a_wire_error(value: Any) -> None:
    for data in (msgpack.packb(value), msgpack.packb({"t": "infer", "id": 1, "model": "m", "params": value}),
                 msgpack.packb({"t": "result", "replica": "r", "batch": 1, "items": value})):
        try:
            ANY.decode(data)
        except wire.WireError as exc:
            assert str(exc)


def test_a_batch_that_only_ends_sessions_leaves_out_its_empty_tensors_and_the_runtime_reads_it() -> None:
    # The one header whose bytes changed with the structs: omit_defaults drops the empty `tensors` list.
    from examples.models.counter.model import CounterModel

    class Ends(CounterModel):
        def __init__(self) -> None:
            self.ended: list[Any] = []

        def end_session(self, session_id: Any, state: Any) -> None:
            self.ended.append(session_id)

    model = Ends()
    store = runtime.SessionStore(model)
    x = np.ones((1, 2), np.float32)
    start = m.encode(m.Batch("r1", 1, "m", "1", [m.BatchItem(1, 1, session=4, start=True)], [wire.tensor_meta("x", x)]))
    runtime.answer_batch(model, "r1", wire.unpack_header(start), [("x", x)], store)
    frame = m.encode(Dispatch("r1", 2, "m", "1", [], [], [], end_sessions=[4]).header())
    assert "tensors" not in msgpack.unpackb(frame)
    header, tensors = wire.decode([frame])
    answer = m.REPLICA_TO_TASK_MANAGER.decode(runtime.answer_batch(model, "r1", header, tensors, store)[0])
    assert answer == m.Result("r1", 2, []) and model.ended == [4]
