"""The TensorFlow adapter: `Dataset.to_tensorflow` as a `tf.data.Dataset` of known shape.

tensorflow is imported inside the functions, never at module level, so that `import
pixcrawler` stays light. The adapter sees a dataset through the `Passes` protocol (what
`Dataset` offers), so this module does not import the facade.

Labels: where a framework needs class indices, the job's `labels` list gives them, in its
order, as torchvision's `ImageFolder` does (`Dataset.info.class_to_idx`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pixcrawler._chunks import LocalChunks

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


def to_tensorflow(dataset: Passes) -> tf.data.Dataset:
    """A `tf.data.Dataset` of `(image, label)` over `dataset`; see `Dataset.to_tensorflow`."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError(
            "to_tensorflow() needs TensorFlow: pip install 'pixcrawler-sdk[tensorflow]'"
        ) from exc
    spec = image_spec(dataset)
    class_to_idx = dict(dataset.info.class_to_idx)
    label_dtype, encode = _label_encoding(class_to_idx, spec.first_label)
    expected = spec.shape

    def generator() -> Iterator[tuple[np.ndarray, Any]]:
        # One engine pass per epoch; tf.data closes the generator (and so the pass) when its
        # iterator goes away, including after take().
        for batch in dataset.iter_engine_batches(desc=None):
            images = batch.images
            for i, label in enumerate(batch.labels):
                image = images[i]
                if spec.checked and image.shape != expected:
                    raise ValueError(
                        f"image {batch.keys[i]!r} is {image.shape}, but the first chunk's "
                        f"images are all {expected}; pass image_size=(height, width) to "
                        "load_dataset so that every image has one size"
                    )
                # A copy: tf.data may buffer elements (prefetch, shuffle) far beyond the
                # life of an engine batch.
                yield np.array(image), encode(label)

    signature = (
        tf.TensorSpec(shape=expected, dtype=tf.uint8),
        tf.TensorSpec(shape=(), dtype=label_dtype),
    )
    tf_dataset = tf.data.Dataset.from_generator(generator, output_signature=signature)
    if dataset.policy.on_error == "raise":
        # Every image comes out, so the count is known: Keras then sizes its epochs (and its
        # progress bar) instead of finding the end by running out of data. Skipping bad images
        # would make the count a guess, and a wrong one is an error in tf.data.
        tf_dataset = tf_dataset.apply(tf.data.experimental.assert_cardinality(len(dataset)))
    return tf_dataset


def _label_encoding(class_to_idx: dict[str, int], first_label: Any) -> tuple[Any, Any]:
    """The TensorFlow dtype of the labels and the function that makes one label fit it."""
    import tensorflow as tf

    if class_to_idx or (isinstance(first_label, int) and not isinstance(first_label, bool)):

        def to_index(label: Any) -> int:
            if isinstance(label, str):
                try:
                    return class_to_idx[label]
                except KeyError:
                    raise ValueError(
                        f"label {label!r} is not in the job's labels {list(class_to_idx)}; "
                        "the job manifest is inconsistent"
                    ) from None
            if isinstance(label, int) and not isinstance(label, bool):
                return label
            raise ValueError(
                f"label {label!r} is neither a class name nor an int; TensorFlow needs one "
                "type for every label"
            )

        return tf.int64, to_index

    def to_text(label: Any) -> str:
        # Strings as they are; dicts (and anything else) as JSON, decodable with json.loads.
        return label if isinstance(label, str) else json.dumps(label)

    return tf.string, to_text
