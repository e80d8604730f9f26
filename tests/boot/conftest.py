"""Fixtures for the boot proof: cached Debian guests, and the preconditions of booting them.

The ``boot`` marker is registered here (pyproject.toml is not this suite's to edit) so that
``-m "not boot"`` can leave these minutes-long tests out of a quick run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bootkit import require, require_tools
from tests.bootkit.guest import (
    GENERIC_GUEST,
    SDA_NAMED_GUEST,
    VMWARE_DRACUT_GUEST,
    VMWARE_GUEST,
    BuiltGuest,
    GuestRecipe,
    build_image,
    cached_image,
    guest_image,
    missing_build_tools,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "boot: boots a real Debian guest under qemu TCG (tens of seconds each; needs "
        "qemu-system-x86, debootstrap, root and loop devices to build the cached guest)",
    )


def _require_boot_tools(recipe: GuestRecipe) -> None:
    """qemu to boot; and, unless the image is already cached, what building it takes."""
    require_tools(("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"))
    if cached_image(recipe) is None:
        missing = missing_build_tools()
        require(not missing, "cannot build the Debian test guest: missing " + ", ".join(missing))


def _built(recipe: GuestRecipe) -> BuiltGuest:
    _require_boot_tools(recipe)
    return build_image(recipe)


@pytest.fixture(scope="session")
def vmware_guest() -> BuiltGuest:
    """The classic VMware guest (cached image; never modify it, copy with ``fresh``)."""
    return _built(VMWARE_GUEST)


@pytest.fixture(scope="session")
def vmware_dracut_guest() -> BuiltGuest:
    """The VMware guest as Red Hat builds it: dracut --hostonly, run on pvscsi."""
    return _built(VMWARE_DRACUT_GUEST)


@pytest.fixture(scope="session")
def generic_guest() -> BuiltGuest:
    return _built(GENERIC_GUEST)


@pytest.fixture(scope="session")
def sda_named_guest() -> BuiltGuest:
    return _built(SDA_NAMED_GUEST)


@pytest.fixture
def fresh(tmp_path: Path) -> Callable[..., Path]:
    """``fresh(recipe)`` -> a private sparse copy of the recipe's image in tmp_path, for tests
    that modify the guest (read-only boots use the cached image: qemu runs with -snapshot)."""

    def make(recipe: GuestRecipe, name: str | None = None) -> Path:
        _require_boot_tools(recipe)
        path, _ = guest_image(recipe, tmp_path / (name or f"{recipe.name}.raw"))
        return path

    return make
