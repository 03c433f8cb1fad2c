"""qiao.compiler — model in, artifact out.

Public API: ``export`` (PyTorch → ONNX), ``compile`` (model → ``Artifact``), ``load`` (directory →
``Artifact``), ``validate`` (artifact vs ONNX Runtime / PyTorch), and the ``QiaoError`` family.
Heavy imports (TVM, torch) happen inside the functions, so ``import qiao.compiler`` stays fast.
"""

from qiao.compiler.driver import Artifact, __version__, compile, load
from qiao.compiler.errors import (
    ArtifactCorrupt,
    CompileError,
    InputMismatch,
    InvalidModel,
    QiaoError,
    ToolchainMissing,
    UnknownModel,
    UnknownTarget,
    UnsupportedOps,
    ValidationMismatch,
)
from qiao.compiler.export import export


def validate(*args, **kwargs):
    """See ``qiao.compiler.validate.validate``."""
    from qiao.compiler.validate import validate as _validate

    return _validate(*args, **kwargs)


__all__ = [
    "Artifact",
    "ArtifactCorrupt",
    "CompileError",
    "InputMismatch",
    "InvalidModel",
    "QiaoError",
    "ToolchainMissing",
    "UnknownModel",
    "UnknownTarget",
    "UnsupportedOps",
    "ValidationMismatch",
    "__version__",
    "compile",
    "export",
    "load",
    "validate",
]
