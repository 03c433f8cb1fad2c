"""qiao.backends — one file per target behind the ``Backend`` interface (see ``base.py``).

Backends are discovered lazily through the ``qiao.backends`` entry-point group (``registry.py``).
"""

from qiao.backends.base import Availability, Backend, DevicePreset, Phase, Runner
from qiao.backends.registry import backend_for_kind, discover, get_backend, list_backends
from qiao.backends.tvm_backend import TVMRunner

__all__ = [
    "backend_for_kind",
    "Availability",
    "Backend",
    "DevicePreset",
    "Phase",
    "Runner",
    "TVMRunner",
    "discover",
    "get_backend",
    "list_backends",
]
