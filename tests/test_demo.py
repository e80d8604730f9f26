"""The README's setup command ends in `vmferry demo`: it must pass, judged by qemu-img."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import require_tool
from vmferry.demo import run_demo


def test_demo_passes_with_qemu_as_judge(tmp_path: Path) -> None:
    require_tool("qemu-img")
    lines: list[str] = []
    assert run_demo(tmp_path, lines.append), "\n".join(lines)
    assert any("qemu-img compare web01.vhdx web01.raw: identical" in line for line in lines)
    assert (tmp_path / "out" / "web01.vhd").exists()
