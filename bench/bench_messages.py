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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'header':<18} {'bytes':>6} {'dict+manual µs':>15} {'msgspec µs':>11} {'ratio':>6}  "
          f"(best of {args.repeats} x {args.number})")
    for name, header, manual, codec in CASES:
        frame = pack_header(header)
        assert m.encode(codec.decode(frame)) and manual(unpack_header(frame))  # both accept it

        def by_hand(frame: bytes = frame, manual: Callable[[Mapping[str, Any]], Any] = manual) -> Any:
            return manual(unpack_header(frame))

        times = {}
        for label, fn in (("dict", by_hand), ("msgspec", lambda frame=frame, codec=codec: codec.decode(frame))):
            runs = timeit.repeat(fn, number=args.number, repeat=args.repeats)
            times[label] = min(runs) / args.number * 1e6
        print(f"{name:<18} {len(frame):>6} {times['dict']:>15.2f} {times['msgspec']:>11.2f} "
              f"{times['dict'] / times['msgspec']:>5.1f}x")


if __name__ == "__main__":
    main()
