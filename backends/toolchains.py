"""Finding the external tools qiao's backends call (linkers, vendor compilers).

Every probe answers ``None`` when the tool is absent: backends turn that into an ``Availability``
or a ``ToolchainMissing`` error naming what to install.
"""

from __future__ import annotations

import glob
import os
import shutil


def find_lld() -> str | None:
    """An ``ld.lld`` (links AMDGPU code objects and cross-compiled CPU libraries): versioned
    Debian names, plain ``ld.lld``, LLVM or ROCm installs. ``None`` if there is none."""
    names = []
    try:
        import tvm

        major = tvm.target.codegen.llvm_version_major(allow_none=True)
        if major:
            names.append(f"ld.lld-{major}")
    except Exception:
        pass
    names += ["ld.lld"] + [f"ld.lld-{v}" for v in range(30, 14, -1)]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    rocm = os.environ.get("ROCM_PATH", "/opt/rocm")
    candidates = [f"{rocm}/llvm/bin/ld.lld"] + sorted(
        glob.glob("/usr/lib/llvm-*/bin/ld.lld"), reverse=True
    )
    return next((c for c in candidates if os.access(c, os.X_OK)), None)
