"""Micro-batches: a seeded shuffle per epoch, padded to the longest row of each micro-batch."""

from __future__ import annotations

import random
from typing import Iterator

import torch

from tunesmith.data.pipeline import Tokenized
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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(data: list[Tokenized], size: int, seed: int, pad_id: int) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, micro-batch) stream; each epoch is a fresh seeded permutation of all rows."""
    epoch = 0
    while True:
        order = epoch_order(len(data), seed, epoch)
        for start in range(0, len(order), size):
            yield epoch, collate([data[i] for i in order[start:start + size]], pad_id)
        epoch += 1


def eval_batches(data: list[Tokenized], size: int, pad_id: int) -> Iterator[dict]:
    for start in range(0, len(data), size):
        yield collate(data[start:start + size], pad_id)
