"""A guest's kernel-module tree as kmod sees it: depmod's text indexes, module metadata, and
kmod's binary index format, all read and written in Python.

Why: to add a storage driver to an initramfs offline, vmferry needs the driver's dependency
closure (``modules.dep``, ``modules.softdep``), proof that each module file belongs to the
kernel (the ``vermagic`` in its ``.modinfo`` ELF section), and the indexes kmod's ``modprobe``
consults inside the initramfs.  kmod reads only the binary ``*.bin`` indexes for dependencies,
aliases and symbols, so those are written too (:func:`write_index`), never by running depmod.

The binary format (kmod's ``libkmod-index``): big-endian 32-bit magic ``0xB007F457``, version
``0x00020001`` and root offset, then nodes of a path-compressed trie.  A node offset carries
flags in its top nibble: prefix present (a NUL-terminated string), children present (first and
last child character, then one offset per character in that range, 0 for none), values present
(a count, then per value a priority and a NUL-terminated string, sorted by priority).
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from vmferry.errors import GuestError
from vmferry.guest.errors import CorruptGuestError, GuestLimitError
from vmferry.guest.linux.initramfs import MODULE_SUFFIXES, module_name

try:
    import zstandard as _zstd
except ImportError:  # optional: .ko.zst modules are then refused by name
    _zstd = None

INDEX_MAGIC = 0xB007F457
INDEX_VERSION = 0x00020001
NODE_PREFIX = 0x80000000
NODE_VALUES = 0x40000000
NODE_CHILDS = 0x20000000
NODE_MASK = 0x0FFFFFFF
MAX_KEY = 4096
MAX_MODULE = 64 << 20  # decompressed size of one .ko


class DriverInjectionError(GuestError):
    """The guest's module tree cannot supply a driver (missing file, wrong kernel, ...)."""


# --- names ------------------------------------------------------------------------------------


def normalize_alias(alias: str) -> str:
    """Dashes → underscores outside ``[...]`` ranges, as kmod keys its alias index."""
    out = []
    depth = 0
    for ch in alias:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        out.append("_" if ch == "-" and not depth else ch)
    return "".join(out)


# --- binary index -----------------------------------------------------------------------------


class _Node:
    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.values: list[tuple[int, int, str]] = []  # priority, insertion order, value


def write_index(items: Iterable[tuple[str, str, int]]) -> bytes:
    """kmod's binary index of ``(key, value, priority)`` items (repeats kept, as depmod does)."""
    root = _Node()
    for n, (key, value, priority) in enumerate(items):
        for s in (key, value):
            if "\0" in s or not s.isascii():
                raise GuestLimitError(f"kmod index entry {s[:60]!r} is not plain ASCII")
        if len(key) > MAX_KEY or len(value) > MAX_KEY:
            raise GuestLimitError(f"kmod index key or value over {MAX_KEY} bytes")
        node = root
        for ch in key:
            node = node.children.setdefault(ch, _Node())
        node.values.append((priority & 0xFFFFFFFF, n, value))
    out = bytearray(struct.pack(">III", INDEX_MAGIC, INDEX_VERSION, 0))
    root_ref = _emit(root, out)
    struct.pack_into(">I", out, 8, root_ref)
    return bytes(out)


def _emit(top: _Node, out: bytearray) -> int:
    """Write the sub-trie under ``top`` (children before parents); returns its flagged offset."""
    refs: dict[int, int] = {}  # id(node) -> flagged offset
    # iterative post-order over compressed nodes: (node, prefix, children-done?)
    # the root keeps an empty prefix, as depmod writes it
    stack: list[tuple[_Node, str, bool]] = [(top, "", False)]
    result = 0
    while stack:
        node, prefix, done = stack.pop()
        if not done:
            stack.append((node, prefix, True))
            for ch in sorted(node.children, reverse=True):
                child, cprefix = _compress(node.children[ch])
                stack.append((child, cprefix, False))
            continue
        offset = len(out)
        if offset > NODE_MASK:
            raise GuestLimitError("kmod index larger than 256 MiB")
        flags = 0
        if prefix:
            out += prefix.encode("ascii") + b"\0"
            flags |= NODE_PREFIX
        if node.children:
            chars = sorted(node.children)
            first, last = ord(chars[0]), ord(chars[-1])
            out += bytes((first, last))
            for code in range(first, last + 1):
                child = node.children.get(chr(code))
                ref = refs[id(_compress(child)[0])] if child is not None else 0
                out += struct.pack(">I", ref)
            flags |= NODE_CHILDS
        if node.values:
            out += struct.pack(">I", len(node.values))
            for priority, _, value in sorted(node.values):
                out += struct.pack(">I", priority) + value.encode("ascii") + b"\0"
            flags |= NODE_VALUES
        result = refs[id(node)] = offset | flags
    return result


def _compress(node: _Node) -> tuple[_Node, str]:
    """Follow single-child, value-less links: the node that holds them and the skipped label."""
    prefix = []
    while not node.values and len(node.children) == 1:
        ((ch, node),) = node.children.items()
        prefix.append(ch)
    return node, "".join(prefix)


def read_index(blob: bytes) -> dict[str, list[tuple[int, str]]]:
    """Every key of a kmod binary index with its (priority, value) list (tests, inspection)."""
    if len(blob) < 12:
        raise CorruptGuestError("kmod index shorter than its header")
    magic, version, root = struct.unpack_from(">III", blob)
    if magic != INDEX_MAGIC or version >> 16 != INDEX_VERSION >> 16:
        raise CorruptGuestError(f"not a kmod index (magic {magic:#x}, version {version:#x})")
    out: dict[str, list[tuple[int, str]]] = {}
    stack = [(root, "")]
    visits = 0
    while stack:
        ref, key = stack.pop()
        visits += 1
        if visits > len(blob):
            raise CorruptGuestError("kmod index nodes form a loop")
        pos = ref & NODE_MASK
        if not 12 <= pos <= len(blob) or (pos == len(blob) and ref & ~NODE_MASK):
            raise CorruptGuestError(f"kmod index node offset {pos} out of range")
        if ref & NODE_PREFIX:
            end = _cstr_end(blob, pos)
            key += blob[pos:end].decode("ascii", "replace")
            pos = end + 1
        if len(key) > MAX_KEY:
            raise GuestLimitError("kmod index key too long")
        if ref & NODE_CHILDS:
            if pos + 2 > len(blob):
                raise CorruptGuestError("kmod index node truncated")
            first, last = blob[pos], blob[pos + 1]
            pos += 2
            count = last - first + 1
            if count < 1 or pos + 4 * count > len(blob):
                raise CorruptGuestError("kmod index child table out of range")
            for i, child in enumerate(struct.unpack_from(f">{count}I", blob, pos)):
                if child:
                    stack.append((child, key + chr(first + i)))
            pos += 4 * count
        if ref & NODE_VALUES:
            if pos + 4 > len(blob):
                raise CorruptGuestError("kmod index node truncated")
            (count,) = struct.unpack_from(">I", blob, pos)
            pos += 4
            if count > len(blob) // 5:
                raise CorruptGuestError("kmod index value count out of range")
            values = []
            for _ in range(count):
                if pos + 4 > len(blob):
                    raise CorruptGuestError("kmod index value truncated")
                (priority,) = struct.unpack_from(">I", blob, pos)
                end = _cstr_end(blob, pos + 4)
                values.append((priority, blob[pos + 4 : end].decode("ascii", "replace")))
                pos = end + 1
            out[key] = values
    return out


def _cstr_end(blob: bytes, pos: int) -> int:
    end = blob.find(b"\0", pos, pos + MAX_KEY + 1)
    if end < 0:
        raise CorruptGuestError("kmod index string without terminator")
    return end


# --- module files -----------------------------------------------------------------------------


def decompress_module(path: str, blob: bytes) -> bytes:
    """The ELF image of a module file as the guest ships it (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    try:
        if path.endswith(".ko.xz"):
            dec = lzma.LZMADecompressor()
            out = dec.decompress(blob, MAX_MODULE + 1)
        elif path.endswith(".ko.gz"):
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob, MAX_MODULE + 1)
        elif path.endswith(".ko.zst"):
            if _zstd is None:
                raise DriverInjectionError(
                    f"{path}: zstd-compressed module and the Python 'zstandard' package is "
                    "not installed",
                    hint="pip install zstandard",
                )
            out = _zstd.ZstdDecompressor().decompressobj().decompress(blob)
        else:
            out = blob
    except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError) as exc:
        raise CorruptGuestError(f"{path}: cannot decompress the module: {exc}") from None
    except Exception as exc:  # zstandard.ZstdError has no stable import path
        if _zstd is not None and isinstance(exc, _zstd.ZstdError):
            raise CorruptGuestError(f"{path}: cannot decompress the module: {exc}") from None
        raise
    if len(out) > MAX_MODULE:
        raise GuestLimitError(f"{path}: module larger than {MAX_MODULE} bytes")
    return out


def modinfo(elf: bytes, what: str = "module") -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF module's ``.modinfo`` section (keys may repeat)."""
    section = _elf_section(elf, ".modinfo", what)
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            info.setdefault(k.decode("ascii", "replace"), []).append(v.decode("utf-8", "replace"))
    return info


def _elf_section(elf: bytes, wanted: str, what: str) -> bytes:
    if len(elf) < 64 or elf[:4] != b"\x7fELF":
        raise CorruptGuestError(f"{what}: not an ELF file")
    cls, data = elf[4], elf[5]
    if cls not in (1, 2) or data not in (1, 2):
        raise CorruptGuestError(f"{what}: unknown ELF class or byte order")
    e = "<" if data == 1 else ">"
    if cls == 2:
        (shoff,) = struct.unpack_from(e + "Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", elf, 0x3A)
        fmt, need = e + "IIQQQQ", 40
    else:
        (shoff,) = struct.unpack_from(e + "I", elf, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", elf, 0x2E)
        fmt, need = e + "IIIIII", 24
    if shentsize < need or shnum == 0 or shstrndx >= shnum:
        raise CorruptGuestError(f"{what}: bad ELF section header table")
    if shoff + shnum * shentsize > len(elf):
        raise CorruptGuestError(f"{what}: ELF section headers run past the end of the file")

    def header(i: int) -> tuple[int, int, int]:
        at = shoff + i * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from(fmt, elf, at)
        if offset + size > len(elf):
            raise CorruptGuestError(f"{what}: ELF section {i} runs past the end of the file")
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_at, offset, size = header(i)
        end = names.find(b"\0", name_at)
        if name_at < len(names) and end > 0 and names[name_at:end] == wanted.encode():
            return elf[offset : offset + size]
    raise CorruptGuestError(f"{what}: no {wanted} section (not a kernel module?)")


def check_vermagic(info: dict[str, list[str]], version: str, what: str) -> None:
    """Refuse a module built for another kernel (its vermagic starts with the release)."""
    magic = (info.get("vermagic") or [""])[0]
    if magic.split(" ", 1)[0] != version:
        raise DriverInjectionError(
            f"{what} was built for kernel {magic.split(' ', 1)[0] or '?'}, not {version}",
            hint="the guest's module tree does not match its kernel; reinstall the kernel package",
        )


# --- the module tree --------------------------------------------------------------------------


@dataclass
class ModuleTree:
    """depmod's text indexes of one kernel (paths relative to its modules directory)."""

    version: str
    deps: dict[str, list[str]] = field(default_factory=dict)  # path -> dependency paths
    paths: dict[str, str] = field(default_factory=dict)  # module name -> path
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (pattern, module)
    symbols: list[tuple[str, str]] = field(default_factory=list)  # (symbol, module)
    softdeps: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    softdep_lines: dict[str, list[str]] = field(default_factory=dict)  # module -> lines
    order: dict[str, int] = field(default_factory=dict)  # path -> modules.order index
    builtin: set[str] = field(default_factory=set)  # module names

    @classmethod
    def parse(
        cls,
        version: str,
        dep: str,
        alias: str = "",
        symbols: str = "",
        softdep: str = "",
        order: str = "",
        builtin: str = "",
    ) -> ModuleTree:
        tree = cls(version)
        for n, line in enumerate(dep.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            path, sep, rest = line.partition(":")
            if not sep or not path.endswith(MODULE_SUFFIXES):
                raise CorruptGuestError(f"modules.dep line {n} is not 'module: deps'")
            tree.deps[path] = rest.split()
            tree.paths.setdefault(module_name(path), path)
        for line in alias.splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                tree.aliases.append((words[1], words[2].replace("-", "_")))
        for line in symbols.splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias" and words[1].startswith("symbol:"):
                tree.symbols.append((words[1][len("symbol:") :], words[2].replace("-", "_")))
        for line in softdep.splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "softdep":
                continue
            mod = words[1].replace("-", "_")
            pre, post = tree.softdeps.setdefault(mod, ([], []))
            tree.softdep_lines.setdefault(mod, []).append(line.strip())
            bucket = pre
            for w in words[2:]:
                if w == "pre:":
                    bucket = pre
                elif w == "post:":
                    bucket = post
                else:
                    bucket.append(w)
        for n, line in enumerate(order.splitlines()):
            tree.order.setdefault(line.strip(), n)
        for line in builtin.splitlines():
            if line.strip():
                tree.builtin.add(module_name(line.strip()))
        base = len(tree.order)
        for n, path in enumerate(sorted(p for p in tree.deps if p not in tree.order)):
            tree.order[path] = base + n
        return tree

    def ranks(self, paths: Iterable[str]) -> dict[str, int]:
        """depmod's value priorities for a tree holding ``paths``: each module's rank in
        modules.order among them (modules it does not list come after, by path)."""
        return {p: n for n, p in enumerate(sorted(paths, key=lambda p: (self.order[p], p)))}

    def lookup(self, name: str) -> list[str]:
        """Module names ``name`` means: itself, else every module whose alias matches it."""
        norm = name.replace("-", "_")
        if norm in self.paths or norm in self.builtin:
            return [norm]
        key = normalize_alias(name)
        found = []
        for pattern, mod in self.aliases:
            # the literal text before the first wildcard must match as is: checking it first
            # spares fnmatch (a regex compiled per pattern) for all but a handful of the
            # thousands of aliases (modules.alias of a distribution kernel: ~7000 lines)
            cut = len(pattern)
            for ch in "*?[":
                at = pattern.find(ch)
                if 0 <= at < cut:
                    cut = at
            if not key.startswith(pattern[:cut].replace("-", "_")):
                continue
            if fnmatch.fnmatchcase(key, normalize_alias(pattern)) and mod not in found:
                found.append(mod)
        return found

    def closure(self, names: Iterable[str]) -> list[str]:
        """Paths of ``names`` and everything they need (hard and soft deps), deps first.

        A name that is built into the kernel needs nothing; one that is neither built in nor
        in modules.dep raises :class:`DriverInjectionError`.  A soft dependency that resolves to
        nothing is skipped (modprobe does the same).
        """
        wanted: list[str] = []
        queue = [(n.replace("-", "_"), True) for n in names]
        seen: set[str] = set()
        while queue:
            name, required = queue.pop(0)
            if name in seen:
                continue
            seen.add(name)
            if name in self.builtin:
                continue
            path = self.paths.get(name)
            if path is None:
                if required:
                    raise DriverInjectionError(
                        f"kernel {self.version}: module {name} is neither built in nor listed "
                        "in modules.dep",
                        hint="the guest's kernel package may lack it (e.g. a -cloud flavour)",
                    )
                continue
            for dep in self.deps[path]:
                queue.append((module_name(dep), True))
            pre, post = self.softdeps.get(name, ([], []))
            for soft in (*pre, *post):
                for mod in self.lookup(soft):
                    queue.append((mod, False))
            wanted.append(path)
        # dependencies before their users: depmod's lists are already transitive
        ordered: list[str] = []
        for path in wanted:
            for dep in [*reversed(self.deps[path]), path]:
                if dep in self.deps and dep not in ordered and dep in wanted:
                    ordered.append(dep)
        return ordered

    # --- indexes restricted to a set of modules -----------------------------------------------

    def dep_text(self, paths: Iterable[str]) -> str:
        keep = set(paths)
        rank = self.ranks(keep)
        lines = []
        for path in sorted(keep, key=rank.__getitem__):
            deps = [d for d in self.deps[path] if d in keep]
            lines.append(f"{path}:" + "".join(f" {d}" for d in deps))
        return "".join(line + "\n" for line in lines)

    def dep_bin(self, paths: Iterable[str]) -> bytes:
        keep = set(paths)
        rank = self.ranks(keep)
        items = []
        for path in sorted(keep, key=rank.__getitem__):
            deps = [d for d in self.deps[path] if d in keep]
            line = f"{path}:" + "".join(f" {d}" for d in deps)
            items.append((module_name(path), line, rank[path]))
        return write_index(items)

    def _kept(self, pairs: list[tuple[str, str]], paths: Iterable[str]) -> list[tuple[str, str]]:
        names = {module_name(p) for p in paths}
        return [(k, m) for k, m in pairs if m in names]

    def alias_text(self, paths: Iterable[str]) -> str:
        return "".join(f"alias {a} {m}\n" for a, m in self._kept(self.aliases, paths))

    def alias_bin(self, paths: Iterable[str]) -> bytes:
        keep = set(paths)
        rank = self.ranks(keep)
        items = [
            (normalize_alias(a), m, rank[self.paths[m]]) for a, m in self._kept(self.aliases, keep)
        ]
        return write_index(items)

    def symbols_text(self, paths: Iterable[str]) -> str:
        return "".join(f"alias symbol:{s} {m}\n" for s, m in self._kept(self.symbols, paths))

    def symbols_bin(self, paths: Iterable[str]) -> bytes:
        keep = set(paths)
        rank = self.ranks(keep)
        items = [(f"symbol:{s}", m, rank[self.paths[m]]) for s, m in self._kept(self.symbols, keep)]
        return write_index(items)

    def softdep_text(self, paths: Iterable[str]) -> str:
        names = {module_name(p) for p in paths}
        lines = [ln for mod in sorted(names) for ln in self.softdep_lines.get(mod, [])]
        return "".join(line + "\n" for line in lines)


_WORD = re.compile(r"^[A-Za-z0-9_.-]+$")


def is_module_word(name: str) -> bool:
    """A plausible module name (what /etc/initramfs-tools/modules and dracut lists hold)."""
    return bool(_WORD.match(name))
