"""One typed configuration tree, nested the same way as the YAML file.

Every section rejects unknown keys with a did-you-mean, so a typo such as
`train.learning_rate` fails before any model is loaded instead of being ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
import typing
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from tunesmith.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = "smollm2-135m-instruct"
    """Short name (see `tunesmith.models.SHORT_NAMES`), a local HF directory, a .gguf file, or a hub id."""
    gguf_file: str | None = None
    """File name inside `name_or_path` when it is a directory holding several GGUF files."""
    trust_remote_code: bool = False
    revision: str | None = None


class DataConfig(Section):
    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    format: Literal["alpaca", "messages", "sharegpt", "text", "preference", "unpaired", "prompt"] | None = None
    """Row format; detected from the first row when absent."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map our field names to yours, e.g. {instruction: question, output: answer}."""
    val_size: Union[float, int] = 0.1
    test_size: Union[float, int] = 0.0
    seed: int = 42
    max_seq_length: int = 1024
    overlong: Literal["drop", "truncate"] = "drop"
    template: str = "model"
    """`model` (the tokenizer's own chat template), `chatml`, `alpaca`, or a path to a Jinja file."""
    system_prompt: str | None = None
    """System message for rows that have none; chat and generate use it too, so training and use match."""
    train_on_prompt: bool = False
    on_bad_row: Literal["error", "skip"] = "error"
    dedup: bool = False
    """Drop exact duplicate training rows, and training rows that also appear in val or test (leakage).
    Either way the data report counts them."""

    @field_validator("val_size", "test_size")
    @classmethod
    def _size(cls, v: float | int) -> float | int:
        if isinstance(v, float) and not 0.0 <= v < 1.0:
            raise ValueError("a fraction must be in [0, 1); use an integer for a row count")
        if isinstance(v, int) and v < 0:
            raise ValueError("a row count cannot be negative")
        return v

    @field_validator("max_seq_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 8:
            raise ValueError("must be at least 8 tokens")
        return v


class _Lora(Section):
    """LoRA's keys, shared by lora and qlora."""

    name: Literal["lora", "qlora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA's input dropout."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """pissa and olora start the adapter from the weights' principal directions (lora only); loftq from the
    quantization error (qlora, 4-bit)."""
    lora_plus_ratio: float | None = Field(None, gt=0)
    modules_to_save: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _init_fits_method(self):
        if self.init in ("pissa", "olora") and self.name != "lora":
            raise ValueError(f"method.init {self.init} applies to method lora only (it rewrites the base weights, "
                             "which a quantized base cannot take back exactly)")
        if self.init == "loftq" and (self.name != "qlora" or self.bits != 4):
            raise ValueError("method.init loftq applies to method qlora with bits 4: it starts the adapter from "
                             "the 4-bit quantization error")
        if self.init in ("pissa", "olora", "loftq") and self.use_dora:
            raise ValueError(f"method.init {self.init} cannot be combined with use_dora")
        if self.init in ("pissa", "olora") and self.modules_to_save:
            raise ValueError(f"method.init {self.init} cannot be combined with modules_to_save (the adapter saved "
                             "for the original weights would leave those modules out)")
        return self


class FullSection(Section):
    name: Literal["full"] = "full"


class FreezeSection(Section):
    name: Literal["freeze"] = "freeze"
    # train the last N decoder layers, modules whose name contains one of these strings, and/or parameters
    # whose name matches a regular expression
    trainable_layers: int = Field(2, ge=0)
    trainable_modules: list[str] = Field(default_factory=list)
    trainable_regex: str | None = None

    @field_validator("trainable_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            import re

            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class LoraSection(_Lora):
    name: Literal["lora"] = "lora"


class QloraSection(_Lora):
    name: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp32"] = "bf16"


class Ia3Section(Section):
    name: Literal["ia3"] = "ia3"
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class OftSection(Section):
    name: Literal["oft"] = "oft"
    dropout: float = Field(0.0, ge=0, lt=1)
    """OFT's and BOFT's module dropout."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    block_size: int = Field(32, ge=1)


class BoftSection(OftSection):
    name: Literal["boft"] = "boft"


class AdapterSection(Section):
    """LLaMA-Adapter: prompt vectors in the top layers."""

    name: Literal["adapter"] = "adapter"
    adapter_layers: int = Field(8, ge=1)
    adapter_len: int = Field(10, ge=1)


class AdapterV2Section(AdapterSection):
    name: Literal["adapter_v2"] = "adapter_v2"


class PromptSection(Section):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1)
    prompt_init_text: str | None = None


class PrefixSection(Section):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1)


METHOD_SECTIONS: dict[str, type[Section]] = {cls.model_fields["name"].default: cls for cls in (
    FullSection, FreezeSection, LoraSection, QloraSection, Ia3Section, OftSection, BoftSection, AdapterSection,
    AdapterV2Section, PromptSection, PrefixSection)}
"""Each method's own section: `method.name` picks one, and only its keys belong under `method:`."""
MethodSection = Annotated[Union[tuple(METHOD_SECTIONS.values())], Field(discriminator="name")]


def _method_defaults() -> dict[str, Any]:
    """Every method key's default, over all methods (a key two methods share has one default)."""
    out: dict[str, Any] = {}
    for cls in METHOD_SECTIONS.values():
        for key, field in cls.model_fields.items():
            out.setdefault(key, field.get_default(call_default_factory=True))
    return out


def method_section(raw: Any) -> Any:
    """The method section as its own method's keys. Configs saved before methods had sections of their own list
    every method's keys: a key of another method at its default value is dropped silently; one set to
    something else is dropped with a warning that names the methods it belongs to."""
    if not isinstance(raw, dict):
        return raw
    name = raw.get("name", "lora")
    own = METHOD_SECTIONS.get(name)
    if own is None:
        return raw  # pydantic names the allowed values
    defaults = _method_defaults()
    kept = {}
    for key, value in raw.items():
        if key in own.model_fields or key not in defaults:
            kept[key] = value  # its own keys, and unknown keys (for the did-you-mean)
        elif value != defaults[key]:
            owners = [m for m, cls in METHOD_SECTIONS.items() if key in cls.model_fields]
            import warnings

            warnings.warn(f"method.{key} applies to method {', '.join(owners)}, not {name}; ignored", stacklevel=4)
    return {"name": name, **kept}


_METHOD_SECTION = TypeAdapter(MethodSection)  # built once: a TypeAdapter compiles its validator


def MethodConfig(**fields: Any) -> Section:  # noqa: N802  (reads like the class it was in 0.1)
    """The section model of `fields["name"]` (lora by default), built from keyword arguments."""
    try:
        return _METHOD_SECTION.validate_python(method_section({"name": "lora", **fields}))
    except ValidationError as exc:
        raise _explain(exc, "method") from None


# ------------------------------------------------------------------------------------------- stages


class SftStageSection(Section):
    """sft: learn replies from prompt/reply rows."""

    name: Literal["sft"] = "sft"


class PretrainStageSection(Section):
    """pretrain: continue pre-training on raw text, cut into blocks of data.max_seq_length tokens."""

    name: Literal["pretrain"] = "pretrain"
    cross_document_attention: bool = False
    """Let a block's tokens attend across the document boundaries inside it (classic GPT-style packing)."""


class DpoStageSection(Section):
    """dpo: prefer the chosen reply over the rejected one, relative to the starting model (the reference)."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    """How far the model may move from the reference: larger keeps it closer."""
    loss: Literal["sigmoid", "hinge", "ipo", "kto_pair"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """The share of pairs assumed mislabelled (conservative DPO); sigmoid loss only."""
    ftx: float = Field(0.0, ge=0)
    """Weight of an SFT term (the chosen reply's mean token loss) added to the preference loss."""
    precompute_reference: bool = False
    """Score every pair with the reference once before training, instead of at every step."""
    reference: str | None = None
    """The model to stay close to: a model (path, hub id, short name) or a run dir; default the starting model."""

    @model_validator(mode="after")
    def _smoothing_fits_loss(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"stage.label_smoothing applies to stage.loss sigmoid, not {self.loss}")
        return self


class OrpoStageSection(Section):
    """orpo: SFT on the chosen reply plus an odds-ratio term against the rejected one; no reference."""

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term beside the SFT loss (ORPO's lambda)."""


class SimpoStageSection(Section):
    """simpo: prefer the chosen reply by mean token log-probability, with a target margin; no reference."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    """Scales the difference of the replies' mean log-probabilities."""
    gamma: float = Field(1.0, ge=0)
    """The margin the scaled difference should exceed."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    ftx: float = Field(0.0, ge=0)


class KtoStageSection(Section):
    """kto: learn from single replies marked desirable or not (no pairs needed), relative to the reference."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    """Weight of a desirable reply's loss (raise it when desirable replies are the rarer kind)."""
    undesirable_weight: float = Field(1.0, gt=0)
    reference: str | None = None
    """The model to stay close to: a model (path, hub id, short name) or a run dir; default the starting model."""


class RmStageSection(Section):
    """rm: a reward model, a scalar head that scores a reply so that chosen replies score above rejected ones."""

    name: Literal["rm"] = "rm"
    center_rewards: float = Field(0.0, ge=0)
    """Weight of a term that keeps rewards near zero (the square of each pair's summed rewards)."""


class _OnlineStageSection(Section):
    """What the online stages (grpo, ppo) share: how answers are sampled and which functions score them."""

    max_new_tokens: int = Field(64, ge=1)
    """The longest answer sampled; a longer one is cut there (and gets no end token)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the answers: higher gives more varied answers to compare."""
    top_p: float = Field(1.0, gt=0, le=1)
    rewards: list[str] = Field(default_factory=lambda: ["exact_match"])
    """Built-in reward names (exact_match, valid_json, json_keys, json_fields, length_penalty) or `module:function` paths."""
    reward_weights: list[float] | None = None
    """One weight per reward (default: all 1); an answer's reward is the weighted sum."""
    answer_field: str = "answer"
    """The row field that exact_match and json_fields compare an answer with."""
    required_keys: list[str] = Field(default_factory=list)
    """The keys json_keys wants in a JSON answer (a row's own `required_keys` field overrides it)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of a per-token KL penalty to the starting model (0: none, and no reference is kept)."""
    clip_range: float = Field(0.2, gt=0, lt=1)
    """How far a token's probability ratio to the sampling policy may move before the objective stops rewarding it."""
    reference: str | None = None
    """The model the KL is measured to: a model (path, hub id, short name) or a run dir; default the starting model."""

    @model_validator(mode="after")
    def _weights_fit_rewards(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"stage.reward_weights has {len(self.reward_weights)} weights for "
                             f"{len(self.rewards)} rewards; give one weight per reward")
        return self


class GrpoStageSection(_OnlineStageSection):
    """grpo: online — the model answers each prompt several times, reward functions score the answers, and
    answers better than their group's average are made likelier (group-relative policy optimisation)."""

    name: Literal["grpo"] = "grpo"
    num_generations: int = Field(4, ge=2)
    """Answers sampled per prompt (the group whose mean reward is each answer's baseline)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the reward spread of the group, of the whole step, or not at all."""

    @model_validator(mode="after")
    def _some_reward(self):
        if not self.rewards:
            raise ValueError("stage.rewards is empty: grpo needs at least one reward function")
        return self


class PpoStageSection(_OnlineStageSection):
    """ppo: online — the model answers each prompt, a reward model (an rm run) or reward functions score the
    answer, and a value head learns what to expect, so each token is credited with how much better it did."""

    name: Literal["ppo"] = "ppo"
    reward_model: str | None = None
    """A run dir trained with stage rm that scores the answers (instead of stage.rewards)."""
    rewards: list[str] = Field(default_factory=list)
    kl_coef: float = Field(0.05, ge=0)
    ppo_epochs: int = Field(4, ge=1)
    """Optimizer steps on each batch of answers before new ones are sampled."""
    score_norm: bool = False
    """Standardise the step's scores (mean 0, deviation 1) before they become rewards."""
    whiten_rewards: bool = False
    """Standardise the per-token rewards over the step before the advantages are estimated."""
    value_clip: float = Field(0.2, gt=0)
    """How far a value estimate may move from the one made at sampling time before its loss stops counting."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value head's loss beside the policy's."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount per token of a later reward."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda: 1 credits each token with everything after it, lower leans on the value estimates."""

    @model_validator(mode="after")
    def _one_scorer(self):
        if bool(self.reward_model) == bool(self.rewards):
            raise ValueError("ppo scores answers with a reward model or with reward functions: set exactly one of "
                             "stage.reward_model (a run dir trained with stage rm) and stage.rewards")
        return self


STAGE_SECTIONS: dict[str, type[Section]] = {cls.model_fields["name"].default: cls for cls in (
    SftStageSection, PretrainStageSection, DpoStageSection, OrpoStageSection, SimpoStageSection, KtoStageSection,
    RmStageSection, GrpoStageSection, PpoStageSection)}
"""Each stage's own section: `stage.name` picks one, and only its keys belong under `stage:`."""
StageSection = Annotated[Union[tuple(STAGE_SECTIONS.values())], Field(discriminator="name")]


# ------------------------------------------------------------------------------------------- optimizers


class _OptimizerSection(Section):
    methods: ClassVar[tuple[str, ...] | None] = None
    """The methods it accepts (None: every one)."""
    flat_keys: ClassVar[dict[str, str]] = {}
    """Its settings' names as flat train.* keys (before optimizers had sections) -> its own keys."""
    state_settings: ClassVar[bool] = False
    """Its settings decide what the saved optimizer state means, so a resume must keep them."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return typing.get_args(cls.model_fields["name"].annotation)


class PlainOptimizerSection(_OptimizerSection):
    """Optimizers with no settings of their own (betas and eps are train.adam_*, shared with GaLore and BAdam)."""

    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"] = "adamw"


class SgdOptimizerSection(_OptimizerSection):
    name: Literal["sgd"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    flat_keys: ClassVar[dict[str, str]] = {"momentum": "momentum"}


class GaloreOptimizerSection(_OptimizerSection):
    name: Literal["galore", "galore_8bit", "galore_adafactor"] = "galore"
    rank: int = Field(128, ge=1)
    """The rank gradients of the layers' weight matrices are projected to."""
    update_interval: int = Field(200, ge=1)
    """Steps between recomputing each projection from the current gradient."""
    scale: float = Field(0.25, gt=0)
    """Multiplies the projected-back update."""
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    methods: ClassVar[tuple[str, ...] | None] = ("full", "freeze")
    flat_keys: ClassVar[dict[str, str]] = {"galore_rank": "rank", "galore_update_interval": "update_interval",
                                           "galore_scale": "scale", "galore_proj_type": "proj_type"}
    state_settings: ClassVar[bool] = True


class BadamOptimizerSection(_OptimizerSection):
    name: Literal["badam"] = "badam"
    switch_every: int = Field(50, ge=1)
    """Optimizer steps on one block (decoder layer) before moving to the next."""
    order: Literal["random", "ascending", "descending"] = "random"
    """The order blocks take turns in (random: a new shuffle each round, from train.seed)."""
    methods: ClassVar[tuple[str, ...] | None] = ("full", "freeze")
    flat_keys: ClassVar[dict[str, str]] = {"badam_switch_every": "switch_every", "badam_order": "order"}
    state_settings: ClassVar[bool] = True


OPTIMIZER_SECTIONS: dict[str, type[_OptimizerSection]] = {name: cls for cls in (
    PlainOptimizerSection, SgdOptimizerSection, GaloreOptimizerSection, BadamOptimizerSection)
    for name in cls.names()}
"""Each optimizer's section: `optimizer.name` picks one (several optimizers may share a section's keys)."""
OptimizerSection = Annotated[Union[PlainOptimizerSection, SgdOptimizerSection, GaloreOptimizerSection,
                                   BadamOptimizerSection], Field(discriminator="name")]


def optimizer_section(raw: Any, train: dict[str, Any] | None = None, complete: bool = True) -> Any:
    """The optimizer section as its own optimizer's keys. Configs written before optimizers had a section name
    the optimizer `train.optimizer` and its settings as flat train.* keys (train.galore_rank): those move here
    from `train` (changed in place). Keys of another optimizer are dropped, silently at their default, else
    with a warning. `complete=False` (a set of overrides, merged into a file later) only moves keys."""
    section = {"name": raw} if isinstance(raw, str) else dict(raw) if isinstance(raw, dict) else raw
    if not isinstance(section, dict):
        return raw  # pydantic says what is wrong
    if train is not None and "optimizer" in train:
        old = train.pop("optimizer")
        old = old.get("name") if isinstance(old, dict) else old
        if "name" in section and section["name"] != old:
            raise ValueError(f"optimizer.name is {section['name']!r} and train.optimizer (its old spelling) is "
                             f"{old!r}: keep one of them")
        section["name"] = old
    for flat in [k for k in train or {} if k in _FLAT_KEYS]:
        section.setdefault(_FLAT_KEYS[flat], train.pop(flat))
    if not complete:
        return section
    name = section.get("name", "adamw")
    own = OPTIMIZER_SECTIONS.get(name)
    if own is not None:  # another optimizer's keys, e.g. after --optimizer.name=sgd over a galore config
        for key in [k for k in section if k not in own.model_fields]:
            owners = [c for c in dict.fromkeys(OPTIMIZER_SECTIONS.values()) if key in c.model_fields]
            if not owners:
                continue  # unknown: pydantic's did-you-mean
            value = section.pop(key)
            if value != owners[0].model_fields[key].default:
                import warnings

                warnings.warn(f"optimizer.{key} applies to optimizer "
                              f"{', '.join(n for c in owners for n in c.names())}, not {name}; ignored", stacklevel=4)
    return {"name": name, **section}


_FLAT_KEYS = {old: new for cls in OPTIMIZER_SECTIONS.values() for old, new in cls.flat_keys.items()}


_OPTIMIZER_SECTION = TypeAdapter(OptimizerSection)


def OptimizerConfig(**fields: Any) -> _OptimizerSection:  # noqa: N802  (reads like a class, as MethodConfig)
    """The section model of `fields["name"]` (adamw by default), built from keyword arguments."""
    try:
        return _OPTIMIZER_SECTION.validate_python(optimizer_section({"name": "adamw", **fields}))
    except ValidationError as exc:
        raise _explain(exc, "optimizer") from None


def shorthand(raw: dict[str, Any], complete: bool = True) -> dict[str, Any]:
    """`method: lora`, `optimizer: galore`, `stage: dpo` mean the section with that name and default keys; the
    optimizer's flat train.* keys of earlier releases move into its section (see optimizer_section)."""
    out = dict(raw)
    for key in ("method", "stage"):
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    train = dict(out["train"]) if isinstance(out.get("train"), dict) else None
    if "optimizer" in out or (train is not None and (
            "optimizer" in train or any(k in _FLAT_KEYS for k in train))):
        out["optimizer"] = optimizer_section(out.get("optimizer", {}), train, complete)
        if train is not None:
            out["train"] = train
    return out


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""
    lr: float = Field(2e-4, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas, for every optimizer built on it (adamw*, galore, galore_8bit, badam)."""
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` picks bf16 autocast where the device supports it, else fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gradient_checkpointing: bool = False
    """Recompute activations during the backward pass: far less memory for ~30 % more compute."""
    group_by_length: bool = True
    """Put rows of similar length in the same optimizer step, so little compute goes to padding."""
    packing: bool = False
    """Put each micro-batch's rows end to end in one row (no padding at all), attention kept within each example."""
    logits_at_labels_only: bool = True
    """Compute the LM head and cross-entropy only at positions that have labels (same loss, less compute)."""
    bf16_frozen_weights: bool = True
    """In bf16, store adapter methods' frozen base weights in bf16 (the same numbers autocast uses, half the memory)."""
    compile: bool = False
    """torch.compile the model: fused kernels after a compile of a minute or more at the start (pays on long runs)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: stop (naming the step), or skip that update and count it."""
    auto_micro_batch: bool = False
    """On out-of-memory, halve the micro-batch (same rows per step, so the same training) and retry."""
    log_interval: int = Field(1, ge=1)
    """Console refresh interval in steps; metrics.jsonl gets every step regardless."""

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return v


class EvalConfig(Section):
    interval: int | None = Field(None, ge=1)
    """Validation loss every N optimizer steps (and always at the end). None = only at the end."""
    batch_size: int = Field(8, ge=1)
    max_batches: int | None = Field(None, ge=1)
    metric: str = "val_loss"
    """What the run watches: the stage's val_* numbers, or a metric of greedy answers (scoring.GENERATED_METRICS)."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest greedy answer when a generated metric is measured during training."""
    early_stopping_patience: int | None = Field(None, ge=1)
    json_schema: str | None = None


class CheckpointConfig(Section):
    interval: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    best_by: str | None = None
    final: Literal["last", "best"] = "last"

    @model_validator(mode="after")
    def _best_needs_a_metric(self):
        if self.final == "best" and not self.best_by:
            raise ValueError("checkpoint.final: best needs checkpoint.best_by (the metric that says which is best, "
                             "such as val_loss or exact_match)")
        return self


class OutputConfig(Section):
    dir: str = "runs/run"
    overwrite: bool = False


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodSection = Field(default_factory=LoraSection)
    stage: StageSection = Field(default_factory=SftStageSection)
    optimizer: OptimizerSection = Field(default_factory=PlainOptimizerSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _own_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = shorthand(raw)
            if "method" in raw:
                raw = {**raw, "method": method_section(raw["method"])}
        return raw

    @model_validator(mode="after")
    def _needs_data(self) -> "Config":
        if self.data.train_file is None:
            raise ValueError("data.train_file is required")
        return self

    @model_validator(mode="after")
    def _optimizer_fits_method(self) -> "Config":
        problem = optimizer_method_problem(self.optimizer.name, self.method.name)
        if problem:
            raise ValueError(problem)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def optimizer_method_problem(optimizer: str, method: str) -> str | None:
    """Why optimizer.name cannot go with method.name, or None."""
    section = OPTIMIZER_SECTIONS.get(optimizer)
    accepted = section.methods if section else None
    if accepted is not None and method not in accepted:
        return (f"optimizer.name {optimizer} works on the model's own weights, so it needs method.name "
                f"{' or '.join(accepted)} (it is {method}); adapters are small enough for adamw")
    return None


# --------------------------------------------------------------------------- loading


def _section_fields(model_cls: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    cls: Any = model_cls
    for part in path:
        field = cls.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


# Names other tools use for our keys, so a user coming from them gets pointed at the right one.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "steps": "max_steps",
    "per_device_train_batch_size": "micro_batch_size", "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps", "gradient_accumulation": "grad_accum_steps",
    "lr_scheduler_type": "lr_scheduler", "scheduler": "lr_scheduler", "warmup": "warmup_steps",
    "max_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target": "target_modules",
    "max_length": "max_seq_length", "cutoff_len": "max_seq_length", "sequence_len": "max_seq_length",
    "model_name_or_path": "name_or_path", "base_model": "name_or_path", "output_dir": "dir",
    "dataset": "train_file", "eval_steps": "interval", "save_steps": "interval", "save_total_limit": "keep_last",
    "bf16": "precision", "fp16": "precision", "dtype": "precision",
}


def _suggest(key: str, known: list[str]) -> str | None:
    alias = ALIASES.get(key.lower())
    if alias in known:
        return alias
    longer = sorted((k for k in known if k.startswith(key)), key=len)
    if key and longer:  # 'adam' means adamw more often than badam
        return longer[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return close[0] if close else None


def _unions() -> dict[str, dict[str, type[BaseModel]]]:
    """The sections that are unions, each by the name that picks its member."""
    return {"method": METHOD_SECTIONS, "stage": STAGE_SECTIONS, "optimizer": OPTIMIZER_SECTIONS}


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    unions = _unions()
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        member = None
        if loc[:1] and loc[0] in unions and len(loc) > 2 and loc[1] in unions[loc[0]]:
            member, loc = loc[1], loc[:1] + loc[2:]  # pydantic puts the union's tag in the path
        key = ".".join(loc) or "(top level)"
        if err["type"] == "union_tag_invalid" and len(loc) == 1 and loc[0] in unions:
            tag, names = str(err.get("ctx", {}).get("tag", "")), list(unions[loc[0]])
            close = _suggest(tag, names)
            lines.append(f"{loc[0]}.name: '{tag}' is not a{'n' if loc[0] == 'optimizer' else ''} {loc[0]}; one of "
                         f"{', '.join(names)}." + (f" Did you mean '{close}'?" if close else ""))
            continue
        if err["type"] == "extra_forbidden":
            known = (list(unions[loc[0]][member].model_fields) if member and len(loc) == 2
                     else _section_fields(Config, loc[:-1]))
            close = _suggest(loc[-1], known)
            hint = f" Did you mean '{'.'.join(loc[:-1] + (close,))}'?" if close else ""
            known_txt = f" Known keys here: {', '.join(known)}." if known else ""
            lines.append(f"unknown key '{key}'{f' ({loc[0]} {member})' if member else ''}.{hint}{known_txt}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {err.get('input')!r})" if loc else msg)
    return ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--train.lr=1e-4 --method.name lora` into a nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '{arg}' has no value: write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"override '--{key}' must name a section and a key, e.g. --train.lr=1e-4")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _shorthand_or_explain(raw: dict[str, Any], source: str) -> dict[str, Any]:
    try:
        return shorthand(raw, complete=False)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid config:\n  {exc}") from None


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate, and resolve data paths against the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, method, train, ...)")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = _deep_merge(_shorthand_or_explain(raw, str(path)), _shorthand_or_explain(extra, "overrides"))
    config = config_from_dict(raw, str(path))
    return resolve_paths(config, path.parent)


def resolve_paths(config: Config, base_dir: Path) -> Config:
    """Relative data files are relative to the config file, so a config works from any working directory."""
    for key in ("train_file", "val_file", "test_file"):
        value = getattr(config.data, key)
        if value is not None and not Path(value).is_absolute():
            candidate = base_dir / value
            if candidate.exists() or not Path(value).exists():
                setattr(config.data, key, str(candidate.resolve()))
            else:
                setattr(config.data, key, str(Path(value).resolve()))
    template = config.data.template
    if template.endswith(".jinja") and not Path(template).is_absolute() and (base_dir / template).exists():
        config.data.template = str((base_dir / template).resolve())  # like the data files
    model_path = config.model.name_or_path
    for candidate in (base_dir / model_path, Path(model_path)):
        if not Path(model_path).is_absolute() and candidate.exists():
            # A local model path must keep working when chat/eval later run from another directory.
            config.model.name_or_path = str(candidate.resolve())
            break
    return config
