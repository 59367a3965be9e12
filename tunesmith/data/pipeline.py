"""read → validate → split (seeded) → render with the template → tokenize with labels → report.

The training file is streamed twice, never held in memory: a first pass validates every row and hashes
its content (for the seeded split, duplicates and leakage), a second renders and tokenizes each row into
a TokenStore and copies it to its split's file. Explicit val/test files are small and read whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tunesmith.config.schema import Config, DataConfig
from tunesmith.data.formats import FORMATS, Example, detect_format, to_example
from tunesmith.data.reading import BadRow, Row, iter_rows
from tunesmith.data.split import seeded_split
from tunesmith.data.templates import IGNORE, encode_prompt, install_template, render, resolve_template
from tunesmith.data.token_store import Pair, PairStore, Prompt, Tokenized, TokenStore
from tunesmith.errors import DataError
from tunesmith.models.loading import load_tokenizer, resolve


@dataclass
class SplitReport:
    name: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    lengths: array = field(default_factory=lambda: array("i"))
    """Token counts of the kept rows, after truncation."""
    raw_lengths: array = field(default_factory=lambda: array("i"))
    """Token counts of every rendered row before max_seq_length applies (what a longer limit would keep)."""
    trained_tokens: int = 0
    blocks: bool = False
    """Pre-training blocks: `rows` counts documents and `kept` the blocks they were cut into."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "kept": self.kept, "truncated": self.truncated,
                               "dropped": dict(self.dropped), "trained_tokens": self.trained_tokens,
                               "tokens": int(sum(self.lengths))}
        if self.blocks:
            out.update(documents=self.rows, blocks=self.kept)
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
            if s.blocks:
                lines.append(f"  {name:<5} documents {s.rows:>6}  blocks {s.kept:>6} of up to {self.max_seq_length} "
                             f"tokens  tokens {d['tokens']:,}  (long documents are split, never cut)")
            else:
                line = f"  {name:<5} rows {s.rows:>6}  kept {s.kept:>6}  truncated {s.truncated:>5}"
                drops = ", ".join(f"{n} {why}" for why, n in s.dropped.items())
                line += f"  dropped {sum(s.dropped.values()):>5}" + (f" ({drops})" if drops else "")
                lines.append(line)
            if "length" in d:
                L = d["length"]
                trained = (f"prompt tokens {d['tokens']:,} (the replies are generated in training)"
                           if FORMATS.get(self.format) and FORMATS[self.format].prompts_only
                           else f"trained tokens {s.trained_tokens:,} of {d['tokens']:,}")
                lines.append(f"        tokens/row p50 {L['p50']}  p90 {L['p90']}  p99 {L['p99']}  max {L['max']}"
                             f"   {trained}")
        return "\n".join(lines)


@dataclass
class PreparedData:
    format: str
    train: Sequence[Tokenized]
    val: Sequence[Tokenized]
    test_examples: list[Example]
    report: DataReport
    work_dir: Path
    """Holds the token files and each split's rows (`splits/{train,val,test}.jsonl`), as read."""
    _owner: Any = None
    """The TemporaryDirectory behind work_dir, when prepare_data made one: removed with this object."""

    @property
    def train_lengths(self) -> Sequence[int]:
        return self.train.lengths if isinstance(self.train, (TokenStore, PairStore)) else [len(t) for t in self.train]

    def copy_splits(self, out_dir: Path) -> None:
        """The exact rows of each split, so the run directory keeps what was used."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val", "test"):
            shutil.copyfile(self.work_dir / "splits" / f"{name}.jsonl", out_dir / f"{name}.jsonl")


def iter_examples(path: str, cfg: DataConfig, fmt: str, skipped: list[str]) -> Iterator[tuple[Row, Example]]:
    """Valid (row, example) pairs of a file, streamed; bad rows raise or (on_bad_row: skip) are recorded."""
    for row in iter_rows(path, cfg.on_bad_row, skipped):
        try:
            example = to_example(row, fmt, cfg.columns)
        except BadRow as exc:
            if cfg.on_bad_row != "skip":
                raise BadRow(f"{exc}\n  (set data.on_bad_row: skip to skip such rows and count them in the report)") from None
            skipped.append(str(exc))
            continue
        if cfg.system_prompt and example.messages and example.messages[0]["role"] != "system":
            example.messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        yield row, example


def file_format(path: str, cfg: DataConfig) -> str:
    """data.format, or detected from the first row of the file."""
    if cfg.format:
        return cfg.format
    for row in iter_rows(path, cfg.on_bad_row, []):
        return detect_format(row, cfg.columns)
    raise DataError(f"{path}: no usable rows")


def load_examples(path: str, cfg: DataConfig, fmt: str | None, skipped: list[str]) -> tuple[str, list[tuple[Row, Example]]]:
    """All examples of a (small) file at once."""
    fmt = fmt or file_format(path, cfg)
    before = len(skipped)
    out = list(iter_examples(path, cfg, fmt, skipped))
    if not out:
        bad = len(skipped) - before
        raise DataError(f"{path}: no usable rows" + (f" ({bad} bad rows skipped)" if bad else ""))
    return fmt, out


def content_key(example: Example) -> int:
    """Rows with the same content after normalisation (column names and order do not matter) share a key."""
    extra = [example.rejected] if example.rejected is not None else []
    extra += [example.desirable] if example.desirable is not None else []
    extra += [example.fields] if example.fields is not None else []
    blob = json.dumps([example.messages, example.text] + extra, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(blob.encode("utf-8"), digest_size=8).digest(), "little")


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the first row of each group of identical rows."""
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(keys, return_index=True)[1]] = True
    return keep


def tokenize_into(sink, report: SplitReport, example: Example, tokenizer, cfg: DataConfig) -> bool:
    """Render one example, apply the over-long policy, and add it to `sink` (a list or TokenStore). A preference
    pair is rendered twice, prompt + chosen and prompt + rejected (the prompt's ids are the same in both, as
    segments are tokenized one by one), its prompt never trained; a TokenStore gets its two rows in turn."""
    report.rows += 1
    if example.fields is not None:  # a prompt row: its prompt ids, never cut (that would cut off where the reply starts)
        ids = encode_prompt(tokenizer, example.messages)
        report.raw_lengths.append(len(ids))
        if len(ids) > cfg.max_seq_length:
            report.dropped[f"prompt longer than max_seq_length {cfg.max_seq_length}"] += 1
            return False
        sink.append(Prompt(ids, example.prompt, example.fields))
        report.kept += 1
        report.lengths.append(len(ids))
        return True
    if example.rejected is not None:
        rejected = Example(messages=example.prompt_messages + [{"role": "assistant", "content": example.rejected}])
        rendered = [render(tokenizer, example), render(tokenizer, rejected)]
    elif example.desirable is not None:  # a KTO row: only its completion is scored, so no prompt training
        rendered = [render(tokenizer, example)]
    else:
        rendered = [render(tokenizer, example, cfg.train_on_prompt)]
    longest = max(len(ids) for ids, _ in rendered)
    report.raw_lengths.append(longest)
    if longest > cfg.max_seq_length:
        if cfg.overlong == "drop":
            report.dropped[f"longer than max_seq_length {cfg.max_seq_length}"] += 1
            return False
        rendered = [(ids[: cfg.max_seq_length], labels[: cfg.max_seq_length]) for ids, labels in rendered]
        report.truncated += 1
    items = [Tokenized(ids, labels, desirable=example.desirable) for ids, labels in rendered]
    if any(item.n_targets == 0 for item in items):
        report.dropped["no trainable tokens"] += 1
        return False
    if isinstance(sink, list):
        sink.append(items[0] if len(items) == 1 else Pair(*items))
    else:
        for ids, labels in rendered:
            sink.append(ids, labels, desirable=example.desirable)
    report.kept += 1
    report.lengths.append(min(longest, cfg.max_seq_length))
    report.trained_tokens += sum(item.n_targets for item in items)
    return True


def tokenize_split(name: str, examples: list[Example], tokenizer, cfg: DataConfig) -> tuple[list[Tokenized], SplitReport]:
    report = SplitReport(name=name)
    out: list[Tokenized] = []
    for ex in examples:
        tokenize_into(out, report, ex, tokenizer, cfg)
    return out, report


class BlockCutter:
    """Documents end to end, each ending in EOS, cut into blocks of `size` tokens: a long document is split
    across blocks, never cut short or dropped; only the last block may be shorter. With `isolated`, a block
    records where documents start inside it (attention and position ids restart there), and the first token
    of such a document is not a target: it would be predicted from the end of another document."""

    def __init__(self, size: int, sink, report: SplitReport, isolated: bool):
        self.size, self.sink, self.report, self.isolated = size, sink, report, isolated
        self._ids: list[int] = []
        self._starts: list[int] = []
        report.blocks = True

    def add(self, example: Example, tokenizer) -> None:
        ids, _ = render(tokenizer, example)  # the document's ids with EOS at the end
        self.report.rows += 1
        self.report.raw_lengths.append(len(ids))
        self._starts.append(len(self._ids))
        self._ids.extend(ids)
        while len(self._ids) >= self.size:
            self._emit(self.size)

    def close(self) -> None:
        if self._ids:
            self._emit(len(self._ids))

    def _emit(self, n: int) -> None:
        ids, labels = self._ids[:n], list(self._ids[:n])
        starts = [s for s in self._starts if 0 < s < n] if self.isolated else []
        for s in starts:
            labels[s] = IGNORE
        item = Tokenized(ids, labels, tuple(starts))
        if isinstance(self.sink, list):
            self.sink.append(item)
        else:
            self.sink.append(ids, labels, starts)
        self.report.kept += 1
        self.report.lengths.append(n)
        self.report.trained_tokens += item.n_targets
        self._ids = self._ids[n:]
        self._starts = [s - n for s in self._starts if s >= n]


TRAIN, VAL, TEST, REMOVED = 0, 1, 2, 3


def prepare_data(cfg: DataConfig, tokenizer, work_dir: Path | None = None, blocks: str | None = None) -> PreparedData:
    """Everything `tunesmith prepare` shows and `train` consumes. The tokenizer must carry the run's template.
    `blocks` ("isolated" or "joined": may documents attend to each other) cuts text rows into pre-training
    blocks of data.max_seq_length tokens instead of keeping one row per example."""
    assert cfg.train_file is not None
    owner = None if work_dir else tempfile.TemporaryDirectory(prefix="tunesmith-data-")
    work_dir = Path(work_dir or owner.name)
    skipped: list[str] = []
    fmt = file_format(cfg.train_file, cfg)

    # ---- pass 1: validate every training row and hash its content (nothing else is kept)
    keys = np.fromiter((content_key(ex) for _, ex in iter_examples(cfg.train_file, cfg, fmt, skipped)),
                       dtype=np.uint64)
    if not len(keys):
        raise DataError(f"{cfg.train_file}: no usable rows ({len(skipped)} bad rows skipped)")
    val_pairs = load_examples(cfg.val_file, cfg, fmt, skipped)[1] if cfg.val_file else []
    test_pairs = load_examples(cfg.test_file, cfg, fmt, skipped)[1] if cfg.test_file else []

    # ---- assign each row: exact duplicates go first, so the seeded split cannot put copies on both sides
    keep = first_occurrences(keys)
    duplicates = int(len(keys) - keep.sum())
    candidates = np.flatnonzero(keep) if cfg.dedup else np.arange(len(keys))
    _, carved_val, carved_test = seeded_split(candidates, 0 if cfg.val_file else cfg.val_size,
                                              0 if cfg.test_file else cfg.test_size, cfg.seed)
    assign = np.full(len(keys), REMOVED if cfg.dedup else TRAIN, dtype=np.int8)
    assign[candidates] = TRAIN
    assign[np.asarray(carved_val, dtype=np.int64)] = VAL
    assign[np.asarray(carved_test, dtype=np.int64)] = TEST
    val_keys = np.array([content_key(ex) for _, ex in val_pairs], dtype=np.uint64)
    test_keys = np.array([content_key(ex) for _, ex in test_pairs], dtype=np.uint64)
    val_keys = np.concatenate([val_keys, keys[assign == VAL]])
    test_keys = np.concatenate([test_keys, keys[assign == TEST]])
    is_train = assign == TRAIN
    in_val, in_test = np.isin(keys, val_keys) & is_train, np.isin(keys, test_keys) & is_train
    checks = OverlapReport(duplicates=duplicates, leaked_into_val=int(in_val.sum()),
                           leaked_into_test=int(in_test.sum()), removed=cfg.dedup)
    if cfg.dedup:
        assign[in_val | in_test] = REMOVED

    # ---- pass 2: render and tokenize each training-file row into its split, and copy the row
    reports = {name: SplitReport(name=name) for name in ("train", "val", "test")}
    # Prompt rows (GRPO) stay in memory with their fields; rendered rows go to a memory-mapped token file.
    train = [] if FORMATS[fmt].prompts_only else TokenStore(work_dir / "tokens", "train")
    val: list[Tokenized] = []
    blocks = blocks if fmt == "text" else None  # other rows are kept whole; the stage then refuses them
    cutters = {"train": BlockCutter(cfg.max_seq_length, train, reports["train"], blocks == "isolated"),
               "val": BlockCutter(cfg.max_seq_length, val, reports["val"], blocks == "isolated")} if blocks else {}
    test_examples: list[Example] = [ex for _, ex in test_pairs]
    (work_dir / "splits").mkdir(parents=True, exist_ok=True)
    files = {name: (work_dir / "splits" / f"{name}.jsonl").open("w", encoding="utf-8")
             for name in ("train", "val", "test")}
    try:
        for name, pairs in (("val", val_pairs), ("test", test_pairs)):  # explicit files, as read
            for row, _ in pairs:
                files[name].write(json.dumps(row.data, ensure_ascii=False) + "\n")
        for (row, ex), where in zip(iter_examples(cfg.train_file, cfg, fmt, []), assign):
            if where == TRAIN:
                if cutters:
                    cutters["train"].add(ex, tokenizer)
                else:
                    tokenize_into(train, reports["train"], ex, tokenizer, cfg)
            elif where == VAL:
                val_pairs.append((row, ex))
            elif where == TEST:
                test_examples.append(ex)
            if where != REMOVED:
                files[("train", "val", "test")[where]].write(json.dumps(row.data, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()
    if cutters:
        cutters["train"].close()
    if isinstance(train, TokenStore):
        train.close()
    if FORMATS[fmt].paired:
        train = PairStore(train)
    for _, ex in val_pairs:
        if cutters:
            cutters["val"].add(ex, tokenizer)
        else:
            tokenize_into(val, reports["val"], ex, tokenizer, cfg)
    if cutters:
        cutters["val"].close()
    counter = BlockCutter(cfg.max_seq_length, [], reports["test"], blocks == "isolated") if blocks else None
    for ex in test_examples:  # counted for the report; eval renders its own
        if counter:
            counter.add(ex, tokenizer)
        else:
            tokenize_into([], reports["test"], ex, tokenizer, cfg)
    if counter:
        counter.close()
    if not reports["test"].rows:
        del reports["test"]
    report = DataReport(fmt, cfg.max_seq_length, cfg.overlong, reports, skipped, checks)
    if not len(train):
        raise DataError(f"{cfg.train_file}: every training row was dropped; see the data report:\n" + report.to_text())
    return PreparedData(format=fmt, train=train, val=val, test_examples=test_examples, report=report,
                        work_dir=work_dir, _owner=owner)


def show_examples(tokenizer, items: list[Tokenized], n: int) -> str:
    """Token-by-token view of rendered examples; trained tokens in [brackets], so masking and EOS are visible."""
    blocks = []
    if items and isinstance(items[0], Prompt):
        return "\n".join(f"--- prompt {k + 1}: {len(p)} tokens (the reply is generated) ---\n"
                         f"{tokenizer.decode(list(p.input_ids))}\n    fields: {json.dumps(p.fields, ensure_ascii=False)}"
                         for k, p in enumerate(items[:n]))
    if items and isinstance(items[0], Pair):
        items = [side for pair in items[:n] for side in (pair.chosen, pair.rejected)]
        n *= 2
    for k, item in enumerate(items[:n]):
        parts = []
        for tok, lab in zip(item.input_ids, item.labels):
            piece = tokenizer.decode([tok]).replace("\n", "\\n")
            parts.append(f"[{piece}]" if lab != IGNORE else piece)
        blocks.append(f"--- example {k + 1}: {len(item.input_ids)} tokens, {item.n_targets} trained "
                      f"(trained tokens in [brackets]) ---\n" + "|".join(parts))
    return "\n".join(blocks)


def load_data_and_tokenizer(cfg: Config):
    """Tokenizer with the run's template installed, and the prepared data (shared by `prepare` and `train`)."""
    source = resolve(cfg.model.name_or_path, cfg.model.gguf_file)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)
    install_template(tokenizer, resolve_template(cfg.data.template, tokenizer))
    # A stage that trains on documents (pretrain) says whether they may attend to each other inside a block.
    joined = getattr(cfg.stage, "cross_document_attention", None)
    blocks = None if joined is None else "joined" if joined else "isolated"
    return source, tokenizer, prepare_data(cfg.data, tokenizer, blocks=blocks)
