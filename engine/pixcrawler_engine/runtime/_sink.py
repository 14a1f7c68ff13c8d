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
        self.dest = None if buf is None else memoryview(buf).cast("B")
        self.base = 0 if self.dest is None else np.frombuffer(self.dest, np.uint8).ctypes.data
        self.position = 0
        self.copied = 0
        self.marks: dict[int, int] = {}  # address of a body buffer -> where it was written

    def write(self, data: Any) -> int:
        address = -1
        if isinstance(data, pa.Buffer):
            address = data.address
            self.marks[address] = self.position
            data = memoryview(data).cast("B")  # Arrow's buffers export signed bytes
        size = len(data)
        end = self.position + size
        if self.dest is not None:
            if end > len(self.dest):
                raise ValueError(
                    f"the batch needs more than the {len(self.dest)} bytes of its buffer"
                )
            if size and address != self.base + self.position:
                self.dest[self.position : end] = data
                self.copied += size
        self.position = end
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
