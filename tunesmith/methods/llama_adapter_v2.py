"""LLaMA-Adapter v2: v1's gated prompts in the top `adapter_layers` layers (through peft), plus a learned
scale (starting at 1) and bias (starting at 0) on the output of every linear layer of the decoder (not the LM
head), plus the decoder's norms unfrozen. It adapts more than v1 for few parameters, and starts from the
unchanged model.

Saved as peft's adapter files (the prompts and gates) and EXTRAS (scales, biases and norms, named as in the
transformers model under peft, whose adapted attention holds the original one as `.model`). Plain peft loads only
the prompts, so an exported adapter needs tunesmith (or EXTRAS applied by hand) to give the trained model; the
prompts cannot be merged into the weights.

The scale and bias are parameters of each linear module, applied by a forward hook: the module stays what it
was (its name, class and attributes), so peft and transformers see the layer they expect, and under bf16 the
frozen weight is still cast. In the adapted top layers peft runs o_proj once more on the prompts' output and adds
the two results, so that layer's learned bias counts twice: an equivalent parametrisation, still zero at start.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tunesmith.config.schema import AdapterV2Section
from tunesmith.errors import ConfigError
from tunesmith.methods.base import LoadBase
from tunesmith.methods.llama_adapter import LlamaAdapterMethod

EXTRAS = "adapter_v2_extras.safetensors"
SCALE, BIAS = "adapter_v2_scale", "adapter_v2_bias"


def _scale_and_shift(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    # The parameters stay fp32; the activations stay in the layer's output dtype (bf16 under autocast).
    return output * getattr(module, SCALE).to(output.dtype) + getattr(module, BIAS).to(output.dtype)


def _linears(decoder: nn.Module) -> list[nn.Module]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return [m for m in decoder.modules() if isinstance(m, (nn.Linear, Conv1D))]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def add_scales_and_biases(model: nn.Module) -> None:
    """Give every linear layer of the decoder a per-output scale (1) and bias (0): the outputs are unchanged."""
    for linear in _linears(model.get_base_model().get_decoder()):
        features = linear.out_features if isinstance(linear, nn.Linear) else linear.nf
        device = linear.weight.device
        linear.register_parameter(SCALE, nn.Parameter(torch.ones(features, device=device, dtype=torch.float32)))
        linear.register_parameter(BIAS, nn.Parameter(torch.zeros(features, device=device, dtype=torch.float32)))
        linear.register_forward_hook(_scale_and_shift)


def extras(model: nn.Module) -> dict[str, nn.Parameter]:
    """Everything v2 trains beyond peft's prompts and gates, by name in the transformers model."""
    base = model.get_base_model()
    norms = {id(p) for m in base.get_decoder().modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    return {n: p for n, p in base.named_parameters() if n.endswith((SCALE, BIAS)) or id(p) in norms}


class LlamaAdapterV2Method(LlamaAdapterMethod):
    name = "adapter_v2"
    config = AdapterV2Section
    init_values = {"train.lr": 3e-3}

    @staticmethod
    def trainable_count(shape, plan) -> int:
        # the prompts, a scale and a bias per linear output, two norms a layer and the final one
        prompts = LlamaAdapterMethod.trainable_count(shape, plan)
        outputs = sum(n_out for _, n_out in shape.matrices().values())
        return prompts + shape.layers * 2 * outputs + (2 * shape.layers + 1) * shape.hidden

    @staticmethod
    def active_layers(shape, plan) -> int:  # it trains scales and norms in every layer
        return shape.layers

    def build(self, model: nn.Module) -> nn.Module:
        model = super().build(model)  # the prompts and gates train; everything else is frozen
        add_scales_and_biases(model)
        for p in extras(model).values():
            p.requires_grad_(True)
        return model

    def peft_trained(self, model: nn.Module) -> set[str]:
        return {n for n in super().peft_trained(model) if n.rsplit(".", 1)[-1].startswith("adaption_")}

    def save(self, model: nn.Module, out_dir: Path) -> None:
        super().save(model, out_dir)  # adapter_config.json + adapter_model.safetensors: prompts and gates
        tensors = {n: p.detach().cpu().contiguous() for n, p in extras(model).items()}
        save_file(tensors, str(out_dir / EXTRAS), metadata={"method": self.name})

    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        super().restore(model, saved_dir)
        self._load_extras(model, saved_dir)

    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        model = super().load(load_base, saved_dir)  # peft's inference model: the prompts are in, frozen
        add_scales_and_biases(model)
        self._load_extras(model, saved_dir)
        return model

    def _load_extras(self, model: nn.Module, saved_dir: Path) -> None:
        path = saved_dir / EXTRAS
        if not path.exists():
            raise ConfigError(f"{saved_dir}: {EXTRAS} is missing; it holds adapter_v2's scales, biases and norms "
                              "(a plain peft adapter has only the prompts)")
        saved = load_file(str(path))
        params = extras(model)
        missing = sorted(set(params) - set(saved))
        unexpected = sorted(set(saved) - set(params))
        wrong = [f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
                 if n in saved and saved[n].shape != p.shape]
        if missing or unexpected or wrong:
            found = [f"{label} {items[:3]}" for label, items in
                     (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
            raise ConfigError(f"{saved_dir}: {EXTRAS} does not fit this model ({'; '.join(found)})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
