"""What a client that sends and never reads costs a bridge, and what it costs the other clients.

    python bench/bench_slow_clients.py [--requests 2000] [--size-kb 256] [--json bench/results/slow_clients.json]

Starts its own `inferoxy serve` (echo model, ZeroMQ and gRPC bridges, free loopback ports) and
runs two cases, each against its own bridge process (found by the PID `serve` prints):

- zmq:  a DEALER sends ``--requests`` echo requests of ``--size-kb`` KiB and reads nothing (its
        receive queue is one message, its kernel buffer 64 KiB, so replies back up into the bridge);
- grpc: a ModelStreamInfer stream writes as many of them as flow control lets through within
        ``--send-timeout`` and reads no answer.

Meanwhile a well-behaved client of the same bridge (ZeroMQ AsyncClient, or gRPC ModelInfer on its
own connection) sends small requests back to back; its successes, failures and p50 are counted.
The bridge's resident memory is read from /proc before the slow client starts (VmRSS) and at its
peak (VmHWM) after ``--hold`` seconds of not reading. Only then does the slow client read what it
was sent, to count its requests answered, refused ``overloaded``, and never answered.

To measure older code with the same script, point ``--code`` (or the first PYTHONPATH entry) at
its checkout: `serve` then runs from there while this script keeps its own helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_bridges import ECHO_ONLY  # noqa: E402  (the same one-model proxy as the other bridge benches)

from bridges.proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from inferoxy.client import AsyncClient, InferenceError  # noqa: E402
from inferoxy.wire import encode, unpack_header  # noqa: E402
from tests.support import ProxyProcess, descendants, wait_for  # noqa: E402

SMALL = np.arange(16, dtype=np.float32)[None]
REQUEST_TIMEOUT_S = 120.0  # longer than the whole case: no slow request expires while it is held
DRAIN_IDLE_S = 3.0  # the slow client stops reading after this long without a reply


# --- the proxy and its bridge processes ----------------------------------------------------------

def start_proxy(code: Path) -> ProxyProcess:
    models = Path(tempfile.mkdtemp()) / "models.yaml"
    models.write_text(ECHO_ONLY)
    env = {"INFEROXY_MODELS_FILE": str(models), "INFEROXY_LOG_LEVEL": "WARNING", "INFEROXY_BRIDGES": "zmq,grpc",
           "PYTHONPATH": str(code)}
    proxy = ProxyProcess(env=env, cwd=code).start(timeout=120)

    async def ready() -> None:
        async with AsyncClient(proxy.zmq_url, timeout=30) as client:
            await client.infer("echo", {"x": SMALL})

    wait_for(lambda: asyncio.run(ready()) is None, timeout=60, what="the echo model")
    return proxy


def bridge_pid(proxy: ProxyProcess, name: str) -> int:
    """The bridge's PID from `serve`'s `components (pid)` line; from the process list for code that lacks it."""
    for line in proxy.output:
        if "components (pid)" in line:
            for component, pid in re.findall(r"(\w+) (\d+)", line.split("components (pid)", 1)[1]):
                if component == name:
                    return int(pid)
    assert proxy.process is not None
    for pid in descendants(proxy.process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[-3:-1] == [b"run", name.encode()]:
            return pid
    raise RuntimeError(f"no {name} process below inferoxy serve")


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak since the process started) of one process, in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(value.split()[0]) / 1024.0, 1)
    return found


# --- the well-behaved clients ----------------------------------------------------------------------

class GoodClient:
    """Back-to-back small requests until ``stop`` is set; successes, failures by code, latencies."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {"alone": [], "beside": []}
        self.phase = "warm-up"
        self.failures: Counter[str] = Counter()
        self.stop = asyncio.Event()

    async def loop(self, call: Any) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                await call()
                self.latencies.setdefault(self.phase, []).append(time.perf_counter() - start)
            except InferenceError as exc:
                self.failures[exc.code] += 1
            except grpc.aio.AioRpcError as exc:
                self.failures[exc.code().name] += 1

    def summary(self) -> dict[str, Any]:
        """Successes and p50 beside the slow client, and p50 alone (just before it started) to compare."""
        def ms(phase: str, q: float) -> float:
            found = self.latencies[phase]
            return round(float(np.percentile(np.array(found) * 1000, q)), 2) if found else 0.0

        return {"ok": len(self.latencies["beside"]), "failed": dict(self.failures), "p50_ms": ms("beside", 50),
                "p99_ms": ms("beside", 99), "max_ms": ms("beside", 100),
                "ok_alone": len(self.latencies["alone"]), "p50_alone_ms": ms("alone", 50)}


async def good_zmq(url: str, good: GoodClient) -> None:
    async with AsyncClient(url, timeout=10) as client:
        async def call() -> None:
            await client.infer("echo", {"x": SMALL})

        await good.loop(call)


def grpc_channel(target: str) -> grpc.aio.Channel:
    # Its own subchannel pool: a channel of its own is then a TCP connection of its own, so the
    # bridge's per-connection bound of one client never covers the other.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    return grpc.aio.insecure_channel(target, options=options)


def infer_request(rid: int, array: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(array.shape))
    return pb.ModelInferRequest(model_name="echo", id=str(rid), inputs=[tensor],
                                raw_input_contents=[array.tobytes()])


async def good_grpc(target: str, good: GoodClient) -> None:
    async with grpc_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call() -> None:
            await stub.ModelInfer(infer_request(0, SMALL), timeout=10)

        await good.loop(call)


# --- the slow clients ------------------------------------------------------------------------------

class SlowZmq:
    """A DEALER that sends ``count`` requests from a thread of its own and reads nothing until ``drain``."""

    def __init__(self, url: str, count: int, array: np.ndarray, send_timeout_s: float) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.setsockopt(zmq.RCVBUF, 64 * 1024)
        self.sock.connect(url)
        self.count, self.array, self.send_timeout_s = count, array, send_timeout_s
        self.sent = 0
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        deadline = time.monotonic() + self.send_timeout_s
        header = {"model": "echo", "timeout_ms": int(REQUEST_TIMEOUT_S * 1000)}
        for rid in range(self.count):
            frames = encode({**header, "id": rid}, [("x", self.array)])
            while not self.sock.poll(100, zmq.POLLOUT):
                if time.monotonic() > deadline:
                    return
            self.sock.send_multipart(frames, copy=False)
            self.sent += 1

    async def sending(self) -> None:
        self.thread.start()
        await asyncio.to_thread(self.thread.join)

    def drain(self) -> Counter[str]:
        """Read until nothing comes for DRAIN_IDLE_S; count the replies by outcome."""
        outcomes: Counter[str] = Counter()
        while sum(outcomes.values()) < self.sent and self.sock.poll(int(DRAIN_IDLE_S * 1000), zmq.POLLIN):
            header = unpack_header(self.sock.recv_multipart(copy=False)[0])
            outcomes["ok" if header.get("ok") is True else str(header.get("error", {}).get("code"))] += 1
        return outcomes

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class SlowGrpc:
    """A ModelStreamInfer stream that writes until ``stop`` and reads nothing until ``drain``."""

    def __init__(self, target: str, count: int, array: np.ndarray) -> None:
        self.channel = grpc_channel(target)
        self.call = pb_grpc.GRPCInferenceServiceStub(self.channel).ModelStreamInfer(timeout=REQUEST_TIMEOUT_S)
        self.count, self.array = count, array
        self.sent = 0
        self.stop = asyncio.Event()
        self.writer: asyncio.Task[None] | None = None

    async def _write(self) -> None:
        for rid in range(self.count):
            if self.stop.is_set():
                break
            await self.call.write(infer_request(rid, self.array))
            self.sent += 1
        await self.call.done_writing()

    async def sending(self, send_timeout_s: float) -> None:
        # A write the bridge holds back (flow control) may stay pending; it is finished during the drain.
        self.writer = asyncio.create_task(self._write())
        await asyncio.wait({self.writer}, timeout=send_timeout_s)
        self.stop.set()

    async def drain(self) -> Counter[str]:
        outcomes: Counter[str] = Counter()
        try:
            while True:
                response = await asyncio.wait_for(self.call.read(), DRAIN_IDLE_S)
                if response is grpc.aio.EOF:
                    break
                message = response.error_message
                outcomes["ok" if not message else "overloaded" if "RESOURCE_EXHAUSTED" in message else message] += 1
        except (TimeoutError, asyncio.TimeoutError):
            pass
        except grpc.aio.AioRpcError as exc:
            outcomes[f"stream ended {exc.code().name}"] += 1
        return outcomes

    async def close(self) -> None:
        self.call.cancel()
        if self.writer is not None:
            await asyncio.gather(self.writer, return_exceptions=True)
        await self.channel.close()


# --- one case ----------------------------------------------------------------------------------------

async def hold(pid: int, seconds: float) -> None:
    """Keep the slow client unread for ``seconds``, reading memory meanwhile so VmHWM is not the only witness."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        memory_mib(pid)
        await asyncio.sleep(0.2)


async def run_case(kind: str, proxy: ProxyProcess, args: argparse.Namespace) -> dict[str, Any]:
    pid = bridge_pid(proxy, f"{kind}_bridge")
    array = np.zeros((1, args.size_kb * 256), np.float32)  # 256 float32 per KiB
    target = f"127.0.0.1:{proxy.grpc_port}"
    good = GoodClient()
    good_task = asyncio.create_task(good_zmq(proxy.zmq_url, good) if kind == "zmq" else good_grpc(target, good))
    await asyncio.sleep(0.5)  # the good client's connection is up and warm before it is measured
    good.phase = "alone"
    await asyncio.sleep(args.alone)
    good.phase = "beside"
    before = memory_mib(pid)
    began = time.perf_counter()
    slow: SlowZmq | SlowGrpc
    if kind == "zmq":
        slow = SlowZmq(proxy.zmq_url, args.requests, array, args.send_timeout)
        await slow.sending()
    else:
        slow = SlowGrpc(target, args.requests, array)
        await slow.sending(args.send_timeout)
    sending_s = time.perf_counter() - began
    await hold(pid, args.hold)
    peak = memory_mib(pid)
    good.stop.set()
    await good_task
    beside_s = time.perf_counter() - began
    try:
        outcomes = await asyncio.to_thread(slow.drain) if isinstance(slow, SlowZmq) else await slow.drain()
    finally:
        if isinstance(slow, SlowZmq):
            slow.close()
        else:
            await slow.close()
    answered = sum(outcomes.values())
    return {
        "case": kind, "bridge_pid": pid,
        "rss_before_mib": before["VmRSS"], "peak_rss_mib": peak["VmHWM"], "rss_held_mib": peak["VmRSS"],
        "slow_sent": slow.sent, "slow_not_sent": args.requests - slow.sent, "sending_s": round(sending_s, 1),
        "slow_ok": outcomes.pop("ok", 0), "slow_overloaded": outcomes.pop("overloaded", 0),
        "slow_other": dict(outcomes), "slow_unanswered": slow.sent - answered,
        "good": {**good.summary(), "seconds_beside": round(beside_s, 1)},
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| case | bridge RSS before MiB | peak MiB | slow sent | answered ok | refused overloaded "
          "| unanswered | held back | good ok/s | good failed | good p50 ms (alone) | good p99 ms |")
    print("|---" * 12 + "|")
    for row in rows:
        good = row["good"]
        print(f"| {row['case']} | {row['rss_before_mib']:.0f} | {row['peak_rss_mib']:.0f} | {row['slow_sent']} "
              f"| {row['slow_ok']} | {row['slow_overloaded']} | {row['slow_unanswered']} | {row['slow_not_sent']} "
              f"| {good['ok'] / good['seconds_beside']:.0f} "
              f"| {sum(good['failed'].values())} | {good['p50_ms']:.2f} ({good['p50_alone_ms']:.2f}) "
              f"| {good['p99_ms']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests the slow client sends")
    parser.add_argument("--size-kb", type=int, default=256, help="KiB of tensor data in each of them")
    parser.add_argument("--cases", nargs="+", default=["zmq", "grpc"], choices=["zmq", "grpc"])
    parser.add_argument("--alone", type=float, default=2.0, help="seconds the good client is measured alone first")
    parser.add_argument("--send-timeout", type=float, default=15.0, help="seconds the slow client may spend sending")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds it then stays unread before its peak is read")
    default_code = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(REPO)
    parser.add_argument("--code", type=Path, default=Path(default_code), help="checkout `serve` runs from")
    parser.add_argument("--json", default="bench/results/slow_clients.json", help="where to write the figures")
    args = parser.parse_args()

    proxy = start_proxy(args.code.resolve())
    try:
        rows = []
        for kind in args.cases:
            rows.append(asyncio.run(run_case(kind, proxy, args)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proxy.stop()

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine, "code": str(args.code), "requests": args.requests,
                                           "size_kb": args.size_kb, "results": rows}, indent=2) + "\n")
    print_table(rows)
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
