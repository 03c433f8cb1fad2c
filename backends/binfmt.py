"""Binary formats qiao reads and rewrites without a GPU or a vendor tool: TVM's packed-imports blob
(the modules an exported library embeds), TVM's serialized CUDA/ROCm device module, 64-bit ELF
headers and symbols (host libraries, cubins, AMDGPU code objects) and NVIDIA fatbin containers.

Pure Python on bytes (no TVM import): ``GPUBackend.export`` uses the packed-imports and
device-module codecs to replace the device code TVM generated, and tests use the readers to look
inside an artifact on a machine without a GPU."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from qiao.compiler.errors import ArtifactCorrupt

# -- the library's packed imports ------------------------------------------------------------------
# TVM serializes every imported module (VM executable, host code, device code) into one blob, the
# symbol ``__tvm_ffi__library_bin`` of the exported library: u64 payload size, the import tree in
# CSR form (two u64 vectors), then per module its kind (u64 length + bytes) and, except for the
# host library itself (kind "_lib"), its serialized bytes (u64 length + bytes).
LIBRARY_BLOB_SYMBOL = "__tvm_ffi__library_bin"


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise ValueError("truncated data")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated data")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def string(self) -> bytes:
        return self.raw(self.u64())

    def u64s(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _pack_str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


@dataclass
class PackedImports:
    """The decoded ``__tvm_ffi__library_bin``: import tree plus ``(kind, bytes)`` per module."""

    row_ptr: list[int]
    child_indices: list[int]
    modules: list[tuple[str, bytes | None]] = field(default_factory=list)

    @classmethod
    def parse(cls, blob: bytes) -> PackedImports:
        r = _Reader(blob)
        size = r.u64()
        if size + 8 != len(blob):
            raise ValueError(f"packed imports say {size} bytes, blob holds {len(blob) - 8}")
        out = cls(r.u64s(), r.u64s())
        while r.pos < len(blob):
            kind = r.string().decode()
            out.modules.append((kind, None if kind == "_lib" else r.string()))
        return out

    def to_bytes(self) -> bytes:
        body = b"".join(
            struct.pack("<Q", len(v)) + b"".join(struct.pack("<Q", x) for x in v)
            for v in (self.row_ptr, self.child_indices)
        )
        for kind, payload in self.modules:
            body += _pack_str(kind.encode())
            if payload is not None:
                body += _pack_str(payload)
        return struct.pack("<Q", len(body)) + body


def read_library_imports(library_path: str) -> PackedImports:
    """Decode the packed imports of an exported library without loading it (no device needed)."""
    with open(library_path, "rb") as f:
        data = f.read()
    try:
        start = elf_symbol_offset(data, LIBRARY_BLOB_SYMBOL)
        (size,) = struct.unpack_from("<Q", data, start)
        return PackedImports.parse(data[start : start + 8 + size])
    except (ValueError, struct.error) as err:
        raise ArtifactCorrupt(
            f"{library_path}: cannot read TVM's packed modules ({err}). fix: recompile the model"
        ) from err


# -- the device module's own layout ----------------------------------------------------------------
@dataclass
class DeviceModule:
    """A serialized TVM CUDA/ROCm module: format, function table, code, and any trailing fields.

    Layout: format string (``cuda``/``ptx``/``cubin``/``fatbin``/``hsaco``; newer TVM prefixes a
    ``cuda.module.v1`` tag), then ``Map<str, FunctionInfo>``, then the code, then (versioned layout
    only) a source map kept verbatim in ``tail``.
    """

    fmt: str
    functions: bytes  # the function table, kept as serialized
    code: bytes
    tail: bytes = b""
    version_tag: bytes = b""

    @classmethod
    def parse(cls, payload: bytes) -> DeviceModule:
        r = _Reader(payload)
        fmt = r.string()
        tag = b""
        if fmt.endswith(b".module.v1"):
            tag, fmt = fmt, r.string()
        start = r.pos
        for _ in range(r.u64()):  # FunctionInfo: name, arg dtypes, launch tags, arg extra tags
            r.string()
            r.string()
            r.raw(4 * r.u64())
            for _ in range(r.u64()):
                r.string()
            r.raw(4 * r.u64())
        functions = payload[start : r.pos]
        code = r.string()
        tail = payload[r.pos :]
        if tail and not tag:
            raise ValueError(f"{len(tail)} unexpected bytes after the device code")
        return cls(fmt.decode(), functions, code, tail, tag)

    def to_bytes(self) -> bytes:
        head = _pack_str(self.version_tag) if self.version_tag else b""
        return (
            head + _pack_str(self.fmt.encode()) + self.functions + _pack_str(self.code) + self.tail
        )

    def kernel_names(self) -> list[str]:
        r = _Reader(self.functions)
        names = []
        for _ in range(r.u64()):
            names.append(r.string().decode())
            r.string()
            r.raw(4 * r.u64())
            for _ in range(r.u64()):
                r.string()
            r.raw(4 * r.u64())
        return names


# -- ELF -------------------------------------------------------------------------------------------
EM_CUDA = 190
EM_AMDGPU = 224


@dataclass(frozen=True)
class ElfInfo:
    """Header fields and defined function symbols of a 64-bit little-endian ELF file."""

    machine: int
    os_abi: int
    abi_version: int
    flags: int
    functions: tuple[str, ...]


def _elf_sections(data: bytes) -> list[tuple]:
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ValueError("only 64-bit little-endian ELF is supported")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]


def _elf_symbols(data: bytes, sections: list[tuple]) -> Iterator[tuple[str, int, int, int, int]]:
    """Yield ``(name, info, shndx, value, size)`` for every symbol in .symtab and .dynsym."""
    for sh in sections:
        if sh[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from(
                "<IBBHQQ", data, off
            )
            start = strtab[4] + st_name
            name = data[start : data.index(b"\0", start)].decode(errors="replace")
            yield name, st_info, st_shndx, st_value, st_size


def check_elf_extents(path: str) -> None:
    """Refuse a 64-bit little-endian ELF file whose headers, segments or sections reach past its
    end (a truncated library): the dynamic loader maps such a file and dies of SIGBUS touching the
    missing pages, so it must never reach ``dlopen``. Raises ``ArtifactCorrupt``."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        header = f.read(64)

        def table(offset: int, count: int, entsize: int, fmt: str) -> list[tuple]:
            if count and (entsize < struct.calcsize(fmt) or offset + count * entsize > size):
                raise ValueError("header table past the end of the file")
            f.seek(offset)
            raw = f.read(count * entsize)
            return [struct.unpack_from(fmt, raw, i * entsize) for i in range(count)]

        try:
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4:6] != b"\x02\x01":
                raise ValueError("not a 64-bit little-endian ELF file")
            phoff, shoff = struct.unpack_from("<QQ", header, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", header, 0x36)
            # (type, flags, offset, vaddr, paddr, filesz, memsz, align)
            for ph in table(phoff, phnum, phentsize, "<IIQQQQQQ"):
                if ph[2] + ph[5] > size:
                    raise ValueError(f"a segment ends at byte {ph[2] + ph[5]}")
            for sh in table(shoff, shnum, shentsize, "<IIQQQQIIQQ"):
                if sh[1] != 8 and sh[4] + sh[5] > size:  # SHT_NOBITS occupies no file bytes
                    raise ValueError(f"a section ends at byte {sh[4] + sh[5]}")
        except (ValueError, struct.error) as err:
            raise ArtifactCorrupt(
                f"{path} is not a complete shared library ({err}; the file has {size} bytes); "
                "refused before loading it. fix: recompile the model"
            ) from err


def read_elf(data: bytes) -> ElfInfo:
    """Machine, OS ABI, flags and defined function names (``STT_FUNC``) of an ELF file."""
    sections = _elf_sections(data)
    (machine,) = struct.unpack_from("<H", data, 18)
    (flags,) = struct.unpack_from("<I", data, 0x30)
    functions = sorted(
        {
            name
            for name, info, shndx, *_ in _elf_symbols(data, sections)
            if info & 0xF == 2 and shndx
        }
    )
    return ElfInfo(machine, data[7], data[8], flags, tuple(functions))


def elf_symbol_offset(data: bytes, symbol: str) -> int:
    """File offset of a defined symbol's bytes (through the section that holds its address)."""
    sections = _elf_sections(data)
    for name, _, shndx, value, _ in _elf_symbols(data, sections):
        if name == symbol and 0 < shndx < len(sections):
            sec = sections[shndx]
            return sec[4] + (value - sec[3])
    raise ValueError(f"symbol {symbol} not found")


# -- looking inside a fatbin without cuobjdump -----------------------------------------------------
FATBIN_MAGIC = 0xBA55ED50


@dataclass(frozen=True)
class FatbinEntry:
    """One image in a fatbin: ``kind`` is ``"elf"`` (SASS cubin) or ``"ptx"``; ``arch`` e.g. 90."""

    kind: str
    arch: int
    compressed: bool
    payload: bytes


def fatbin_entries(data: bytes) -> list[FatbinEntry]:
    """Split a fatbin into its images.

    Container layout as nvcc writes it: a 16-byte header (magic, version, header size, payload
    size), then per image a header with kind, header size, payload size, arch at +28, flags at +40,
    and the size before compression at +56 when compressed, followed by the image.
    """
    magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError("not a fatbin")
    entries, pos, end = [], header_size, header_size + fat_size
    while pos < end:
        kind, _, entry_header, payload_size = struct.unpack_from("<HHIQ", data, pos)
        (arch,) = struct.unpack_from("<I", data, pos + 28)
        (flags,) = struct.unpack_from("<Q", data, pos + 40)
        (uncompressed,) = struct.unpack_from("<Q", data, pos + 56) if entry_header >= 64 else (0,)
        payload = data[pos + entry_header : pos + entry_header + payload_size]
        entries.append(
            FatbinEntry(
                {1: "ptx", 2: "elf"}.get(kind, str(kind)),
                arch,
                bool(uncompressed) or bool(flags & 0xA000),
                payload,
            )
        )
        pos += entry_header + payload_size
    return entries


def cubin_arch(e_flags: int, abi_version: int) -> int:
    """The SM number a cubin is for, from its ELF header (CUDA 12.8+ ABI moved it to bits 8-15)."""
    return (e_flags >> 8) & 0xFF if abi_version >= 8 else e_flags & 0xFF
