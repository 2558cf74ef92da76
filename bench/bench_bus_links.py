"""What one hop of the components' bus costs: tcp:// or ipc://, with CURVE or without, in one process.

    python bench/bench_bus_links.py [--seconds 2] [--sizes 64 1048576] [--repeats 3]

A DEALER sends a header frame plus one tensor frame of ``size`` bytes to a ROUTER that echoes it,
one message in flight (a round trip is two hops), and the other way round never waits on Python:
both sockets live in this process, so what is measured is libzmq's transport and CURVE's
encryption, not the components. The four links: tcp://127.0.0.1 with CURVE (``serve``'s components
before), ipc:// in a private directory without CURVE (``serve`` now), and the other two for
reference. Prints the best of the repeats, round trips per second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time

import zmq
import zmq.asyncio

from inferoxy import curve
from inferoxy.bus import plain_socket

SECRET = "bench-bus-links-secret"


def round_trips(ctx: zmq.asyncio.Context, url: str, with_curve: bool, size: int, seconds: float) -> float:
    secret = SECRET if with_curve else None
    # The same sockets as the components' (inferoxy.bus), CURVE as curve.server_for/client_for give it.
    server = plain_socket(ctx, zmq.ROUTER, bind=url, curve_server=curve.server_for(secret, curve.BATCH_MANAGER, url))
    client = plain_socket(ctx, zmq.DEALER, connect=url,
                          curve_client=curve.client_for(secret, curve.BATCH_MANAGER, url))
    assert (server.getsockopt(zmq.CURVE_SERVER) == 1) == with_curve, "the link is not what it is labelled"
    header, payload = b"h" * 100, b"x" * size
    try:
        client.send_multipart([header, payload])  # the handshake, outside the clock
        server.send_multipart(server.recv_multipart(copy=False), copy=False)
        client.recv_multipart(copy=False)
        count, stop_at = 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < stop_at:
            client.send_multipart([header, payload], copy=size < 65536)
            server.send_multipart(server.recv_multipart(copy=False), copy=False)
            client.recv_multipart(copy=False)
            count += 1
        return count / (time.perf_counter() - started)
    finally:
        client.close(0)
        server.close(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024 * 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    private = tempfile.mkdtemp(prefix="inferoxy-bench-links-")  # mode 0700: curve.private_ipc, no CURVE
    shared = tempfile.mkdtemp(prefix="inferoxy-bench-links-")
    os.chmod(shared, 0o755)  # others may enter: CURVE stays on
    ctx: zmq.asyncio.Context = zmq.asyncio.Context()
    try:
        print(f"{'link':<26} {'tensor bytes':>12} {'round trips/s':>14}  (best of {args.repeats})")
        for size in args.sizes:
            for label, scheme, with_curve in (("tcp:// + CURVE (before)", "tcp", True),
                                              ("ipc:// private (now)", "ipc", False),
                                              ("ipc:// + CURVE", "ipc", True), ("tcp:// plain", "tcp", False)):
                best = 0.0
                for n in range(args.repeats):
                    url = f"ipc://{shared if with_curve else private}/link{n}"
                    if scheme == "tcp":
                        with socket.socket() as probe:
                            probe.bind(("127.0.0.1", 0))
                            url = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
                    best = max(best, round_trips(ctx, url, with_curve, size, args.seconds))
                print(f"{label:<26} {size:>12} {best:>14.0f}", flush=True)
    finally:
        ctx.term()
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    main()
