"""What the CLI calls: ``show`` and ``convert``; thin wrappers so the CLI stays thin too."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from vmferry.errors import ConfigError
from vmferry.vm.convert import Conversion, convert_config
from vmferry.vm.model import VmModel
from vmferry.vm.readers import read_config

#: characters no target's file system or shell takes well in a file name (Windows/Hyper-V forbid
#: these; `<>` and quotes also keep names inert when shown in HTML reports or scripts)
_UNSAFE_IN_NAMES = frozenset('/\\:<>"|?*')


def safe_file_name(name: str) -> str:
    """A file name derived from a VM name, with no path separators or control characters.

    VM names come from the (untrusted) source config; they must never choose a directory.
    """
    cleaned = "".join(
        "_" if c in _UNSAFE_IN_NAMES or unicodedata.category(c) in ("Cc", "Cf") else c for c in name
    ).strip(" .")
    return cleaned or "vm"


def show(path: str | Path) -> VmModel:
    """Read any supported VM config; ``.to_json()`` on the result is the ``--json`` output."""
    return read_config(path)


def convert(
    path: str | Path,
    target: str,
    out: str | Path | None = None,
    *,
    keep_macs: bool = True,
    boot_controller: str | None = None,
    overwrite: bool = False,
    vmid: int | None = None,
) -> Conversion:
    """Read ``path``, convert it for ``target``; when ``out`` is a directory, write the files there.

    Nothing is written unless ``out`` is given; existing files are never replaced unless
    ``overwrite``.  Returns the files (name → text), the choices made and what was not carried.
    ``vmid``: the Proxmox VM id to name the config and volumes after (Proxmox targets only).
    """
    model = read_config(path)
    out_dir = Path(out).resolve() if out is not None else None
    disk_dir = str(out_dir) if out_dir is not None else "/var/lib/libvirt/images"
    result = convert_config(
        model,
        target,
        keep_macs=keep_macs,
        boot_controller=boot_controller,
        disk_dir=disk_dir,
        vmid=vmid,
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in result.files.items():
            dest = out_dir / safe_file_name(name)
            if dest.exists() and not overwrite:
                raise ConfigError(
                    "refusing to overwrite an existing file",
                    path=str(dest),
                    hint="pass overwrite=True (--force) or choose another -o directory",
                )
            dest.write_text(text, encoding="utf-8", newline="")
    return result
