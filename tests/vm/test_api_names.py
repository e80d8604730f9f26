"""Names derived from untrusted VM names must be inert file names on every target."""

from __future__ import annotations

import pytest

from vmferry.vm.api import safe_file_name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web01", "web01"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("a\\b:c", "a_b_c"),
        ('x<script>"|?*', "x_script_____"),
        ("evil\u202etxt.exe", "evil_txt.exe"),  # right-to-left override disguises the name
        ("tab\tnew\nline", "tab_new_line"),
        (" .. ", "vm"),
        ("dbs-ünïcode", "dbs-ünïcode"),
    ],
)
def test_safe_file_name(name: str, expected: str) -> None:
    assert safe_file_name(name) == expected
