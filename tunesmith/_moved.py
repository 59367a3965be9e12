"""Old import paths, kept working for one release (0.2 drops them; ARCHITECTURE.md lists the new homes).

Importing an old path gives the module that now holds the code (the same module object, so monkeypatching
through either name patches both) and a DeprecationWarning naming the new path. A few modules were split;
their old path gives a module that re-exports the names they used to have.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "tunesmith.explain": "tunesmith.config.explain",
    "tunesmith.init_config": "tunesmith.planning.init_config",
    "tunesmith.device": "tunesmith.models.device",
    "tunesmith.training.attention": "tunesmith.models.attention",
    "tunesmith.training.batching": "tunesmith.data.batching",
    "tunesmith.training.loss": "tunesmith.stages.tokens",
    "tunesmith.training.galore": "tunesmith.optim.galore",
    "tunesmith.training.block_coordinate": "tunesmith.optim.block_coordinate",
    "tunesmith.training.checkpoint": "tunesmith.run.checkpoint",
    "tunesmith.training.metrics": "tunesmith.run.metrics",
    "tunesmith.generate": "tunesmith.inference.generate",
    "tunesmith.estimate": "tunesmith.planning.estimate",
    "tunesmith.doctor": "tunesmith.planning.doctor",
}

SPLIT = {  # old module -> {name: new module}
    "tunesmith.run_dir": {"is_run_dir": "tunesmith.run.run_dir", "read_run_config": "tunesmith.run.run_dir",
                          "write_json": "tunesmith.run.run_dir", "RunDir": "tunesmith.run.run_dir",
                          "Loaded": "tunesmith.inference.loading",
                          "load_for_inference": "tunesmith.inference.loading"},
    "tunesmith.evaluate": {"evaluate_file": "tunesmith.evaluation.evaluate",
                           "exact_match": "tunesmith.evaluation.evaluate", "mean_loss": "tunesmith.stages.tokens"},
    "tunesmith.bench": {"bench": "tunesmith.training.bench", "BenchResult": "tunesmith.planning.speed",
                        "known_speed": "tunesmith.planning.speed", "matmul_peak": "tunesmith.planning.speed",
                        "training_flops_per_token": "tunesmith.planning.speed",
                        "result_json": "tunesmith.planning.speed", "record": "tunesmith.planning.speed"},
    "tunesmith.preflight": {name: "tunesmith.planning.preflight" for name in (
        "check_before_training", "doctor_config", "assess", "this_machine", "plan_for", "model_shape",
        "Machine", "Speed", "training_speed", "estimate_command")},
    "tunesmith.training.optim": {"build_optimizer": "tunesmith.optim.build", "param_groups": "tunesmith.optim.groups",
                                 "build_scheduler": "tunesmith.optim.schedule",
                                 "lr_factor": "tunesmith.optim.schedule"},
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes in tunesmith 0.2", DeprecationWarning, stacklevel=3)


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED or name in SPLIT:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        if spec.name in MOVED:
            _warn(spec.name, MOVED[spec.name])
            return importlib.import_module(MOVED[spec.name])
        module = types.ModuleType(spec.name, f"Moved: {spec.name} (see tunesmith._moved)")
        for attr, home in SPLIT[spec.name].items():
            setattr(module, attr, getattr(importlib.import_module(home), attr))
        _warn(spec.name, ", ".join(sorted(set(SPLIT[spec.name].values()))))
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
