"""Orthogonal fine-tuning through peft: each targeted weight is multiplied by a learned block-diagonal
orthogonal matrix (OFT), or by butterfly-structured ones (BOFT), which keeps the angles between neurons
and so much of the pretrained knowledge. Both merge into the weights."""

from __future__ import annotations

import contextlib
import warnings

import torch.nn as nn

from tunesmith.config.schema import BoftSection, OftSection
from tunesmith.errors import ConfigError
from tunesmith.methods.peft_adapter import PeftAdapterMethod, default_targets


def check_block_size(model: nn.Module, method: str, block: int, targets) -> None:
    """peft silently shrinks a block size that does not divide a layer's inputs; say so before training."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bad = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if targets != "all-linear" and name.rsplit(".", 1)[-1] not in targets:
            continue
        if module.in_features % block:
            bad[name.rsplit(".", 1)[-1]] = module.in_features
    if bad:
        sizes = sorted(set(bad.values()))
        fits = [b for b in (4, 8, 16, 32, 64, 128) if all(n % b == 0 for n in sizes)]
        raise ConfigError(f"method {method}: method.block_size {block} does not divide the inputs of "
                          + ", ".join(f"{k} ({v})" for k, v in sorted(bad.items()))
                          + (f"; block sizes that fit: {', '.join(map(str, fits))}" if fits else ""))


class OftMethod(PeftAdapterMethod):
    name = "oft"
    config = OftSection
    init_values = {"train.lr": 1e-4}

    @staticmethod
    def trainable_count(shape, plan) -> int:  # a skew-symmetric block (its upper triangle) per block of inputs
        b = plan.block_size
        return shape.layers * sum(n_in // b * b * (b - 1) // 2 for n_in, _ in shape.matrices().values())

    def peft_config(self, model: nn.Module):
        from peft import OFTConfig

        check_block_size(model, self.name, self.cfg.block_size, self.cfg.target_modules)
        return OFTConfig(r=0, oft_block_size=self.cfg.block_size, module_dropout=self.cfg.dropout,
                         target_modules=default_targets(self.cfg.target_modules), task_type="CAUSAL_LM")


class BoftMethod(PeftAdapterMethod):
    name = "boft"
    config = BoftSection
    init_values = {"train.lr": 1e-4, "method.block_size": 8}

    @staticmethod
    def trainable_count(shape, plan) -> int:
        b = plan.block_size
        return shape.layers * sum(n_in // b * b * b + n_out for n_in, n_out in shape.matrices().values())

    def peft_config(self, model: nn.Module):
        from peft import BOFTConfig

        check_block_size(model, self.name, self.cfg.block_size, self.cfg.target_modules)
        # One butterfly factor: peft uses one anyway unless its CUDA extension compiles at run time.
        return BOFTConfig(boft_block_size=self.cfg.block_size, boft_block_num=0, boft_n_butterfly_factor=1,
                          boft_dropout=self.cfg.dropout, target_modules=default_targets(self.cfg.target_modules),
                          task_type="CAUSAL_LM")

    def build(self, model: nn.Module) -> nn.Module:
        with quiet_kernel_build():
            return super().build(model)

    def load(self, load_base, saved_dir):
        with quiet_kernel_build():
            return super().load(load_base, saved_dir)


@contextlib.contextmanager
def quiet_kernel_build():
    """peft tries to compile a CUDA kernel for BOFT and warns twice when it cannot (always, on CPU)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")
        yield
