"""Path lookup shared by every inode-based filesystem reader (ext, XFS).

Guest paths are untrusted: a symlink may point at ``/`` or loop forever, and ``..`` must not
climb out of the filesystem.  One walker with the bounds (40 symlink hops, 4096-byte paths,
``..`` stopping at the root) serves every reader, which supplies only the format-specific
steps: reading an inode, listing a directory, reading a symlink's target.
"""

from __future__ import annotations

from typing import Any

from vmferry.guest.errors import GuestLimitError, NotADirectoryInGuestError
from vmferry.guest.fs.types import DirEntry, GuestFileNotFound

MAX_SYMLINK_HOPS = 40
MAX_PATH = 4096
MAX_FILE_READ = 256 << 20
DIR_CACHE_DIRS = 256


class TreeFilesystem:
    """Base for readers; subclasses set ``_dir_cache = {}`` and implement the hooks below."""

    _dir_cache: dict[int, dict[str, int]]

    # --- hooks ----------------------------------------------------------------------------------

    @property
    def root_ino(self) -> int:
        raise NotImplementedError

    def inode(self, ino: int) -> Any:
        raise NotImplementedError

    def _dir_entries(self, node: Any) -> list[DirEntry]:
        raise NotImplementedError

    def _readlink_node(self, node: Any) -> str:
        raise NotImplementedError

    def read_inode_data(self, node: Any, limit: int = MAX_FILE_READ) -> bytes:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------

    def _lookup_in(self, dir_ino: int, name: str) -> int | None:
        """One directory step; listings are cached (dropped by writers when they change)."""
        names = self._dir_cache.get(dir_ino)
        if names is None:
            names = {e.name: e.inode for e in self._dir_entries(self.inode(dir_ino))}
            if len(self._dir_cache) >= DIR_CACHE_DIRS:
                self._dir_cache.pop(next(iter(self._dir_cache)))
            self._dir_cache[dir_ino] = names
        return names.get(name)

    def resolve(self, path: str, *, follow: bool = True) -> Any:
        """The inode at ``path``; symlinks resolved inside this filesystem, at most 40 hops."""
        if len(path) > MAX_PATH:
            raise GuestLimitError("path longer than 4096 bytes")
        hops = 0
        stack: list[int] = [self.root_ino]  # directory inodes from the root down
        parts = [p for p in path.split("/") if p not in ("", ".")][::-1]
        while parts:
            name = parts.pop()
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = self.inode(stack[-1])
            if cur.kind != "dir":
                raise NotADirectoryInGuestError(f"{path}: a component is not a directory")
            child = self._lookup_in(cur.ino, name)
            if child is None:
                raise GuestFileNotFound("not found in the guest filesystem", path=path)
            node = self.inode(child)
            if node.kind == "symlink" and (parts or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise GuestLimitError(f"{path}: more than {MAX_SYMLINK_HOPS} symlinks")
                target = self._readlink_node(node)
                if target.startswith("/"):
                    stack = [self.root_ino]
                parts.extend([p for p in target.split("/") if p not in ("", ".")][::-1])
                if len(parts) > MAX_PATH:
                    raise GuestLimitError(f"{path}: symlinks expand past 4096 components")
                continue
            stack.append(child)
        return self.inode(stack[-1])

    def exists(self, path: str) -> bool:
        try:
            self.resolve(path)
        except (GuestFileNotFound, NotADirectoryInGuestError):
            return False
        return True

    def _regular(self, path: str) -> Any:
        node = self.resolve(path)
        if node.kind != "file":
            raise GuestFileNotFound("not a regular file", path=path)
        return node

    def read_file(self, path: str, limit: int = MAX_FILE_READ) -> bytes:
        return self.read_inode_data(self._regular(path), limit)

    def readlink(self, path: str) -> str:
        node = self.resolve(path, follow=False)
        if node.kind != "symlink":
            raise GuestFileNotFound("not a symlink", path=path)
        return self._readlink_node(node)

    def listdir(self, path: str) -> list[DirEntry]:
        return [e for e in self._dir_entries(self.resolve(path)) if e.name not in (".", "..")]
