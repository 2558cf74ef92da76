"""What a request's id costs on the data path, without it and with it (docs/PROTOCOL.md, "Request ids").

    python bench/bench_request_ids.py [--repeats 5] [--number 20000]

Times, in this process (no sockets), best of the repeats in µs, each step the id adds to:
- the bridge: choosing the id (a client's X-Request-ID checked, or a fresh one made); REST's endpoint also
  reads the headers, sets the context variable and adds ``X-Request-ID`` to the answer (the row's "without" is
  the bare ``Response``; REST only, so left out of the sum);
- the gateway: building the ``infer`` header (``m.Infer`` encoded) without ``rid`` and with a 32-character one;
- the batch manager: reading that ``infer``; building a 64-item ``batch`` without and with an id per item;
- the replica: reading the 64-item ``batch`` (plain msgpack, as the runtime does) and, with ids, setting the
  context variable around the batch (``logs.BatchIds``: the ids are collected only if a line is logged);
- a ``log.debug`` call guarded by ``isEnabledFor`` at INFO (what every per-request line costs when off).

Then the sum per request (one ``infer``, a 64th of a batch) without and with the id. On a shared machine
the slower repeats measure the neighbours, hence the best of them (timeit's own advice).
"""

from __future__ import annotations

import argparse
import logging
import timeit
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response

from bridges import request_ids
from inferoxy import messages as m
from inferoxy.logs import REQUEST_IDS, BatchIds
from inferoxy.wire import unpack_header

META = {"name": "x", "dtype": "float32", "shape": [1, 16]}
REPLICA = "host-echo-1-0-9f3a2b1c4d5e"
RID = "4bf92f3577b34da6a3ce929d0e0e4736"
SEQS = range(1000, 1064)
RIDS = [request_ids.fresh() for _ in SEQS]
log = logging.getLogger("bench.request_ids")


def infer(rid: str | None) -> bytes:
    return m.encode(m.Infer(123456, "echo", "1", 30000, {"priority": "high"}, [META], rid))


def batch(with_ids: bool) -> bytes:
    items = [m.BatchItem(seq, 1, rid=rid if with_ids else None) for seq, rid in zip(SEQS, RIDS, strict=True)]
    return m.encode(m.Batch(REPLICA, 4242, "echo", "1", items, [META] * 64))


def replica_reads(frame: bytes, with_ids: bool) -> Any:
    header = unpack_header(frame)
    if not with_ids:
        return header
    token = REQUEST_IDS.set(BatchIds(header.get("items")))
    REQUEST_IDS.reset(token)
    return header


HEADERS = Headers(raw=[(b"host", b"127.0.0.1:8698"), (b"content-type", b"application/json"),
                       (b"content-length", b"120"), (b"x-request-id", RID.encode())])


def rest_endpoint() -> None:
    """What bridges/rest.py's endpoint adds: the id from the headers, the context variable, the answer's header."""
    given = request_ids.given(None, HEADERS.get(request_ids.HEADER), HEADERS.get(request_ids.TRACEPARENT))
    token = REQUEST_IDS.set(given or request_ids.fresh())
    response = Response(b"{}", media_type="application/json")
    response.raw_headers.append((b"x-request-id", str(REQUEST_IDS.get()).encode("ascii")))
    REQUEST_IDS.reset(token)


def rest_response() -> None:
    Response(b"{}", media_type="application/json")


def debug_line() -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request %d", 1, extra={"request_id": RID})


def best_us(fn: Callable[[], Any], number: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.INFO)
    n, r = args.number, args.repeats
    infer_plain, infer_id = infer(None), infer(RID)
    batch_plain, batch_id = batch(False), batch(True)
    codec = m.BRIDGE_TO_BATCH_MANAGER
    rows: list[tuple[str, float, float, float]] = [  # (step, µs without, µs with, share of one request)
        ("bridge: choose the id", 0.0, best_us(lambda: request_ids.choose(None, RID, None), n, r), 1.0),
        ("bridge: make a fresh id", 0.0, best_us(request_ids.fresh, n, r), 0.0),  # instead of the above
        ("REST: endpoint's share", best_us(rest_response, n, r), best_us(rest_endpoint, n, r), 0.0),  # REST only
        ("gateway: infer out", best_us(lambda: infer(None), n, r), best_us(lambda: infer(RID), n, r), 1.0),
        ("BM: infer in", best_us(lambda: codec.decode(infer_plain), n, r),
         best_us(lambda: codec.decode(infer_id), n, r), 1.0),
        ("BM: batch out, 64", best_us(lambda: batch(False), n // 10, r), best_us(lambda: batch(True), n // 10, r),
         1 / 64),
        ("replica: batch in, 64", best_us(lambda: replica_reads(batch_plain, False), n // 10, r),
         best_us(lambda: replica_reads(batch_id, True), n // 10, r), 1 / 64),
        ("debug line at INFO", 0.0, best_us(debug_line, n, r), 3.0),  # gateway, batch manager, replica (per batch)
    ]
    print(f"{'step':<24} {'without µs':>11} {'with µs':>9}  (best of {r}; header bytes: infer {len(infer_plain)} -> "
          f"{len(infer_id)}, batch {len(batch_plain)} -> {len(batch_id)})")
    for step, without, with_id, _share in rows:
        print(f"{step:<24} {without:>11.3f} {with_id:>9.3f}")
    before = sum(without * share for _, without, _, share in rows)
    after = sum(with_id * share for _, _, with_id, share in rows)
    print(f"per request: {before:.3f} -> {after:.3f} µs (+{after - before:.3f} µs)")


if __name__ == "__main__":
    main()
