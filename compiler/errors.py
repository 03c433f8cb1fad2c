"""qiao's error hierarchy.

Library code raises these with the fix in the message; only the CLI prints them and picks the exit
code.
"""

from __future__ import annotations


class QiaoError(Exception):
    """Root of every error qiao raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InvalidModel(QiaoError):
    """The model file is not a readable ONNX model (not ONNX, truncated, fails the checker)."""


class UnsupportedOps(QiaoError):
    """The model uses operators qiao cannot lower. ``ops`` maps op type to node names."""

    def __init__(self, ops: dict[str, list[str]]):
        self.ops = ops
        lines = [
            f"  {op_type}: {len(nodes)} node(s), e.g. {', '.join(repr(n) for n in nodes[:3])}"
            for op_type, nodes in sorted(ops.items())
        ]
        super().__init__(
            f"the model uses {len(ops)} unsupported operator type(s):\n"
            + "\n".join(lines)
            + "\nfix: re-export the model without these operators (e.g. a different opset), or "
            "add a converter in qiao.compiler.frontend"
        )


class UnknownTarget(QiaoError):
    """A target or device preset name that no backend provides."""


class UnknownModel(QiaoError):
    """A built-in model name that does not exist and is not a file."""


class ToolchainMissing(QiaoError):
    """A compiler, driver or device the backend needs is not installed here."""


class InputMismatch(QiaoError):
    """Run-time inputs do not match the artifact's manifest (missing, wrong shape or dtype)."""


class ArtifactCorrupt(QiaoError):
    """An artifact directory is incomplete, modified or of an unknown format version."""


class ArtifactIncompatible(QiaoError):
    """An intact artifact built for a machine this one is not (CPU features, architecture)."""


class CompileError(QiaoError):
    """Compilation failed inside TVM or a vendor toolchain."""


class ValidationMismatch(QiaoError):
    """Outputs differ from the references beyond tolerance."""

    exit_code = 1
