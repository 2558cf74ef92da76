"""PyTriton serving identity models, the Triton anchor of bench_vs_triton.py. Runs in the Triton venv
(bench/triton_env.sh), never in Inferoxy's own environment.

    LD_LIBRARY_PATH=$PREFIX/lib bench/.triton-venv/bin/python bench/triton_identity.py \
        --grpc-port 8001 --http-port 8000 --metrics-port 8002     # prints "ready" once serving
    ... --check                                                    # start, answer one request, stop

One model per case (Triton fixes a model's dtype and rank), each with dynamic batching as issue 13
states: max batch 64, max queue delay 0.5 ms. Input ``x``, output ``y``, the same bytes.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

# name -> (dtype, shape without the batch dimension); bench_vs_triton.py's CASES name the same models.
MODELS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "echo_fp32_16": (np.float32, (16,)),
    "echo_uint8_frame": (np.uint8, (1080, 1920, 3)),
    "echo_fp32_image": (np.float32, (3, 224, 224)),
}


@batch
def identity(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bind_all(triton: Triton) -> None:
    for name, (dtype, shape) in MODELS.items():
        triton.bind(
            model_name=name,
            infer_func=identity,
            inputs=[Tensor(name="x", dtype=dtype, shape=shape)],
            outputs=[Tensor(name="y", dtype=dtype, shape=shape)],
            config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=500)),
            strict=False,
        )


def check(grpc_port: int) -> None:
    from tritonclient.grpc import InferenceServerClient, InferInput

    client = InferenceServerClient(f"127.0.0.1:{grpc_port}")
    payload = np.arange(16, dtype=np.float32)[None]
    tensor = InferInput("x", list(payload.shape), "FP32")
    tensor.set_data_from_numpy(payload)
    answer = client.infer("echo_fp32_16", [tensor]).as_numpy("y")
    assert answer is not None and np.array_equal(answer, payload), answer
    print(f"triton_identity: Triton answered on 127.0.0.1:{grpc_port}: {answer.tolist()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="answer one request and stop")
    args = parser.parse_args()
    grpc_port, http_port = args.grpc_port or free_port(), args.http_port or free_port()
    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=grpc_port, http_address="127.0.0.1", http_port=http_port,
        metrics_port=args.metrics_port or free_port(), allow_metrics=False, log_verbose=0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config) as triton:
        bind_all(triton)
        triton.run()
        if args.check:
            check(grpc_port)
            return
        print("ready", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
