"""Ship a run: merged weights or a PEFT adapter."""

from tunesmith.export.merged import export_run

__all__ = ["export_run"]
