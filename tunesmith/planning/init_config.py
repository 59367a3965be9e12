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

# Starting points that differ by method; everything else is the config's own default.
METHOD_STARTS: dict[str, dict[str, Any]] = {
    "lora": {"method.r": 16, "method.alpha": 32, "train.lr": 2e-4},
    "full": {"train.lr": 2e-5, "train.weight_decay": 0.01},
    "freeze": {"train.lr": 1e-4},
    "qlora": {"method.r": 16, "method.alpha": 32, "train.lr": 2e-4},
    "ia3": {"train.lr": 1e-3},
    "oft": {"train.lr": 1e-4},
    "boft": {"train.lr": 1e-4, "method.block_size": 8},
    "adapter": {"train.lr": 9e-3},
    "adapter_v2": {"train.lr": 3e-3},
    "prompt": {"train.lr": 3e-2},
    "prefix": {"train.lr": 1e-2},
}
LORA = {"lora", "qlora"}
QLORA = {"qlora"}
# Keys that only mean something for some methods.
ONLY_FOR = {"method.r": LORA, "method.alpha": LORA, "method.dropout": {"lora", "qlora", "oft", "boft"},
            "method.target_modules": {"lora", "qlora", "ia3", "oft", "boft"}, "method.bits": QLORA,
            "method.quant_type": QLORA, "method.double_quant": QLORA, "method.compute_dtype": QLORA,
            "method.use_dora": LORA,
            "method.use_rslora": LORA, "method.init": LORA, "method.lora_plus_ratio": LORA,
            "method.modules_to_save": LORA, "method.block_size": {"oft", "boft"},
            "method.trainable_layers": {"freeze"}, "method.trainable_modules": {"freeze"},
            "method.trainable_regex": {"freeze"}, "method.adapter_layers": {"adapter", "adapter_v2"},
            "method.adapter_len": {"adapter", "adapter_v2"}, "method.num_virtual_tokens": {"prompt", "prefix"},
            "method.prompt_init_text": {"prompt"}}


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=100, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ")


def init_config(model: str, method: str, train_file: str, output_dir: str = "runs/my-run") -> str:
    if method not in METHOD_STARTS:
        raise ValueError(f"method must be one of {', '.join(METHOD_STARTS)}")
    values = {path: info.default for path, info in config_fields().items()}
    values.update({"model.name_or_path": model, "method.name": method, "data.train_file": train_file,
                   "train.warmup_steps": 10, "eval.interval": 50, "checkpoint.interval": 100,
                   "output.dir": output_dir, **METHOD_STARTS[method]})
    lines = [f"# tunesmith config: {model}, method {method}.",
             "# Each key's meaning is above it; `tunesmith explain KEY` says more (typical values, what goes",
             "# wrong when it is too high or too low)."]
    section = None
    for path, value in values.items():
        if method not in ONLY_FOR.get(path, {method}):
            continue
        head, key = path.split(".", 1)
        if head != section:
            section = head
            lines += ["", *_comment(texts()["sections"][head]["meaning"], ""), f"{head}:"]
        lines += [*_comment(one_line(path), "  "), f"  {key}: {_scalar(value)}"]
    text = "\n".join(lines) + "\n"
    config_from_dict(yaml.safe_load(text), "generated config")  # what we write must load
    return text
