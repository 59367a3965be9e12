"""tunesmith's `dpo` against TRL's DPOTrainer + PEFT LoRA (its documented usage), in one invocation.

    pip install trl==1.16.0   # test-only; not a tunesmith dependency
    python benchmarks/dpo_vs_trl.py [--pairs 160] [--steps 40] [--batch 4] [--lr 5e-4] [--beta 0.1]

Same preference pairs (the demo task: the exact JSON line chosen over a worse reply), model, LoRA (r 16,
alpha 32, all linear layers, no dropout), beta, sigmoid loss, learning rate, cosine schedule, warm-up, pairs
per step, optimizer steps and precision. Each side trains in its own process. One evaluator then loads both
adapters with plain peft and scores them on the same held-out pairs: greedy exact match against the chosen
reply, valid-JSON rate, and pairwise accuracy (the tuned model gives the chosen reply a higher log-probability
than the rejected one). Prints the training wall time of each side (model loading excluded) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def prompt_of(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}"  # what tunesmith's alpaca reading makes of the row


def side(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


TUNESMITH = """
import json, sys
from tunesmith.config.schema import config_from_dict
from tunesmith.training.loop import train
run = train(config_from_dict(json.load(open(sys.argv[1]))), log=lambda *a: None)
info = json.load(open(run / 'run.json'))
print(json.dumps({'seconds': info['train_time_s'], 'adapter': str(run / 'final')}))
"""

TRL = """
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
a = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(a['model'])
model = AutoModelForCausalLM.from_pretrained(a['model'], dtype=torch.float32)
rows = [json.loads(l) for l in open(a['train'])]
args = DPOConfig(output_dir=a['out'], report_to=[], per_device_train_batch_size=a['batch'], max_steps=a['steps'],
                 learning_rate=a['lr'], lr_scheduler_type='cosine', warmup_steps=a['warmup'], beta=a['beta'],
                 loss_type=['sigmoid'], use_cpu=True, bf16=False, logging_steps=10, save_strategy='no',
                 max_length=a['max_length'], seed=0, weight_decay=0.0, max_grad_norm=1.0)
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear',
                                            task_type='CAUSAL_LM'))
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
trainer.model.save_pretrained(a['out'] + '/adapter')
print(json.dumps({'seconds': round(seconds, 1), 'adapter': a['out'] + '/adapter'}))
"""

EVALUATE = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
a = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(a['model'])
out = {}
for name, adapter in a['adapters'].items():
    model = AutoModelForCausalLM.from_pretrained(a['model'], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval() if adapter else model.eval()
    exact = valid = wins = 0
    for row in a['test']:
        messages = [{'role': 'user', 'content': row['prompt']}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
        reply = tok.decode(gen[0, ids['input_ids'].shape[1]:], skip_special_tokens=True).strip()
        exact += reply == row['chosen']
        try:
            json.loads(reply); valid += 1
        except ValueError:
            pass
        scores = []
        for answer in (row['chosen'], row['rejected']):
            full = tok.apply_chat_template(messages + [{'role': 'assistant', 'content': answer}], return_tensors='pt',
                                           return_dict=True)['input_ids']
            n = ids['input_ids'].shape[1]
            with torch.no_grad():
                logps = model(input_ids=full).logits[0, n - 1:-1].float().log_softmax(-1)
            scores.append(float(logps.gather(1, full[0, n:, None]).sum()))
        wins += scores[0] > scores[1]
    n = len(a['test'])
    out[name] = {'exact_match': exact / n, 'json_valid': valid / n, 'pairwise_accuracy': wins / n}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    from tunesmith.demo.task import make_preference_rows
    from tunesmith.models.loading import resolve

    model_dir = resolve(args.model).path  # the same safetensors directory for both sides
    rows = make_preference_rows(args.pairs + args.test, seed=1)
    train_rows, test_rows = rows[:args.pairs], rows[args.pairs:]
    work = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    ours = work / "pairs.jsonl"
    ours.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    theirs = work / "pairs_trl.jsonl"  # TRL's conversational form of the same pairs
    theirs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": prompt_of(r)}],
                                          "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                          "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n"
                              for r in train_rows))
    config = {"model": {"name_or_path": model_dir},
              "data": {"train_file": str(ours), "val_size": 0, "test_size": 0, "max_seq_length": 256},
              "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
              "stage": {"name": "dpo", "beta": args.beta, "loss": "sigmoid"},
              "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": args.lr,
                        "lr_scheduler": "cosine", "warmup_steps": 4, "weight_decay": 0.0, "max_grad_norm": 1.0,
                        "seed": 0, "precision": "fp32"},
              "output": {"dir": str(work / "tunesmith"), "overwrite": True}}
    (work / "tunesmith.json").write_text(json.dumps(config))
    trl_args = {"model": model_dir, "train": str(theirs), "out": str(work / "trl"), "batch": args.batch,
                "steps": args.steps, "lr": args.lr, "warmup": 4, "beta": args.beta, "max_length": 256}
    (work / "trl.json").write_text(json.dumps(trl_args))

    print(f"{args.pairs} pairs, {args.steps} steps of {args.batch} pairs, LoRA r 16, beta {args.beta}, lr {args.lr}, "
          f"fp32 on CPU; work dir {work}", flush=True)
    results = {"tunesmith": side(TUNESMITH, str(work / "tunesmith.json"))}
    print(f"tunesmith trained in {results['tunesmith']['seconds']} s", flush=True)
    results["trl"] = side(TRL, str(work / "trl.json"))
    print(f"TRL trained in {results['trl']['seconds']} s", flush=True)
    test = [{"prompt": prompt_of(r), "chosen": r["chosen"], "rejected": r["rejected"]} for r in test_rows]
    (work / "eval.json").write_text(json.dumps({"model": model_dir, "test": test, "adapters": {
        "base": None, "tunesmith": results["tunesmith"]["adapter"], "trl": results["trl"]["adapter"]}}))
    scores = side(EVALUATE, str(work / "eval.json"))

    print(f"\nheld-out: {args.test} pairs\n")
    print("| | train wall time | exact match | valid JSON | pairwise accuracy |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("base", "trl", "tunesmith"):
        s = scores[name]
        t = f"{results[name]['seconds']:.0f} s" if name in results else "-"
        print(f"| {name} | {t} | {s['exact_match']:.1%} | {s['json_valid']:.1%} | {s['pairwise_accuracy']:.1%} |")
    print(f"\ntunesmith's time / TRL's: {results['tunesmith']['seconds'] / results['trl']['seconds']:.2f}")


if __name__ == "__main__":
    main()
