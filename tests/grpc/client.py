"""A gRPC client for tests/grpc.rs: over TLS with a client certificate to TARGET (fulcrum),
verifying it as SERVER_NAME against CA. Makes, on one channel and so one connection, 8 unary
calls and 4 bidirectional streams at once. Prints "ok <calls>" and exits 0, or prints the gRPC
status and exits 1.

usage: client.py TARGET SERVER_NAME CA CERT KEY"""

import sys
from concurrent import futures

import grpc


def main():
    target, server_name, ca, cert, key = sys.argv[1:6]
    read = lambda path: open(path, "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )
    options = [("grpc.ssl_target_name_override", server_name), ("grpc.enable_retries", 0)]
    with grpc.secure_channel(target, credentials, options=options) as channel:
        say = channel.unary_unary("/fulcrum.test.Echo/Say")
        chat = channel.stream_stream("/fulcrum.test.Echo/Chat")

        def unary(i):
            body = f"hello {i}".encode()
            assert say(body, timeout=10) == body
            return 1

        def stream(i):
            sent = [f"stream {i} message {j}".encode() for j in range(5)]
            got = list(chat(iter(sent), timeout=10))
            assert got == sent, got
            return len(sent)

        try:
            with futures.ThreadPoolExecutor(max_workers=12) as pool:
                jobs = [pool.submit(unary, i) for i in range(8)] + [pool.submit(stream, i) for i in range(4)]
                calls = sum(job.result() for job in jobs)
        except grpc.RpcError as e:
            print(f"rpc failed: {e.code().name}: {e.details()}", flush=True)
            return 1
        print(f"ok {calls}", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
