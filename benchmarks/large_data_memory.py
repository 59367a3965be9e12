"""Peak memory of `tunesmith prepare` on a large generated JSONL file (issue: bounded-memory data reading).

    python benchmarks/large_data_memory.py [--mb 200] [--keep]

Writes a file of about --mb megabytes of alpaca rows (~1 KB each) to a temporary directory, runs
`tunesmith prepare` on it with the default model's tokenizer in a child process, and prints the file size,
rows, wall time and the child's peak RSS. The same command on a 1 MB file gives the fixed baseline
(Python, torch, transformers, tokenizer), so the growth with file size is visible.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the quick brown fox jumps over a lazy dog while seven bakers in Lisbon argue about bread prices "
         "and the river keeps flowing past old mills and new bridges under a grey autumn sky").split()


def write_rows(path: Path, megabytes: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target, written, rows = megabytes * 1e6, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(120, 200)))
            line = json.dumps({"instruction": "Summarise the passage in five words.", "input": text,
                               "output": " ".join(rng.choice(WORDS) for _ in range(5))}) + "\n"
            f.write(line)
            written += len(line)
            rows += 1
    return rows


def measure(data: Path, work: Path) -> tuple[float, float, str]:
    config = work / f"{data.stem}.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "data": {"train_file": str(data), "val_size": 0.01, "test_size": 0.01, "max_seq_length": 1024},
    }))
    cmd = [sys.executable, "-c", "import resource, sys; from tunesmith.cli.app import main; sys.argv=['tunesmith', 'prepare', sys.argv[1]];"
           "\ntry: main()\nfinally: print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)",
           str(config)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    peak = float(done.stderr.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    return elapsed, peak, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    try:
        results = []
        for mb in (1, args.mb):
            data = work / f"rows_{int(mb)}mb.jsonl"
            rows = write_rows(data, mb)
            elapsed, peak, report = measure(data, work)
            results.append((data.stat().st_size / 1e6, rows, elapsed, peak))
            print(report.strip().splitlines()[0] if report.strip() else "")
        print(f"{'file MB':>8} {'rows':>9} {'seconds':>8} {'peak RSS MB':>12}")
        for size, rows, elapsed, peak in results:
            print(f"{size:>8.1f} {rows:>9,} {elapsed:>8.1f} {peak:>12.0f}")
        base, big = results
        print(f"growth: {big[3] - base[3]:.0f} MB of RSS for {big[0] - base[0]:.0f} MB more data "
              f"({(big[3] - base[3]) / (big[0] - base[0]):.2f} MB per MB)")
    finally:
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
