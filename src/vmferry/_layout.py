"""Byte-exact on-disk structures declared once, packed and unpacked symmetrically.

Why not construct or cstruct: the core engine stays dependency-free, writers need ``pack`` as
much as readers need ``unpack``, and a type checker sees real dataclass fields.  A layout is
bytes only: validation belongs to the driver, which knows the file it came from.

    class VhdFooter(Layout, byteorder=">", size=512):
        cookie: bytes = raw(8)
        data_offset: int = u64()
        ...

Class creation fails unless the fields add up to ``size``, so a miscounted reserved field is a
crash at import, not a corrupt image in the field.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, Self


def _field(fmt: str, default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"fmt": fmt})


def u8(default: int = 0) -> Any:
    return _field("B", default)


def u16(default: int = 0) -> Any:
    return _field("H", default)


def u32(default: int = 0) -> Any:
    return _field("I", default)


def u64(default: int = 0) -> Any:
    return _field("Q", default)


def i64(default: int = 0) -> Any:
    return _field("q", default)


def raw(length: int, default: bytes | None = None) -> Any:
    value = bytes(length) if default is None else default.ljust(length, b"\0")
    return _field(f"{length}s", value)


class Layout:
    """Base for fixed-size structures; subclasses become dataclasses."""

    _struct: ClassVar[struct.Struct]
    size: ClassVar[int]

    def __init_subclass__(cls, *, byteorder: str = ">", size: int | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        dataclasses.dataclass(cls)
        fmt = byteorder + "".join(f.metadata["fmt"] for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        cls._struct = struct.Struct(fmt)
        if size is not None and cls._struct.size != size:
            raise TypeError(
                f"{cls.__name__}: fields add up to {cls._struct.size} bytes, not {size}"
            )
        cls.size = cls._struct.size

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Parse from ``buf``; the caller has already checked that enough bytes are there."""
        return cls(*cls._struct.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return self._struct.pack(*(getattr(self, f.name) for f in dataclasses.fields(self)))  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
