"""Sources: a dataset address becomes an ordered list of chunks, and a chunk becomes records.

    _base.py      the `Source` interface, `JobSource`, the wrappers, zip chunk reading
    _record.py    `Record`: one sample of a chunk before decoding
    _jobapi.py    `JobClient`: the job API over http(s):// or a file:// store
    _manifest.py  the job manifest, parsed and checked
    _http.py      the HTTP client, attempts with backoff, error texts
    _download.py  resumable, verified chunk downloads
    _store.py     the local job store's layout, read back
    _pack.py      `pack`: folders and JSONL lists into a job of the store
    _cache.py     the disk cache of verified chunks, shared by processes
    parquet/      Hugging Face-style Parquet shards, one chunk per row group

Public names are re-exported by `pixcrawler_engine`.
"""
