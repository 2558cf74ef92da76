"""The model runtime (``python -m inferoxy.runtime``) against a task manager played by the test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from examples.models.counter.model import CounterModel
from inferoxy import envelope, wire
from inferoxy.model import accepts_params
from inferoxy.runtime import EXIT_CONFIG, EXIT_LOST_TASK_MANAGER, EXIT_STOPPED, SessionStore, answer_batch
from inferoxy.warmup import DATATYPES, run_warmup
from model_manager.spec import DATATYPE_TO_DTYPE
from tests.models_for_tests import BatchProbeModel, ParamsProbeModel
from tests.support import REPO

Tensors = Sequence[tuple[str, np.ndarray]]


class FakeTaskManager:
    """A ROUTER on loopback that starts replicas, talks to them, and answers their heartbeats."""

    def __init__(self, log_dir: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.url = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.heartbeats = 0

    def start(self, model_class: str, *, replica: str = "r-1", interval: float = 0.5, liveness: int = 20,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        environ = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "INFEROXY_REPLICA_URL": self.url,
            "INFEROXY_REPLICA_ID": replica,
            "INFEROXY_MODEL_CLASS": model_class,
            "INFEROXY_MODEL_NAME": "m",
            "INFEROXY_MODEL_VERSION": "7",
            "INFEROXY_HEARTBEAT_INTERVAL_S": str(interval),
            "INFEROXY_HEARTBEAT_LIVENESS": str(liveness),
            **(env or {}),
        }
        with open(self.log_dir / f"{replica}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "inferoxy.runtime"], env=environ, cwd=REPO,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def log(self, replica: str = "r-1") -> str:
        return (self.log_dir / f"{replica}.log").read_text()

    def recv(self, timeout: float = 15.0, *, answer_heartbeats: bool = True) -> tuple[bytes, dict[str, Any], Tensors]:
        """The next message that is not a heartbeat (heartbeats are counted, and answered unless told not to)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1):
                raise AssertionError(f"no message from the replica within {timeout}s")
            identity, *frames = self.sock.recv_multipart(copy=False)
            route = envelope.unpack(frames.pop(0)) if envelope.is_envelope(frames[0]) else None
            header, tensors = wire.decode(frames)
            # Answers, and only answers, come back behind the envelope of the batch they answer.
            assert (route is not None) == (header["t"] in ("result", "failed")), header
            assert route is None or route == (header["replica"], header["batch"]), (route, header)
            if header["t"] != "hb":
                return identity.bytes, header, tensors
            self.heartbeats += 1
            if answer_heartbeats:
                self.send(identity.bytes, {"t": "hb"})

    def ready(self, replica: str = "r-1") -> dict[str, Any]:
        identity, header, _ = self.recv()
        assert (identity, header["t"]) == (replica.encode(), "ready"), header
        return header

    def send(self, identity: bytes, header: dict[str, Any], tensors: Tensors = ()) -> None:
        routed = [envelope.pack(header["replica"], header["batch"])] if header["t"] == "batch" else []
        self.sock.send_multipart([identity, *routed, *wire.encode(header, tensors)])

    def send_batch(self, batch: int, items: Sequence[Tensors], replica: str = "r-1") -> None:
        header = {"t": "batch", "replica": replica, "batch": batch, "model": "m", "version": "7",
                  "items": [{"id": 100 + i, "n": len(tensors)} for i, tensors in enumerate(items)]}
        self.send(replica.encode(), header, [tensor for tensors in items for tensor in tensors])

    def answer(self, batch: int) -> tuple[dict[str, Any], Tensors]:
        _, header, tensors = self.recv()
        assert header.get("batch") == batch, header
        return header, tensors

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def tm(tmp_path: Path) -> Iterator[FakeTaskManager]:
    fake = FakeTaskManager(tmp_path)
    yield fake
    fake.close()


def items_of(header: dict[str, Any], tensors: Tensors) -> list[dict[str, np.ndarray]]:
    """A result's tensors, grouped per item."""
    grouped, start = [], 0
    for item in header["items"]:
        grouped.append(dict(tensors[start:start + item["n"]]))
        start += item["n"]
    assert start == len(tensors)
    return grouped


def test_ready_then_a_batch_of_two_items_is_joined_predicted_and_split(tm: FakeTaskManager) -> None:
    process = tm.start("tests.models_for_tests:BatchProbeModel")
    ready = tm.ready()
    assert ready == {"t": "ready", "replica": "r-1", "model": "m", "version": "7", "capacity": 2,
                     "pid": process.pid}

    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    second = np.arange(100, 109, dtype=np.float32).reshape(3, 3)
    tm.send_batch(1, [[("x", first)], [("x", second)]])
    header, tensors = tm.answer(1)
    assert header["t"] == "result" and header["replica"] == "r-1"
    assert header["items"] == [{"n": 3}, {"n": 3}]
    one, two = items_of(header, tensors)
    np.testing.assert_array_equal(one["y"], first * 2)
    np.testing.assert_array_equal(two["y"], second * 2)
    # One predict call saw all five rows, in item order.
    np.testing.assert_array_equal(one["row"], [0, 1])
    np.testing.assert_array_equal(two["row"], [2, 3, 4])
    np.testing.assert_array_equal(np.concatenate([one["batch_rows"], two["batch_rows"]]), [5] * 5)
    assert one["y"].dtype == np.float32 and one["row"].dtype == np.int64


def test_items_with_several_inputs_keep_their_own_rows(tm: FakeTaskManager) -> None:
    tm.start("examples.models.echo.model:EchoModel")
    tm.ready()
    a: Tensors = [("image", np.ones((1, 2, 2), np.uint8)), ("scale", np.array([0.5], np.float64))]
    b: Tensors = [("scale", np.array([1.5, 2.5], np.float64)), ("image", np.zeros((2, 2, 2), np.uint8))]  # other order
    tm.send_batch(4, [a, b])
    header, tensors = tm.answer(4)
    one, two = items_of(header, tensors)
    np.testing.assert_array_equal(one["image"], a[0][1])
    np.testing.assert_array_equal(one["scale"], a[1][1])
    np.testing.assert_array_equal(two["image"], b[1][1])
    np.testing.assert_array_equal(two["scale"], b[0][1])


def test_predict_raising_is_a_model_error_and_the_replica_lives_on(tm: FakeTaskManager) -> None:
    process = tm.start("tests.models_for_tests:RaisingModel")
    tm.ready()
    tm.send_batch(1, [[("fail", np.array([0, 1], np.int8))]])
    header, tensors = tm.answer(1)
    assert (header["t"], header["code"]) == ("failed", "model_error")
    assert "ValueError" in header["message"] and "asked to fail" in header["message"]
    assert not tensors

    tm.send_batch(2, [[("fail", np.array([0], np.int8))]])
    header, tensors = tm.answer(2)
    assert header["t"] == "result"
    np.testing.assert_array_equal(dict(tensors)["fail"], [0])
    assert process.poll() is None
    assert "asked to fail" in tm.log(), "the traceback goes to the replica's log"


@pytest.mark.parametrize(
    ("broken", "words"),
    [
        ("shape", "leading dimension"),
        ("scalar", "leading dimension"),
        ("dtype", "datetime64"),
        ("complex", "complex64"),
        ("list", "not a numpy array"),
        ("not_a_dict", "dict"),
        ("empty", "non-empty"),
    ],
)
def test_a_bad_output_is_a_model_error(tm: FakeTaskManager, broken: str, words: str) -> None:
    process = tm.start("tests.models_for_tests:BadOutputModel")
    tm.ready()
    tm.send_batch(1, [[(broken, np.zeros((2, 1), np.float32))]])
    header, _ = tm.answer(1)
    assert (header["t"], header["code"]) == ("failed", "model_error"), header
    assert words in header["message"], header["message"]

    tm.send_batch(2, [[("fine", np.zeros((2, 1), np.float32))]])
    assert tm.answer(2)[0]["t"] == "result"
    assert process.poll() is None


@pytest.mark.parametrize(
    ("items", "words"),
    [
        ([[("x", np.zeros((1, 2), np.float32))], [("x", np.zeros((1, 2), np.float64))]], "float64"),
        ([[("x", np.zeros((1, 2), np.float32))], [("x", np.zeros((1, 3), np.float32))]], "[1, 3]"),
        ([[("x", np.zeros((1, 2), np.float32))], [("y", np.zeros((1, 2), np.float32))]], "inputs"),
        ([[("x", np.zeros((1,), np.float32)), ("z", np.zeros((2,), np.float32))]], "leading dimension"),
        ([[("x", np.float32(1))]], "leading dimension"),
    ],
)
def test_items_that_cannot_be_joined_are_bad_input(tm: FakeTaskManager, items: list[Tensors], words: str) -> None:
    tm.start("examples.models.echo.model:EchoModel")
    tm.ready()
    tm.send_batch(1, items)
    header, _ = tm.answer(1)
    assert (header["t"], header["code"]) == ("failed", "bad_input"), header
    assert words in header["message"], header["message"]


def test_malformed_batches_are_answered_and_the_replica_lives_on(tm: FakeTaskManager) -> None:
    process = tm.start("examples.models.echo.model:EchoModel")
    tm.ready()
    # The header promises 8 bytes, the frame has 3.
    header = {"t": "batch", "replica": "r-1", "batch": 9, "items": [{"id": 1, "n": 1}],
              "tensors": [{"name": "x", "dtype": "float32", "shape": [2]}]}
    tm.sock.send_multipart([b"r-1", envelope.pack("r-1", 9), wire.pack_header(header), b"abc"])
    answer, _ = tm.answer(9)
    assert (answer["t"], answer["code"]) == ("failed", "bad_input")
    # Counts of tensors that do not add up.
    tm.send(b"r-1", {"t": "batch", "replica": "r-1", "batch": 10, "items": [{"id": 1, "n": 2}]},
            [("x", np.zeros(1, np.float32))])
    assert tm.answer(10)[0]["code"] == "bad_input"
    tm.sock.send_multipart([b"r-1", b"\xc1 not msgpack"])
    # A batch whose header is garbage is still answered: its envelope says which batch failed.
    tm.sock.send_multipart([b"r-1", envelope.pack("r-1", 12), b"\xc1 not msgpack"])
    answer, _ = tm.answer(12)
    assert (answer["t"], answer["replica"], answer["code"]) == ("failed", "r-1", "bad_input"), answer
    tm.send_batch(11, [[("x", np.ones(1, np.float32))]])
    assert tm.answer(11)[0]["t"] == "result"
    assert process.poll() is None


def test_heartbeats_keep_flowing_during_a_long_predict(tm: FakeTaskManager) -> None:
    # Liveness 0.5 s on both sides, a predict of 1.5 s: only heartbeats sent while it runs keep things alive.
    process = tm.start("tests.models_for_tests:SlowModel", interval=0.1, liveness=5)
    tm.ready()
    tm.heartbeats = 0
    tm.send_batch(1, [[("sleep_s", np.array([1.5], np.float32))]])
    header, _ = tm.answer(1)
    assert header["t"] == "result"
    assert tm.heartbeats >= 8, tm.heartbeats
    assert process.poll() is None


def test_more_batches_than_its_capacity_are_refused(tm: FakeTaskManager) -> None:
    tm.start("tests.models_for_tests:SlowModel")
    tm.ready()
    for batch in (1, 2, 3):
        tm.send_batch(batch, [[("sleep_s", np.array([0.5], np.float32))]])
    _, header, _ = tm.recv()
    assert (header["batch"], header["t"], header["code"]) == (3, "failed", "overloaded")
    assert [tm.recv()[1]["batch"], tm.recv()[1]["batch"]] == [1, 2]


def test_stop_finishes_held_batches_then_exits_zero(tm: FakeTaskManager) -> None:
    process = tm.start("tests.models_for_tests:SlowModel")
    tm.ready()
    tm.send_batch(1, [[("sleep_s", np.array([0.3], np.float32))]])
    tm.send_batch(2, [[("sleep_s", np.array([0.3], np.float32))]])
    tm.send(b"r-1", {"t": "stop"})
    tm.send_batch(3, [[("sleep_s", np.array([0.3], np.float32))]])
    answers = {header["batch"]: header for header in (tm.recv()[1] for _ in range(3))}
    assert answers[1]["t"] == answers[2]["t"] == "result"
    assert (answers[3]["t"], answers[3]["code"]) == ("failed", "replica_lost")
    assert process.wait(timeout=15) == EXIT_STOPPED


def test_sigterm_finishes_held_batches_then_exits_zero(tm: FakeTaskManager) -> None:
    process = tm.start("tests.models_for_tests:SlowModel")
    tm.ready()
    tm.send_batch(1, [[("sleep_s", np.array([0.5], np.float32))]])
    tm.send_batch(2, [[("sleep_s", np.array([0.5], np.float32)), ("x", np.arange(3, dtype=np.int16)[None])]])
    # Batch 2 arrived while batch 1 ran for half a second, so the replica holds it when SIGTERM comes.
    assert tm.answer(1)[0]["t"] == "result"
    process.send_signal(signal.SIGTERM)
    header, tensors = tm.answer(2)
    assert header["t"] == "result"
    np.testing.assert_array_equal(dict(tensors)["x"], [[0, 1, 2]])
    assert process.wait(timeout=15) == EXIT_STOPPED


def test_silence_from_the_task_manager_ends_the_replica(tm: FakeTaskManager) -> None:
    process = tm.start("examples.models.echo.model:EchoModel", interval=0.1, liveness=3)
    tm.ready()
    started = time.monotonic()
    code = process.wait(timeout=15)
    assert code == EXIT_LOST_TASK_MANAGER
    assert time.monotonic() - started < 5
    assert "no word from the task manager" in tm.log()


def test_a_replica_exits_when_no_task_manager_is_there(tm: FakeTaskManager) -> None:
    tm.sock.close()  # nobody listens at the address any more
    process = tm.start("examples.models.echo.model:EchoModel", interval=0.1, liveness=3)
    assert process.wait(timeout=15) == EXIT_LOST_TASK_MANAGER


@pytest.mark.parametrize(
    ("model_class", "words"),
    [
        ("tests.models_for_tests:FailingLoadModel", "weights missing"),
        ("tests.models_for_tests:NotAModel", "not a subclass"),
        ("tests.models_for_tests:NoSuchModel", "NoSuchModel"),
        ("no_such_module:Model", "no_such_module"),
        ("without-a-colon", "module:Class"),
    ],
)
def test_a_model_that_cannot_load_ends_the_replica_with_its_traceback(
    tm: FakeTaskManager, model_class: str, words: str
) -> None:
    process = tm.start(model_class)
    assert process.wait(timeout=15) == EXIT_CONFIG
    output = tm.log()
    assert words in output, output
    assert "Traceback" in output
    assert tm.sock.poll(100) == 0, "a replica that failed to load must not say ready"



# --- sessions and ragged batches, called directly (the thread and sockets are covered above) -----------


def run_batch(model: Any, header: dict[str, Any], tensors: list[tuple[str, np.ndarray]],
              store: SessionStore | None = None) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    frames = answer_batch(model, "r1", {"t": "batch", "batch": 1, **header}, tensors, store)
    return wire.decode([zmq.Frame(bytes(f)) if not isinstance(f, zmq.Frame) else f for f in frames])


class EndRecorder(CounterModel):
    def __init__(self) -> None:
        self.ended: list[Any] = []

    def end_session(self, session_id: Any, state: Any) -> None:
        self.ended.append((session_id, state.count))


def test_sessions_keep_their_own_state_and_run_their_hooks() -> None:
    model = EndRecorder()
    store = SessionStore(model)
    x = np.ones((1, 2), np.float32)
    items = [{"id": 1, "n": 1, "session": "a", "start": True, "end": False},
             {"id": 2, "n": 1, "session": "b", "start": True, "end": False}]
    header, tensors = run_batch(model, {"items": items}, [("x", x), ("x", x * 10)], store)
    assert [int(t[1][0]) for t in tensors if t[0] == "count"] == [1, 1]
    items = [{"id": 3, "n": 1, "session": "a", "start": False, "end": True},
             {"id": 4, "n": 1, "session": "b", "start": False, "end": False}]
    header, tensors = run_batch(model, {"items": items}, [("x", x), ("x", x * 10)], store)
    assert [float(t[1][0]) for t in tensors if t[0] == "total"] == [4.0, 40.0]
    assert model.ended == [("a", 2)] and set(store.states) == {"b"}
    # An idled-out session: a batch with no items runs its end hook.
    header, tensors = run_batch(model, {"items": [], "end_sessions": ["b"]}, [], store)
    assert header["items"] == [] and model.ended[-1] == ("b", 2) and not store.states


def test_a_session_the_replica_does_not_hold_is_lost_never_fresh() -> None:
    model = CounterModel()
    store = SessionStore(model)
    x = np.ones((1, 2), np.float32)
    items = [{"id": 1, "n": 1, "session": "gone", "start": False, "end": False},
             {"id": 2, "n": 1, "session": "new", "start": True, "end": False}]
    header, tensors = run_batch(model, {"items": items}, [("x", x), ("x", x)], store)
    assert header["t"] == "result"
    assert header["items"][0]["code"] == "session_lost" and header["items"][0]["n"] == 0
    assert header["items"][1] == {"n": 2} and len(tensors) == 2
    assert "gone" not in store.states


def test_ragged_batches_pass_lists_and_split_lists() -> None:
    class Ragged(BatchProbeModel):
        def predict(self, batch: dict[str, Any]) -> dict[str, Any]:
            return {"width": [np.array([a.shape[1]] * len(a), np.int64) for a in batch["x"]]}

    items = [{"id": 1, "n": 1}, {"id": 2, "n": 1}]
    tensors = [("x", np.zeros((2, 3), np.float32)), ("x", np.zeros((1, 5), np.float32))]
    header, out = run_batch(Ragged(), {"items": items, "ragged": True}, tensors)
    assert header["t"] == "result", header
    assert [a.tolist() for _, a in out] == [[3, 3], [5]]


# --- warmup (the spec's sample requests, before ready) and request parameters ---------------------------


def warmup_env(*requests: dict[str, Any], **spec: Any) -> dict[str, str]:
    return {"INFEROXY_MODEL_SPEC": json.dumps({"name": "m", "warmup": list(requests), **spec})}


def test_warmup_runs_every_request_count_times_before_ready(tm: FakeTaskManager, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    sample = tmp_path / "sample.npy"
    np.save(sample, np.arange(6, dtype=np.int64).reshape(3, 2))
    env = warmup_env({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, 3], "fill": "random"}], "count": 2},
                     {"inputs": [{"name": "a", "datatype": "INT64", "shape": [3, 2], "fill": "file",
                                  "file": str(sample)},
                                 {"name": "b", "datatype": "BOOL", "shape": [3]}]})
    tm.start("tests.models_for_tests:WarmupRecorderModel", env={**env, "WARMUP_RECORD": str(record)})
    ready = tm.ready()
    # Every warmup batch had been answered when ready was sent: nothing reaches the model afterwards.
    assert record.read_text().splitlines() == ["x:float32[4, 3]", "x:float32[4, 3]", "a:int64[3, 2] b:bool[3]"]
    assert isinstance(ready["warmup_s"], float) and ready["warmup_s"] >= 0
    assert "warmup: 2 request(s) answered" in tm.log()


def test_a_replica_without_warmup_says_ready_without_warmup_s(tm: FakeTaskManager) -> None:
    tm.start("tests.models_for_tests:BatchProbeModel", env=warmup_env())
    assert "warmup_s" not in tm.ready()


@pytest.mark.parametrize(
    ("model_class", "inputs", "words"),
    [
        ("tests.models_for_tests:RaisingModel", [{"name": "fail", "datatype": "INT32", "shape": [4],
                                                  "fill": "random"}], "ValueError: asked to fail"),
        ("tests.models_for_tests:BadOutputModel", [{"name": "shape", "datatype": "FP32", "shape": [2, 1]}],
         "its leading dimension must be the batch's 2 rows"),
        ("tests.models_for_tests:BatchProbeModel", [{"name": "x", "datatype": "FP32", "shape": [2], "fill": "file",
                                                     "file": "/no/such/sample.npy"}], "cannot read '/no/such"),
    ],
)
def test_a_failed_warmup_ends_the_replica_with_the_reason(
    tm: FakeTaskManager, model_class: str, inputs: list[dict[str, Any]], words: str
) -> None:
    process = tm.start(model_class, env=warmup_env({"inputs": inputs}))
    assert process.wait(timeout=15) == EXIT_CONFIG
    output = tm.log()
    assert "warmup failed; exiting: warmup request 0" in output and words in output, output
    assert tm.sock.poll(100) == 0, "a replica whose warmup failed must not say ready"


def test_a_stateful_model_warms_up_in_a_session_of_its_own() -> None:
    model = EndRecorder()
    requests = [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2]}], "count": 3}]
    assert run_warmup(model, "r1", requests) >= 0
    # Each run is a session started and ended at once: no state outlives the warmup.
    assert model.ended == [("warmup-0-0", 1), ("warmup-0-1", 1), ("warmup-0-2", 1)]


def test_params_reach_a_model_that_asks_for_them_per_row() -> None:
    model = ParamsProbeModel()
    assert accepts_params(model) and not accepts_params(BatchProbeModel())
    items = [{"id": 1, "n": 1, "params": {"scale": 10}}, {"id": 2, "n": 1}, {"id": 3, "n": 1, "params": {"scale": -1}}]
    tensors = [("x", np.ones((2, 2), np.float32)), ("x", np.ones((1, 2), np.float32)),
               ("x", np.ones((1, 2), np.float32))]
    frames = answer_batch(model, "r1", {"t": "batch", "batch": 1, "items": items}, tensors, None, with_params=True)
    header, out = wire.decode([zmq.Frame(bytes(f)) if not isinstance(f, zmq.Frame) else f for f in frames])
    assert header["t"] == "result", header
    assert [a[:, 0].tolist() for name, a in out if name == "y"] == [[10.0, 10.0], [1.0], [-1.0]]


def test_params_reach_a_stateful_model_by_keyword() -> None:
    seen: list[Any] = []

    class WithParams(CounterModel):
        def predict(self, batch: dict[str, Any], sessions: Any = (), params: Any = ()) -> dict[str, Any]:
            seen.extend(dict(p) for p in params)
            return super().predict(batch, sessions)

    model = WithParams()
    items = [{"id": 1, "n": 1, "session": "a", "start": True, "params": {"k": "v"}},
             {"id": 2, "n": 1, "session": "b", "start": True}]
    x = np.ones((1, 2), np.float32)
    frames = answer_batch(model, "r1", {"t": "batch", "batch": 1, "items": items}, [("x", x), ("x", x)],
                          SessionStore(model), with_params=accepts_params(model))
    assert wire.decode([zmq.Frame(bytes(f)) for f in frames])[0]["t"] == "result"
    assert seen == [{"k": "v"}, {}]


def test_the_warmup_knows_every_datatype_the_spec_does() -> None:
    # The replica cannot import the spec (pydantic); its copy of the datatypes must not drift.
    assert DATATYPES == DATATYPE_TO_DTYPE


def test_a_ragged_model_warms_up_with_lists_as_its_batches_come() -> None:
    seen: list[Any] = []

    class Ragged(BatchProbeModel):
        def predict(self, batch: dict[str, Any]) -> dict[str, Any]:
            seen.append([a.shape for a in batch["x"]])
            return {"y": list(batch["x"])}

    model = Ragged()
    model.spec = {"ragged_batches": True}
    run_warmup(model, "r1", [{"inputs": [{"name": "x", "datatype": "FP16", "shape": [2, 5]}]}])
    assert seen == [[(2, 5)]]
