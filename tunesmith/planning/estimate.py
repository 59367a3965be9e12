"""`tunesmith estimate`: how much memory a training run needs, what it is made of, and whether it fits.

The model is the one tunesmith's loop actually runs (mixed precision keeps fp32 master weights; LoRA in
bf16 stores the frozen base in bf16; the LM head runs only where labels are). The activation figures per
token and layer were read off autograd's saved tensors for Llama-style decoders (tests/test_estimate.py
re-measures them), and the whole estimate is checked against measured peak memory by
benchmarks/memory_estimate.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from tunesmith.methods import METHODS
from tunesmith.optim.registry import OPTIMIZERS
from tunesmith.stages import STAGES

GiB = 2**30
# A frozen base with small trained add-ons (the methods whose saves_base_weights is False).
ADAPTER_METHODS = tuple(name for name, method in METHODS.items() if not method.saves_base_weights)
Precision = Literal["fp32", "bf16"]

# Bytes autograd keeps per token and decoder layer: coefficients of (hidden, intermediate, query width,
# key/value width, heads), plus a LoRA term per unit of rank for all-linear targets. Exact for Llama-style
# layers (RMSNorm, rotary attention through SDPA, gated MLP); see tests/test_estimate.py.
LAYER_BYTES = {
    # (adapter, precision): (hidden, intermediate, q, kv, heads, per unit of LoRA rank)
    (True, "bf16"): (18, 8, 6, 4, 4, 15),
    (True, "fp32"): (16, 16, 8, 8, 4, 29),
    (False, "bf16"): (26, 8, 4, 4, 4, 0),
    (False, "fp32"): (24, 16, 8, 8, 4, 0),
}
# adapter_v2 keeps, beside a frozen layer's tensors, each linear output its scale's gradient needs.
ADAPTER_V2_BYTES = {"bf16": (20, 10, 6, 8, 4, 0), "fp32": (28, 20, 8, 16, 4, 0)}
# Per scored token at the LM head, in bytes per vocabulary entry: the fp32 logits cross-entropy keeps, and
# during the backward pass their gradient (fp32, plus its bf16 copy under autocast).
HEAD_SAVED = {"bf16": 4, "fp32": 4}
HEAD_BACKWARD = {"bf16": 6, "fp32": 4}
# The backward pass needs working memory beyond what the forward pass kept (each layer's activation
# gradients), and on CPU the C allocator keeps freed blocks mapped: peak resident memory runs at this
# multiple of the kept layer activations, by device and by whether the method is an adapter
# (benchmarks/memory_estimate.py measured the CPU figures; benchmarks/gpu_memory.py checked the CUDA ones
# on an H200 with a 1.7B model: estimate / measured 0.89-1.05 for LoRA, full, GaLore and LLaMA-Adapter v2).
WORKING_FACTOR = {("cpu", True): 1.75, ("cpu", False): 1.1, ("cuda", True): 1.25, ("cuda", False): 1.25}
# With gradient checkpointing a layer keeps only its fp32 input (4 bytes × hidden per token), but while
# layers are recomputed one by one during the backward pass, resident memory on CPU grows by about 25.5
# bytes × hidden per token and layer (measured on SmolLM2-135M and a tiny model).
CHECKPOINT_BYTES_PER_HIDDEN = {"cpu": 25.5, "cuda": 4 * 1.25}
QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # NF4 with double-quantized block constants (bitsandbytes' layout)
CPU_RUNTIME = 0.85 * GiB  # Python, PyTorch, transformers and peft loaded: measured resident memory
CUDA_RUNTIME = 0.75 * GiB  # the CUDA context and kernels, outside PyTorch's allocator (771 MB measured, H200)
CUDA_SLACK = 0.05  # PyTorch's caching allocator: blocks that are reserved but not in use
# bitsandbytes de-quantizes each layer's weights into temporaries of many sizes, and 8-bit also keeps int8
# copies of the activations: reserved-but-idle and extra memory, as a multiple of the activations (measured
# once, H200, 1.7B model: reserved 1.3 times allocated for 4-bit, 1.4 for 8-bit).
QLORA_CUDA_SLACK = {4: 0.45, 8: 1.3}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a decoder-only model."""

    name: str
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    context: int | None = None
    family: str | None = None
    """config.model_type, e.g. llama."""
    assumed: str | None = None
    """Set when the shape was guessed from a parameter count: which reference it follows."""

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def head(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def linear(self) -> int:
        """Weights of the decoder's linear layers (everything but the embedding, the head and the norms)."""
        return max(self.params - self.embedding - self.head - self.layers * 2 * self.hidden - self.hidden, 0)

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(in, out) of one decoder layer's linear weights, by module name."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, r: int, targets: str | list[str] = "all-linear") -> int:
        sizes = self.matrices()
        names = list(sizes) if targets == "all-linear" else [t for t in targets if t in sizes]
        return self.layers * r * sum(sum(sizes[n]) for n in names)

    def layer_params(self) -> int:
        return self.linear // max(self.layers, 1) + 2 * self.hidden


# Well-known Llama-style shapes, used when only a parameter count is given.
REFERENCE_SHAPES = [
    # name, params, layers, hidden, intermediate, heads, kv heads, vocab, tied
    ("SmolLM2-135M", 134_515_008, 30, 576, 1536, 9, 3, 49152, True),
    ("SmolLM2-360M", 361_821_120, 32, 960, 2560, 15, 5, 49152, True),
    ("Qwen2.5-0.5B", 494_032_768, 24, 896, 4864, 14, 2, 151936, True),
    ("TinyLlama-1.1B", 1_100_048_384, 22, 2048, 5632, 32, 4, 32000, False),
    ("SmolLM2-1.7B", 1_711_376_384, 24, 2048, 8192, 32, 32, 49152, True),
    ("Llama-3.2-3B", 3_212_749_824, 28, 3072, 8192, 24, 8, 128256, True),
    ("Llama-2-7B", 6_738_415_616, 32, 4096, 11008, 32, 32, 32000, False),
    ("Llama-3-8B", 8_030_261_248, 32, 4096, 14336, 32, 8, 128256, False),
    ("Llama-2-13B", 13_015_864_320, 40, 5120, 13824, 40, 40, 32000, False),
    ("Qwen2.5-32B", 32_763_876_352, 64, 5120, 27648, 40, 8, 152064, False),
    ("Llama-3-70B", 70_553_706_496, 80, 8192, 28672, 64, 8, 128256, False),
]


def shape_from_params(params: float, **overrides) -> ModelShape:
    """A Llama-style shape for a parameter count: the nearest well-known model's, any part overridable."""
    ref = min(REFERENCE_SHAPES, key=lambda s: abs(math.log(s[1] / params)))
    name, _, layers, hidden, inter, heads, kv, vocab, tied = ref
    shape = ModelShape(name=f"{params / 1e9:g}B parameters", params=int(params), layers=layers, hidden=hidden,
                       intermediate=inter, heads=heads, kv_heads=kv, head_dim=hidden // heads, vocab=vocab,
                       tied=tied, assumed=name)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "hidden" in given and "heads" not in given:
        given["head_dim"] = given["hidden"] // heads
    return replace(shape, **given)


def shape_from_model(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                     revision: str | None = None) -> ModelShape:
    """The exact shape of a model from its config: the parameters are counted on a meta-device build, so
    no weights are read (a short name is still fetched and converted once, like any use of it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.errors import ModelError
    from tunesmith.models.loading import resolve

    source = resolve(name_or_path, gguf_file)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, revision=revision,
                                            **source.kwargs())
    except Exception as exc:  # noqa: BLE001 - a hub id offline, or not a model: say which
        raise ModelError(f"could not read the configuration of '{name_or_path}': {str(exc)[:300]}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())  # tied tensors once
    heads = text.num_attention_heads
    hidden = text.hidden_size
    return ModelShape(
        name=name_or_path, params=params, layers=text.num_hidden_layers, hidden=hidden,
        intermediate=getattr(text, "intermediate_size", 4 * hidden), heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size,
        tied=bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
        context=getattr(text, "max_position_embeddings", None), family=getattr(text, "model_type", None))


@dataclass(frozen=True)
class Plan:
    """One training configuration, as far as memory is concerned."""

    shape: ModelShape
    method: str = "lora"
    """A method.name (methods.METHODS)."""
    precision: Precision = "bf16"
    micro_batch: int = 4
    seq: int = 1024
    grad_accum: int = 1
    """Micro-batches per optimizer step: above 1, gradients are held while the next micro-batch runs."""
    device: Literal["cpu", "cuda"] = "cpu"
    device_memory: float | None = None
    """Bytes available (GPU memory, or RAM on CPU); None: no verdict."""
    gradient_checkpointing: bool = False
    lora_r: int = 8
    bits: int = 4
    """QLoRA: bits per base weight (4 or 8)."""
    lora_targets: str | list[str] = "all-linear"
    trainable_layers: int = 2
    block_size: int = 32
    """OFT/BOFT block size."""
    adapter_layers: int = 8
    adapter_len: int = 10
    """LLaMA-Adapter: prompts of adapter_len vectors in the top adapter_layers layers."""
    virtual_tokens: int = 20
    """prompt / prefix tuning: learned positions."""
    bf16_frozen_weights: bool = True
    optimizer: str = "adamw"
    """optimizer.name: what the optimizer keeps per trained weight (and, for badam, how many train at once)."""
    stage: str = "sft"
    """stage.name: what the stage keeps beside the model (DPO's reference copy); micro_batch counts model rows,
    two per preference pair."""
    galore_rank: int = 128
    labelled_share: float = 1.0
    """Share of tokens that carry a label (the LM head runs only there); 1.0 is the worst case."""
    stage_settings: tuple = ()
    """The stage section's settings as (key, value) pairs (kl_coef, precompute_reference, reference, ...): what
    decides whether the stage keeps a reference at all."""

    @property
    def stage_setting(self):
        return dict(self.stage_settings).get

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq

    @property
    def adapter(self) -> bool:
        return self.method in ADAPTER_METHODS


@dataclass
class Part:
    name: str
    bytes: float
    note: str


@dataclass
class MemoryEstimate:
    plan: Plan
    trainable: int
    parts: list[Part]
    peak: float
    activations_other_way: float
    """The activations with gradient checkpointing flipped, to show what it buys (or costs)."""
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.plan.device_memory is None else self.peak <= self.plan.device_memory

    def part(self, name: str) -> float:
        return next(p.bytes for p in self.parts if p.name == name)

    def to_text(self) -> str:
        p, s = self.plan, self.plan.shape
        method = {"lora": f"LoRA r {p.lora_r}", "qlora": f"QLoRA ({p.bits}-bit base, LoRA r {p.lora_r})",
                  "full": "full fine-tuning", "freeze": f"freeze (last {p.trainable_layers} layers train)",
                  "ia3": "IA3", "oft": f"OFT (blocks of {p.block_size})",
                  "adapter": f"LLaMA-Adapter ({p.adapter_layers} layers × {p.adapter_len} prompts)",
                  "adapter_v2": f"LLaMA-Adapter v2 ({p.adapter_layers} layers × {p.adapter_len} prompts, "
                                "scales, biases and norms)",
                  "prompt": f"prompt tuning ({p.virtual_tokens} virtual tokens)",
                  "prefix": f"prefix tuning ({p.virtual_tokens} virtual tokens)",
                  "boft": f"BOFT (blocks of {p.block_size})"}[p.method]
        shape = f"{s.params / 1e6:,.0f}M parameters, {s.layers} layers, hidden {s.hidden}, vocabulary {s.vocab:,}"
        lines = [f"Memory estimate: {s.name} ({shape}), {method}, {p.precision}, micro-batch {p.micro_batch} × "
                 f"{p.seq} tokens{', gradient checkpointing' if p.gradient_checkpointing else ''}, on {p.device}"]
        if s.assumed:
            lines.append(f"  (shape assumed like {s.assumed}; pass --model, or --layers/--hidden/--vocab, to be exact)")
        for part in self.parts:
            lines.append(f"  {part.name:<22}{gib(part.bytes):>10}   {part.note}")
        other = "with" if not p.gradient_checkpointing else "without"
        lines.append(f"  {'':<22}{'':>10}   ({other} gradient checkpointing the activations would be "
                     f"{gib(self.activations_other_way)})")
        lines.append(f"  {'peak':<22}{gib(self.peak):>10}   not the sum: gradients fill memory as the backward pass "
                     "frees activations")
        lines.append(f"  trainable parameters: {self.trainable:,} ({100 * self.trainable / max(s.params, 1):.2f} %)")
        if self.fits is not None:
            share = 100 * self.peak / p.device_memory
            verdict = "fits" if self.fits else "does not fit"
            lines.append(f"{verdict}: {gib(self.peak)} of {gib(p.device_memory)} ({share:.0f} %)")
            if self.suggestions:
                lines.append("changes that would make it fit:")
                lines += [f"  - {x}" for x in self.suggestions]
        return "\n".join(lines)


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n < 10 * GiB else f"{n / GiB:,.1f} GiB"


def parse_size(text: str) -> float:
    """'24GB', '24 GiB', '800MB', '24' (GiB) → bytes. GB and GiB both mean 2**30, as GPU makers' cards do."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([tgmk])i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 24GB or 800MB)")
    unit = {"t": 2**40, "g": GiB, "m": 2**20, "k": 2**10, None: GiB}[m.group(2)]
    return float(m.group(1)) * unit


def trainable_params(plan: Plan) -> int:
    """The method's own formula (each entry of the methods registry carries one)."""
    return METHODS[plan.method].trainable_count(plan.shape, plan)


def layer_activation_bytes(plan: Plan) -> float:
    """Bytes autograd keeps per token for one decoder layer."""
    s = plan.shape
    c_h, c_i, c_q, c_kv, c_heads, c_r = (ADAPTER_V2_BYTES[plan.precision] if plan.method == "adapter_v2" else
                                         LAYER_BYTES[(plan.adapter, plan.precision)])
    lora = c_r * plan.lora_r * (1 if plan.lora_targets == "all-linear" else len(plan.lora_targets) / 7)
    return (c_h * s.hidden + c_i * s.intermediate + c_q * s.heads * s.head_dim + c_kv * s.kv_heads * s.head_dim
            + c_heads * s.heads + (lora if plan.adapter else 0))


def activation_bytes(plan: Plan, checkpointing: bool) -> float:
    """What a micro-batch's forward pass keeps for the backward pass, plus the LM head's backward peak."""
    s, tokens = plan.shape, plan.tokens
    layer = layer_activation_bytes(plan)
    # Frozen layers below the first trainable one need no backward pass, so they keep nothing (adapter_v2
    # trains scales and norms in every layer, so all layers keep theirs).
    kept = METHODS[plan.method].active_layers(s, plan)
    factor = WORKING_FACTOR[(plan.device, plan.adapter)]
    if checkpointing:  # each layer keeps only its input; one layer at a time is recomputed
        layers = tokens * (kept * CHECKPOINT_BYTES_PER_HIDDEN[plan.device] * s.hidden + factor * layer)
    else:
        layers = tokens * kept * layer * factor
    scored = tokens * plan.labelled_share
    head = scored * s.vocab * (HEAD_SAVED[plan.precision] + HEAD_BACKWARD[plan.precision])
    return layers + head


def estimate_memory(plan: Plan, suggest: bool = True, offer_qlora: bool = True) -> MemoryEstimate:
    """The memory a plan needs; with `suggest`, when it does not fit, the changes that would make it fit
    (`offer_qlora`: include switching to a 4-bit base, which needs bitsandbytes)."""
    s = plan.shape
    trainable = trainable_params(plan)
    half = plan.precision == "bf16"
    parts: list[Part] = []

    # weights: what the base model occupies while training
    if plan.method == "qlora":
        bits = QLORA_BITS if plan.bits == 4 else 8 + 32 / 4096  # 8-bit: one fp32 scale per row of 4,096
        base = s.linear * bits / 8 + (s.embedding + s.head) * 4
        note = f"linear layers in {plan.bits}-bit, embeddings in fp32"
    elif plan.adapter and half and plan.bf16_frozen_weights:
        base = s.linear * 2 + s.head * 2 + (s.params - s.linear - s.head) * 4
        note = "frozen linear layers in bf16, embeddings and norms in fp32"
    else:
        base = s.params * 4
        note = "fp32 (bf16 runs keep fp32 master weights)"
    if plan.adapter:
        base += trainable * 4
        note += f"; {trainable:,} adapter weights in fp32"
    parts.append(Part("weights", base, note))
    for name, nbytes, what in STAGES[plan.stage].extra_memory(plan):
        parts.append(Part(name, nbytes, what))
        base += nbytes  # held all run long, like the weights

    # bf16 copies autocast makes of fp32 weights and keeps for the backward pass
    copies = 0.0
    if half and plan.method == "full":
        copies = s.linear * 2
    elif half and plan.method == "freeze":
        copies = s.linear * 2 * min(plan.trainable_layers, s.layers) / s.layers
    elif half and plan.adapter and plan.method != "qlora" and not plan.bf16_frozen_weights:
        copies = s.linear * 2
    if half and not (plan.adapter and plan.bf16_frozen_weights) and plan.method != "qlora":
        copies += s.vocab * s.hidden * 2  # the LM head's weight (or the tied embedding), cast each step
    if copies:
        parts.append(Part("bf16 weight copies", copies, "autocast's bf16 copies of fp32 weights, kept for backward"))

    grads, states, state_note = optimizer_memory(plan, trainable)
    parts.append(Part("gradients", grads, "fp32, one per trainable parameter"
                      + (" of the active block (one layer)" if plan.optimizer == "badam" else "")))
    parts.append(Part("optimizer states", states, state_note))

    acts = activation_bytes(plan, plan.gradient_checkpointing)
    other = activation_bytes(plan, not plan.gradient_checkpointing)
    parts.append(Part("activations", acts, f"{plan.tokens:,} tokens a micro-batch"
                      + (f", {100 * plan.labelled_share:.0f} % of them scored" if plan.labelled_share < 1 else "")))

    runtime = CPU_RUNTIME if plan.device == "cpu" else CUDA_RUNTIME
    if plan.method == "qlora":
        runtime += 2 * max(s.hidden * s.intermediate, s.vocab * s.hidden if not s.tied else 0)  # one de-quantized layer
    slack = CUDA_SLACK * (acts + copies) if plan.device == "cuda" else 0.0
    if plan.device == "cuda" and plan.method == "qlora":
        slack += QLORA_CUDA_SLACK[plan.bits] * acts
    parts.append(Part("overhead", runtime + slack, "runtime (Python, PyTorch, CUDA context) and allocator slack"))

    # The forward/backward peak holds everything but the gradients, which grow as activations are freed
    # (with accumulation, the earlier micro-batches' gradients are held as well); the optimizer step holds
    # the gradients and no activations. The larger of the two is the peak.
    static = base + states + runtime
    held = grads if plan.grad_accum > 1 else 0.0
    peak = max(static + copies + acts + slack + held,
               static + grads + (trainable * 4 if plan.device == "cuda" else 0))  # foreach AdamW's temporaries
    estimate = MemoryEstimate(plan, trainable, parts, peak, other)
    if suggest and plan.device_memory is not None and peak > plan.device_memory:
        estimate.suggestions = fit_suggestions(plan, offer_qlora)
    return estimate


def optimizer_memory(plan: Plan, trainable: int) -> tuple[float, float, str]:
    """(gradient bytes, optimizer-state bytes, what the states are): the optimizer's own formula."""
    return OPTIMIZERS[plan.optimizer].memory(plan, trainable)


def fit_suggestions(plan: Plan, offer_qlora: bool = True) -> list[str]:
    """Changes, one at a time and then combined, that bring the estimate under the device memory."""
    limit = plan.device_memory
    assert limit is not None
    out: list[str] = []

    def fits(p: Plan) -> bool:
        return estimate_memory(p, suggest=False).peak <= limit

    def largest_micro_batch(p: Plan) -> int | None:
        return next((m for m in range(p.micro_batch - 1, 0, -1) if fits(replace(p, micro_batch=m))), None)

    keep = "raise train.grad_accum_steps to keep the effective batch"
    checkpointed = replace(plan, gradient_checkpointing=True)
    if not plan.gradient_checkpointing and fits(checkpointed):
        out.append("train.gradient_checkpointing: true (about 30 % slower)")
    micro = largest_micro_batch(plan)
    if micro:
        out.append(f"train.micro_batch_size: {micro} ({keep})")
    if not plan.gradient_checkpointing and not fits(checkpointed):
        micro = largest_micro_batch(checkpointed)
        if micro:
            out.append(f"train.gradient_checkpointing: true with train.micro_batch_size: {micro} ({keep})")
    for seq in (2**k for k in range(int(math.log2(max(plan.seq - 1, 1))), 6, -1)):
        if fits(replace(plan, seq=seq)):
            out.append(f"data.max_seq_length: {seq} (check how many rows that cuts with `tunesmith doctor CONFIG`)")
            break
    if plan.precision == "fp32" and fits(replace(plan, precision="bf16")):
        out.append("train.precision: bf16 (where the device supports it)")
    if plan.method in ("full", "freeze") and plan.optimizer == "adamw":
        for optimizer, label in (("adamw_8bit", "8-bit optimizer states, a quarter of AdamW's"),
                                 ("galore", "optimizer states at low rank"),
                                 ("badam", "one layer trains at a time")):
            if fits(replace(plan, optimizer=optimizer)):
                out.append(f"optimizer.name: {optimizer} ({label})")
                break
    if plan.method in ("full", "freeze") and fits(replace(plan, method="lora")):
        out.append("method.name: lora (trains ~1 % of the weights, usually close in quality)")
    if offer_qlora and plan.method != "qlora" and fits(replace(plan, method="qlora", precision="bf16")):
        out.append("method.name: qlora (LoRA over a 4-bit base: a quarter of the weight memory)")
    if out:
        return out
    # Nothing alone is enough: add changes one by one, cheapest first, and say exactly which ones fit.
    combined, changes = plan, []
    steps = [("gradient checkpointing", {"gradient_checkpointing": True}), ("micro-batch 1", {"micro_batch": 1}),
             ("bf16", {"precision": "bf16"}), ("LoRA", {"method": "lora"})]
    if offer_qlora:
        steps.append(("a 4-bit (QLoRA) base", {"method": "qlora", "precision": "bf16"}))
    for label, change in steps:
        candidate = replace(combined, **change)
        if candidate == combined or (label == "LoRA" and plan.adapter):
            continue
        combined, changes = candidate, changes + [label]
        if fits(combined):
            return ["all of: " + ", ".join(changes)]
    need = estimate_memory(combined, suggest=False).peak
    return [f"a device with more memory, or a smaller model: even with {', '.join(changes) or 'these settings'} "
            f"it needs {gib(need)}"]
