"""Base models: where they come from (short names, local directories, GGUF files, hub ids), loading them,
the device and precision they run in, and the attention that keeps packed examples apart."""

from tunesmith.models.loading import (SHORT_NAMES, ModelSource, cache_dir, ensure_short_name, load_causal_lm,
                                      load_tokenizer, resolve)

__all__ = ["SHORT_NAMES", "ModelSource", "cache_dir", "ensure_short_name", "load_causal_lm", "load_tokenizer",
           "resolve"]
