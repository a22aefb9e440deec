#!/usr/bin/env python3
"""A model server that hangs: accepts connections on 127.0.0.1:PORT, reads, never answers.

Used as the shadow of bench/configs/sidecar-mirror-hang.yaml (started next to the sidecar
by the bench command in docs/performance.md)."""

import asyncio
import sys


async def main(port: int) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 18399))
