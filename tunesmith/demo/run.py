"""The demo: fine-tune SmolLM2-135M-Instruct with LoRA to extract fields as JSON, then compare with the base.

    python -m tunesmith.demo.run [--out DIR] [--steps N]

It uses only the public functions the CLI uses: load_config → train → load_for_inference → generate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tunesmith.errors import TunesmithError

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo_lora.yaml"


def _answers(loaded, examples, max_new_tokens: int) -> list[str]:
    from tunesmith.inference.generate import Sampling, generate_batch

    return generate_batch(loaded.model, loaded.tokenizer, [ex.prompt_messages for ex in examples],
                          Sampling(max_new_tokens=max_new_tokens))


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run directory (replaced if it is an earlier demo run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--show", type=int, default=20, help="held-out rows to compare")
    args = parser.parse_args(argv)

    from tunesmith.config.schema import load_config
    from tunesmith.console import quiet_libraries
    from tunesmith.data.pipeline import load_examples
    from tunesmith.demo.task import write_dataset
    from tunesmith.evaluation.evaluate import exact_match
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training.loop import train

    quiet_libraries()
    started = time.perf_counter()
    overrides: dict = {"output": {"dir": args.out, "overwrite": True}}
    if args.steps:
        overrides["train"] = {"max_steps": args.steps}
    cfg = load_config(CONFIG, overrides)
    data_file = Path(cfg.data.train_file or "")
    if not data_file.exists():
        write_dataset(data_file)  # the generator is seeded, so this is the file the repo ships

    print(f"== 1. fine-tune {cfg.model.name_or_path} with {cfg.method.name} ({CONFIG.name})", flush=True)
    run_dir = train(cfg)

    test_file = run_dir / "data" / "test.jsonl"
    _, pairs = load_examples(str(test_file), cfg.data, None, [])
    examples = [ex for _, ex in pairs][: args.show]
    references = [ex.reference for ex in examples]

    print(f"\n== 2. answer {len(examples)} held-out rows (never trained on) with the base and the fine-tuned model",
          flush=True)
    base = load_for_inference(cfg.model.name_or_path)
    # The base model rambles; 64 new tokens are plenty for the one-line JSON answer we compare.
    base_answers = _answers(base, examples, max_new_tokens=64)
    del base
    tuned = load_for_inference(run_dir)
    tuned_answers = _answers(tuned, examples, max_new_tokens=64)

    for i, (ex, ref, b, t) in enumerate(zip(examples, references, base_answers, tuned_answers), start=1):
        print(f"\n[{i}] {_short(ex.prompt_messages[-1]['content'].split(chr(10))[-1], 110)}")
        print(f"    expected:   {_short(ref, 110)}")
        print(f"    base:       {'✓' if b.strip() == ref.strip() else '✗'} {_short(b, 108)}")
        print(f"    fine-tuned: {'✓' if t.strip() == ref.strip() else '✗'} {_short(t, 108)}")

    before, after = exact_match(base_answers, references), exact_match(tuned_answers, references)
    print(f"\nexact match on {len(examples)} held-out rows: base {before:.0%}  →  fine-tuned {after:.0%}")
    print(f"total time {time.perf_counter() - started:.0f} s; run directory {run_dir} "
          f"(loss curve: {run_dir / 'loss.png'})")
    print(f"next: tunesmith chat {run_dir}    |    tunesmith export {run_dir} --format merged --out exported")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
