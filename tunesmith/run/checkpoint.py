"""Checkpoints that survive: complete or absent, verifiable, and enough to continue a run exactly.

checkpoints/step-000120/
  adapter_model.safetensors | model.safetensors | trainable.safetensors   what the method trains
  stage_modules.safetensors                   what the stage trains itself, if anything (rm's scalar head, ppo's value head)
  stage_state.json                            what an online stage carries between steps (ppo's sampled batch)
  optimizer.safetensors + optimizer.json      AdamW moments (tensors) and param groups (JSON)
  rng.safetensors                             torch (and CUDA) generator states
  trainer_state.json                          step, data position, scheduler, Python/NumPy RNG, fingerprint
  config.yaml                                 the resolved config of the run
  manifest.json                               size and sha256 of every file above; written last

A checkpoint is written into `.tmp-step-N/` and renamed only once the manifest is on disk, so a crash or
`kill -9` leaves either a whole checkpoint or a temporary directory that is ignored. Nothing here uses
pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.run.run_dir import RunDir, write_json

MANIFEST = "manifest.json"
STATE = "trainer_state.json"


class CheckpointError(TunesmithError):
    """A checkpoint that cannot be used (incomplete, corrupt, or from an incompatible run)."""


# --------------------------------------------------------------------------- hashing and the manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST)):
        with path.open("rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the manifest says they are
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "complete": True, "files": files}, indent=1), encoding="utf-8")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST)


def problems(directory: Path) -> list[str]:
    """Why a checkpoint directory cannot be trusted; empty when it is complete and intact."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return ["no manifest.json (the save did not finish)"]
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        files = info["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return ["manifest.json is unreadable"]
    found = []
    for name, meta in files.items():
        path = directory / name
        if not path.exists():
            found.append(f"{name} is missing")
        elif path.stat().st_size != meta["bytes"]:
            found.append(f"{name} has {path.stat().st_size} bytes, expected {meta['bytes']} (truncated?)")
        elif sha256_file(path) != meta["sha256"]:
            found.append(f"{name} does not match its checksum")
    return found


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """step-* directories with a manifest, oldest first (cheap: no checksums)."""
    root = RunDir(run_dir).checkpoints
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).exists()) if root.exists() else []


def find_checkpoint(run_dir: Path, name: str | None = None) -> Path:
    """The named checkpoint (an error if it is damaged) or the newest intact one (damaged ones are skipped)."""
    root = RunDir(run_dir).checkpoints
    if name:
        path = root / name if not Path(name).is_absolute() else Path(name)
        if not path.is_dir():
            available = ", ".join(p.name for p in complete_checkpoints(run_dir)) or "none"
            raise CheckpointError(f"checkpoint {path} does not exist (complete checkpoints: {available})")
        found = problems(path)
        if found:
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(found)}")
        return path
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.exists() else []
    for path in candidates:
        found = problems(path)
        if not found:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {'; '.join(found)}", stacklevel=2)
    raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from "
                          "(start again without --resume, with --overwrite to replace the run)")


# --------------------------------------------------------------------------- optimizer and RNG state


PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type", "verbose")


def _is_projector(value: Any) -> bool:
    # galore_torch is optional: no import to save (ours subclass its projector)
    return any(cls.__name__ == "GaLoreProjector" for cls in type(value).__mro__)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to safetensors, everything else to JSON. Containers are flattened with a marker each: a nested
    slot (bitsandbytes keeps its quantized state in one dict per parameter) as idx.slot.key, a list holding
    tensors as idx.slot.0, idx.slot.1, and GaLore's projector (an object) as its settings plus its basis
    (idx.projector.ortho_matrix: a tensor, or a list of two for proj_type full)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    seen: set[int] = set()

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous().cpu()
            ptr = value.untyped_storage().data_ptr()
            tensors[prefix] = value.clone() if ptr in seen else value  # bitsandbytes shares its code books
            seen.add(ptr)
        elif _is_projector(value):
            basis = value.ortho_matrix
            strides = [list(m.stride()) for m in basis] if isinstance(basis, list) else (
                list(basis.stride()) if isinstance(basis, torch.Tensor) else None)
            scalars[prefix] = {"__nested__": ["ortho_matrix"], "strides": strides,
                               "__galore_projector__": {key: getattr(value, key) for key in PROJECTOR_FIELDS}}
            put(f"{prefix}.ortho_matrix", basis)
        elif isinstance(value, dict):
            scalars[prefix] = {"__nested__": sorted(value)}
            for key, inner in value.items():
                put(f"{prefix}.{key}", inner)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            scalars[prefix] = {"__list__": len(value)}
            for i, inner in enumerate(value):
                put(f"{prefix}.{i}", inner)
        else:
            scalars[prefix] = value

    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            put(f"{idx}.{key}", value)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _strided(tensor: torch.Tensor, strides: list[int] | None) -> torch.Tensor:
    """`tensor` laid out in memory with `strides` (safetensors stores it contiguous)."""
    if strides is None or list(tensor.stride()) == strides:
        return tensor
    return torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def _basis(ortho_matrix: Any, strides: Any) -> Any:
    """GaLore's basis in the memory layout the SVD gave it: a matrix product reads a transposed layout in
    another order, and the resumed run would differ in the last bits."""
    if isinstance(ortho_matrix, list):
        return [_strided(m, st) for m, st in zip(ortho_matrix, strides or [None] * len(ortho_matrix))]
    if isinstance(ortho_matrix, torch.Tensor):
        return _strided(ortho_matrix, strides)
    return ortho_matrix


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          projector_from_state: Callable[[dict, Any], Any] | None = None) -> dict[str, Any]:
    """The state dict back; GaLore's projectors are rebuilt by the optimizer's `projector_from_state` hook
    (settings, basis), so this module needs no optimizer package."""
    flat: dict[str, Any] = {**tensors, **meta["scalars"]}
    containers = {key for key, value in flat.items()
                  if isinstance(value, dict) and ("__nested__" in value or "__list__" in value)}

    def get(prefix: str) -> Any:
        if prefix not in containers:
            return flat[prefix]
        marker = flat[prefix]
        if "__list__" in marker:
            return [get(f"{prefix}.{i}") for i in range(marker["__list__"])]
        inner = {key: get(f"{prefix}.{key}") for key in marker["__nested__"]}
        if "__galore_projector__" in marker:
            if projector_from_state is None:
                raise CheckpointError("this checkpoint holds GaLore projectors and optimizer.name is not a "
                                      "galore optimizer")
            return projector_from_state(marker["__galore_projector__"],
                                        _basis(inner["ortho_matrix"], marker.get("strides")))
        return inner

    state: dict[int, dict[str, Any]] = {}
    for prefix in flat:
        if prefix.rsplit(".", 1)[0] in containers:
            continue  # read with its container
        idx, key = prefix.split(".", 1)
        state.setdefault(int(idx), {})[key] = get(prefix)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- save and load


BEST = "best.json"
"""checkpoints/best.json: which checkpoint is the best by checkpoint.best_by (rotation keeps it)."""


def best_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """{checkpoint, step, metric, value} of the best checkpoint, or None (none recorded, or it is gone)."""
    path = RunDir(run_dir).checkpoints / BEST
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return best if (path.parent / best.get("checkpoint", "")).is_dir() else None


def mark_best(run_dir: Path, checkpoint: Path, metric: str, value: float, keep_last: int) -> None:
    """Record `checkpoint` as the best, then drop the previous best if rotation no longer keeps it."""
    write_json(RunDir(run_dir).checkpoints / BEST, {"checkpoint": checkpoint.name, "step": read_state(checkpoint)["step"],
                                                    "metric": metric, "value": value})
    prune(run_dir, keep_last)


def prune(run_dir: Path, keep_last: int, newest: Path | None = None) -> None:
    """Drop complete checkpoints beyond the newest `keep_last`, sparing the best one."""
    best = best_checkpoint(run_dir)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != newest and (best is None or old.name != best["checkpoint"]):
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, method, model, optimizer, scheduler, trainer_state: dict[str, Any],
                    keep_last: int, stage=None) -> Path:
    """Write a complete checkpoint or none; then drop the oldest beyond `keep_last` (never the best one, see
    mark_best). `stage` saves the modules it trains itself (rm's head), if any."""
    root = RunDir(run_dir).checkpoints
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        method.save(model, tmp)
        if stage is not None:
            stage.save(tmp)
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        shutil.copy2(RunDir(run_dir).config, tmp / "config.yaml")
        write_manifest(tmp, step)
        if final.exists():  # a damaged leftover with the same step: the new one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in complete_checkpoints(run_dir)]
        why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(
            f"could not write the checkpoint for step {step} in {root}: {why}. "
            f"{'The previous checkpoint ' + previous[-1] + ' is intact' if previous else 'No earlier checkpoint exists'}; "
            "free some space (or lower checkpoint.keep_last) and resume with --resume."
        ) from None
    prune(run_dir, keep_last, final)  # only after the new one is complete
    return final


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def _tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad headers
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None


def load_checkpoint(path: Path, state: dict[str, Any], method, model, optimizer, scheduler, stage=None) -> None:
    """Put weights, optimizer, scheduler and RNG back as they were (`state` is `read_state(path)`)."""
    for f in path.glob("*.safetensors"):  # check every header before touching the model
        with f.open("rb") as handle:
            header = handle.read(8)
        if len(header) < 8 or int.from_bytes(header, "little") > min(f.stat().st_size, 100 << 20):
            raise CheckpointError(f"{f} is not a valid safetensors file (bad header)")
    method.restore(model, path)
    if stage is not None:
        stage.restore(path)
    device = str(next(model.parameters()).device)
    opt = _optimizer_from_files(_tensors(path / "optimizer.safetensors", device),
                                json.loads((path / "optimizer.json").read_text(encoding="utf-8")),
                                getattr(optimizer, "projector_from_state", None))
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(_tensors(path / "rng.safetensors"), state["rng"])


def clean_temporary(run_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash (they were never renamed, so nothing refers to them)."""
    root = RunDir(run_dir).checkpoints
    for tmp in root.glob(".tmp-step-*") if root.exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- may this run be resumed?


def fingerprint(cfg, data_hashes: dict[str, str | None]) -> dict[str, Any]:
    """What must not change between a run and its resumption, or the result is no longer the same run."""
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "method": cfg.method.model_dump(mode="json"),
        "stage.name": cfg.stage.name,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "optimizer.name": cfg.optimizer.name,
        **optimizer_settings(cfg.optimizer),
        "train.seed": cfg.train.seed,
        "train.group_by_length": cfg.train.group_by_length,
        "data.seed": cfg.data.seed,
        "data.max_seq_length": cfg.data.max_seq_length,
        "data.template": cfg.data.template,
        **{f"data.{k} (sha256)": v for k, v in data_hashes.items()},
    }


def optimizer_settings(section) -> dict[str, Any]:
    """The settings of GaLore or BAdam, which decide what the optimizer state means (none for the others, so
    checkpoints from before these optimizers still resume)."""
    if not section.state_settings:
        return {}
    return {f"optimizer.{key}": value for key, value in section.model_dump(mode="json").items() if key != "name"}


def _renamed(saved: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint written before the optimizer had a section names its keys train.optimizer, train.galore_rank."""
    from tunesmith.config.schema import OPTIMIZER_SECTIONS

    flat = {f"train.{old}": f"optimizer.{new}" for c in OPTIMIZER_SECTIONS.values() for old, new in c.flat_keys.items()}
    flat["train.optimizer"] = "optimizer.name"
    return {flat.get(key, key): value for key, value in saved.items()}


def check_resumable(saved: dict[str, Any], current: dict[str, Any], force: bool) -> list[str]:
    """The fields that changed; an error unless `force`, in which case they are returned as warnings."""
    # Checkpoints from before the optimizer and the stage were choices trained with adamw, as sft.
    saved = {"optimizer.name": "adamw", "stage.name": "sft", **_renamed(saved)}
    if isinstance(saved.get("method"), dict) and isinstance(current.get("method"), dict):
        # Before each method had a section of its own, every method's keys were saved: compare this method's.
        saved["method"] = {key: saved["method"].get(key) for key in current["method"]}
    changed = [f"{key}: was {saved.get(key)!r}, now {current.get(key)!r}"
               for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if changed and not force:
        raise CheckpointError("cannot resume: the run has changed since the checkpoint:\n  " + "\n  ".join(changed)
                              + "\nResuming would not continue the same run. Restore the old setting, start a new "
                              "run, or pass --force to resume anyway.")
    return changed
