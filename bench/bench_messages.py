"""What reading a bus header costs: msgpack-python into a dict checked by hand, against inferoxy.messages.

    python bench/bench_messages.py [--repeats 5] [--number 20000]

Times, in this process (no sockets), decode + validate of the headers on the data path:
- ``infer``: a bridge's request as the batch manager reads it (one FP32 input, a priority parameter);
- ``batch`` of 64 items: what the task manager and the replica read (64 tensor descriptions);
- ``result`` of 64 items: what the batch manager reads back.

"dict" is what the proxy did before inferoxy.messages: ``wire.unpack_header`` then the hand-written
checks of batch_manager/messages.py (copied below, as they were); "msgspec" is ``Codec.decode``, which
checks the same fields while it decodes. Neither checks the tensor descriptions against the frames
(``wire.check_tensors`` does, for both, afterwards). Prints the best of the repeats, µs per header: on a
shared machine the slower repeats measure the neighbours (timeit's own advice).

Then what building and reading answers cost (skip with ``--no-encode``), and each side's total per request:
the gateway builds an ``infer`` and reads its ``reply``; the batch manager reads the ``infer``, builds the
``reply``, and its share (1/64) of a 64-item ``batch`` it builds and of the ``result`` it reads. "dict" is the
code before the structs (copied below: dicts packed by msgpack-python, answers read by hand).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from inferoxy import messages as m
from inferoxy.wire import WireError, pack_header, unpack_header

META = {"name": "x", "dtype": "float32", "shape": [1, 16]}
INFER = {"t": "infer", "id": 123456, "model": "echo", "version": None, "timeout_ms": 30000,
         "params": {"priority": "high"}, "tensors": [META]}
BATCH = {"t": "batch", "replica": "host-echo-1-0-9f3a2b1c4d5e", "batch": 4242, "model": "echo", "version": "1",
         "items": [{"id": 1000 + i, "n": 1} for i in range(64)], "tensors": [META] * 64}
RESULT = {"t": "result", "replica": BATCH["replica"], "batch": 4242, "items": [{"n": 1}] * 64,
          "tensors": [META] * 64}


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def manual_infer(header: Mapping[str, Any]) -> Any:
    """batch_manager.messages.parse_infer before the structs (plus the type check of ``t``)."""
    if header.get("t") != "infer":
        raise WireError("unknown message type")
    request_id = header.get("id")
    if not _is_int(request_id):
        raise WireError("'id' must be an int")
    model = header.get("model")
    if not isinstance(model, str) or not model:
        raise WireError("'model' must be a non-empty string")
    version = header.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise WireError("'version' must be a non-empty string or null")
    timeout_ms = header.get("timeout_ms")
    if timeout_ms is not None and (not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
                                   or not 0 < timeout_ms <= m.MAX_TIMEOUT_MS):
        raise WireError("'timeout_ms' must be a number")
    params = header.get("params")
    if params is not None and not isinstance(params, dict):
        raise WireError("'params' must be a map")
    if not isinstance(header.get("tensors", []), list):
        raise WireError("'tensors' must be a list")
    return request_id, model, version, timeout_ms


def manual_batch(header: Mapping[str, Any]) -> Any:
    """The same checks by hand for a ``batch``: the fields the task manager and the replica rely on."""
    replica, batch_id, items = header.get("replica"), header.get("batch"), header.get("items")
    if not isinstance(replica, str) or not replica or not _is_int(batch_id):
        raise WireError("'replica' and 'batch'")
    if not isinstance(header.get("model"), str) or not isinstance(header.get("version"), str):
        raise WireError("'model' and 'version'")
    if not isinstance(items, list) or not isinstance(header.get("tensors", []), list):
        raise WireError("'items'")
    for item in items:
        if not isinstance(item, dict) or not _is_int(item.get("id")) or not _is_int(item.get("n")) or item["n"] < 0:
            raise WireError("every item must be a map with int 'id' and 'n' >= 0")
    return items


def manual_result(header: Mapping[str, Any]) -> Any:
    """batch_manager.messages.parse_batch_ref + parse_result_items + parse_result_item_errors."""
    replica, batch_id, items = header.get("replica"), header.get("batch"), header.get("items")
    if not isinstance(replica, str) or not replica or not _is_int(batch_id):
        raise WireError("'replica' and 'batch'")
    if not isinstance(items, list):
        raise WireError("result: 'items' must be a list")
    counts = []
    for item in items:
        n = item.get("n") if isinstance(item, dict) else None
        if not _is_int(n) or n < 0:
            raise WireError("result: every item must be a map with an int 'n' >= 0")
        counts.append(n)
    if any(isinstance(item, dict) and "code" in item for item in items):
        raise AssertionError("not in this benchmark")
    return counts


CASES: list[tuple[str, dict[str, Any], Callable[[Mapping[str, Any]], Any], m.Codec[Any]]] = [
    ("infer", INFER, manual_infer, m.BRIDGE_TO_BATCH_MANAGER),
    ("batch, 64 items", BATCH, manual_batch, m.TASK_MANAGER_TO_REPLICA),
    ("result, 64 items", RESULT, manual_result, m.TASK_MANAGER_TO_BATCH_MANAGER),
]


# --- building headers: the dicts before (copied as they were) against the structs -----------------------

REPLY_IN = pack_header({"t": "reply", "id": 123456, "model": "echo", "version": "1", "tensors": [META]})


def dict_infer_out() -> bytes:
    """bridges/gateway.py start_request before: the pipeline's header, then the gateway's message."""
    header = {"model": "echo", "version": "1", "params": {"priority": "high"}, "tensors": [META]}
    message = {"t": "infer", "id": 123456, "model": header["model"], "version": header.get("version"),
               "timeout_ms": 30000, "params": header.get("params") or {}, "tensors": header["tensors"]}
    return pack_header(message)


def struct_infer_out() -> bytes:
    return m.encode(m.Infer(123456, "echo", "1", 30000, {"priority": "high"}, [META]))


def dict_reply_in(frame: bytes = REPLY_IN, frames: tuple[Any, ...] = (b"x" * 64,)) -> Any:
    """bridges/gateway.py _dispatch before: unpack, then the fields it read by hand."""
    header = unpack_header(frame)
    if header.get("t") == "hb":
        return None
    rid = header.get("id")
    if not isinstance(rid, int) or header.get("t") != "reply":
        raise WireError("not a reply")
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or len(tensors) != len(frames):
        raise WireError("malformed reply")
    return rid, header.get("model"), header.get("version"), tensors


def struct_reply_in(frame: bytes = REPLY_IN, frames: tuple[Any, ...] = (b"x" * 64,)) -> Any:
    answer = m.BATCH_MANAGER_TO_BRIDGE.decode(frame)
    if isinstance(answer, m.Heartbeat):
        return None
    if not isinstance(answer, m.Reply) or len(answer.tensors) != len(frames):
        raise WireError("malformed reply")
    return answer.id, answer.model, answer.version, answer.tensors


def dict_reply_out() -> bytes:
    """batch_manager.messages.reply_header before, packed by the service."""
    return pack_header({"t": "reply", "id": 123456, "model": "echo", "version": "1", "tensors": [META]})


def struct_reply_out() -> bytes:
    return m.encode(m.Reply(123456, "echo", "1", [META]))


SEQS = range(1000, 1064)
METAS = [META] * 64


def dict_batch_out() -> bytes:
    """batch_manager/batching.py's items and Dispatch.header before, packed by the service."""
    items = [{"id": seq, "n": 1} for seq in SEQS]
    header: dict[str, Any] = {"t": "batch", "replica": BATCH["replica"], "batch": 4242, "model": "echo",
                              "version": "1", "items": items, "tensors": METAS}
    return pack_header(header)


def struct_batch_out() -> bytes:
    items = [m.BatchItem(seq, 1) for seq in SEQS]
    return m.encode(m.Batch(BATCH["replica"], 4242, "echo", "1", items, METAS))


BUILDERS: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    ("gateway: infer out", dict_infer_out, struct_infer_out),
    ("gateway: reply in", dict_reply_in, struct_reply_in),
    ("BM: reply out", dict_reply_out, struct_reply_out),
    ("BM: batch out, 64", dict_batch_out, struct_batch_out),
]


def best_us(fn: Callable[[], Any], number: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--no-encode", dest="encode", action="store_false", help="decoding only")
    args = parser.parse_args()
    print(f"{'header':<18} {'bytes':>6} {'dict+manual µs':>15} {'msgspec µs':>11} {'ratio':>6}  "
          f"(best of {args.repeats} x {args.number})")
    decoded: dict[str, dict[str, float]] = {}
    for name, header, manual, codec in CASES:
        frame = pack_header(header)
        assert m.encode(codec.decode(frame)) and manual(unpack_header(frame))  # both accept it

        def by_hand(frame: bytes = frame, manual: Callable[[Mapping[str, Any]], Any] = manual) -> Any:
            return manual(unpack_header(frame))

        times = decoded[name] = {
            "dict": best_us(by_hand, args.number, args.repeats),
            "msgspec": best_us(lambda frame=frame, codec=codec: codec.decode(frame), args.number, args.repeats)}
        print(f"{name:<18} {len(frame):>6} {times['dict']:>15.2f} {times['msgspec']:>11.2f} "
              f"{times['dict'] / times['msgspec']:>5.1f}x")
    if not args.encode:
        return
    built: dict[str, dict[str, float]] = {}
    for name, by_dict, by_struct in BUILDERS:
        assert by_dict() == by_struct() or name.endswith("in"), name  # the same bytes on the wire
        times = built[name] = {"dict": best_us(by_dict, args.number, args.repeats),
                               "msgspec": best_us(by_struct, args.number, args.repeats)}
        print(f"{name:<18} {'':>6} {times['dict']:>15.2f} {times['msgspec']:>11.2f} "
              f"{times['dict'] / times['msgspec']:>5.1f}x")
    print("per request (one infer; 64-item batches):")
    for side, parts in (
        ("gateway", [(built, "gateway: infer out", 1.0), (built, "gateway: reply in", 1.0)]),
        ("batch manager", [(decoded, "infer", 1.0), (built, "BM: reply out", 1.0),
                           (built, "BM: batch out, 64", 1 / 64), (decoded, "result, 64 items", 1 / 64)]),
    ):
        before = sum(table[name]["dict"] * share for table, name, share in parts)
        after = sum(table[name]["msgspec"] * share for table, name, share in parts)
        print(f"  {side:<16} {before:>15.2f} {after:>11.2f} {before / after:>5.1f}x")


if __name__ == "__main__":
    main()
