"""The README's tables of methods, stages, optimizers, export and data formats, written from the registries
themselves, so the front door cannot drift from the code. `python -m tunesmith.cli.registry_tables`
rewrites them in README.md; tests/test_registries.py fails when they differ."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tunesmith.data.formats import FORMATS as DATA_FORMATS
from tunesmith.methods import METHODS
from tunesmith.optim.registry import OPTIMIZERS
from tunesmith.stages import STAGES

BEGIN = "<!-- registry tables: python -m tunesmith.cli.registry_tables writes them -->"
END = "<!-- end of registry tables -->"


def _keys(prefix: str, names) -> str:
    return ", ".join(f"`{prefix}.{n}`" for n in names) or "none"


def _when(name: str, meaning: str) -> str:
    """The "Pick it ..." sentence of a stage's explanation: when to use it."""
    found = re.search(r"Pick it (.*?)[.;](?:\s|$)", " ".join(meaning.split()))
    if not found:
        raise ValueError(f"choices.stage.name.{name}: its meaning needs a 'Pick it ...' sentence (when to use it)")
    return found.group(1)[0].upper() + found.group(1)[1:]


def tables() -> str:
    from tunesmith.export import FORMATS as EXPORTS

    rows = ["| `method.name` | what it is | its own keys | exports |", "| --- | --- | --- | --- |"]
    for name, method in METHODS.items():
        exports = ", ".join(f for f, e in EXPORTS.items() if e.refuses(method) is None)
        rows.append(f"| `{name}` | {method.explanation()['label']} | {_keys('method', method.fields())} | {exports} |")
    rows += ["", "| `stage.name` | what it is | when to use it | data formats | its own keys |",
             "| --- | --- | --- | --- | --- |"]
    for name, stage in STAGES.items():
        rows.append(f"| `{name}` | {stage.explanation()['label']} | {_when(name, stage.explanation()['meaning'])} | "
                    f"{', '.join(stage.data_formats())} | {_keys('stage', stage.fields())} |")
    rows += ["", "| `optimizer.name` | what it is | methods | its own keys |", "| --- | --- | --- | --- |"]
    for name, opt in OPTIMIZERS.items():
        rows.append(f"| `{name}` | {opt.explanation()['label']} | {', '.join(opt.methods or ['all'])} | "
                    f"{_keys('optimizer', opt.fields())} |")
    rows += ["", "| `data.format` | what it is | stages |", "| --- | --- | --- |"]
    for name, fmt in DATA_FORMATS.items():
        rows.append(f"| `{name}` | {fmt.explanation()['label']} | {', '.join(fmt.stages)} |")
    rows += ["", "| `export --format` | what it is |", "| --- | --- |"]
    for name, fmt in EXPORTS.items():
        rows.append(f"| `{name}` | {fmt.explanation()['label']} |")
    return "\n".join(rows)


def block() -> str:
    return f"{BEGIN}\n{tables()}\n{END}"


def in_readme(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    return text[text.index(BEGIN):text.index(END) + len(END)]


if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    text = readme.read_text(encoding="utf-8")
    readme.write_text(text.replace(in_readme(readme), block()), encoding="utf-8")
    print(f"wrote the registry tables in {readme}")
