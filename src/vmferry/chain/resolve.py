"""Finding a child's parent safely.

The paths come from inside an image, so they are untrusted: a downloaded .avhd may name
``C:\\Windows\\..`` or ``../../etc/shadow`` as its parent.  Rules, in order:

1. the child dictates the parent's format (never probed: a probed raw parent is a CVE);
2. candidate locations are the child's hints, relative ones resolved against the child's
   directory first, then absolute ones, then the hint's base name beside the child (a VM folder
   copied from Windows keeps only that);
3. a candidate must resolve (symlinks followed) inside an allowed directory;
4. the parent's identity must equal what the child pinned, so a same-named but different file
   is never stacked under a child;
5. depth is bounded and a file already on the chain is a loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from vmferry.disk import BlockFile, DiskFormat, ParentRef, driver_by_name
from vmferry.errors import (
    ChainLoopError,
    ParentMismatchError,
    ParentNotFoundError,
    PathEscapeError,
)

MAX_CHAIN_DEPTH = 256
_WIN_ABS = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")


@dataclass
class ResolveOptions:
    """How far the resolver may go.  Defaults are the safe ones."""

    allowed_dirs: Sequence[Path] | None = None  # None: the top image's directory tree
    max_depth: int = MAX_CHAIN_DEPTH
    ignore_identity: bool = False  # rebase --unsafe / forensic reads: mismatch only warns
    force_share: bool = False
    warnings: list[str] = field(default_factory=list)


def candidate_paths(child: Path, ref: ParentRef) -> list[Path]:
    """Where to look for the parent, most trusted first, duplicates removed."""
    child_dir = child.parent
    relative: list[Path] = []
    absolute: list[Path] = []
    names: list[Path] = []
    for hint in ref.hints:
        if not hint:
            continue
        if _WIN_ABS.match(hint):
            win = PureWindowsPath(hint)
            names.append(child_dir / win.name)
            continue
        posix_hint = hint.replace("\\", "/") if "\\" in hint and "/" not in hint else hint
        p = PurePosixPath(posix_hint)
        if p.is_absolute():
            absolute.append(Path(p))
            names.append(child_dir / p.name)
        else:
            relative.append(child_dir / p)
    seen: set[str] = set()
    out: list[Path] = []
    for p in relative + absolute + names:
        key = os.path.normpath(str(p))
        if key not in seen:
            seen.add(key)
            out.append(Path(key))
    return out


def is_inside(path: Path, roots: Iterable[Path]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        root_real = os.path.realpath(root)
        if real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep):
            return True
    return False


def open_parent(
    child_path: Path,
    child: DiskFormat,
    ref: ParentRef,
    roots: Sequence[Path],
    opts: ResolveOptions,
) -> tuple[Path, DiskFormat]:
    """Open the parent ``ref`` describes, read-only, or explain why not."""
    driver = driver_by_name(ref.format)
    escaped: list[Path] = []
    tried: list[str] = []
    for cand in candidate_paths(child_path, ref):
        if not os.path.exists(cand):
            tried.append(str(cand))
            continue
        if not is_inside(cand, roots):
            escaped.append(cand)
            continue
        f = BlockFile.open(cand, writable=False, force_share=opts.force_share)
        try:
            layer = driver.open(f, writable=False)
        except BaseException:
            f.close()
            raise
        _check_identity(child_path, cand, ref, layer, opts)
        return cand, layer
    if escaped:
        allowed = ", ".join(str(r) for r in roots)
        raise PathEscapeError(
            f"parent {escaped[0]} is outside the allowed directories ({allowed})",
            path=str(child_path),
            hint=f"if you trust this image, allow the directory: --allow-dir {escaped[0].parent}",
        )
    stored = ", ".join(repr(h) for h in ref.hints) or "(none)"
    raise ParentNotFoundError(
        f"parent not found; the image names {stored}; looked at {', '.join(tried) or 'nothing'}",
        path=str(child_path),
        hint="if the parent was moved, point the child at it: vmferry rebase CHILD -b PARENT",
    )


def identity_mismatches(
    ref: ParentRef, actual: Mapping[str, str], parent: str = "parent"
) -> list[str]:
    """One line per pinned key the candidate parent does not satisfy (empty: it is the parent).

    The one place that decides parent identity, so opening, discovery and rebase agree
    (a key may also take the values in ``ref.alternatives``, e.g. VHDX parent_linkage2).
    """
    return [
        f"{key}: child expects {want}, {parent} has {actual.get(key, '(none)')}"
        for key, want in ref.identity.items()
        if str(actual.get(key, "")).lower()
        not in {str(v).lower() for v in (want, *ref.alternatives.get(key, ()))}
    ]


def _check_identity(
    child_path: Path, parent_path: Path, ref: ParentRef, layer: DiskFormat, opts: ResolveOptions
) -> None:
    actual = layer.identity()
    diffs = identity_mismatches(ref, actual)
    for key, want in ref.advisory.items():
        have = actual.get(key)
        if have is not None and str(have).lower() != str(want).lower():
            opts.warnings.append(
                f"{child_path}: parent {parent_path} {key} differs (child expects {want}, "
                f"parent has {have}); identity otherwise matches"
            )
    if not diffs:
        return
    from vmferry.chain.journal import tolerated_mismatch

    record = tolerated_mismatch(parent_path, dict(ref.identity))
    if record is not None:
        opts.warnings.append(
            f"{child_path}: a merge into {parent_path} was interrupted; the chain still reads "
            f"correctly. Finish it with: vmferry merge {record.get('child', child_path)}"
        )
        return
    what = ref.mismatch_message or "it is not the parent this child was created from"
    message = f"{parent_path}: {what}: " + "; ".join(diffs)
    if opts.ignore_identity:
        opts.warnings.append(f"{child_path}: {message} (ignored on request)")
        return
    layer.close()
    raise ParentMismatchError(
        message,
        path=str(child_path),
        hint="the parent was modified or replaced after the child was created; reading the pair "
        "would give corrupt data. If you are sure, rebase with --unsafe",
    )


def check_loop(
    seen: set[tuple[int, int]], layer: DiskFormat, depth: int, opts: ResolveOptions
) -> None:
    key = layer.file.dev_ino
    if key in seen:
        raise ChainLoopError(
            "the chain loops back to an image already in it", path=str(layer.file.path)
        )
    seen.add(key)
    if depth > opts.max_depth:
        raise ChainLoopError(
            f"chain is deeper than {opts.max_depth} images", path=str(layer.file.path)
        )
