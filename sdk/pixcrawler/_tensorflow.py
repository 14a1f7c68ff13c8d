"""The TensorFlow adapter: `Dataset.to_tensorflow` as a `tf.data.Dataset` of known shape.

tensorflow is imported inside the functions, never at module level, so that `import
pixcrawler` stays light. The adapter sees a dataset through the `Passes` protocol (what
`Dataset` offers), so this module does not import the facade.

Labels: where a framework needs class indices, the job's `labels` list gives them, in its
order, as torchvision's `ImageFolder` does (`Dataset.info.class_to_idx`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from pixcrawler._chunks import LocalChunks
from pixcrawler._labels import LabelCoder, is_int
from pixcrawler._rebatch import aligned_empty, check_batch_size, count_batches, rebatch

if TYPE_CHECKING:
    import tensorflow as tf

    from pixcrawler._chunks import JobRef
    from pixcrawler._info import DatasetInfo
    from pixcrawler._parquet_ref import ParquetRef
    from pixcrawler_engine._config import DecodePolicy
    from pixcrawler_engine.runtime._stream import Batch

__all__ = ["ImageSpec", "Passes", "image_spec", "to_tensorflow"]


class Passes(Protocol):
    """What the adapter needs of a dataset: its address, policy, info, length and passes."""

    @property
    def ref(self) -> JobRef | ParquetRef: ...

    @property
    def policy(self) -> DecodePolicy: ...

    @property
    def info(self) -> DatasetInfo: ...

    def __len__(self) -> int: ...

    def iter_engine_batches(self, *, desc: str | None = None) -> Iterator[Batch]: ...

    def _launch_ahead(self) -> None: ...


@dataclass(frozen=True)
class ImageSpec:
    """What a pass over a dataset yields, known before the pass.

    Attributes:
        shape: (H, W, C); a dimension is None where images differ in it.
        checked: True when `shape` was read from the first chunk rather than fixed by the
            decode policy: later images must be checked against it.
        first_label: the label of the first image (None when the job has no images).
    """

    shape: tuple[int | None, int | None, int | None]
    checked: bool
    first_label: Any = None


def image_spec(dataset: Passes) -> ImageSpec:
    """The image shape of `dataset`'s output, from the decode policy or its first chunk.

    Without a fixed output size, the headers of the first chunk's images (not their pixels)
    say what sizes come out: if they all agree, that shape is used and checked on every
    later image; if not, the varying dimensions are None. Only the first chunk is fetched.
    """
    from pixcrawler_engine.decode._image import probe
    from pixcrawler_engine.decode._plan import output_shape

    policy = dataset.policy
    fixed = policy.fixed_shape
    labels_known = bool(dataset.info.labels)
    if fixed is not None and labels_known:
        return ImageSpec(shape=fixed, checked=False)
    chunks = [c.index for c in dataset.ref.manifest.chunks if c.num_images]
    if not chunks:
        channels = None if fixed is None else fixed[2]
        return ImageSpec(shape=fixed or (None, None, channels), checked=False)
    cache = LocalChunks(dataset.ref)
    try:
        reader, records = cache.open(chunks[0])
        first_label = records[0].label
        if fixed is not None:
            return ImageSpec(shape=fixed, checked=False, first_label=first_label)
        shapes = set()
        for record in records:
            try:
                shapes.add(tuple(output_shape(probe(reader.read(record.ref)), policy)))
            except Exception:  # a bad sample says nothing about the others' shape
                continue
    finally:
        cache.discard()
    if not shapes:
        return ImageSpec(shape=(None, None, None), checked=False, first_label=first_label)
    dims = tuple(
        values.pop() if len(values := {s[d] for s in shapes}) == 1 else None for d in range(3)
    )
    return ImageSpec(shape=dims, checked=len(shapes) == 1, first_label=first_label)  # type: ignore[arg-type]


def to_tensorflow(
    dataset: Passes,
    *,
    batch_size: int | None = None,
    drop_last: bool = False,
    metadata: bool = False,
) -> tf.data.Dataset:
    """A `tf.data.Dataset` over `dataset`; see `Dataset.to_tensorflow`.

    Engine batches cross into TensorFlow whole: one copy each, into 64-byte-aligned memory
    that TensorFlow adopts without a second copy (never the engine's shared memory itself,
    which prefetch or shuffle buffers would hold far beyond a batch's life). Single images
    are those batches `unbatch()`ed, in TensorFlow's own code.
    """
    check_batch_size(batch_size, optional=True)
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError(
            "to_tensorflow() needs TensorFlow: pip install 'pixcrawler-sdk[tensorflow]'"
        ) from exc
    # The engine starts (~0.3 s) while TensorFlow traces the pipeline below (~0.1 s).
    dataset._launch_ahead()
    spec = image_spec(dataset)
    if batch_size is not None and None in spec.shape:
        raise ValueError(
            f"to_tensorflow(batch_size={batch_size}) needs images of one size, but the first "
            f"chunk's images already differ ({spec.shape}); pass image_size=(height, width) "
            "to load_dataset so that every image has one size"
        )
    class_to_idx = dict(dataset.info.class_to_idx)
    coder = LabelCoder(class_to_idx, indexed=bool(class_to_idx) or is_int(spec.first_label))
    varying = None in spec.shape
    rows = None if varying else (batch_size if drop_last else None)
    signature = [
        tf.TensorSpec(shape=(rows, *spec.shape), dtype=tf.uint8),
        tf.TensorSpec(shape=(rows,), dtype=tf.int64 if coder.indexed else tf.string),
    ]
    if metadata:
        signature.append(tf.TensorSpec(shape=(rows,), dtype=tf.string))
    if varying:
        signature = [tf.TensorSpec(shape=s.shape[1:], dtype=s.dtype) for s in signature]

    def generator() -> Iterator[tuple[np.ndarray, ...]]:
        # One engine pass per epoch; tf.data closes the generator (and so the pass) when its
        # iterator goes away, including after take().
        batches = dataset.iter_engine_batches(desc=None)
        extract = _extractor(coder, metadata)
        if varying:
            yield from _single_images(batches, extract)
            return
        for out in rebatch(
            batches,
            batch_size,
            drop_last=drop_last,
            shape=cast("tuple[int, int, int]", spec.shape),  # no None: not varying
            extract=extract,
            alloc=_aligned_alloc,
        ):
            images = out.owner if out.owner is not None else _aligned_copy(out.images)
            yield (images, *out.columns)

    tf_dataset = tf.data.Dataset.from_generator(generator, output_signature=tuple(signature))
    if batch_size is None and not varying:
        tf_dataset = tf_dataset.unbatch()
    if dataset.policy.on_error == "raise":
        # Every image comes out, so the count is known: Keras then sizes its epochs (and its
        # progress bar) instead of finding the end by running out of data. Skipping bad images
        # would make the count a guess, and a wrong one is an error in tf.data.
        count = count_batches(len(dataset), batch_size, drop_last)
        tf_dataset = tf_dataset.apply(
            tf.data.experimental.assert_cardinality(len(dataset) if count is None else count)
        )
    return tf_dataset


def _extractor(coder: LabelCoder, metadata: bool) -> Callable[[Batch], tuple[Any, ...]]:
    """The per-row columns of an engine batch as TensorFlow takes them."""

    def extract(batch: Batch) -> tuple[Any, ...]:
        labels = coder(batch)
        if not isinstance(labels, np.ndarray):
            # Strings as they are; dicts (and anything else) as JSON, decodable with json.loads.
            texts = [v if isinstance(v, str) else json.dumps(v) for v in labels]
            labels = np.array(texts, dtype=object)
        if not metadata:
            return (labels,)
        fields = zip(batch.keys, batch.metadata, strict=True)
        meta = [json.dumps({"key": key, **values}) for key, values in fields]
        return labels, np.array(meta, dtype=object)

    return extract


def _single_images(
    batches: Iterator[Batch], extract: Callable[[Batch], tuple[Any, ...]]
) -> Iterator[tuple[np.ndarray, ...]]:
    """Images one at a time, for datasets whose images differ in size (no batch holds them)."""
    for batch in batches:
        images = batch.images
        columns = extract(batch)
        for i in range(len(images)):
            yield (_aligned_copy(images[i]), *(column[i] for column in columns))


def _aligned_alloc(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    array = aligned_empty(shape)
    return array, array


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    out = aligned_empty(array.shape)
    np.copyto(out, array)
    return out
