"""A plaintext gRPC backend for tests/grpc.rs: service fulcrum.test.Echo with a unary method
(Say: the request back) and a bidirectional streaming one (Chat: each message back), raw bytes
(no generated code). Prints "PORT <n>" once it listens on 127.0.0.1, then serves until killed."""

import sys
from concurrent import futures

import grpc


def say(request, context):
    return request


def chat(requests, context):
    for message in requests:
        yield message


def main():
    handler = grpc.method_handlers_generic_handler(
        "fulcrum.test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
