"""QLoRA: the base model loaded in 4-bit (NF4 or FP4, optionally double-quantized) or 8-bit through
bitsandbytes, frozen, with LoRA (or DoRA) adapters trained on top in higher precision.

The adapter is saved like LoRA's. Merging cannot go into 4-bit weights without a second rounding, so the
merged model is the base de-quantized to full precision plus the adapter: it computes what was trained, and
its weights carry the base's rounding (the quantization gap from the original model), which a warning says.
With `init: loftq` the adapter starts from the 4-bit rounding error of each weight (read from the model's
safetensors files), so quantized base plus adapter start closer to the original model. Such an adapter
belongs with the 4-bit base (as chat, eval and merge use it): on the original weights it would add the
rounding error rather than cancel it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from tunesmith.config.schema import QloraSection
from tunesmith.errors import ConfigError
from tunesmith.methods.lora import LoraMethod


class QloraMethod(LoraMethod):
    name = "qlora"
    config = QloraSection
    packages = (("bitsandbytes", "pip install 'bitsandbytes>=0.49' (or tunesmith[qlora])"),)
    quantized = True

    def load_kwargs(self, device: torch.device) -> dict:
        from transformers import BitsAndBytesConfig

        cfg = self.cfg
        if cfg.bits == 8:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32)
        kwargs: dict = {"quantization_config": quantization}
        if device.type == "cuda":  # bitsandbytes quantizes while placing the weights
            kwargs["device_map"] = {"": device.index or 0}
        return kwargs

    def build(self, model: nn.Module) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        source = getattr(model, "name_or_path", "")
        # Norms and embeddings to fp32 and input gradients on; checkpointing stays train.gradient_checkpointing's.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = super().build(model)
        if self.cfg.init == "loftq":
            start_from_quantization_error(model, source)
        return model

    def load(self, load_base, saved_dir):
        self._load_base = load_base  # merge loads the quantized base again, on the CPU, to de-quantize it
        return super().load(load_base, saved_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        load_base = getattr(self, "_load_base", None)
        if load_base is None:
            raise RuntimeError("QloraMethod.merge needs a model from QloraMethod.load")
        warnings.warn(f"qlora: the adapter is merged into the base de-quantized from {self.cfg.bits}-bit, so the "
                      "merged model computes what was trained, but its weights carry the base's rounding (the "
                      "quantization gap from the original model)", stacklevel=2)
        # On the CPU: the full-precision copy of a large model would not fit beside the quantized one on a GPU.
        full = load_base(on=torch.device("cpu")).dequantize(dtype=torch.float32)
        full = get_peft_model(full, model.peft_config["default"])
        set_peft_model_state_dict(full, get_peft_model_state_dict(model))
        return full.merge_and_unload()


def start_from_quantization_error(model: nn.Module, source: str) -> None:
    """LoftQ (one step): set each adapter to the best rank-r approximation of its weight's 4-bit rounding
    error, so that quantized weight plus adapter starts as close to the original weight as rank r allows.
    peft's own version runs on CUDA only and ignores the adapter's alpha/r scale; this one does neither."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit

    weights = original_weights(source)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            base = module.get_base_layer().weight
            key = name.removeprefix("base_model.model.") + ".weight"
            original = weights(key).to(base.device, torch.float32)
            if original.shape != base.quant_state.shape:
                raise ConfigError(f"method.init loftq: {key} is {tuple(original.shape)} in the safetensors files "
                                  f"but {tuple(base.quant_state.shape)} in the model; use method.init default")
            error = original - bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
            u, s, vh = torch.linalg.svd(error, full_matrices=False)
            r = module.r["default"]
            root = s[:r].sqrt()
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_((root[:, None] * vh[:r]).to(a.dtype))
            b.copy_((u[:, :r] * root / module.scaling["default"]).to(b.dtype))


def original_weights(source: str):
    """A reader of the model's full-precision tensors by name, from its (possibly sharded) safetensors."""
    from safetensors import safe_open

    folder = Path(source) if source else None
    if folder is not None and not folder.is_dir() and source.count("/") == 1:
        from huggingface_hub import snapshot_download

        try:  # a hub id: the weights from_pretrained just downloaded
            folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors*"]))
        except Exception:  # noqa: BLE001 - reported below as missing weights
            folder = None
    index = folder / "model.safetensors.index.json" if folder else None
    if index is not None and index.exists():
        import json

        files = {k: folder / v for k, v in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    elif folder is not None and (folder / "model.safetensors").exists():
        files = None
    else:
        raise ConfigError(f"method.init loftq reads the full-precision weights from the model's safetensors files, "
                          f"and {source or 'this model'} has none (a GGUF file, or a model built in memory). "
                          "Use method.init default, or a model folder with model.safetensors")

    def read(name: str) -> torch.Tensor:
        # Checkpoints name tensors as the model does, or without its first prefix (e.g. "model.").
        for key in (name, name.split(".", 1)[-1]):
            path = folder / "model.safetensors" if files is None else files.get(key)
            if path is None:
                continue
            with safe_open(str(path), framework="pt") as f:
                if key in f.keys():
                    return f.get_tensor(key)
        raise ConfigError(f"method.init loftq: {name} is not in {folder}'s safetensors files, so its "
                          "full-precision weight cannot be read; use method.init default")

    return read
