"""Micro-batches: a seeded shuffle per epoch; each micro-batch padded to its longest row, or packed into one."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import numpy as np
import torch

from tunesmith.data.token_store import Tokenized
from tunesmith.data.templates import IGNORE


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; padding is excluded by the attention mask and IGNORE labels (by position, not by id)."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        labels[i, :n] = torch.tensor(x.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(items: list[Tokenized]) -> dict[str, torch.Tensor]:
    """All rows end to end in one row, with no padding: position ids restart at 0 for each example, so the
    model attends only within an example, and each example's first label is dropped, so no example is
    trained to predict the next one's first token (unpacked, a row's first token is never a target either).
    """
    ids = np.concatenate([np.asarray(x.input_ids, dtype=np.int64) for x in items])
    labels = np.concatenate([np.asarray(x.labels, dtype=np.int64) for x in items])
    starts = np.cumsum([0] + [len(x.input_ids) for x in items[:-1]])
    labels[starts] = IGNORE
    # A pre-training block may hold several documents (Tokenized.starts): positions restart at each of them too.
    positions = np.concatenate([_positions(len(x.input_ids), x.starts) for x in items])
    return {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(positions)[None]}


def _positions(n: int, starts) -> np.ndarray:
    positions = np.arange(n)
    for start in starts:
        positions[start:] -= positions[start]
    return positions


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def length_grouped_order(lengths: Sequence[int], seed: int, epoch: int, group: int, window: int = 64) -> list[int]:
    """A seeded order in which each run of `group` rows (one optimizer step) has similar lengths.

    Shuffle, cut into windows of `window` groups, sort each window by length, cut it into groups, and
    shuffle the groups: steps stay random, but a step pads its rows to a length close to their own.
    """
    order = epoch_order(len(lengths), seed, epoch)
    groups: list[list[int]] = []
    span = group * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        groups += [chunk[i:i + group] for i in range(0, len(chunk), group)]
    random.Random(seed * 7_919 + epoch).shuffle(groups)
    return [i for g in groups for i in g]


class RowStream:
    """Rows in a fresh seeded order each epoch, endlessly. `position` (rows handed out so far) is its whole
    state, so a resumed run continues with exactly the row an uninterrupted run would have seen next.

    With `lengths` and `group` (rows per optimizer step), each step's rows have similar lengths.
    """

    def __init__(self, n_rows: int, seed: int, position: int = 0, lengths: Sequence[int] | None = None,
                 group: int = 1):
        self.n_rows, self.seed, self.position = n_rows, seed, position
        self.lengths, self.group = lengths, group
        self._order: list[int] = []
        self._order_epoch = -1

    @property
    def epoch(self) -> int:
        return self.position // self.n_rows

    def take(self, k: int) -> list[int]:
        """The next k row indices (an optimizer step may run across an epoch boundary)."""
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.position, self.n_rows)
            if epoch != self._order_epoch:
                self._order = (length_grouped_order(self.lengths, self.seed, epoch, self.group)
                               if self.lengths is not None and self.group > 1
                               else epoch_order(self.n_rows, self.seed, epoch))
                self._order_epoch = epoch
            out.append(self._order[offset])
            self.position += 1
        return out


def micro_batches(rows: list[Tokenized], size: int, pad_id: int, packed: bool = False
                  ) -> list[dict[str, torch.Tensor]]:
    """Split one optimizer step's rows into micro-batches of `size` rows, padded or packed."""
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    return [pack(c) if packed else collate(c, pad_id) for c in chunks]


def eval_batches(data: list[Tokenized], size: int, pad_id: int, packed: bool = False) -> Iterator[dict]:
    for start in range(0, len(data), size):
        yield pack(data[start:start + size]) if packed else collate(data[start:start + size], pad_id)
