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

# Bound after the submodule of the same name is imported, so ``qiao.compiler.validate`` stays the
# function (a lazy wrapper would be replaced by the module the first time anything imports it).
from qiao.compiler.validate import validate  # noqa: E402

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
