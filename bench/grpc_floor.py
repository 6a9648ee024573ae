"""What gRPC itself costs to move a request's bytes: the floor under our transport numbers.

    python -m bench.grpc_floor     # child process: serves one method that takes bytes and answers at once

No protobuf parsing, no servicer, no batcher: the request's bytes go through the same Python gRPC stack
(grpc.aio, HTTP/2 over loopback, default channel settings apart from the message size limit) as a
ScoreRequest does, and the answer is two bytes. Round trips against it say how much of the gRPC path's
"wire" share belongs to gRPC and how much to our server. The same bytes can go as one message (as to
Score) or as a client stream of parts (as to ScoreStream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from bench.common import use_server_allocator
from services.core.server import READY_PREFIX

SERVICE = "bench.Floor"
METHOD = f"/{SERVICE}/Take"
STREAM_METHOD = f"/{SERVICE}/TakeStream"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


async def _take(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def _take_stream(parts: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in parts:
        pass
    return b"ok"


async def serve() -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Take": grpc.unary_unary_rpc_method_handler(_take),
            "TakeStream": grpc.stream_unary_rpc_method_handler(_take_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{READY_PREFIX}127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def round_trip_ms(endpoint: str, body: bytes | list[bytes], images: int, repeats: int) -> float:
    """Median ms per image of sequential calls carrying ``body`` (``images`` images' worth): one
    message, or a list of them sent as one stream."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(endpoint, options=options) as channel:
        call = channel.stream_unary(STREAM_METHOD) if isinstance(body, list) else channel.unary_unary(METHOD)
        await call(body)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await call(body)
            times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0 / images


if __name__ == "__main__":
    use_server_allocator()  # as our server's process has it
    asyncio.run(serve())
