"""Every method on the default model and the demo task: trainable parameters, peak memory, tokens/s and
validation loss after the same short run. Prints the Markdown table the README shows.

    python benchmarks/methods_table.py               # all methods, ~35 min on 2 CPU cores
    python benchmarks/methods_table.py --steps 10 --only lora,ia3

Each method trains in its own process (`tunesmith train examples/demo_lora.yaml` with overrides), so its
peak resident memory is its own; tokens/s is the mean over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name: overrides (a learning rate suited to each method; the rest is the demo config)
METHODS = {
    "full": ["--method.name=full", "--train.lr=5e-5"],
    "freeze (last 2 layers)": ["--method.name=freeze", "--method.trainable_layers=2", "--train.lr=2e-4"],
    "lora r 8": ["--method.name=lora", "--method.r=8", "--method.alpha=16", "--train.lr=1e-3"],
    "lora r 8 + DoRA": ["--method.name=lora", "--method.r=8", "--method.alpha=16", "--method.use_dora=true",
                        "--train.lr=1e-3"],
    "lora r 8 + LoRA+ (16)": ["--method.name=lora", "--method.r=8", "--method.alpha=16",
                              "--method.lora_plus_ratio=16", "--train.lr=2e-4"],
    "lora r 8 + PiSSA init": ["--method.name=lora", "--method.r=8", "--method.alpha=16", "--method.init=pissa",
                             "--train.lr=2e-4"],
    "lora r 8 + OLoRA init": ["--method.name=lora", "--method.r=8", "--method.alpha=16", "--method.init=olora",
                             "--train.lr=2e-4"],
    "qlora 4-bit NF4, r 8": ["--method.name=qlora", "--method.r=8", "--method.alpha=16", "--train.lr=1e-3"],
    "qlora 4-bit NF4 r 8 + LoftQ init": ["--method.name=qlora", "--method.r=8", "--method.alpha=16",
                                         "--method.init=loftq", "--train.lr=1e-3"],
    "ia3": ["--method.name=ia3", "--train.lr=1e-2"],
    "oft (blocks of 32)": ["--method.name=oft", "--method.block_size=32", "--train.lr=1e-3"],
    "boft (blocks of 8)": ["--method.name=boft", "--method.block_size=8", "--train.lr=1e-3"],
    "adapter (8 layers × 10)": ["--method.name=adapter", "--method.adapter_layers=8", "--method.adapter_len=10",
                                "--train.lr=9e-3"],
    "adapter_v2 (LLaMA-Adapter v2, 8 layers × 10)": ["--method.name=adapter_v2", "--method.adapter_layers=8",
                                                      "--method.adapter_len=10", "--train.lr=3e-3"],
    "full + GaLore (rank 128, projection every 10 steps)": ["--method.name=full", "--optimizer.name=galore",
                                                           "--optimizer.update_interval=10", "--train.lr=2e-4"],
    "full + BAdam (one layer at a time, 5 steps each)": ["--method.name=full", "--optimizer.name=badam",
                                                        "--optimizer.switch_every=5", "--train.lr=1e-4"],
    "prompt (20 virtual tokens)": ["--method.name=prompt", "--method.num_virtual_tokens=20", "--train.lr=3e-2"],
    "prefix (20 virtual tokens)": ["--method.name=prefix", "--method.num_virtual_tokens=20", "--train.lr=1e-2"],
}


# Runs the CLI and, on exit, reports the process's own peak resident memory (KiB) on stderr.
CHILD = ("import atexit, resource, sys; "
         "atexit.register(lambda: print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
         "file=sys.stderr)); from tunesmith.cli.app import main; sys.argv = ['tunesmith', *sys.argv[1:]]; main()")


def run_one(overrides: list[str], steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, "train", str(REPO / "examples" / "demo_lora.yaml"), *overrides,
           f"--train.max_steps={steps}", "--train.warmup_steps=2", "--eval.interval=1000",
           "--checkpoint.interval=1000", f"--output.dir={out}", "--ignore-checks"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        lines = [x for x in done.stderr.strip().splitlines() if not x.startswith("PEAK_KIB")]
        return {"error": lines[-1] if lines else "failed"}
    peak = int(next(x for x in done.stderr.splitlines() if x.startswith("PEAK_KIB")).split()[1])
    info = json.loads((out / "run.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "loss" in m and m["step"] > 1]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    return {"trainable": info["parameters"]["trainable"], "total": info["parameters"]["total"],
            "peak_mb": peak / 1024,
            "tokens_per_s": sum(m["tokens"] for m in trained) / sum(m["step_time_s"] for m in trained),
            "val_loss": val[-1] if val else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated name prefixes, e.g. lora,ia3")
    args = parser.parse_args()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    work = Path(tempfile.mkdtemp(prefix="tunesmith-methods-"))
    print(f"demo task, {args.steps} steps of 8 rows, SmolLM2-135M-Instruct, this machine's precision (auto)\n")
    print("| method | trainable parameters | peak memory | tokens/s | val loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for i, (name, overrides) in enumerate(METHODS.items()):
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        r = run_one(overrides, args.steps, work / f"run{i}")
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} | | | |", flush=True)
            continue
        print(f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f} %) | {r['peak_mb']:,.0f} MB | "
              f"{r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
