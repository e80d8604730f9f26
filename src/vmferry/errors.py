"""Every error vmferry raises on purpose.

A user (or a script reading ``--json``) needs to know *what kind* of failure happened to decide
what to do next: a corrupt image wants ``check``, a missing parent wants ``rebase``, a locked
image wants the VM shut down.  So each failure has its own class, each class maps to a CLI exit
code, and every error carries an optional hint naming the next step.  Anything else escaping a
parser (``ValueError``, ``struct.error``, ``OSError`` from a bad seek) is a bug.
"""

from __future__ import annotations


class VmferryError(Exception):
    """Root of every deliberate vmferry failure."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        path: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = str(path) if path is not None else None
        self.offset = offset

    def __str__(self) -> str:
        where = ""
        if self.path:
            where = f"{self.path}: "
        at = f" (at offset {self.offset:#x})" if self.offset is not None else ""
        return f"{where}{self.message}{at}"

    def to_json(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "path": self.path,
            "offset": self.offset,
        }


# --- images -----------------------------------------------------------------------------------


class FormatError(VmferryError):
    """The bytes of an image do not say what they must."""

    exit_code = 2


class NotThisFormatError(FormatError):
    """The file is not of the format it was opened as (bad magic or cookie)."""


class UnknownFormatError(FormatError):
    """No driver recognised the file and the user named no format."""


class CorruptImageError(FormatError):
    """A structure is present but inconsistent: bad checksum, overlap, out-of-range entry."""


class TruncatedImageError(CorruptImageError):
    """A structure points past the end of the file."""


class UnsupportedFeatureError(FormatError):
    """The image uses a feature vmferry does not implement; refusing beats guessing."""

    exit_code = 63

    def __init__(self, message: str, *, features: list[str] | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.features = features or []


class DirtyLogError(FormatError):
    """A VHDX log must be replayed before the image can be used this way."""


class ResourceLimitError(FormatError):
    """A header asks for more memory or depth than any sane image needs."""


class MissingExtentError(FormatError):
    """A multi-file image (VMDK descriptor) names a data file that is not there."""


# --- chains -----------------------------------------------------------------------------------


class ChainError(VmferryError):
    """Something is wrong with the links between a differencing disk and its parent."""

    exit_code = 4


class ParentNotFoundError(ChainError):
    """None of the locations the child names holds its parent (within the allowed dirs)."""


class ParentMismatchError(ChainError):
    """A parent was found but is not the disk the child was created from."""


class ChainLoopError(ChainError):
    """Following parents leads back to an image already in the chain, or too deep."""


class PathEscapeError(ChainError):
    """A path stored inside an image points outside the directories vmferry may open."""


# --- operations -------------------------------------------------------------------------------


class UnsafeOperationError(VmferryError):
    """The operation could lose data or break another image; vmferry refuses by default."""

    exit_code = 5


class ImageLockedError(UnsafeOperationError):
    """Another process (usually a running VM) holds the image open."""


class UsageError(VmferryError):
    """The caller asked for something that makes no sense (bad size, bad option)."""

    exit_code = 64


# --- guests and configs -----------------------------------------------------------------------


class GuestError(VmferryError):
    """Inspecting or repairing the guest inside an image failed."""

    exit_code = 6


class InspectionError(GuestError):
    """The guest's filesystems or OS could not be understood."""


class GuestFileNotFoundError(GuestError, FileNotFoundError):
    """A file the rule needs is not in the guest."""


class ConfigError(VmferryError):
    """A VM configuration could not be read or written."""

    exit_code = 7
