"""Parquet page headers: just enough of the Thrift compact protocol to read one, and its fields.

A page header is a Thrift struct (`PageHeader` in parquet.thrift) read field by field from the
column chunk's bytes; `read_page_header` returns it as a `PageHeader` with the fields the page
reader uses. Headers are small; one longer than `MAX_HEADER_BYTES` (huge min/max statistics)
is refused, not read. Damage raises `Corrupt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DATA_PAGE",
    "DATA_PAGE_V2",
    "DICTIONARY_PAGE",
    "INDEX_PAGE",
    "MAX_HEADER_BYTES",
    "Corrupt",
    "PageHeader",
    "read_page_header",
]

MAX_HEADER_BYTES = 16 << 20
DATA_PAGE, INDEX_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 1, 2, 3


class Corrupt(Exception):
    """The column chunk is damaged; the values passed on before it are good."""


class _Reader(Protocol):
    def read(self, n: int) -> bytes: ...


@dataclass(frozen=True)
class PageHeader:
    """The fields of a page header the reader needs (parquet.thrift field numbers in brackets).

    Attributes:
        kind: DATA_PAGE, INDEX_PAGE, DICTIONARY_PAGE or DATA_PAGE_V2 [1].
        uncompressed: the page's size once decompressed [2].
        compressed: the page's size in the file, after this header [3].
        count: values (rows, nulls included) in a data page, entries in a dictionary [x.1].
        encoding: the values' encoding (0 PLAIN, 2 PLAIN_DICTIONARY, 8 RLE_DICTIONARY) [x.2].
        def_encoding: a v1 data page's definition-level encoding (3 RLE) [5.3].
        def_bytes: a v2 page's definition-level bytes, stored uncompressed [8.5].
        rep_bytes: a v2 page's repetition-level bytes [8.6].
        values_compressed: whether a v2 page's values are compressed [8.7, default true].
    """

    kind: int
    uncompressed: int
    compressed: int
    count: int = 0
    encoding: int = 0
    def_encoding: int = 3
    def_bytes: int = 0
    rep_bytes: int = 0
    values_compressed: bool = True


def read_page_header(inp: _Reader) -> PageHeader:
    """Reads one page header from `inp`, positioned at its first byte.

    Raises:
        Corrupt: not a page header, or sizes and counts that cannot be.
    """
    fields = _Thrift(inp).struct()
    kind, uncompressed, compressed = fields.get(1), fields.get(2), fields.get(3)
    for name, value in (("size", compressed), ("uncompressed size", uncompressed)):
        if not isinstance(value, int) or value < 0:
            raise Corrupt(f"a page header without a valid {name} ({value!r})")
    assert isinstance(uncompressed, int) and isinstance(compressed, int)
    if kind == DATA_PAGE:
        page = _sub(fields, 5)
        header = PageHeader(kind, uncompressed, compressed, count=_int(page, 1),
                            encoding=_int(page, 2), def_encoding=_int(page, 3, 3))  # fmt: skip
    elif kind == DICTIONARY_PAGE:
        page = _sub(fields, 7)
        header = PageHeader(kind, uncompressed, compressed, count=_int(page, 1),
                            encoding=_int(page, 2))  # fmt: skip
    elif kind == DATA_PAGE_V2:
        page = _sub(fields, 8)
        header = PageHeader(kind, uncompressed, compressed, count=_int(page, 1),
                            encoding=_int(page, 4), def_bytes=_int(page, 5, 0),
                            rep_bytes=_int(page, 6, 0),
                            values_compressed=page.get(7, True) is not False)  # fmt: skip
        if header.def_bytes + header.rep_bytes > min(compressed, uncompressed):
            raise Corrupt("a v2 page whose levels are longer than the page")
    elif kind == INDEX_PAGE:
        return PageHeader(kind, uncompressed, compressed)
    else:
        raise Corrupt(f"unknown page type {kind!r}")
    return header


def _int(page: dict[int, Any], number: int, default: int | None = None) -> int:
    value = page.get(number, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Corrupt(f"a page header whose field {number} is {value!r}, not a count")
    return value


def _sub(fields: dict[int, Any], number: int) -> dict[int, Any]:
    page = fields.get(number)
    if not isinstance(page, dict):
        raise Corrupt("a page header without its page's own header")
    return page


class _Thrift:
    """The Thrift compact protocol, reading a struct of any fields (unknown ones are skipped)."""

    def __init__(self, inp: _Reader) -> None:
        self.inp = inp
        self.read_bytes = 0

    def take(self, n: int) -> bytes:
        self.read_bytes += n
        if self.read_bytes > MAX_HEADER_BYTES:
            raise Corrupt("a page header longer than 16 MiB")
        data = self.inp.read(n)
        if len(data) != n:
            raise Corrupt("the column chunk ends inside a page header")
        return data

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise Corrupt("a varint longer than 64 bits in a page header")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int) -> Any:
        if kind in (1, 2):  # booleans live in the field header
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            return self.take(8)
        if kind == 8:
            return self.take(self.varint())
        if kind in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return [self.value(elem) for _ in range(size)]
        if kind == 11:
            size = self.varint()
            types = self.byte() if size else 0
            return [(self.value(types >> 4), self.value(types & 0x0F)) for _ in range(size)]
        if kind == 12:
            return self.struct()
        raise Corrupt(f"unknown Thrift type {kind} in a page header")

    def struct(self) -> dict[int, Any]:
        fields: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == 0:
                return fields
            delta = head >> 4
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind)
