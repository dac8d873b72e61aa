"""Runtime backends that execute exported programs (LiteRT; ExecuTorch)."""

from __future__ import annotations

from pathlib import Path


def program_bytes(source: bytes | bytearray | memoryview | str | Path, identifier: bytes, what: str,
                  error: type[Exception]) -> bytes:
    """A program's bytes, given or read from a path, checked for its flatbuffer file identifier (bytes
    4..8) so that a wrong file fails here with `error` naming what was expected, not deep in a runtime."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise error(f"{what} {path} does not exist")
        data = path.read_bytes()
    if len(data) < 8 or data[4:8] != identifier:
        raise error(f"not a {what}: the flatbuffer identifier {identifier.decode()!r} is missing")
    return data
