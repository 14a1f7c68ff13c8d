"""Hugging Face-style Parquet shards as a source: one chunk per row group, in bounded memory.

    _source.py  `ParquetSource`: shards, row groups and the records of one
    _schema.py  where the shards are, and which columns are image, mask and label
    _http.py    remote files read with HTTP Range requests
    _pages.py   one binary column chunk streamed value by value, whatever its pages' layout
    _thrift.py  page headers (the Thrift compact protocol)
    _snappy.py  a Snappy page decompressed as a stream
    _rle.py     definition levels and dictionary indices (RLE/bit-packed hybrid)
    _rows.py    the local rows file of a fetched row group, read by the workers

Public names are re-exported by `pixcrawler_engine`.
"""
