"""tunesmith against the reference recipe (HF Trainer + PEFT LoRA), in one invocation, on this machine.

    python benchmarks/speed_vs_hf.py [--steps 30] [--batch 8] [--model smollm2-135m-instruct] [--skip-fp32]

Same model, data (benchmarks/speed_data.py: varied lengths, prompt masking), LoRA r 8 on all linear layers,
learning rate, schedule, batch and optimizer steps. Each side trains in its own process (so peak RSS is
its own); then one evaluator computes the validation loss of both adapters the same way (token-weighted,
prompt masked). Prints real (non-padding) tokens/s, wall time, peak RSS, final train and validation loss,
the ratios, and the achieved FLOP/s against this machine's measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-3000:]}")


def tunesmith_side(model: str, train: Path, out: Path, args) -> dict:
    config = {
        "model": {"name_or_path": model},
        "data": {"train_file": str(train), "val_size": 0, "test_size": 0, "max_seq_length": args.max_length,
                 "overlong": "truncate", "template": "model"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "grad_accum_steps": 1, "lr": args.lr,
                  "lr_scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "seed": 0, "precision": args.precision, **json.loads(args.tunesmith_train)},
        "output": {"dir": str(out / "run"), "overwrite": True},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    script = (
        "import json, resource, sys, torch\n"
        "from tunesmith.config.schema import config_from_dict\n"
        "from tunesmith.training.loop import train\n"
        "run = train(config_from_dict(json.load(open(sys.argv[1]))), log=lambda *a: None)\n"
        "info = json.load(open(run / 'run.json'))\n"
        "steps = [json.loads(l) for l in open(run / 'metrics.jsonl') if '\"loss\"' in l]\n"
        "print(json.dumps({'seconds': info['train_time_s'], 'real_tokens': sum(s['tokens'] for s in steps),\n"
        "  'final_train_loss': steps[-1]['loss'], 'precision': info['precision'],\n"
        "  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
        "  'peak_gpu_mb': torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))\n"
    )
    cmd = [sys.executable, "-c", script, str(out / "config.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"tunesmith failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["adapter"] = str(out / "run" / "final")
    return result


def reference_side(model_dir: Path, train: Path, out: Path, args, bf16: bool) -> dict:
    cmd = [sys.executable, str(HERE / "reference_hf_trainer.py"), str(model_dir), str(train), str(out),
           "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
           "--max-length", str(args.max_length)] + (["--bf16"] if bf16 else [])
    if not (args.reuse_reference and (out / "result.json").exists()):
        run(cmd)
    result = json.loads((out / "result.json").read_text())
    result["adapter"] = str(out / "adapter")
    return result


def validation_loss(model_dir: Path, adapter: str, val: Path, max_length: int) -> float:
    """One evaluator for both sides: the base model + the adapter, token-weighted loss on the val rows."""
    from peft import PeftModel

    from tunesmith.config.schema import DataConfig
    from tunesmith.data.pipeline import load_examples, tokenize_split
    from tunesmith.stages.tokens import mean_loss
    from tunesmith.models.loading import ModelSource, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(str(model_dir)))
    cfg = DataConfig(train_file=str(val), max_seq_length=max_length, overlong="truncate")
    _, pairs = load_examples(str(val), cfg, None, [])
    rows, _ = tokenize_split("val", [ex for _, ex in pairs], tokenizer, cfg)
    model = PeftModel.from_pretrained(load_causal_lm(ModelSource(str(model_dir))), adapter)
    return mean_loss(model, rows, 8, tokenizer.pad_token_id)[0]


def flops_per_token(model_dir: Path) -> float:
    """LoRA training ≈ 4 × (frozen parameters touched per token): forward 2N, backward through activations 2N
    (no weight gradients for frozen weights). The LM head counts only where tunesmith computes it, so this
    is the same, conservative count for both sides."""
    from tunesmith.models.loading import ModelSource, load_causal_lm

    model = load_causal_lm(ModelSource(str(model_dir)))
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 4.0 * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--precision", default="auto", help="tunesmith's train.precision")
    parser.add_argument("--tunesmith-train", default="{}", help='extra train.* keys as JSON, e.g. {"group_by_length": false}')
    parser.add_argument("--skip-fp32", action="store_true", help="run the reference only with bf16")
    parser.add_argument("--skip-bf16", action="store_true", help="run the reference only in fp32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="with --work: reuse reference results already there (when tuning tunesmith only)")
    args = parser.parse_args()

    import speed_data

    from tunesmith.models.loading import resolve

    model_dir = Path(resolve(args.model).path)
    work = args.work or Path(tempfile.mkdtemp(prefix="tunesmith-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    train = speed_data.write(work / "train.jsonl", args.rows, seed=1)
    val = speed_data.write(work / "val.jsonl", 64, seed=2)

    sides: dict[str, dict] = {}
    if not args.skip_fp32:
        sides["reference fp32"] = reference_side(model_dir, train, work / "ref_fp32", args, bf16=False)
    if not args.skip_bf16:
        sides["reference bf16"] = reference_side(model_dir, train, work / "ref_bf16", args, bf16=True)
    sides["tunesmith"] = tunesmith_side(str(model_dir), train, work / "ours", args)

    per_token = flops_per_token(model_dir)
    import torch

    from tunesmith.planning.speed import matmul_peak

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    peaks = {p: matmul_peak(device, p) for p in ("fp32", "bf16")}
    for name, r in sides.items():
        r["tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["val_loss"] = validation_loss(model_dir, r["adapter"], val, args.max_length)
        r["flops_per_s"] = r["tokens_per_s"] * per_token

    print(f"\n{args.steps} optimizer steps × {args.batch} rows, LoRA r 8 all-linear, {args.model}, "
          f"{torch.cuda.get_device_name() if gpu else f'{os.cpu_count()} CPU threads'}; "
          f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print(f"{'':16} {'tokens/s':>9} {'wall s':>8} {'peak RSS MB':>12}" + (f" {'peak GPU MB':>12}" if gpu else "")
          + f" {'train loss':>11} {'val loss':>9} {'GFLOP/s':>8} {'% bf16 peak':>11}")
    for name, r in sides.items():
        print(f"{name:16} {r['tokens_per_s']:>9.0f} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f}"
              + (f" {r.get('peak_gpu_mb') or 0:>12.0f}" if gpu else "")
              + f" {r['final_train_loss']:>11.4f} {r['val_loss']:>9.4f} {r['flops_per_s'] / 1e9:>8.1f} "
              f"{100 * r['flops_per_s'] / peaks['bf16']:>10.1f}%")
    refs = [r for n, r in sides.items() if n.startswith("reference")]
    best = max(refs, key=lambda r: r["tokens_per_s"]) if refs else None
    if best:
        ours = sides["tunesmith"]
        print(f"\ntunesmith vs the faster reference: {ours['tokens_per_s'] / best['tokens_per_s']:.2f}× tokens/s, "
              f"peak RSS {ours['peak_rss_mb'] / best['peak_rss_mb']:.2f}×, "
              f"val loss {ours['val_loss']:.4f} vs {best['val_loss']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"sides": sides, "matmul_peak": peaks, "args": vars(args)}, default=str,
                                        indent=1))


if __name__ == "__main__":
    main()
