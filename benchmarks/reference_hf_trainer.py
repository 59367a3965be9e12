"""The reference recipe: what a user would write by hand with HF Trainer + PEFT LoRA.

    python benchmarks/reference_hf_trainer.py MODEL_DIR TRAIN.jsonl OUT_DIR --steps 30 [--bf16]

Idiomatic and unhandicapped: chat-template prompts, prompt tokens masked with -100, DataCollatorForSeq2Seq
padding to the longest row of each batch, LoRA r 8 on all linear layers, AdamW, cosine schedule with
warmup. It writes the adapter and `result.json` (wall time of trainer.train(), real tokens seen, the
last logged loss and peak RSS). tunesmith is not imported here.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments)


def tokenize(row: dict, tokenizer, max_length: int) -> dict:
    user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                          {"role": "assistant", "content": row["output"]}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]}


class CountingCollator(DataCollatorForSeq2Seq):
    """The stock collator, also counting the real (non-padding) tokens it hands to the model."""

    real_tokens = 0

    def __call__(self, features, return_tensors=None):
        CountingCollator.real_tokens += sum(len(f["input_ids"]) for f in features)
        return super().__call__(features, return_tensors)


class LastLoss(TrainerCallback):
    loss = float("nan")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            LastLoss.loss = logs["loss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("train")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    data = Dataset.from_list(rows).map(lambda r: tokenize(r, tokenizer, args.max_length),
                                       remove_columns=list(rows[0].keys()))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        bf16=args.bf16, use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = CountingCollator(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator,
                      callbacks=[LastLoss()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(Path(args.out) / "adapter")
    result = {"seconds": seconds, "real_tokens": CountingCollator.real_tokens, "final_train_loss": LastLoss.loss,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    (Path(args.out) / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
