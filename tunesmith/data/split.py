"""Seeded train/val/test split at the row level (before tokenization, so it never depends on max_seq_length)."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from tunesmith.errors import ConfigError

T = TypeVar("T")


def split_count(size: float | int, n: int, name: str) -> int:
    """Rows for a split given as a fraction (0.1) or a count (200)."""
    if isinstance(size, float):
        count = round(size * n)
        return max(count, 1) if size > 0 and n > 1 else count
    if size >= n:
        raise ConfigError(f"data.{name} asks for {size} rows but only {n} rows are available to split")
    return size


def seeded_split(items: Sequence[T], val_size: float | int, test_size: float | int, seed: int
                 ) -> tuple[list[T], list[T], list[T]]:
    """Shuffle indices with `seed` and cut test, then val, from the front; the rest trains."""
    n = len(items)
    n_test = split_count(test_size, n, "test_size")
    n_val = split_count(val_size, n, "val_size")
    if n_test + n_val >= n:
        raise ConfigError(f"data.val_size + data.test_size leave no training rows out of {n}")
    order = np.random.default_rng(seed).permutation(n)  # 8 bytes a row, even for millions of rows
    test = [items[i] for i in sorted(order[:n_test])]
    val = [items[i] for i in sorted(order[n_test:n_test + n_val])]
    train = [items[i] for i in sorted(order[n_test + n_val:])]
    return train, val, test
