"""On a CUDA GPU: QLoRA (4-bit and 8-bit bases) against LoRA on a bf16 base, and full fine-tuning, each
measured by `tunesmith bench` and set beside the memory estimate that `tunesmith doctor` would print.

    python benchmarks/gpu_memory.py                       # SmolLM2-1.7B's shape, random weights
    python benchmarks/gpu_memory.py --shape 135m          # the default model's shape
    python benchmarks/gpu_memory.py --model PATH_OR_ID    # a real model instead
    python benchmarks/gpu_memory.py --only lora,qlora --steps 20

Without --model it builds a model of SmolLM2-1.7B's shape (24 layers, hidden 2,048), or 135M's, with random weights
from the default model's config and tokenizer, so it needs no download: memory and speed depend on the
shape, not on the values. Each case trains the demo task in its own process, so each peak is its own.
"GPU peak" is what the process held on the card at its busiest: PyTorch's peak reservation plus the CUDA
context, the figure nvidia-smi shows and the one the estimate predicts.
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

CASES = {
    "lora r 16, bf16 base": ["--method.name=lora"],
    "lora r 16, bf16 base, checkpointing": ["--method.name=lora", "--train.gradient_checkpointing=true"],
    "qlora r 16, 4-bit NF4 base": ["--method.name=qlora", "--method.bits=4"],
    "qlora r 16, 8-bit base": ["--method.name=qlora", "--method.bits=8"],
    "full, bf16 autocast": ["--method.name=full", "--train.lr=2e-5"],
    "full, GaLore rank 128": ["--method.name=full", "--optimizer.name=galore", "--train.lr=1e-4"],
    "full, BAdam": ["--method.name=full", "--optimizer.name=badam", "--train.lr=2e-5"],
    "adapter_v2, 8 layers × 10": ["--method.name=adapter_v2", "--train.lr=3e-3"],
}

# One case, in a fresh process: bench it, then the estimate doctor would give for the same config.
CHILD = r"""
import json, sys, torch
from tunesmith.config.schema import load_config
from tunesmith.training.bench import bench
from tunesmith.planning.estimate import estimate_memory
from tunesmith.planning.preflight import model_shape, plan_for, this_machine
from tunesmith.data.pipeline import load_data_and_tokenizer
cfg = load_config(sys.argv[1], sys.argv[3:])
machine = this_machine(cfg.train.device, cfg.train.precision)  # before training: the card's free memory
result = bench(cfg, steps=int(sys.argv[2]), log=lambda *a, **k: None)
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()  # what the process holds beyond PyTorch's pool
    reserved, allocated = torch.cuda.max_memory_reserved(), result.peak_gpu_mb * 2**20
else:  # a dry run on CPU: the process's peak RSS stands in
    context, reserved = 0, result.peak_rss_mb * 2**20
    allocated = reserved
_, _, data = load_data_and_tokenizer(cfg)
est = estimate_memory(plan_for(cfg, model_shape(cfg), machine, data.report), suggest=False)
print("RESULT", json.dumps({"tokens_per_s": result.tokens_per_s, "allocated_mb": allocated / 2**20,
      "reserved_mb": reserved / 2**20, "context_mb": context / 2**20,
      "estimate_mb": est.peak / 2**20, "trainable": est.trainable, "device": result.device,
      "parts": {p.name: round(p.bytes / 2**20) for p in est.parts}}))
"""


SHAPES = {  # SmolLM2's own sizes
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "head_dim": 64},
}


def build_random_model(like: Path, shape: str, out: Path) -> None:
    """A model of one of SHAPES with random bf16 weights, and the default model's tokenizer files."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(like)
    config.update(SHAPES[shape])
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (like / name).exists():
            shutil.copy(like / name, out / name)


def run_case(model: str, overrides: list[str], steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(REPO / "examples" / "demo_lora.yaml"), str(steps),
           f"--model.name_or_path={model}", *extra, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        tail = [x for x in done.stderr.strip().splitlines() if x.strip()]
        return {"error": tail[-1] if tail else f"exit {done.returncode}"}
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="name or path; default: random weights in the shape --shape names")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    parser.add_argument("--like", type=Path, help="folder with the config and tokenizer to shape the random "
                        "model from (default: the cached default model)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_into:
        build_random_model(args.like, args.shape, args.build_into)
        return

    model = args.model
    if model is None:
        from tunesmith.models.loading import ensure_short_name

        like = args.like or ensure_short_name("smollm2-135m-instruct")
        model = str(Path(tempfile.mkdtemp(prefix=f"tunesmith-{args.shape}-")))
        # In a process of its own: memory this one held on the card would count in every case's reading.
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--like", str(like), "--build-into", model],
                       check=True)
    extra = [f"--train.micro_batch_size={args.micro_batch}", "--train.grad_accum_steps=1"]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    results = {}
    print(f"demo task, micro-batch {args.micro_batch}, {args.steps} measured steps, model {model}\n")
    print("| case | trainable | GPU peak | estimate | estimate / peak | allocated peak | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, overrides in CASES.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        r = results[name] = run_case(model, overrides, args.steps, extra)
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:100]} | | | | | |", flush=True)
            continue
        held = r["reserved_mb"] + r["context_mb"]
        print(f"| {name} | {r['trainable']:,} | {held:,.0f} MB | {r['estimate_mb']:,.0f} MB | "
              f"{r['estimate_mb'] / held:.2f} | {r['allocated_mb']:,.0f} MB | {r['tokens_per_s']:,.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
