"""gRPC peers for tests/http.rs, with grpcio and no generated code (bytes in, bytes out).

  peer.py server PORT NAME       serves /harbor.Test/Who (unary: answers NAME) and
                                 /harbor.Test/Echo (bidirectional: each message back, prefixed
                                 with NAME); prints "ready" once listening
  peer.py unary TARGET N         N unary calls on one channel; prints {"NAME": calls, ...}
  peer.py stream TARGET N        one bidirectional call of N messages; prints the answers as a
                                 JSON list
  peer.py deadline TARGET MS     one unary call with a deadline of MS ms; prints the status
"""

import json
import os
import sys
from concurrent import futures

import grpc

IDENTITY = (lambda b: b, lambda b: b)


def serve(port, name):
    def who(request, context):
        return name.encode()

    def echo(requests, context):
        for message in requests:
            yield name.encode() + b":" + message

    handler = grpc.method_handlers_generic_handler("harbor.Test", {
        "Who": grpc.unary_unary_rpc_method_handler(who, *IDENTITY),
        "Echo": grpc.stream_stream_rpc_method_handler(echo, *IDENTITY),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def main():
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "server":
        serve(int(target), sys.argv[3])
        return
    # A TLS channel when the test names a CA to trust (and the name to ask for).
    ca, name = os.environ.get("GRPC_TEST_CA"), os.environ.get("GRPC_TEST_NAME")
    if ca:
        with open(ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        if mode == "unary":
            call = channel.unary_unary("/harbor.Test/Who", *IDENTITY)
            counts = {}
            for _ in range(int(sys.argv[3])):
                name = call(b"", timeout=10).decode()
                counts[name] = counts.get(name, 0) + 1
            print(json.dumps(counts))
        elif mode == "stream":
            call = channel.stream_stream("/harbor.Test/Echo", *IDENTITY)
            messages = (f"m{i}".encode() for i in range(int(sys.argv[3])))
            print(json.dumps([m.decode() for m in call(messages, timeout=10)]))
        elif mode == "deadline":
            call = channel.unary_unary("/harbor.Test/Who", *IDENTITY)
            try:
                call(b"", timeout=int(sys.argv[3]) / 1000)
                print("OK")
            except grpc.RpcError as error:
                print(error.code().name)


if __name__ == "__main__":
    main()
