"""What a consumer pays for its first batch: no import it does not need.

pyarrow imports pandas (0.3-0.6 s here) on the first `Array.to_numpy`, and `pyarrow.compute`
takes ~35 ms to import; reading a batch's images, masks, shapes and label indices must go
through neither. A `file://` job sends no request, so it never imports httpx (~60 ms, in the
consumer and again in its supervisor). Checked in a fresh interpreter
(this one may have pandas loaded already), on real engine processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    from pixcrawler import load_dataset
    from pixcrawler_engine.runtime._classes import ClassIndex

    ds = load_dataset({job!r}, base_url={url!r}, num_workers=1, progress=False, **{options!r})
    names = sorted({{label for batch in ds.iter_engine_batches() for label in batch.labels}})
    assert "pandas" not in sys.modules, "reading labels imported pandas"
    classes = ClassIndex(names)
    for batch in ds.iter_engine_batches():
        images, masks = batch.images, batch.masks
        indices = batch.label_indices(classes)
        assert len(indices) == len(batch) and (indices >= 0).all()
        assert [names[i] for i in indices] == batch.labels
    # Nor pyarrow.compute: its import (~35 ms, ~0.1 s on a busy machine) was the first batch's.
    assert "pyarrow.compute" not in sys.modules, "reading label indices imported pyarrow.compute"
    assert "httpx" not in sys.modules, "a file:// job imported httpx"
    for image, label in ds:
        pass
    ds.close()
    print(sorted(m for m in sys.modules if m.split(".")[0] == "pandas")[:3])
    """
)


def _modules_after(store: Path, job: str, **options: object) -> str:
    script = SCRIPT.format(job=job, url=store.as_uri(), options=options)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_fixed_size_batches_do_not_import_pandas(store: Path) -> None:
    assert _modules_after(store, "demo", image_size=16) == "[]"


def test_variable_size_batches_do_not_import_pandas(store: Path) -> None:
    assert _modules_after(store, "demo") == "[]"
