"""The command line: each verb parses its arguments, calls one library function and prints."""

from tunesmith.cli.app import app, main

__all__ = ["app", "main"]
