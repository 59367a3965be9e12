"""Before/after: the tunesmith side of speed_vs_hf.py (same model, data, LoRA, steps) run alternately from two source
trees, e.g. a checkout of the previous release and this one, to show a refactor costs no speed:

    git worktree add /tmp/old 0d14219 && python benchmarks/ab_trees.py /tmp/old . --rounds 2

Each run is a fresh process with PYTHONPATH set to its tree; prints tokens/s, seconds, final loss and peak RSS.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_data  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("before", type=Path)
parser.add_argument("after", type=Path)
parser.add_argument("--rounds", type=int, default=2)
args = parser.parse_args()

work = Path(tempfile.mkdtemp(prefix="ab-"))
train = speed_data.write(work / "train.jsonl", 600, seed=1)
SCRIPT = (
    "import json, resource, sys\n"
    "from tunesmith.config import config_from_dict\n"
    "from tunesmith.training.loop import train\n"
    "run = train(config_from_dict(json.load(open(sys.argv[1]))), log=lambda *a: None)\n"
    "info = json.load(open(run / 'run.json'))\n"
    "steps = [json.loads(l) for l in open(run / 'metrics.jsonl') if '\"loss\"' in l]\n"
    "print(json.dumps({'seconds': info['train_time_s'], 'tokens_per_s': sum(s['tokens'] for s in steps) / info['train_time_s'],\n"
    "  'final_train_loss': steps[-1]['loss'], 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
results = {"before": [], "after": []}
for rnd in range(args.rounds):
    for side, root in (("before", args.before.resolve()), ("after", args.after.resolve())):
        out = work / f"{side}{rnd}"
        out.mkdir()
        cfg = {"model": {"name_or_path": "smollm2-135m-instruct"},
               "data": {"train_file": str(train), "val_size": 0, "test_size": 0, "max_seq_length": 512,
                        "overlong": "truncate", "template": "model"},
               "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
               "train": {"max_steps": 30, "micro_batch_size": 8, "grad_accum_steps": 1, "lr": 1e-3,
                         "lr_scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.0, "max_grad_norm": 1.0,
                         "seed": 0, "precision": "auto"},
               "output": {"dir": str(out / "run"), "overwrite": True}}
        (out / "config.json").write_text(json.dumps(cfg))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(root)}
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", SCRIPT, str(out / "config.json")], capture_output=True, text=True, env=env, cwd="/tmp")
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[side].append(r)
        print(side, rnd, r, flush=True)
print(json.dumps(results))
