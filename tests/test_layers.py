"""The package's shape: layers import only downward (import-linter's contract in pyproject.toml), no module
imports itself back through others, and the old import paths of 0.1 still work for one release."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                           "sys.argv = ['lint-imports', '--no-cache']; sys.exit(lint_imports_command())"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_layer_contract_holds():
    done = lint_imports(ROOT)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout + done.stderr


def test_the_layer_contract_catches_an_upward_import(tmp_path):
    """The same contract on a copy of the package with one upward import (config -> training) must fail."""
    shutil.copytree(ROOT / "tunesmith", tmp_path / "tunesmith", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "tunesmith" / "config" / "upward.py").write_text("from tunesmith.training.loop import train\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "tunesmith.config.upward -> tunesmith.training.loop" in done.stdout, done.stdout


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("tunesmith")
    assert len(graph.modules) > 50  # the package itself, not an empty graph
    cycles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("old, name, new", [
    ("tunesmith.run_dir", "load_for_inference", "tunesmith.inference.loading"),
    ("tunesmith.run_dir", "read_run_config", "tunesmith.run.run_dir"),
    ("tunesmith.training.checkpoint", "find_checkpoint", "tunesmith.run.checkpoint"),
    ("tunesmith.training.loss", "token_loss_sum", "tunesmith.stages.tokens"),
    ("tunesmith.training.optim", "build_optimizer", "tunesmith.optim.build"),
    ("tunesmith.evaluate", "mean_loss", "tunesmith.stages.tokens"),
    ("tunesmith.generate", "generate_batch", "tunesmith.inference.generate"),
    ("tunesmith.bench", "bench", "tunesmith.training.bench"),
    ("tunesmith.preflight", "check_before_training", "tunesmith.planning.preflight"),
    ("tunesmith.estimate", "estimate_memory", "tunesmith.planning.estimate"),
    ("tunesmith.device", "pick_device", "tunesmith.models.device"),
])
def test_old_import_paths_still_work_with_a_warning(old, name, new):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_the_public_api_keeps_its_names():
    from tunesmith.cli import main  # noqa: F401  (the console script's entry point)
    from tunesmith.config import Config, load_config  # noqa: F401
    from tunesmith.export import export_run  # noqa: F401
    from tunesmith.inference.generate import generate_batch  # noqa: F401
    from tunesmith.inference.loading import load_for_inference  # noqa: F401
    from tunesmith.models import load_causal_lm, resolve  # noqa: F401
    from tunesmith.training.loop import train  # noqa: F401
