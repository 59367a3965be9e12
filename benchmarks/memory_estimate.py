"""How close `tunesmith estimate` comes to the memory training really takes.

Each case trains a few steps of a config with `tunesmith bench` in a fresh process (so its peak resident
memory is its own) and sets the measured peak beside the estimate for the same plan. Rows are exactly the
sequence length and every token is trained (text format), the worst case the estimate assumes.

    python benchmarks/memory_estimate.py            # tiny models and SmolLM2-135M, ~35 min on 2 CPU cores
    python benchmarks/memory_estimate.py --quick    # three cases, ~5 min

On a CUDA machine the measured figure is the peak GPU memory PyTorch allocated (plus the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tunesmith.planning.estimate import GiB, Plan, estimate_memory, shape_from_model

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue").split()

# (label, model, method, micro-batch, sequence length, precision, gradient checkpointing)
CASES = [
    ("tiny-a lora", "tiny-a", "lora", 8, 512, "bf16", False),
    ("tiny-b lora", "tiny-b", "lora", 4, 1024, "bf16", False),
    ("tiny-b full fp32", "tiny-b", "full", 4, 512, "fp32", False),
    ("tiny-b full", "tiny-b", "full", 8, 512, "bf16", False),
    ("tiny-b lora 4x1024 ckpt", "tiny-b", "lora", 4, 1024, "bf16", True),
    ("smollm2 lora 1x512", "smollm2-135m-instruct", "lora", 1, 512, "bf16", False),
    ("smollm2 lora 4x512", "smollm2-135m-instruct", "lora", 4, 512, "bf16", False),
    ("smollm2 lora 8x512", "smollm2-135m-instruct", "lora", 8, 512, "bf16", False),
    ("smollm2 lora 4x1024 ckpt", "smollm2-135m-instruct", "lora", 4, 1024, "bf16", True),
    ("smollm2 lora 8x512 ckpt", "smollm2-135m-instruct", "lora", 8, 512, "bf16", True),
    ("smollm2 lora 4x512 fp32", "smollm2-135m-instruct", "lora", 4, 512, "fp32", False),
    ("smollm2 full 4x512", "smollm2-135m-instruct", "full", 4, 512, "bf16", False),
    ("smollm2 full 8x512", "smollm2-135m-instruct", "full", 8, 512, "bf16", False),
    ("smollm2 full 4x512 fp32", "smollm2-135m-instruct", "full", 4, 512, "fp32", False),
    ("smollm2 freeze 4x512", "smollm2-135m-instruct", "freeze", 4, 512, "bf16", False),
]
QUICK = {"tiny-a lora", "smollm2 lora 4x512", "smollm2 full 4x512"}

TINY = {  # Llama-style models with SmolLM2's vocabulary (and tokenizer), random weights
    "tiny-a": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2),
    "tiny-b": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4),
}


def build_tiny(name: str, work: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.models.loading import ensure_short_name

    out = work / name
    if (out / "config.json").exists():
        return str(out)
    tokenizer = AutoTokenizer.from_pretrained(ensure_short_name("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=4096,
                         **TINY[name])
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def write_data(path: Path, rows: int = 64, words: int = 1600) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def measure(model: str, method: str, micro: int, seq: int, precision: str, ckpt: bool, data: Path,
            work: Path) -> dict:
    cfg = {"model": {"name_or_path": model},
           "data": {"train_file": str(data), "format": "text", "val_size": 0, "test_size": 0,
                    "max_seq_length": seq, "overlong": "truncate"},
           "method": {"name": method, "r": 8, "alpha": 16, "trainable_layers": 2},
           "train": {"micro_batch_size": micro, "lr": 1e-4, "precision": precision,
                     "gradient_checkpointing": ckpt},
           "output": {"dir": str(work / "run")}}
    path = work / "case.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "bench", str(path), "--steps", "2", "--json"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"bench failed for {model} {method}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three cases instead of all")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    write_data(data)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'case':<28}{'estimate':>12}{'measured':>12}{'ratio':>8}")
    ratios = []
    for label, model, method, micro, seq, precision, ckpt in CASES:
        if args.quick and label not in QUICK:
            continue
        path = build_tiny(model, work) if model in TINY else model
        result = measure(path, method, micro, seq, precision, ckpt, data, work)
        plan = Plan(shape_from_model(path), method, precision, micro, seq, device=device,
                    gradient_checkpointing=ckpt)
        estimate = estimate_memory(plan).peak / 2**20
        measured = result["peak_rss_mb"] if device == "cpu" else result["peak_gpu_mb"] + 0.6 * GiB / 2**20
        ratios.append(estimate / measured)
        print(f"{label:<28}{estimate:>9,.0f} MB{measured:>9,.0f} MB{estimate / measured:>8.2f}", flush=True)
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"\n{len(ratios)} cases; estimate / measured from {min(ratios):.2f} to {max(ratios):.2f} "
          f"(worst {100 * (worst - 1):+.0f} %; the target is within ±25 %)")


if __name__ == "__main__":
    main()
