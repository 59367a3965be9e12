"""`tunesmith init`: a complete, commented config for a chosen model and method.

Every key is written with the value that will be used and, above it, what it means (from
explanations.yaml), so a new user starts from a file that explains itself.
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml

from tunesmith.config.schema import config_from_dict
from tunesmith.config.explain import config_fields, one_line, texts
from tunesmith.methods import METHODS
from tunesmith.optim.registry import OPTIMIZERS
from tunesmith.stages import STAGES

# Written for every config; beyond these, the method, optimizer and stage entries add their own keys and values.
COMMON = {"train.warmup_steps": 10, "eval.interval": 50, "checkpoint.interval": 100}


def _belongs(path: str, method, optimizer, stage) -> bool:
    """Keys of one method, optimizer or stage appear only in configs that use it."""
    head, key = path.split(".", 1)
    own = {"method": method.fields, "optimizer": optimizer.fields, "stage": stage.fields}.get(head)
    return own is None or key == "name" or key in own()


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=100, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ")


def init_config(model: str, method: str, train_file: str, output_dir: str = "runs/my-run", optimizer: str = "adamw",
                stage: str = "sft") -> str:
    for what, name, registry in (("method", method, METHODS), ("optimizer", optimizer, OPTIMIZERS),
                                 ("stage", stage, STAGES)):
        if name not in registry:
            raise ValueError(f"{what} must be one of {', '.join(registry)}")
    entry, opt, stage_entry = METHODS[method], OPTIMIZERS[optimizer], STAGES[stage]
    values = {path: info.default for path, info in config_fields().items()}
    values.update({"model.name_or_path": model, "method.name": method, "data.train_file": train_file,
                   "optimizer.name": optimizer, "stage.name": stage, "output.dir": output_dir, **COMMON,
                   **entry.init_values, **stage_entry.init_values})
    lines = [f"# tunesmith config: {model}, method {method}" + (f", stage {stage}" if stage != "sft" else "")
             + (f", optimizer {optimizer}" if optimizer != "adamw" else "") + ".",
             "# Each key's meaning is above it; `tunesmith explain KEY` says more (typical values, what goes",
             "# wrong when it is too high or too low)."]
    section = None
    for path, value in values.items():
        if not _belongs(path, entry, opt, stage_entry):
            continue
        head, key = path.split(".", 1)
        if head != section:
            section = head
            lines += ["", *_comment(texts()["sections"][head]["meaning"], ""), f"{head}:"]
        lines += [*_comment(one_line(path), "  "), f"  {key}: {_scalar(value)}"]
    text = "\n".join(lines) + "\n"
    config_from_dict(yaml.safe_load(text), "generated config")  # what we write must load
    return text
