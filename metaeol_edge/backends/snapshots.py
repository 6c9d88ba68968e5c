"""Saved KV states of template prefixes, so a context loads a prefix by copying it instead of decoding it.

The one-at-a-time engine holds one template prefix per context, decoded on an empty cache (that is what keeps
a prompt's vector the same bit for bit whatever ran before it). MetaEOL has 8 templates and the engine runs
2 lanes, so each call used to decode every template's prefix again: for one sentence, 8 prefixes of ~60
tokens beside 8 prompt tails of ~15, most of the call's work. llama.cpp can copy a sequence's cells out
(``llama_state_seq_get_data``) and back into an empty cache (``llama_state_seq_set_data``), where they land
on the same cells with the same bytes as a fresh decode, so the prompt that follows computes exactly what
it did (tests/test_engine.py checks the bits).

One store serves the process, keyed by the engine's model file and the context settings a prefix's cells
depend on (:func:`state_key`): the lanes of an engine, and every engine on the same file and settings (a
notebook that makes ``MetaEOL("smollm2-135m")`` again, a test suite), decode a prefix once.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

SNAPSHOT_BYTES = 256 << 20
"""What the process keeps at most. A MetaEOL prefix of smollm2-135m in F32 KV cells is ~1.5 MB; the least
recently used go first past this."""


def state_key(model_path: Path, **settings: object) -> tuple:
    """What a prefix's saved cells belong to: the model file as it is now (a file written again at the same
    path is another file: another inode or change time, even where a copy keeps the modification time) and the
    settings that shape its decode (KV type, batch, context, GPU layers, mode)."""
    stat = model_path.stat()
    file = (str(model_path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return (*file, *sorted(settings.items()))


class PrefixSnapshots:
    """(state key, prefix tokens) -> the bytes of that sequence's state, least recently used dropped past
    ``limit``."""

    def __init__(self, limit: int = SNAPSHOT_BYTES) -> None:
        self.limit = limit
        self._saved: OrderedDict[Hashable, ctypes.Array] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> ctypes.Array | None:
        with self._lock:
            data = self._saved.get(key)
            if data is not None:
                self._saved.move_to_end(key)
            return data

    def put(self, key: Hashable, data: ctypes.Array) -> None:
        size = ctypes.sizeof(data)
        if size > self.limit:
            return
        with self._lock:
            old = self._saved.pop(key, None)
            if old is not None:
                self._bytes -= ctypes.sizeof(old)
            self._saved[key] = data
            self._bytes += size
            while self._bytes > self.limit:
                _, dropped = self._saved.popitem(last=False)
                self._bytes -= ctypes.sizeof(dropped)

    def drop(self, key: Hashable) -> None:
        with self._lock:
            old = self._saved.pop(key, None)
            if old is not None:
                self._bytes -= ctypes.sizeof(old)

    def __len__(self) -> int:
        return len(self._saved)

    @property
    def nbytes(self) -> int:
        return self._bytes


SHARED = PrefixSnapshots()
"""The process's store (an engine may be given another: tests do)."""
