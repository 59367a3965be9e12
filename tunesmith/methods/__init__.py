"""Fine-tuning methods, one small module each behind `Method`."""

from tunesmith.config.schema import MethodConfig
from tunesmith.methods.base import Method, describe_counts, parameter_counts
from tunesmith.methods.freeze import FreezeMethod
from tunesmith.methods.full import FullMethod
from tunesmith.methods.ia3 import Ia3Method
from tunesmith.methods.llama_adapter import LlamaAdapterMethod
from tunesmith.methods.llama_adapter_v2 import LlamaAdapterV2Method
from tunesmith.methods.lora import LoraMethod
from tunesmith.methods.oft import BoftMethod, OftMethod
from tunesmith.methods.prompt_tuning import PrefixTuningMethod, PromptTuningMethod
from tunesmith.methods.qlora import QloraMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (FullMethod, FreezeMethod, LoraMethod, QloraMethod, Ia3Method,
                                                        OftMethod, BoftMethod, LlamaAdapterMethod, LlamaAdapterV2Method,
                                                        PromptTuningMethod, PrefixTuningMethod)}


def get_method(cfg: MethodConfig) -> Method:
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "Method", "get_method", "describe_counts", "parameter_counts"]
