"""The CLI: qemu-img's letters, one-line errors with exit codes, JSON for scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import qemu_img
from vmferry.cli.common import parse_options, parse_size
from vmferry.cli.main import cli
from vmferry.errors import UsageError


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a child process (what users and scripts see)."""
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512", 512),
        ("4k", 4096),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("64KiB", 64 << 10),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "ten", "1.3k", "-5", "5X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_parse_options() -> None:
    assert parse_options(("a=1,b=x", "c=3")) == {"a": "1", "b": "x", "c": "3"}
    with pytest.raises(UsageError, match="needs a value"):
        parse_options(("novalue",))


def test_create_convert_compare_info_json(tmp_path: Path) -> None:
    runner = CliRunner()
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    assert runner.invoke(cli, ["create", "-f", "raw", str(a), "16M"]).exit_code == 0
    with open(a, "r+b") as f:
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
    r = runner.invoke(cli, ["convert", "--json", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["bytes_written"] == 1 << 20
    qemu_img("compare", "-f", "raw", "-F", "raw", str(a), str(b))
    assert runner.invoke(cli, ["compare", str(a), str(b)]).exit_code == 0
    info = json.loads(runner.invoke(cli, ["info", "--json", str(b)]).output)
    assert info["format"] == "raw" and info["virtual_size"] == 16 << 20
    with open(b, "r+b") as f:
        f.seek(10 << 20)
        f.write(b"x")
    r = runner.invoke(cli, ["compare", str(a), str(b)])
    assert r.exit_code == 1 and f"offset {10 << 20}" in r.output
    records = json.loads(runner.invoke(cli, ["map", "--json", str(a)]).output)
    assert [(m["start"], m["length"]) for m in records if m["data"]] == [(3 << 20, 1 << 20)]


def test_convert_quiet_prints_nothing(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.raw", tmp_path / "b.vhd", tmp_path / "c.vhd"
    a.write_bytes(os.urandom(1 << 20))
    loud = run_cli("convert", "--no-sync", str(a), str(b))
    assert loud.returncode == 0 and "written in" in loud.stdout
    quiet = run_cli("convert", "-q", "--no-sync", str(a), str(c))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == quiet.stderr == ""
    qemu_img("compare", "-f", "raw", "-F", "vpc", str(a), str(c))


def test_errors_are_one_line_with_exit_code(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.vhd"
    garbage.write_bytes(b"conectix" + os.urandom(600))
    for args, code in [
        (["info", str(tmp_path / "missing.img")], 1),
        (["convert", str(garbage), str(tmp_path / "out.qq")], 64),
        (["create", "-f", "raw", str(tmp_path / "x.raw"), "12Q"], 64),
        (["create", "-f", "nosuch", str(tmp_path / "x.raw"), "1M"], 64),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("vmferry: error: ")


def test_error_as_json(tmp_path: Path) -> None:
    proc = run_cli("info", "--json", str(tmp_path / "missing.img"))
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["error"] == "VmferryError" and "no such file" in err["message"]


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    a = tmp_path / "a.raw"
    a.write_bytes(bytes(4096))
    proc = run_cli("create", "-f", "raw", str(a), "1M")
    assert proc.returncode == 64 and "already exists" in proc.stderr
    assert a.stat().st_size == 4096
