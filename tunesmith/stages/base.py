"""The stage protocol: what one training stage (SFT, continued pre-training, and later DPO, KTO, reward
modelling, PPO, GRPO) decides, and nothing else.

A stage owns how one optimizer step's rows become micro-batches, the loss of a micro-batch as a *sum* with
the count it should be divided by, the count of the whole step (the step's normaliser), its evaluation, and
whether it needs a reference model. The loop sums `loss_sum` over the micro-batches of a step and divides by
`count(rows)`, so a row weighs the same whatever the micro-batching (DESIGN rule 1); the count is a plain
integer so a multi-process runtime can all-reduce it before dividing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from tunesmith.config.explain import choice
from tunesmith.config.schema import STAGE_SECTIONS, Config, Section
from tunesmith.data.formats import FORMATS


MODULES_FILE = "stage_modules.safetensors"
"""Beside the method's weights in every checkpoint and in final/: the modules a stage trains itself (rm's head)."""


class Stage(ABC):
    name: str
    needs_reference: bool = False
    """True for stages that score batches with a frozen copy of the starting model too (DPO, KTO)."""
    can_pack: bool = True
    """Whether micro-batches may be packed (rows end to end): only where rows are scored independently."""
    packs_by_default: bool = False
    """Its batches are packed wherever the model allows it, whatever train.packing says (preference pairs
    share their prompt's forward pass that way)."""
    init_values: dict[str, Any] = {}
    """Values `tunesmith init` writes for it beyond stage.name."""
    needs_packed_attention: bool = False
    """Its batches are packed rows whatever train.packing says (pre-training blocks of several documents)."""
    rows_per_item: int = 1
    """Model rows per training item: 2 for a preference pair (chosen and rejected in one batch)."""
    tokenizer = None
    """Set by the session before prepare(): online stages decode what they sample."""
    models: dict[str, Any] = {}
    """Set by the session before prepare(): the models the stage's settings name, loaded and frozen
    ("reference" from stage.reference; "reward_model", a (body, head) pair, from stage.reward_model)."""

    @classmethod
    def rows_per(cls, section: Section) -> int:
        """Model rows per training item under this config (GRPO: stage.num_generations answers per prompt)."""
        return cls.rows_per_item

    @classmethod
    def explanation(cls) -> dict[str, str]:
        """Its label and meaning (explanations.yaml, choices.stage.name)."""
        return choice("stage.name", cls.name)

    @classmethod
    def section(cls) -> type[Section]:
        """Its config model: `stage:` holds these keys when `stage.name` is this stage."""
        return STAGE_SECTIONS[cls.name]

    @classmethod
    def fields(cls) -> list[str]:
        """Its own stage.* keys (beyond name): what `tunesmith init` writes for it."""
        return [k for k in cls.section().model_fields if k != "name"]

    @staticmethod
    def extra_memory(plan) -> list[tuple[str, float, str]]:
        """(part, bytes, what it is) that this stage adds to `tunesmith estimate`'s plan: a reference model,
        generations, a value head. `plan` is a planning.estimate.Plan (duck-typed)."""
        return []

    def __init__(self, cfg: Section, run: Config):
        self.cfg, self.run = cfg, run

    @classmethod
    def data_formats(cls) -> list[str]:
        """The row formats it trains on: each data format says which stages its rows can train."""
        return [name for name, fmt in FORMATS.items() if cls.name in fmt.stages]

    def check_data(self, data_format: str, source: str) -> str | None:
        """Why the prepared data cannot train this stage, or None."""
        if data_format not in self.data_formats():
            return (f"stage {self.name} trains on {' or '.join(self.data_formats())} rows, and {source} holds "
                    f"{data_format} rows; set data.format, or pick the stage for this data (stage.name)")
        return None

    @abstractmethod
    def count(self, rows: Sequence[Any]) -> int:
        """The step's normaliser: what the summed loss of these rows is divided by (label tokens, pairs)."""

    @abstractmethod
    def batches(self, rows: Sequence[Any], size: int, pad_id: int, packed: bool) -> Iterable[dict[str, torch.Tensor]]:
        """One optimizer step's rows as micro-batches of `size` rows."""

    @abstractmethod
    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss of the micro-batch, what it counts): the loop divides by the whole step's count."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, rows: Sequence[Any], batch_size: int, pad_id: int, precision: str,
                 max_batches: int | None) -> dict[str, float]:
        """Held-out metrics (at least val_loss) over `rows`."""

    def prepare(self, model, method, data, device, precision: str, pad_id: int) -> None:
        """Once the model is built and placed, before the optimizer and any resume: what the stage keeps beside
        the model (DPO's reference). It may replace data.train or data.val by views of them."""

    def rows_wanted(self, step: int, rows_per_step: int) -> int:
        """How many new data rows step `step` takes: all of them, or none while an online stage (PPO) trains
        again on the answers it sampled at an earlier step."""
        return rows_per_step

    def collect(self, model: torch.nn.Module, rows: Sequence[Any], step: int) -> Sequence[Any]:
        """What the step trains on: the data rows themselves, or for an online stage (GRPO) answers it samples
        from `model` for them now. It must depend only on the rows, the weights and the step (exact resume)."""
        return rows

    def step_metrics(self, rows: Sequence[Any]) -> dict[str, float]:
        """Numbers of one step for metrics.jsonl besides loss, lr and timing."""
        return {}

    # ---- modules the stage trains beside the model (rm's scalar head): the optimizer, checkpoints and final/
    # carry them through these three, whatever the method.

    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules it adds beside the model, by name; made in prepare()."""
        return {}

    def parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"stage.{name}.{key}", p) for name, module in self.modules().items()
                for key, p in module.named_parameters()]

    def save(self, directory: Path) -> None:
        if self.modules():
            save_modules(self.modules(), directory / MODULES_FILE)

    def restore(self, directory: Path) -> None:
        if self.modules():
            load_modules(self.modules(), directory / MODULES_FILE)


def save_modules(modules: dict[str, torch.nn.Module], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({f"{name}.{key}": value.detach().contiguous().cpu() for name, module in modules.items()
               for key, value in module.state_dict().items()}, str(path))


def load_modules(modules: dict[str, torch.nn.Module], path: Path) -> None:
    """Put a saved file's weights back; every module's every weight must be in it."""
    from safetensors.torch import load_file

    from tunesmith.errors import ConfigError

    if not path.exists():
        raise ConfigError(f"{path.parent}: no {path.name}, which this stage's trained modules "
                          f"({', '.join(modules)}) are saved in")
    saved = load_file(str(path))
    for name, module in modules.items():
        mine = {key[len(name) + 1:]: value for key, value in saved.items() if key.startswith(name + ".")}
        device = next(module.parameters()).device
        module.load_state_dict({k: v.to(device) for k, v in mine.items()})
