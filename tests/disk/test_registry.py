"""The registry's light entries must describe their drivers exactly (they stand in for them)."""

from __future__ import annotations

import ast
import subprocess
import sys

from vmferry.disk import REGISTRY, driver_by_name, driver_for_extension


def test_entries_match_their_classes() -> None:
    for entry in REGISTRY:
        cls = entry.load()
        assert (cls.name, tuple(cls.aliases), tuple(cls.extensions)) == (
            entry.name,
            entry.aliases,
            entry.extensions,
        )
        assert driver_by_name(entry.name) is cls
        for ext in entry.extensions:
            assert driver_for_extension(f"x{ext.upper()}") is cls


def test_opening_one_format_imports_only_its_driver() -> None:
    code = (
        "import sys, vmferry.cli.main, vmferry.disk as d; d.driver_by_name('vhd'); "
        "print(sorted(m for m in sys.modules if m.startswith('vmferry.disk.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(out.stdout)  # the module names the child printed
    assert "vmferry.disk.vhd" in loaded
    assert not any(m.startswith(("vmferry.disk.qcow2", "vmferry.disk.vmdk")) for m in loaded)
