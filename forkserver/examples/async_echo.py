"""Echo every byte back with asyncio streams (runs on ``asyncio`` workers).

    forkserver run --bind 127.0.0.1:7000 forkserver.examples.async_echo:handle
"""

import asyncio


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
