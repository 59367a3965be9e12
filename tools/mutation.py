"""Mutation testing of tunesmith's core, one module at a time (not part of `make test`: minutes per module).

    python tools/mutation.py rendering|loss|accumulation|checkpoint|methods [--max-children 2]

mutmut (pip install mutmut==3.8.1) changes one operator, constant or call at a time in the module's files
and runs the fast tests that exercise them; a mutant that no test notices "survived". The work happens in a
scratch copy of the repository, so `mutants/` never lands in the tree. Prints the mutants by outcome, the
surviving ones by name (`mutmut show NAME` in the scratch directory shows the diff), and the score: killed
over all mutants that are not listed as equivalent below.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (files mutated, the fast tests that exercise them)
MODULES = {
    "rendering": (["tunesmith/data/templates.py"],
                  ["tests/test_data.py", "tests/test_one_prompt.py::test_training_prompt_is_the_chosen_template_with_the_system_prompt"]),
    "loss": (["tunesmith/stages/tokens.py", "tunesmith/stages/sft.py"],
             ["tests/test_training.py::test_grad_accumulation_matches_one_big_batch",
              "tests/test_stages_and_events.py::test_the_stage_loss_is_the_token_loss_the_loop_always_used",
              "tests/test_speed_switches.py::test_packed_rows_give_each_example_its_unpacked_loss",
              "tests/test_speed_switches.py::test_packed_and_padded_steps_give_the_same_loss_and_gradients",
              "tests/test_speed_switches.py::test_logits_at_labels_only_gives_the_full_head_loss_and_gradients",
              "tests/test_methods_and_export.py::test_eval_loss_is_the_token_mean_that_plain_transformers_computes"]),
    "accumulation": (["tunesmith/training/loop.py"],
                     ["tests/test_training.py::test_grad_accumulation_matches_one_big_batch",
                      "tests/test_training.py::test_train_writes_a_complete_run_dir",
                      "tests/test_training.py::test_nan_loss_stops_with_a_clear_error",
                      "tests/test_stages_and_events.py",
                      "tests/test_faults.py::test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint",
                      "tests/test_faults.py::test_nan_skip_policy_skips_the_update_and_counts_it",
                      "tests/test_faults.py::test_out_of_memory_gives_advice"]),
    "checkpoint": (["tunesmith/run/checkpoint.py"],
                   ["tests/test_faults.py", "tests/test_saved_configs.py"]),
    "methods": (["tunesmith/methods/base.py", "tunesmith/methods/peft_adapter.py", "tunesmith/methods/lora.py",
                 "tunesmith/methods/full.py", "tunesmith/methods/freeze.py"],
                ["tests/test_methods_and_export.py", "tests/test_registries.py::test_every_method_is_complete"]),
}

# Mutants that change nothing observable, by module, with the reason (names as `mutmut results` prints them).
EQUIVALENT: dict[str, dict[str, str]] = {}


def counts(results: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in results.splitlines():
        m = re.match(r"\s*(\S+):\s*(\w[\w ]*)$", line)
        if m:
            found.setdefault(m.group(2).strip(), []).append(m.group(1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", choices=MODULES)
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (to `mutmut show`)")
    args = parser.parse_args()
    files, tests = MODULES[args.module]
    scratch = Path(tempfile.mkdtemp(prefix=f"mutation-{args.module}-"))
    for part in ("tunesmith", "tests", "pyproject.toml"):
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, scratch / part)
    (scratch / "setup.cfg").write_text("[mutmut]\nsource_paths = tunesmith\n"
                                       + "only_mutate =\n" + "".join(f"    {f}\n" for f in files)
                                       + "also_copy =\n    tunesmith\n    tests\n"
                                       + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests)
                                       + "pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n")
    env_note = "HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
    started = time.time()
    run = subprocess.run(f"{env_note} {sys.executable} -m mutmut run --max-children {args.max_children}",
                         shell=True, cwd=scratch, capture_output=True, text=True)
    results = subprocess.run(f"{sys.executable} -m mutmut results --all true", shell=True, cwd=scratch,
                             capture_output=True, text=True).stdout
    by_status = counts(results)
    if not by_status:
        print(run.stdout[-3000:], run.stderr[-3000:])
        raise SystemExit("mutmut produced no results")
    equivalent = EQUIVALENT.get(args.module, {})
    total = sum(len(v) for v in by_status.values())
    killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
    counted = total - len([n for names in by_status.values() for n in names if n in equivalent])
    print(f"{args.module}: {total} mutants in {time.time() - started:.0f} s; "
          + ", ".join(f"{k} {len(v)}" for k, v in sorted(by_status.items())))
    for name in by_status.get("survived", []):
        print(f"  survived: {name}" + (f"  (equivalent: {equivalent[name]})" if name in equivalent else ""))
    print(f"score: {killed} of {counted} non-equivalent mutants killed = {100 * killed / max(counted, 1):.1f} %")
    print(f"scratch: {scratch}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
