"""A bare ``grpc.aio`` server whose ModelInfer answers each request with its own inputs: no batching,
no bus, no validation. The ceiling for a Python gRPC server on this machine (bench_vs_triton.py).

    python bench/grpc_echo_server.py --port 8001      # prints "ready" once listening

Uses the project's generated stubs (bridges/proto), so its messages are exactly the bridge's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bridges.proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from bridges.proto import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    async def ServerLive(  # noqa: N802
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)


async def serve(port: int) -> None:
    # Same message limits as the gRPC bridge, so large tensors are allowed through on both.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1),
                                      ("grpc.max_send_message_length", -1)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
