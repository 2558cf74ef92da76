"""Every header of the internal bus (docs/PROTOCOL.md) as a typed struct, and one codec for them.

A header frame is a msgpack map whose ``t`` names the message; here each message kind is a
``msgspec.Struct`` tagged by that ``t``, so one decoder of a union reads any header of a link
and checks every field's type and range while it decodes, in C, instead of a dict being
unpacked and then walked by hand. msgspec's msgpack is the same msgpack that msgpack-python
reads and writes: a struct encodes to the map a hand-built dict would have packed to, and
decodes from one, so a peer that builds its headers by hand (a replica's runtime) needs
nothing new.

Every component of the proxy builds and reads its headers this way (docs/ARCHITECTURE.md, "Decisions")::

    from inferoxy import messages as m

    frame = m.encode(m.Cancel(id=7))                       # bytes: the header frame
    msg = m.BRIDGE_TO_BATCH_MANAGER.decode(frame)          # a Cancel; WireError if malformed
    any_kind = m.decode(frame)                             # the same, from the codec of every kind
    match msg:
        case m.Infer(): ...
        case m.Cancel(id=request_id): ...

A link's codec refuses kinds that link never carries, so prefer it to ``decode`` in a component.
A struct packs to the map a hand-built dict would have (``m.encode(m.Reply(...))``); ``peek_id`` and
``peek_batch`` recover the ids to answer or settle when a header is refused.

Every codec raises ``inferoxy.wire.WireError`` with a text that is safe to send to the peer
(it names the field and what was wrong, in at most ``MAX_ERROR_CHARS``), and enforces
``wire.MAX_HEADER_BYTES`` before it decodes anything. Unknown fields are ignored, as the
hand-written readers did, so a newer peer may add one. Tensor descriptions stay maps
(``TensorMeta``); ``wire.check_tensors`` checks them against the frames that follow.

This module is the proxy's, not the replica SDK's: ``inferoxy.model`` and ``inferoxy.runtime``
must stay importable with numpy, pyzmq and msgpack only (tests/test_sdk_clean_venv.py), so
they do not import it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, TypeVar, Union

import msgspec

from inferoxy.wire import MAX_HEADER_BYTES, Frame, WireError, frame_buffer
from model_manager.spec import ServingState

# Model, version and tensor names (docs/PROTOCOL.md, "Limits every bridge enforces").
NAME_MAX_BYTES = 256
# An error text quotes a bad value (an unknown type, say): a peer gets back no more than this of it.
MAX_ERROR_CHARS = 500
# A day: long enough for any inference, short enough that a deadline is always a finite clock value.
MAX_TIMEOUT_MS = 86_400_000

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX_BYTES)]
Count = Annotated[int, msgspec.Meta(ge=0)]
TimeoutMs = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_MS)]
# A request's id (docs/PROTOCOL.md, "Request ids"): the bridges hand out only visible ASCII, at most this long.
REQUEST_ID_MAX_CHARS = 128
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=REQUEST_ID_MAX_CHARS)]
# Replica ids are the task manager's strings; a session is the client's sequence_id (int or str).
ReplicaId = Annotated[str, msgspec.Meta(min_length=1)]
SessionId = Union[int, str]  # noqa: UP007 (msgspec reads the annotation at runtime, 3.10 too)
# {"name": str, "dtype": str, "shape": [int, ...]}: kept a map, as the scheduler and the wire module read it.
TensorMeta = dict[str, Any]


class Message(msgspec.Struct, tag_field="t", gc=False):
    """A bus header. gc=False: a decoded header holds no cycles, and the collector need not track it."""


# --- bridges <-> batch manager ----------------------------------------------------------------------


class Infer(Message, tag="infer"):
    id: int
    model: Name
    version: Name | None = None
    timeout_ms: TimeoutMs | None = None
    params: dict[str, Any] | None = None
    tensors: list[TensorMeta] = []
    rid: RequestId | None = None  # the request's id, for log lines; last, so the fields before keep their places

    def __post_init__(self) -> None:
        # max_length counts characters; the limit is in UTF-8 bytes. Only a long name can be over it.
        for field, value in (("model", self.model), ("version", self.version)):
            if value is not None and len(value) * 4 > NAME_MAX_BYTES and len(value.encode()) > NAME_MAX_BYTES:
                raise ValueError(f"'{field}' is longer than {NAME_MAX_BYTES} bytes")


class Cancel(Message, tag="cancel"):
    id: int


class Reply(Message, tag="reply"):
    id: int
    model: str
    version: str
    tensors: list[TensorMeta] = []


class Error(Message, tag="error"):
    """``code`` is read as any string: one from a newer peer is passed on unchanged (``InferoxyError``)."""

    id: int | None
    code: str
    message: str


class Heartbeat(Message, tag="hb", omit_defaults=True):
    """``hb`` on every link: ``epoch`` from the batch and task managers, ``resync`` from a batch manager."""

    epoch: str | None = None
    resync: bool = False


# --- batch manager <-> task manager <-> replicas ------------------------------------------------------


class ReplicaUp(Message, tag="replica_up"):
    replica: ReplicaId
    model: str
    version: str
    capacity: Count


class ReplicaDown(Message, tag="replica_down"):
    replica: ReplicaId
    reason: str | None = None


class ReplicaDraining(Message, tag="replica_draining", omit_defaults=True):
    replica: ReplicaId
    reason: str | None = None
    sessions_grace_s: float | None = None
    """A scale-down of a stateful model: the replica's sessions go on for at most this long (nothing else goes to
    it), until a ``replica_draining`` without it ends them. Unset: it takes no batch from now on."""


class ModelStatus(Message, tag="model_status"):
    model: Name
    version: Name
    state: ServingState
    reason: str | None = None


class ModelDrained(Message, tag="model_drained"):
    model: str
    version: str


class ModelLoad(msgspec.Struct, gc=False):
    """One model version's load at one batch manager, as ``load`` reports it."""

    model: Name
    version: Name
    queued: Count
    """Requests waiting here for a batch (not yet at a replica)."""
    in_flight: Count
    """Batches this batch manager has at the model's replicas."""


class Load(Message, tag="load"):
    """A batch manager's load (docs/PROTOCOL.md): what the autoscaler scales on and what credit is split by.
    Lists every model version with load, and once more with zeros each one whose load just ended."""

    models: list[ModelLoad]


class Credit(Message, tag="credit"):
    """From now on this batch manager may have at most ``capacity`` batches at ``replica`` at once (its share of
    the replica's credit; ``replica_up`` gave its first one). The batch manager echoes it back once applied: the
    task manager then knows every batch sent under the old credit has arrived (``task_manager.credit``)."""

    replica: ReplicaId
    capacity: Count


class BatchItem(msgspec.Struct, omit_defaults=True, gc=False):
    """One request of a ``batch``: it owns the next ``n`` tensors; stateful models add the session fields."""

    id: int
    n: Count
    session: SessionId | None = None
    start: bool = False
    end: bool = False
    rid: RequestId | None = None  # the request's id (the bridge's), for the replica's log lines
    # The request's parameters less the ones the proxy reads (batch_manager/params.py): Model.predict's ``params``.
    params: dict[str, Any] | None = None


class Batch(Message, tag="batch", omit_defaults=True):
    replica: ReplicaId
    batch: int
    model: str
    version: str
    items: list[BatchItem]
    tensors: list[TensorMeta] = []
    ragged: bool = False
    end_sessions: list[SessionId] | None = None


class ResultItem(msgspec.Struct, omit_defaults=True, gc=False):
    """One item's answer: ``n`` output tensors, or (``n`` 0) ``code`` and ``message`` when it alone failed."""

    n: Count
    code: str | None = None
    message: str | None = None


class Result(Message, tag="result", omit_defaults=True):
    replica: ReplicaId
    batch: int
    items: list[ResultItem]
    tensors: list[TensorMeta] = []
    # How long the model's predict took, as the replica measured it; replicas built before it leave it out.
    compute_ns: Count | None = None


class Failed(Message, tag="failed"):
    replica: ReplicaId
    batch: int
    code: str
    message: str


class Ready(Message, tag="ready", omit_defaults=True):
    replica: ReplicaId
    model: str
    version: str
    capacity: Count
    pid: int
    # Seconds the spec's warmup took before this ready (inferoxy.warmup); None: no warmup, or an older replica.
    warmup_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


class Stop(Message, tag="stop"):
    pass


class BatchRef(msgspec.Struct, gc=False):
    """Which batch a ``result`` or ``failed`` answers, read alone: enough to settle it when the rest is garbled."""

    replica: ReplicaId
    batch: int


# --- the codec ---------------------------------------------------------------------------------------

M = TypeVar("M", bound=Message)
_PYTHON_PLAIN: dict[Any, str] = {int: "an int", str: "a string", float: "a number", bool: "a bool"}

_ENCODER = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    """The header frame of ``message``: the msgpack map the hand-built dict would have been."""
    return _ENCODER.encode(message)


class Codec(Generic[M]):
    """Decodes the headers one link may carry (a union of message kinds), validating while it decodes."""

    def __init__(self, *kinds: type[M]) -> None:
        self.kinds = kinds
        self._tags = [str(kind.__struct_config__.tag) for kind in kinds]
        # What a missing top-level field should have been, for the error text ("'id' must be an int").
        self._wants: dict[str, str] = {}
        for kind in kinds:
            for field in msgspec.structs.fields(kind):
                want = _PYTHON_PLAIN.get(getattr(field.type, "__origin__", field.type))
                if want is not None:
                    self._wants.setdefault(field.encode_name, want)
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(Union[kinds])  # noqa: UP007

    def decode(self, frame: Frame) -> M:
        data = frame_buffer(frame)
        if len(data) > MAX_HEADER_BYTES:
            raise WireError(f"header of {len(data)} bytes is larger than {MAX_HEADER_BYTES}")
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            text = _explain(str(exc), self._tags, self._wants)
            raise WireError(text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "...") from None
        except msgspec.DecodeError as exc:
            raise WireError(f"header is not valid msgpack: {exc}") from None


BRIDGE_TO_BATCH_MANAGER: Codec[Infer | Cancel | Heartbeat] = Codec(Infer, Cancel, Heartbeat)
BATCH_MANAGER_TO_BRIDGE: Codec[Reply | Error | Heartbeat] = Codec(Reply, Error, Heartbeat)
TASK_MANAGER_TO_BATCH_MANAGER: Codec[
    Heartbeat | ReplicaUp | ReplicaDown | ReplicaDraining | ModelStatus | Credit | Result | Failed
] = Codec(Heartbeat, ReplicaUp, ReplicaDown, ReplicaDraining, ModelStatus, Credit, Result, Failed)
BATCH_MANAGER_TO_TASK_MANAGER: Codec[Heartbeat | ModelDrained | Load | Credit | Batch] = Codec(
    Heartbeat, ModelDrained, Load, Credit, Batch)
REPLICA_TO_TASK_MANAGER: Codec[Ready | Heartbeat | Result | Failed] = Codec(Ready, Heartbeat, Result, Failed)
TASK_MANAGER_TO_REPLICA: Codec[Heartbeat | Batch | Stop] = Codec(Heartbeat, Batch, Stop)
# Any header of any link: for tools and tests; a component decodes with its link's codec, which refuses the rest.
ANY: Codec[Message] = Codec(Infer, Cancel, Reply, Error, Heartbeat, ReplicaUp, ReplicaDown, ReplicaDraining,
                            ModelStatus, ModelDrained, Load, Credit, Batch, Result, Failed, Ready, Stop)


def decode(frame: Frame) -> Message:
    """Any bus header as its struct; WireError (safe to send to the peer) when it is not one."""
    return ANY.decode(frame)


class _Id(msgspec.Struct, gc=False):
    id: Any = None


_ID_DECODER = msgspec.msgpack.Decoder(_Id)
_BATCH_REF_DECODER = msgspec.msgpack.Decoder(BatchRef)


def peek_id(frame: Frame) -> int | None:
    """The request ``id`` of a header that failed to decode, so the error can still name it; None if unreadable."""
    try:
        value = _ID_DECODER.decode(frame_buffer(frame)).id
    except (msgspec.MsgspecError, TypeError):
        return None
    # bool is an int subclass, and True is no request id.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def peek_batch(frame: Frame) -> BatchRef | None:
    """The ``replica`` and ``batch`` of a garbled ``result``/``failed`` header, or None if even they are missing."""
    try:
        return _BATCH_REF_DECODER.decode(frame_buffer(frame))
    except (msgspec.MsgspecError, TypeError):
        return None



# msgspec's ValidationError texts, e.g. "Expected `int`, got `str` - at `$.id`", turned into the proxy's.
_AT = re.compile(r"^(?P<what>.*?)(?: - at (?P<key>`key` in )?`(?P<path>[^`]*)`)?$", re.S)
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]*)`(?P<rest>[^,]*)(?:, got `(?P<got>[^`]*)`)?$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_PLAIN = {"int": "an int", "str": "a string", "float": "a number", "object": "a map", "array": "a list",
          "bool": "a bool", "null": "null"}
_GOT = {"object": "a map", "array": "a list", "null": "null"}


def _explain(text: str, tags: list[str], wants: dict[str, str]) -> str:
    match = _AT.match(text)
    assert match is not None  # the pattern matches any text
    what, path = match["what"], match["path"]
    field = _field(path)
    if match["key"]:
        return f"map keys must be strings{f' in {field}' if field else ''}"
    if path == "$.t" or (path is None and what == "Object missing required field `t`"):
        expected = ", ".join(repr(tag) for tag in tags)
        value = re.match(r"^Invalid value (.*)$", what)
        return f"unknown message type {value[1] if value else 'None'}; expected one of {expected}"
    if (path in (None, "$")) and what.startswith("Expected `object`"):
        return "header must be a msgpack map"
    missing = _MISSING.match(what)
    if missing:
        name = missing["field"]
        if not field and name in wants:
            return f"'{name}' must be {wants[name]}; it is missing"
        return f"'{name}' is required{f' in {field}' if field else ''}"
    expected_match = _EXPECTED.match(what)
    if expected_match:
        kinds = [_PLAIN.get(part.strip(), part.strip()) for part in expected_match["want"].split("|")]
        got_type = expected_match["got"]
        got = f", got {_GOT.get(got_type, got_type)}" if got_type else ""
        return f"{field or 'header'} must be {' or '.join(kinds)}{expected_match['rest']}{got}"
    # A __post_init__ check or an enum value: msgspec's own text names the field.
    return f"{field}: {what}" if field and not what.startswith("'") else what


def _field(path: str | None) -> str:
    """``$.items[3].n`` -> ``'items[3].n'``; the header itself -> ''."""
    if not path or path == "$":
        return ""
    return f"'{path.removeprefix('$.')}'"
