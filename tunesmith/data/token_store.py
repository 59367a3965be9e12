"""Tokenized rows kept compactly: flat int32 ids and a one-byte trained mask per token, on disk, memory-mapped.

A Python list of token ids costs ~36 bytes a token; here a token costs 5 bytes of file, and the operating
system pages in only what a batch touches, so a large training file does not have to fit in memory.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from tunesmith.data.templates import IGNORE

_FLUSH_TOKENS = 1 << 20


@dataclass
class Tokenized:
    """One rendered row: token ids and labels (IGNORE where the loss must not look)."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    starts: Sequence[int] = ()
    """Positions after 0 where another document starts (a pre-training block that holds several): attention
    and position ids restart there unless documents may attend to each other."""
    desirable: bool | None = None
    """An unpaired (KTO) row's label."""

    @property
    def n_targets(self) -> int:
        # A label at position t is predicted from position t-1, so position 0 never counts.
        return int(np.count_nonzero(np.asarray(self.labels[1:]) != IGNORE))

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Pair:
    """A preference pair: the same prompt ids with the chosen and with the rejected reply (labels on the reply)."""

    chosen: Tokenized
    rejected: Tokenized
    reference: tuple[float, float] | None = None
    """The starting model's scores of (chosen, rejected), when they were computed before training."""

    @property
    def n_targets(self) -> int:
        return self.chosen.n_targets + self.rejected.n_targets

    def __len__(self) -> int:
        """The longer side: what a padded batch of pairs is padded to."""
        return max(len(self.chosen), len(self.rejected))


@dataclass
class Prompt:
    """A prompt row of an online stage (GRPO): the prompt's ids up to where the reply starts, and what the
    reward functions are given besides the reply."""

    input_ids: Sequence[int]
    prompt: object
    """The prompt as written in the row (a string or chat messages)."""
    fields: dict
    """The row's other fields (an expected answer, required keys, ...)."""

    n_targets = 0  # nothing in the row itself is trained: the replies are generated

    def __len__(self) -> int:
        return len(self.input_ids)


def _position(i: int, n: int) -> int:
    """A list's index rules: negative counts from the end; out of range is an IndexError."""
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(i)
    return i


class TokenStore(Sequence):
    """Append rows while preparing, then `close()` and index like a list of Tokenized."""

    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self._ids_path, self._mask_path = directory / f"{name}.ids.i32", directory / f"{name}.mask.u8"
        for p in (self._ids_path, self._mask_path):
            p.write_bytes(b"")
        self._ids_buf, self._mask_buf = array("i"), array("B")
        self._offsets = array("q", [0])
        self._tags = array("b")  # per row: -1 none, 0 undesirable, 1 desirable (KTO labels)
        self._ids: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def append(self, ids: Sequence[int], labels: Sequence[int], starts: Sequence[int] = (),
               desirable: bool | None = None) -> None:
        # One byte per token: bit 0 = trained, bit 1 = a document starts here.
        first = len(self._mask_buf)
        self._ids_buf.extend(ids)
        self._mask_buf.extend(1 if lab != IGNORE else 0 for lab in labels)
        for start in starts:
            self._mask_buf[first + start] |= 2
        self._offsets.append(self._offsets[-1] + len(ids))
        self._tags.append(-1 if desirable is None else int(desirable))
        if len(self._ids_buf) >= _FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        with self._ids_path.open("ab") as f:
            self._ids_buf.tofile(f)
        with self._mask_path.open("ab") as f:
            self._mask_buf.tofile(f)
        self._ids_buf, self._mask_buf = array("i"), array("B")

    def close(self) -> "TokenStore":
        self._flush()
        if self._offsets[-1]:
            self._ids = np.memmap(self._ids_path, dtype=np.int32, mode="r")
            self._mask = np.memmap(self._mask_path, dtype=np.uint8, mode="r")
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row, without reading the rows."""
        return np.diff(np.frombuffer(self._offsets, dtype=np.int64))

    @overload
    def __getitem__(self, i: int) -> Tokenized: ...
    @overload
    def __getitem__(self, i: slice) -> list[Tokenized]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _position(i, len(self))
        if self._ids is None or self._mask is None:
            raise RuntimeError("TokenStore: call close() before reading")
        start, end = self._offsets[i], self._offsets[i + 1]
        ids = np.asarray(self._ids[start:end], dtype=np.int64)
        mask = self._mask[start:end]
        labels = np.where(mask & 1, ids, IGNORE)
        starts = np.flatnonzero(mask & 2)
        tag = self._tags[i]
        return Tokenized(ids, labels, tuple(int(s) for s in starts) if len(starts) else (),
                         None if tag < 0 else bool(tag))


class PairStore(Sequence):
    """A TokenStore holding pairs as consecutive rows (chosen, rejected), indexed as Pairs."""

    def __init__(self, store: TokenStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store) // 2

    @property
    def lengths(self) -> np.ndarray:
        both = self.store.lengths
        return np.maximum(both[0::2], both[1::2])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _position(i, len(self))
        return Pair(self.store[2 * i], self.store[2 * i + 1])
