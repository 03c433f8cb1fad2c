"""``qiao.backends.binfmt`` on a CPU artifact, so the readers the GPU tests rely on are checked on
any machine (the CUDA/ROCm tests that use them need nvcc or ld.lld): ELF headers, symbols and symbol
offsets against binutils' ``readelf``, and TVM's packed-imports blob read back byte for byte."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from qiao.backends.binfmt import (
    LIBRARY_BLOB_SYMBOL,
    PackedImports,
    elf_symbol_offset,
    read_elf,
    read_library_imports,
)
from qiao.compiler.testing import has_command

needs_readelf = pytest.mark.skipif(not has_command("readelf"), reason="binutils not installed")
EM_BY_NAME = {"X86-64": 62, "AArch64": 183}  # e_machine values of the ELF specification


@pytest.fixture(scope="module")
def library(compiled_builtin):
    art = compiled_builtin("mlp")
    return os.path.join(art.directory, art.manifest["backend"]["library"])


def _readelf(*args) -> str:
    return subprocess.run(
        ["readelf", "-W", *args], capture_output=True, text=True, check=True
    ).stdout


@needs_readelf
def test_elf_header_and_functions_agree_with_readelf(library):
    with open(library, "rb") as f:
        info = read_elf(f.read())
    (machine,) = re.findall(r"Machine:\s+(.*)", _readelf("-h", library))
    assert info.machine == next(v for k, v in EM_BY_NAME.items() if k in machine), machine
    defined = set()
    for line in _readelf("-s", library).splitlines():
        cols = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(cols) >= 8 and cols[3] == "FUNC" and cols[6] != "UND":
            defined.add(cols[7].split("@")[0])
    assert defined and set(info.functions) == defined


@needs_readelf
def test_symbol_offset_agrees_with_readelf_sections(library):
    with open(library, "rb") as f:
        data = f.read()
    rows = [
        line.split()
        for line in _readelf("-s", library).splitlines()
        if line.split()[-1:] == [LIBRARY_BLOB_SYMBOL]
    ]
    value, ndx = int(rows[0][1], 16), int(rows[0][6])
    sections = {}
    for line in _readelf("-S", library).splitlines():
        m = re.match(r"\s*\[\s*(\d+)\]\s+\S+\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m:
            sections[int(m.group(1))] = (int(m.group(2), 16), int(m.group(3), 16))
    address, offset = sections[ndx]
    assert elf_symbol_offset(data, LIBRARY_BLOB_SYMBOL) == offset + value - address


def test_packed_imports_read_back_byte_for_byte(library):
    imports = read_library_imports(library)
    kinds = [kind for kind, _ in imports.modules]
    assert kinds[0] == "relax.VMExecutable" and "_lib" in kinds
    with open(library, "rb") as f:
        data = f.read()
    start = elf_symbol_offset(data, LIBRARY_BLOB_SYMBOL)
    blob = data[start : start + 8 + int.from_bytes(data[start : start + 8], "little")]
    assert PackedImports.parse(blob).to_bytes() == blob


def test_truncated_blob_is_refused():
    with pytest.raises(ValueError, match="bytes"):
        PackedImports.parse((100).to_bytes(8, "little") + b"\0" * 16)
