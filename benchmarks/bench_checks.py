"""The clock-dependent side of `tunesmith bench`, printed rather than asserted (tests/test_bench.py asserts the rest).

Benches a tiny random Llama (LoRA, fp32, CPU unless a GPU is there) for a few steps and prints what only a
clock can tell: tokens/s, seconds per step, achieved FLOP/s against the measured matmul peak, and the
projected run time, with a plausibility note beside each (a share of peak above 100 % or a projected time
that does not follow from seconds per step means the measurement, not the machine, is wrong).

    python benchmarks/bench_checks.py            # ~1 min on 2 CPU cores
    python benchmarks/bench_checks.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def note(ok: bool) -> str:
    return "ok" if ok else "SUSPICIOUS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    from tunesmith.training.bench import bench
    from tunesmith.config.schema import config_from_dict

    with tempfile.TemporaryDirectory(prefix="bench-checks-") as tmp:
        tmp = Path(tmp)
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(len(tokenizer))
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        rng = random.Random(0)
        words = ["cat", "river", "blue", "seven", "mountain", "ok", "paper", "lamp"]
        with (tmp / "data.jsonl").open("w") as f:
            for _ in range(64):
                picked = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
                f.write(json.dumps({"instruction": "Shout this.", "input": picked, "output": picked.upper()}) + "\n")
        cfg = config_from_dict({
            "model": {"name_or_path": str(tmp / "model")},
            "data": {"train_file": str(tmp / "data.jsonl"), "val_size": 4, "test_size": 0},
            "method": {"name": "lora", "r": 4},
            "train": {"epochs": 2, "micro_batch_size": 4, "grad_accum_steps": 2, "precision": "fp32"},
            "output": {"dir": str(tmp / "run")},
        }, "bench-checks")
        r = bench(cfg, steps=args.steps, log=lambda *_: None)

    print(r.to_text())
    print()
    print(f"tokens/s               {r.tokens_per_s:12,.0f}   {note(r.tokens_per_s > 0)}")
    print(f"seconds per step       {r.seconds_per_step:12.4f}   {note(r.seconds_per_step > 0)}")
    print(f"share of matmul peak   {100 * r.share_of_peak:11.2f} %  {note(0 < r.share_of_peak < 1)} "
          "(a tiny model reaches a small share; above 100 % is impossible)")
    achieved = r.tokens_per_s * r.flops_per_token / 1e12
    print(f"achieved TFLOP/s       {r.achieved_tflops:12.6f}   {note(abs(achieved - r.achieved_tflops) <= 1e-9 + 1e-6 * achieved)}"
          " (tokens/s × FLOPs per token)")
    projected = r.seconds_per_step * r.run_steps / 3600
    print(f"projected run          {r.run_hours:12.6f} h {note(abs(projected - r.run_hours) <= 1e-6 * projected + 1e-12)}"
          f" ({r.run_steps} steps × seconds per step)")


if __name__ == "__main__":
    main()
