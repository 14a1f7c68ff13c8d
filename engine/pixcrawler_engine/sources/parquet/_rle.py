"""Parquet's RLE/bit-packed hybrid encoding, decoded: definition levels and dictionary indices."""

from __future__ import annotations

import numpy as np

from pixcrawler_engine.sources.parquet._thrift import Corrupt

__all__ = ["decode_hybrid"]


def decode_hybrid(data: bytes, count: int, bit_width: int) -> np.ndarray:
    """Decodes `count` values of `bit_width` bits (RLE runs and bit-packed groups of 8).

    Raises:
        Corrupt: the data ends before `count` values, or holds an empty run.
    """
    out = np.zeros(count, dtype=np.int64)
    if bit_width == 0 or count == 0:
        return out  # every value is 0 (a dictionary of one entry)
    if bit_width > 32:
        raise Corrupt(f"a bit width of {bit_width} in RLE-encoded values")
    pos = filled = 0
    width_bytes = (bit_width + 7) // 8
    weights = 1 << np.arange(bit_width, dtype=np.int64)
    try:
        while filled < count:
            shift = header = 0
            while True:
                b = data[pos]
                pos += 1
                header |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
                if shift > 35:
                    raise Corrupt("an RLE run header longer than 32 bits")
            if header & 1:  # bit-packed: groups of 8 values, LSB first
                nbytes = (header >> 1) * bit_width
                if pos + nbytes > len(data):
                    raise IndexError("a bit-packed run past the end")
                bits = np.unpackbits(
                    np.frombuffer(data, np.uint8, nbytes, pos), bitorder="little"
                ).reshape(-1, bit_width)
                values = bits @ weights
                if not len(values):
                    raise Corrupt("an empty bit-packed run")
                take = min(len(values), count - filled)
                out[filled : filled + take] = values[:take]
                filled += take
                pos += nbytes
            else:  # a run of one value
                run = header >> 1
                if run == 0:
                    raise Corrupt("an empty run in RLE-encoded values")
                if pos + width_bytes > len(data):
                    raise IndexError("a run's value past the end")
                value = int.from_bytes(data[pos : pos + width_bytes], "little")
                pos += width_bytes
                take = min(run, count - filled)
                out[filled : filled + take] = value
                filled += take
    except (IndexError, ValueError) as exc:
        raise Corrupt(f"RLE-encoded values are truncated ({exc})") from exc
    return out
