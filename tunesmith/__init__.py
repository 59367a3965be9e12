"""tunesmith: fine-tune open language models on your own data.

The package by layer (an upper layer imports only lower ones; ARCHITECTURE.md):
cli, demo · evaluation, export · training, inference · planning · stages, methods, optim · data · models · run ·
config
"""

__version__ = "0.1.0"

from tunesmith import _moved  # noqa: E402  (old import paths keep working for one release)

_moved.install()
