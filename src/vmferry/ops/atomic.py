"""Outputs appear whole or not at all.

A new image is written under a hidden temporary name in the destination directory and renamed
over the final name only once it is complete and synced, so a crash, a full disk or Ctrl-C
leaves either nothing or a finished image, never a half-written one under the user's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from vmferry.disk.blockfile import BlockFile
from vmferry.errors import UsageError, VmferryError
from vmferry.fsutil import sync_dir


class AtomicOutput:
    def __init__(
        self, final: str | os.PathLike[str], *, overwrite: bool = False, durable: bool = True
    ) -> None:
        self.final = Path(os.path.abspath(final))
        self.overwrite = overwrite
        #: False: rename without syncing first (qemu-img convert's default, cache=unsafe): a
        #: killed process still leaves nothing half-written under the final name, but a power
        #: loss right after may leave a renamed file whose data never reached the disk
        self.durable = durable
        self.tmp = self.final.with_name(f".{self.final.name}.vmferry-{os.urandom(4).hex()}")
        self.file: BlockFile | None = None
        self.committed = False

    def __enter__(self) -> AtomicOutput:
        if self.final.exists() and not self.overwrite:
            raise UsageError(
                "output already exists",
                path=str(self.final),
                hint="remove it or choose another name",
            )
        if not self.final.parent.is_dir():
            raise UsageError("output directory does not exist", path=str(self.final.parent))
        self.file = BlockFile.open(self.tmp, writable=True, create=True)
        self.file.final_path = self.final
        self.companions: list[str] = []
        return self

    def discard_with(self, files: list[str]) -> None:
        """Files the format wrote beside the output (VMDK extents): removed if it fails."""
        self.companions = [f for f in files if os.path.abspath(f) != str(self.tmp)]

    def commit(self) -> None:
        """Sync the finished file, move it into place, and sync the directory entry."""
        assert self.file is not None
        if self.file.fd >= 0 and self.durable:
            self.file.sync_now()
        if self.final.exists() and not self.overwrite:
            raise UsageError("output appeared while writing", path=str(self.final))
        os.replace(self.tmp, self.final)
        self.committed = True
        if not self.durable:
            return
        sync_dir(self.final.parent)
        self.committed = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.file is not None and self.file.fd >= 0 and exc_type is not None:
            self.file.close()
        if isinstance(exc, VmferryError) and exc.path == str(self.tmp):
            # the hidden name is about to vanish: the user knows the output by its own name
            exc.path = str(self.final)
        if not self.committed:
            for path in [str(self.tmp), *getattr(self, "companions", [])]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
