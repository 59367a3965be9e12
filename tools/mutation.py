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
    "rendering": (["tunesmith/data/templates.py"], ["tests/test_data.py", "tests/test_rendering.py"]),
    "loss": (["tunesmith/stages/tokens.py", "tunesmith/stages/sft.py"],
             ["tests/test_training.py::test_grad_accumulation_matches_one_big_batch",
              "tests/test_stages_and_events.py::test_the_stage_loss_is_the_token_loss_the_loop_always_used",
              "tests/test_speed_switches.py::test_packed_rows_give_each_example_its_unpacked_loss",
              "tests/test_speed_switches.py::test_packed_and_padded_steps_give_the_same_loss_and_gradients",
              "tests/test_speed_switches.py::test_logits_at_labels_only_gives_the_full_head_loss_and_gradients",
              "tests/test_training.py::test_eval_loss_is_the_token_weighted_mean_of_transformers_losses",
              "tests/test_stages_and_events.py::test_the_stage_batches_are_the_loops_micro_batches_padded_or_packed",
              "tests/test_stages_and_events.py::test_step_metrics_count_all_tokens_and_the_trained_ones",
              "tests/test_stages_and_events.py::test_evaluation_runs_in_the_runs_precision_and_caps_perplexity",
              "tests/test_stages_and_events.py::test_a_soft_capped_model_is_scored_with_its_capping",
              "tests/test_stages_and_events.py::test_soft_prompt_positions_are_not_scored"]),
    "accumulation": (["tunesmith/training/loop.py"],
                     ["tests/test_loop_units.py",  # a fake session: milliseconds per test
                      # and one real run, end to end: accumulated micro-batches give the one big batch's step
                      "tests/test_training.py::test_grad_accumulation_matches_one_big_batch"]),
    "checkpoint": (["tunesmith/run/checkpoint.py"],
                   ["tests/test_checkpoint_units.py", "tests/test_saved_configs.py",
                    # one real GaLore projector through the files (the unit tests use a stand-in class)
                    "tests/test_galore_badam.py::test_galore_state_survives_the_checkpoint_files[galore-left]"]),
    "methods": (["tunesmith/methods/base.py", "tunesmith/methods/peft_adapter.py", "tunesmith/methods/lora.py",
                 "tunesmith/methods/full.py", "tunesmith/methods/freeze.py"],
                ["tests/test_method_protocol.py",
                 "tests/test_methods_and_export.py::test_method_roundtrip",
                 "tests/test_methods_and_export.py::test_lora_all_linear_targets_every_projection",
                 "tests/test_registries.py::test_every_method_is_complete"]),
}

# Mutants that change nothing observable, by module, with the reason (names as `mutmut results` prints them).
T = "tunesmith.data.templates.x_"
C = "tunesmith.run.checkpoint.x_"
EQUIVALENT: dict[str, dict[str, str]] = {
    "rendering": {
        T + "resolve_template__mutmut_21": "read_text(encoding=None) is UTF-8 wherever Python runs in a UTF-8 locale "
                                           "(and C-locale coercion makes it so)",
        T + "resolve_template__mutmut_23": "'UTF-8' and 'utf-8' name the same codec",
        T + "_render__mutmut_2": "apply_chat_template(tokenize=None) takes the falsy branch: text, as tokenize=False",
        T + "_encode__mutmut_2": "the tokenizer encodes an empty string to no ids, the else branch's []",
        T + "conversation_segments__mutmut_24": "add_generation_prompt=None renders as False",
        T + "conversation_segments__mutmut_53": "end = -2 instead of -1 when there is no EOS: both take the "
                                                "`end >= 0` is false branch",
        T + "render__mutmut_8": "tokenizer(text) adds special tokens by default, as add_special_tokens=True does",
    },
    "loss": {
        **{f"tunesmith.stages.tokens.x_model_inputs__mutmut_{i}": "without the attention mask a right-padded row's "
           "real positions attend exactly as before (causal attention never looks right); only pads change"
           for i in (5, 6, 7, 8, 9)},
        **{f"tunesmith.stages.tokens.x_token_loss_sum__mutmut_{i}": "it only swaps the labels-only path and the "
           "plain path where both compute the same loss (tests pin that they agree); soft-capped models and soft "
           "prompts still take the plain path" for i in (1, 16)},
        **{f"tunesmith.stages.tokens.x_virtual_tokens__mutmut_{i}": "every peft config defines is_prompt_learning, "
           "so getattr's default (False, None, True or none) is never read" for i in (14, 17, 20)},
        **{f"tunesmith.stages.sft.xǁSftStageǁloss_sum__mutmut_{i}": "labels_only None or its default picks a path "
           "that computes the same loss" for i in (3, 6)},
    },
    "methods": {
        "tunesmith.methods.freeze.xǁFreezeMethodǁbuild__mutmut_9": "with trainable_layers 0 the slice "
                                                                   "layers[len - 0:] is empty as the else branch's []",
        "tunesmith.methods.freeze.xǁFreezeMethodǁrestore__mutmut_12": "load_state_dict(strict=None) is falsy: "
                                                                      "not strict, as strict=False",
        "tunesmith.methods.full.xǁFullMethodǁrestore__mutmut_20": "load_state_dict(strict=None) is falsy: not "
                                                                  "strict, as strict=False",
        **{f"tunesmith.methods.lora.x_rewrites_base__mutmut_{i}": "the default for a config without "
           "init_lora_weights ('', None or 'XXXX') is never pissa or olora either" for i in (16, 22)},
    },
    "accumulation": {
        "tunesmith.training.loop.x_train__mutmut_42": "the no-stop callable returns None instead of False: both "
                                                      "falsy in `request() or wanted() or ...`",
        "tunesmith.training.loop.x_run_steps__mutmut_40": "float('INF') is float('inf')",
    },
    "checkpoint": {
        C + "sha256_file__mutmut_5": "f.read(None) reads the whole file as one block: the same digest (chunking "
                                     "only bounds the memory)",
        **{C + f"write_manifest__mutmut_{i}": "the temporary's name is never read back: any name starting with "
           "manifest.json is left out of the listing, and it is renamed to manifest.json" for i in (23, 24)},
        **{C + f"{fn}__mutmut_{i}": "json.dumps writes ASCII only (ensure_ascii), the same bytes in any encoding"
           for fn, i in [("write_manifest", 26), ("write_manifest", 28), ("write_manifest", 42),
                         ("save_checkpoint", 29), ("save_checkpoint", 31), ("save_checkpoint", 37),
                         ("save_checkpoint", 55), ("save_checkpoint", 57), ("save_checkpoint", 65)]},
        **{C + f"{fn}__mutmut_{i}": "the JSON read is the ASCII that json.dumps wrote: 'UTF-8', 'utf-8' and the "
           "locale's encoding read it alike (and a manifest that is not text is unreadable either way)"
           for fn, i in [("problems", 8), ("problems", 10), ("read_state", 2), ("read_state", 5),
                         ("load_checkpoint", 50), ("load_checkpoint", 55)]},
        **{C + f"{fn}__mutmut_{i}": "globbing a directory that does not exist yields nothing, as the else "
           "branch's []" for fn, i in [("complete_checkpoints", 4), ("find_checkpoint", 26),
                                       ("clean_temporary", 4)]},
        C + "find_checkpoint__mutmut_5": "root / an absolute path is that absolute path (pathlib), as Path(name)",
        **{C + f"_restore_rng__mutmut_{i}": "np.random.set_state converts the key array to uint32 itself (the "
           "keys are below 2**32)" for i in (21, 23)},
        **{C + f"{fn}__mutmut_{i}": "every method and optimizer key is a str, int, float, bool, None or a list "
           "of str, which python mode dumps exactly as json mode does (a mode other than 'json' is python's)"
           for fn, i in [("fingerprint", 5), ("fingerprint", 6), ("fingerprint", 7),
                         ("optimizer_settings", 2), ("optimizer_settings", 3), ("optimizer_settings", 4)]},
    },
}


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
    # One thread per test process: mutmut limits each mutant's CPU time, and a multi-threaded torch spends CPU
    # seconds faster than wall seconds, which would end a surviving mutant's run early as a "timeout".
    env_note = "HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"
    started = time.time()
    run = subprocess.run(f"{env_note} {sys.executable} -m mutmut run --max-children {args.max_children}",
                         shell=True, cwd=scratch, capture_output=True, text=True)
    results = subprocess.run(f"{sys.executable} -m mutmut results --all true", shell=True, cwd=scratch,
                             capture_output=True, text=True).stdout
    by_status = counts(results)
    if not by_status or set(by_status) == {"not checked"}:
        print(run.stdout[-3000:], run.stderr[-3000:])
        raise SystemExit("mutmut produced no results")
    equivalent = EQUIVALENT.get(args.module, {})
    total = sum(len(v) for v in by_status.values())
    killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
    counted = total - len([n for n in by_status.get("survived", []) if n in equivalent])
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
