#!/usr/bin/env python3
"""A loopback TCP proxy that delays every byte by DELAY_MS in each direction,
as a database in another region would (2 x DELAY_MS round trip), without
limiting throughput: data keeps flowing while earlier data is in flight.

    latency_proxy.py LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS [TURNS_LOG]

Prints "ready" once it listens. Used by scripts/bench.sh. With TURNS_LOG,
appends a line for every turn of a conversation (the client speaking after
the server did, i.e. one round trip paid): connection, seconds since the
proxy started, the first message's type byte and the chunk's length.
"""
import asyncio
import sys
import time


START = time.monotonic()


async def pump(reader, writer, delay, turn=None):
    queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if turn and data:
                turn(data)
            await queue.put((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, asyncio.CancelledError):
        sender.cancel()
        writer.close()


async def main():
    listen, host, port, delay_ms = sys.argv[1:5]
    delay = float(delay_ms) / 1000
    log = open(sys.argv[5], "a", buffering=1) if len(sys.argv) > 5 else None
    connections = [0]

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        connections[0] += 1
        conn, last = connections[0], ["server"]

        def spoke(side):
            def seen(data):
                if log and side == "client" and last[0] == "server":
                    kind = chr(data[0]) if 32 < data[0] < 127 else "-"
                    log.write(f"{conn} {time.monotonic() - START:.4f} {kind} {len(data)}\n")
                last[0] = side
            return seen

        await asyncio.gather(
            pump(client_r, server_w, delay, spoke("client")),
            pump(server_r, client_w, delay, spoke("server")),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, "127.0.0.1", int(listen))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
