"""The one input pipeline of both tasks: decoded examples -> (cut, cache, shuffle, repeat) ->
transform -> batch -> finish. What the cache holds never follows the sources' resolution: an
augmented training set is cut to the largest size its random transform draws from before the
cache; a deterministic one (evaluation) caches its transformed examples."""

import tensorflow as tf

CACHE_LIMIT_BYTES = 4e9  # larger decoded training sets (ImageNet) are read anew each epoch
SHUFFLE_BUFFER = 10_000


def shrink(image, side, method="bilinear"):
    """`image` (or a mask, method="nearest") with its shorter side resized to `side` when longer,
    in its own dtype: what the cache holds, however large the source."""
    shape = tf.shape(image)[:2]
    scale = side / tf.cast(tf.reduce_min(shape), tf.float32)
    resized_hw = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), 1)

    def resized():
        pixels = tf.image.resize(image, resized_hw, method)  # bilinear: float32
        return (
            pixels
            if pixels.dtype == image.dtype
            else tf.saturate_cast(tf.round(pixels), image.dtype)
        )

    return tf.cond(scale < 1, resized, lambda: image)


def cached_bytes(examples, side, channels_bytes, source_shape=None):
    """What caching `examples` decoded examples takes at most: their shorter side cut to `side`
    (or the dataset's fixed `source_shape`, when smaller), `channels_bytes` bytes a pixel."""
    if source_shape is not None and None not in source_shape[:2]:
        side = min(side, *source_shape[:2])
    return examples * side * side * channels_bytes


def cacheable(examples, side, channels_bytes, source_shape=None):
    """Whether the decoded training set fits the cache (see cached_bytes)."""
    return cached_bytes(examples, side, channels_bytes, source_shape) < CACHE_LIMIT_BYTES


def batches(
    dataset,
    transform,
    finish,
    cut,
    training,
    batch_size,
    cache=True,
    seed=None,
    drop_remainder=False,
    *,
    example_seeds=False,
):
    """Batches of `dataset`'s examples.

    transform: one example -> its model input (and target) at the final size. With `cut` (an
    augmented training set: example -> example cut to the largest size `transform` draws from),
    the cut examples are cached and `transform` runs after the cache, anew each epoch, with a
    stateless seed per example (`example_seeds`: transform(*example, seed), the same crops
    whatever the parallelism of the map); without it, `transform` is deterministic and its output
    is cached. finish: one batch -> the batch the model takes (normalisation, batch-level
    augmentation). Training repeats, shuffles (seeded) and drops the last partial batch.
    """
    parallel = tf.data.AUTOTUNE
    if cut is None:
        dataset = dataset.map(transform, num_parallel_calls=parallel)
        if cache:
            dataset = dataset.cache()
        if training:
            dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
            dataset = dataset.repeat()
    else:
        dataset = dataset.map(cut, num_parallel_calls=parallel)
        if cache:
            dataset = dataset.cache()
        dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True).repeat()
        if example_seeds:
            dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.random(seed=seed).batch(2)))
            dataset = dataset.map(
                lambda example, example_seed: transform(*example, example_seed),
                num_parallel_calls=parallel,
            )
        else:
            dataset = dataset.map(transform, num_parallel_calls=parallel)
    dataset = dataset.batch(batch_size, drop_remainder=training or drop_remainder)
    return dataset.map(finish, num_parallel_calls=parallel).prefetch(parallel)
