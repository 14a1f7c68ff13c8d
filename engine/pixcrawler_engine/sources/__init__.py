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
    _cached_source.py  a job source whose downloads go through that cache
    parquet/      Hugging Face-style Parquet shards, one chunk per row group

Public names are re-exported by `pixcrawler_engine`.
"""

import sys
import types

# `import httpx` imports httpx's own command line (`httpx._main`: rich, pygments, click) when
# those are installed (keras brings rich): 200 ms at every start of a stream, for a program the
# engine never runs. A placeholder module makes httpx take its fallback instead.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", types.ModuleType("httpx._main"))
