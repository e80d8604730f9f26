"""Test kit for the "proof that it boots": real Debian guests built from Debian's packages, and
qemu (software emulation) boots of them on any controller from any disk format.

``guest`` builds and caches the images (root and loop devices needed: fixtures only; vmferry
itself never needs root); ``boot`` runs one boot and says whether the guest reached its marker.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    """Under CI a missing tool means a broken setup, so it fails instead of skipping."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, message: str) -> None:
    """Skip locally (with the reason) or fail under CI when a precondition is missing."""
    if condition:
        return
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tools(*tools: tuple[str, str]) -> None:
    """Each item is (program, Debian package); all missing ones are named in one message."""
    missing = [f"{prog} (apt-get install {pkg})" for prog, pkg in tools if not shutil.which(prog)]
    require(not missing, "missing: " + ", ".join(missing))
