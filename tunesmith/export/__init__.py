"""Ship a run: merged weights or a PEFT adapter (one registry entry per format, export/formats.py)."""

from tunesmith.export.formats import FORMATS, ExportFormat, export_run

__all__ = ["FORMATS", "ExportFormat", "export_run"]
