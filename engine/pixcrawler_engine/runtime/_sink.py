"""An Arrow IPC sink over a buffer that leaves in place what already lies where it goes.

See NOTE [pixels in place] in `_batch`: the pixels of a batch decoded into a slot are never
copied when the batch is written there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["InPlaceSink", "write_stream"]


class InPlaceSink:
    """A file for Arrow's IPC writer over `buf`: a buffer already at its place is not copied.

    Arrow hands body buffers over as `pa.Buffer`s (zero-copy, with their address); metadata
    comes as small bytes. Writes past the end raise, as `FixedSizeBufferWriter`'s do.
    """

    closed = False

    def __init__(self, buf: memoryview | None) -> None:
        self.dest = None if buf is None else np.frombuffer(buf, np.uint8)
        self.base = 0 if self.dest is None else self.dest.ctypes.data
        self.position = 0
        self.copied = 0
        self.marks: dict[int, int] = {}  # address of a body buffer -> where it was written

    def write(self, data: Any) -> int:
        view = np.frombuffer(data, np.uint8)
        size = view.size
        if isinstance(data, pa.Buffer):
            self.marks[data.address] = self.position
        if self.dest is not None:
            if self.position + size > self.dest.size:
                raise ValueError(
                    f"the batch needs more than the {self.dest.size} bytes of its buffer"
                )
            if size and view.ctypes.data != self.base + self.position:
                np.copyto(self.dest[self.position : self.position + size], view)
                self.copied += size
        self.position += size
        return size

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def write_stream(batch: pa.RecordBatch, sink: InPlaceSink) -> None:
    with pa.PythonFile(sink, mode="w") as file, pa.ipc.new_stream(file, batch.schema) as writer:
        writer.write_batch(batch)
