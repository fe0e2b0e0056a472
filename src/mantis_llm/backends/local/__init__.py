"""The local backend: Mantis in this process with transformers (``backend="local"``).

Importing this package imports neither torch nor transformers; they load with the model.
"""

from ._deps import INSTALL_HINT
from .backend import TransformersBackend

__all__ = ["TransformersBackend", "INSTALL_HINT"]
