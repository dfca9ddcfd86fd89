"""Built-in data sources. A data source is a plain function returning an `ArrayDataset`:

    source(**args) -> ArrayDataset

Both built-ins need no download: the digits ship inside this package (`digits.npz`, scikit-learn's
8x8 digits as uint8, equal to `sklearn.datasets.load_digits`: tests/unit/test_data.py), and
`synthetic` makes a seeded, learnable classification problem of any size for scale tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# ArrayDataset and split live in training.arrays (file sources use them too); data sources and
# their users know them as training.data.ArrayDataset and training.data.split.
from training.arrays import ArrayDataset, split  # noqa: F401

# The digits as arrays, not through scikit-learn: importing sklearn.datasets costs about a second
# (scipy, pandas' parser) in every process that loads them, every Train worker and trial included.
DIGITS_FILE = Path(__file__).with_name("digits.npz")
IN_MEMORY_ROWS = 200_000  # rows of a file source that load_dataset reads (see there)


def digits(image: bool = False) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1797 examples, 10 classes), pixels scaled to [0, 1].

    image: true gives (1, 8, 8) examples instead of 64 features.
    """
    with np.load(DIGITS_FILE) as arrays:
        data, target = arrays["data"], arrays["target"]
    x = (data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return ArrayDataset(x=x, y=target.astype(np.int64))


def synthetic(samples: int = 4096, features: int = 64, classes: int = 10, seed: int = 0, noise: float = 0.5) -> ArrayDataset:
    """Gaussian clusters around random class centers: learnable, seeded, any size."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)).astype(np.float32)
    y = rng.integers(0, classes, size=samples)
    x = centers[y] + noise * rng.normal(size=(samples, features)).astype(np.float32)
    return ArrayDataset(x=x.astype(np.float32), y=y.astype(np.int64))


def load_dataset(config) -> ArrayDataset:
    """Call the configured data source and check what it returns; errors name `data.source`.

    A file source is read into memory here, its first IN_MEMORY_ROWS rows: for what needs arrays
    on one machine (export parity, int8 calibration, `tandem import`'s check, the profile).
    Training streams the files instead (training/file_source.py).
    """
    from cluster.config import ConfigError, Problem, looks_like_files, resolve_import_path

    if looks_like_files(config.data.source):
        from training.file_source import read_into_memory

        return read_into_memory(config, IN_MEMORY_ROWS)

    source = resolve_import_path(config.data.source)
    try:
        dataset = source(**config.data.args)
    except TypeError as exc:
        raise ConfigError(
            [
                Problem(
                    path="data.args",
                    value=config.data.args,
                    message=f"{config.data.source} rejected these arguments ({exc}); fix data.args",
                )
            ]
        ) from None
    problems = dataset_problems(dataset, config.data.source)
    if problems:
        raise ConfigError([Problem(path="data.source", value=config.data.source, message=p) for p in problems])
    return dataset


def dataset_problems(dataset, source: str) -> list[str]:
    if not isinstance(dataset, ArrayDataset):
        return [f"returned {type(dataset).__name__}; a data source returns training.data.ArrayDataset(x, y)"]
    x, y = dataset.x, dataset.y
    problems = []
    if not isinstance(x, np.ndarray) or x.ndim < 2 or x.shape[0] == 0:
        problems.append(f"x has shape {getattr(x, 'shape', None)}; expected (N, features...) with N > 0")
    elif x.dtype != np.float32:
        problems.append(f"x has dtype {x.dtype}; expected float32 (cast with x.astype(np.float32))")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        problems.append(
            f"y has shape {getattr(y, 'shape', None)} and dtype {getattr(y, 'dtype', None)}; expected integer labels of shape (N,)"
        )
    elif isinstance(x, np.ndarray) and x.ndim >= 1 and len(y) != len(x):
        problems.append(f"x has {len(x)} examples but y has {len(y)}; they must match")
    elif y.min() < 0:
        problems.append("labels must be 0..num_classes-1; found a negative label")
    return problems
