"""Read-only state for the memory figures: what preloading is meant to share.

Two shapes of the same size:

* ``objects``: 1,000 tuples of (int, 1 kB bytes) per MB, as real
  preloaded state (parsed config, models, tables) is made of many small
  objects;
* ``blob``: one bytes buffer, the shape Python can share after fork.

Each request reads the next 500 entries (or 500 kB of the buffer), so a
few hundred requests read all of it. On CPython 3.11 reading an object
writes its reference count, which un-shares its page after fork;
``gc.freeze()`` stops the collector's writes, not those. Slicing one
bytes buffer copies out and never writes to the buffer itself.
"""

from __future__ import annotations

from typing import Any

ENTRY = 1000  # bytes per entry
STEP = 500  # entries read per request


class State:
    def __init__(self, megabytes: int, kind: str = "objects") -> None:
        if kind not in ("objects", "blob"):
            raise ValueError(f"state kind must be objects or blob, not {kind!r}")
        self.kind = kind
        self.entries = megabytes * 1000
        self.cursor = 0
        self.objects: list[tuple[int, bytes]] = []
        self.blob = b""
        if kind == "objects":
            self.objects = [(i, bytes([i % 251]) * ENTRY) for i in range(self.entries)]
        else:
            self.blob = bytes(range(250)) * (self.entries * ENTRY // 250)

    def touch(self) -> None:
        """Read the next slice, as a handler that uses all of its state would."""
        if not self.entries:
            return
        start, self.cursor = self.cursor, (self.cursor + STEP) % self.entries
        if self.kind == "objects":
            chunk: Any = self.objects[start : start + STEP]
            size = sum(len(entry[1]) for entry in chunk)
        else:
            size = len(self.blob[start * ENTRY : (start + STEP) * ENTRY])
        if size != ENTRY * min(STEP, self.entries - start):
            raise RuntimeError("state is corrupt")
