"""WebSocket peers for HTTP mode's upgrade tests (the `websockets` package from PyPI).

  peer.py server NAME      echoes each message as "NAME:message" on a free port, which it
                           prints as "listening PORT"
  peer.py client URL N     sends N text messages and one 1 MiB binary message, prints each
                           answer (binary ones as their length and a checksum), then closes
"""

import asyncio
import hashlib
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve


async def server(name):
    async def echo(ws):
        async for message in ws:
            if isinstance(message, bytes):
                await ws.send(message)
            else:
                await ws.send(f"{name}:{message}")

    async with serve(echo, "127.0.0.1", 0, max_size=4 << 20) as running:
        port = running.sockets[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        await asyncio.Future()


async def client(url, n):
    async with connect(url, max_size=4 << 20, open_timeout=10, close_timeout=5) as ws:
        for i in range(n):
            await ws.send(f"m{i}")
            print(await asyncio.wait_for(ws.recv(), 10), flush=True)
        blob = bytes(range(256)) * 4096
        await ws.send(blob)
        back = await asyncio.wait_for(ws.recv(), 10)
        print(f"binary {len(back)} {hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server(sys.argv[2]))
    else:
        asyncio.run(client(sys.argv[2], int(sys.argv[3])))
