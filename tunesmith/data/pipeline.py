"""read → validate → split (seeded) → render with the template → tokenize with labels → report."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.formats import Example, detect_format, to_example
from tunesmith.data.reading import BadRow, Row, read_rows
from tunesmith.data.split import seeded_split
from tunesmith.data.templates import IGNORE, render
from tunesmith.errors import DataError


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        # A label at position t is predicted from position t-1, so position 0 never counts.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class SplitReport:
    name: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    trained_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "kept": self.kept, "truncated": self.truncated,
                               "dropped": dict(self.dropped), "trained_tokens": self.trained_tokens,
                               "tokens": int(sum(self.lengths))}
        if self.lengths:
            p = np.percentile(self.lengths, [50, 90, 99])
            out["length"] = {"min": int(min(self.lengths)), "p50": int(p[0]), "p90": int(p[1]),
                             "p99": int(p[2]), "max": int(max(self.lengths))}
        return out


@dataclass
class OverlapReport:
    """Exact duplicate rows in the training file, and training rows that also appear in val or test."""

    duplicates: int = 0
    leaked_into_val: int = 0
    leaked_into_test: int = 0
    removed: bool = False

    def any(self) -> bool:
        return bool(self.duplicates or self.leaked_into_val or self.leaked_into_test)

    def to_text(self) -> str:
        parts = [f"{self.duplicates} exact duplicate rows in the training file",
                 f"{self.leaked_into_val} training rows also in val", f"{self.leaked_into_test} also in test"]
        action = "removed from train" if self.removed else "kept (data.dedup: true removes them)"
        return "duplicates: " + ", ".join(parts) + f"; {action}"


@dataclass
class DataReport:
    format: str
    max_seq_length: int
    overlong: str
    splits: dict[str, SplitReport]
    skipped_rows: list[str] = field(default_factory=list)
    checks: OverlapReport = field(default_factory=lambda: OverlapReport())

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "max_seq_length": self.max_seq_length, "overlong": self.overlong,
                "bad_rows_skipped": len(self.skipped_rows), "bad_row_examples": self.skipped_rows[:10],
                "duplicates": self.checks.__dict__, "splits": {k: v.to_dict() for k, v in self.splits.items()}}

    def to_text(self) -> str:
        lines = [f"Data report (format {self.format}, max_seq_length {self.max_seq_length}, "
                 f"over-long rows: {self.overlong})"]
        if self.skipped_rows:
            lines.append(f"  bad rows skipped: {len(self.skipped_rows)}")
            lines += [f"    {m}" for m in self.skipped_rows[:5]]
            if len(self.skipped_rows) > 5:
                lines.append(f"    ... and {len(self.skipped_rows) - 5} more")
        if self.checks.any():
            lines.append("  " + self.checks.to_text())
        for name, s in self.splits.items():
            d = s.to_dict()
            line = f"  {name:<5} rows {s.rows:>6}  kept {s.kept:>6}  truncated {s.truncated:>5}"
            drops = ", ".join(f"{n} {why}" for why, n in s.dropped.items())
            line += f"  dropped {sum(s.dropped.values()):>5}" + (f" ({drops})" if drops else "")
            lines.append(line)
            if "length" in d:
                L = d["length"]
                lines.append(f"        tokens/row p50 {L['p50']}  p90 {L['p90']}  p99 {L['p99']}  max {L['max']}"
                             f"   trained tokens {s.trained_tokens:,} of {d['tokens']:,}")
        return "\n".join(lines)


@dataclass
class PreparedData:
    format: str
    train: list[Tokenized]
    val: list[Tokenized]
    test_examples: list[Example]
    raw_splits: dict[str, list[dict[str, Any]]]
    """The original rows of each split, so the run directory can keep exactly what was used."""
    examples: dict[str, list[Example]]
    report: DataReport


def load_examples(path: str, cfg: DataConfig, fmt: str | None, skipped: list[str]) -> tuple[str, list[tuple[Row, Example]]]:
    read = read_rows(path, cfg.on_bad_row)
    skipped += read.skipped
    if not read.rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(read.skipped)} bad rows skipped)" if read.skipped else ""))
    fmt = fmt or cfg.format or detect_format(read.rows[0], cfg.columns)
    out = []
    for row in read.rows:
        try:
            example = to_example(row, fmt, cfg.columns)
            if cfg.system_prompt and example.messages and example.messages[0]["role"] != "system":
                example.messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            out.append((row, example))
        except BadRow as exc:
            if cfg.on_bad_row != "skip":
                raise BadRow(f"{exc}\n  (set data.on_bad_row: skip to skip such rows and count them in the report)") from None
            skipped.append(str(exc))
    if not out:
        raise DataError(f"{path}: no usable rows ({len(read.rows)} rows did not match the {fmt} format)")
    return fmt, out


def content_key(example: Example) -> str:
    """Rows with the same content after normalisation (column names and order do not matter) share a key."""
    blob = json.dumps([example.messages, example.text], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def count_duplicates(pairs: list[tuple[Row, Example]]) -> int:
    return len(pairs) - len({content_key(ex) for _, ex in pairs})


def drop_duplicates(pairs: list[tuple[Row, Example]]) -> tuple[list[tuple[Row, Example]], int]:
    """Keep the first of each set of identical rows; returns (rows, how many were dropped)."""
    seen: set[str] = set()
    kept = []
    for row, ex in pairs:
        key = content_key(ex)
        if key not in seen:
            seen.add(key)
            kept.append((row, ex))
    return kept, len(pairs) - len(kept)


def check_overlap(train, val, test, remove: bool, duplicates: int):
    """Count training rows whose content is also in val/test (leakage); drop them from train if `remove`."""
    val_keys = {content_key(ex) for _, ex in val}
    test_keys = {content_key(ex) for _, ex in test}
    keys = [content_key(ex) for _, ex in train]
    report = OverlapReport(duplicates=duplicates, leaked_into_val=sum(k in val_keys for k in keys),
                           leaked_into_test=sum(k in test_keys for k in keys), removed=remove)
    if remove:
        train = [pair for pair, k in zip(train, keys) if k not in val_keys and k not in test_keys]
    return train, report


def tokenize_split(name: str, examples: list[Example], tokenizer, cfg: DataConfig) -> tuple[list[Tokenized], SplitReport]:
    report = SplitReport(name=name, rows=len(examples))
    out = []
    for ex in examples:
        ids, labels = render(tokenizer, ex, cfg.train_on_prompt)
        if len(ids) > cfg.max_seq_length:
            if cfg.overlong == "drop":
                report.dropped[f"longer than max_seq_length {cfg.max_seq_length}"] += 1
                continue
            ids, labels = ids[: cfg.max_seq_length], labels[: cfg.max_seq_length]
            report.truncated += 1
        item = Tokenized(ids, labels)
        if item.n_targets == 0:
            report.dropped["no trainable tokens"] += 1
            continue
        out.append(item)
        report.lengths.append(len(ids))
        report.trained_tokens += item.n_targets
    report.kept = len(out)
    return out, report


def prepare_data(cfg: DataConfig, tokenizer) -> PreparedData:
    """Everything `tunesmith prepare` shows and `train` consumes. The tokenizer must carry the run's template."""
    skipped: list[str] = []
    assert cfg.train_file is not None
    fmt, train_pairs = load_examples(cfg.train_file, cfg, None, skipped)
    # Exact duplicates go first, so the seeded split cannot put copies of one row on both sides.
    train_pairs, duplicates = drop_duplicates(train_pairs) if cfg.dedup else (train_pairs, count_duplicates(train_pairs))
    val_pairs = load_examples(cfg.val_file, cfg, fmt, skipped)[1] if cfg.val_file else None
    test_pairs = load_examples(cfg.test_file, cfg, fmt, skipped)[1] if cfg.test_file else None
    # Carve what the user did not provide as a file out of the training rows, with the seed.
    carve_val = 0 if val_pairs is not None else cfg.val_size
    carve_test = 0 if test_pairs is not None else cfg.test_size
    train_pairs, carved_val, carved_test = seeded_split(train_pairs, carve_val, carve_test, cfg.seed)
    val_pairs = val_pairs if val_pairs is not None else carved_val
    test_pairs = test_pairs if test_pairs is not None else carved_test

    train_pairs, checks = check_overlap(train_pairs, val_pairs, test_pairs, cfg.dedup, duplicates)

    splits = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
    examples = {k: [ex for _, ex in v] for k, v in splits.items()}
    train, train_report = tokenize_split("train", examples["train"], tokenizer, cfg)
    val, val_report = tokenize_split("val", examples["val"], tokenizer, cfg)
    reports = {"train": train_report, "val": val_report}
    if examples["test"]:
        reports["test"] = tokenize_split("test", examples["test"], tokenizer, cfg)[1]
    if not train:
        raise DataError(f"{cfg.train_file}: every training row was dropped; see the data report:\n"
                        + DataReport(fmt, cfg.max_seq_length, cfg.overlong, reports, skipped, checks).to_text())
    return PreparedData(
        format=fmt, train=train, val=val, test_examples=examples["test"],
        raw_splits={k: [row.data for row, _ in v] for k, v in splits.items()},
        examples=examples,
        report=DataReport(fmt, cfg.max_seq_length, cfg.overlong, reports, skipped, checks),
    )


def show_examples(tokenizer, items: list[Tokenized], n: int) -> str:
    """Token-by-token view of rendered examples; trained tokens in [brackets], so masking and EOS are visible."""
    blocks = []
    for k, item in enumerate(items[:n]):
        parts = []
        for tok, lab in zip(item.input_ids, item.labels):
            piece = tokenizer.decode([tok]).replace("\n", "\\n")
            parts.append(f"[{piece}]" if lab != IGNORE else piece)
        blocks.append(f"--- example {k + 1}: {len(item.input_ids)} tokens, {item.n_targets} trained "
                      f"(trained tokens in [brackets]) ---\n" + "|".join(parts))
    return "\n".join(blocks)
