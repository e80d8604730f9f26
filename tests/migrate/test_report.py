"""``vmferry migrate --report``: the page of a real migration, as headless Chromium sees it.

The source VM is hostile on purpose: its name, its disk's file name, its network name and the
guest's own files (a comment in /etc/fstab, a kernel parameter in grub.cfg) carry markup that
would inject an element if anything were left unescaped.  Chromium parses the page
(``--dump-dom``); the DOM it returns must hold the sections, every finding with its evidence,
every guest diff line for line, and those strings as text, never as elements.  Two more runs
check that the Content-Security-Policy stops a script even if one got in, and that a narrow
(phone) window never scrolls sideways.  Blocked and dry-run documents come from real runs too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.guest.conftest import KVER, build_guest_disk, vmware_root
from tests.migrate.conftest import ALL_DRIVERS, vmx_text
from vmferry.errors import CorruptImageError, UsageError
from vmferry.guest.linux.rules.base import Change
from vmferry.migrate import migrate
from vmferry.migrate.findings import SEVERITIES
from vmferry.migrate.report import MAX_DIFF_LINES, render_html, write_html

HOSTILE = "</script><img src=x onerror=alert(1)>"
DISK_NAME = "d<img src=x onerror=alert(2)>.raw"  # no "/" in a file name
NETWORK = "net<svg onload=alert(3)>"
RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: would reverse how the rest of the name reads
VM_NAME = f"web{RLO}{HOSTILE}"
SECTIONS = (
    "machine",
    "findings",
    "guest",
    "changes",
    "disks",
    "space",
    "choices",
    "resume",
    "notes",
)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip


# --- a DOM from Chromium's serialisation -------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):  # type: ignore[no-untyped-def]
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [
            n for n in self.iter()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
        ]  # fmt: skip

    def by_id(self, ident: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == ident]
        assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(markup: str) -> Node:
    b = _Builder()
    b.feed(markup)
    b.close()
    return b.root


def chromium_dom(page: Path, tmp: Path, width: int = 1200) -> Node:
    """The DOM headless Chromium builds from ``page`` (scripts, if any, have run)."""
    chromium = next(
        (n for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    ) or require_tool("chromium")  # skips locally with the reason, fails under CI=true
    proc = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={width},900",
            "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]
    return parse(proc.stdout)


# --- the source VM -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """A VMware VM whose every name and guest file carries markup, migrated to KVM by the CLI
    with ``--json`` and ``--report``: (document, page, scratch directory)."""
    require_tool("qemu-img")
    tmp = tmp_path_factory.mktemp("report")
    root = vmware_root(tmp)
    (root / f"lib/modules/{KVER}/modules.builtin").write_text(
        "".join(f"kernel/drivers/storage/{m}.ko\n" for m in ALL_DRIVERS)
        + "kernel/fs/ext4/ext4.ko\n"
    )
    (root / "etc/fstab").write_text(
        f"# /etc/fstab {HOSTILE}\n/dev/sda1  /  ext4  errors=remount-ro  0 1\n"
        "/dev/sda5  none  swap  sw  0 0\n"
    )
    (root / "boot/grub/grub.cfg").write_text(
        "menuentry 'Debian <b>bold</b>' {\n  insmod ext2\n"
        f"  linux /boot/vmlinuz-{KVER} root=/dev/sda1 ro quiet note='{HOSTILE}'\n"
        f"  initrd /boot/initrd.img-{KVER}\n}}\n"
    )
    disk = build_guest_disk(tmp, root)
    vm = tmp / "vm"
    vm.mkdir()
    disk.img.rename(vm / DISK_NAME)
    (vm / "web.vmx").write_text(
        vmx_text(VM_NAME, DISK_NAME, extra=f'ethernet0.networkName = "{NETWORK}"\n')
    )
    page = tmp / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "vmferry", "migrate", str(vm / "web.vmx"), "--to", "kvm",
         "-o", str(tmp / "out"), "--json", "--report", str(page)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["status"] == "completed" and doc["source"]["name"] == VM_NAME
    return doc, page, tmp


# --- the page of a completed migration ---------------------------------------------------------


def test_page_is_self_contained(hostile_run: tuple[dict, Path, Path]) -> None:
    _doc, page, _tmp = hostile_run
    text = page.read_text(encoding="utf-8")
    assert "http:" not in text.lower() and "https:" not in text.lower()
    assert not re.search(r"<(script|link|img|iframe|object|embed|svg|form)\b", text, re.I)
    assert not re.search(r"@import|url\(", text, re.I)
    assert not re.search(r"<[a-z][^>]*\son\w+\s*=", text, re.I)  # text has no raw "<"
    assert "default-src 'none'" in text  # the CSP meta
    assert not list(page.parent.glob(".report.html.vmferry-*"))  # no temporary left


def test_chromium_dom_has_every_section_finding_and_diff(
    hostile_run: tuple[dict, Path, Path],
) -> None:
    doc, page, tmp = hostile_run
    dom = chromium_dom(page, tmp)
    # hostile strings stayed text: no element or handler came out of them
    tags = {n.tag for n in dom.iter()}
    assert not tags & {"img", "script", "svg", "iframe", "object", "embed", "b"}, tags
    assert not [a for n in dom.iter() for a in n.attrs if a.startswith("on")]
    body = dom.find_all("body")[0].text()
    assert RLO not in body and "U+202E" in body  # shown, not obeyed
    assert HOSTILE in dom.find_all("h1")[0].text()
    assert DISK_NAME in dom.by_id("disk-table").text()
    assert NETWORK in dom.by_id("nic-table").text()
    for ident in SECTIONS:
        assert dom.by_id(ident).tag == "section"
    assert "status-completed" in dom.by_id("status").classes
    # findings: grouped by severity, each with its message, evidence and action
    for sev in SEVERITIES:
        group = dom.by_id(f"sev-{sev}")
        shown = group.find_all("article", "finding")
        want = [f for f in doc["findings"] if f["severity"] == sev]
        assert len(shown) == len(want) == doc["summary"][sev]
        for node, f in zip(shown, want, strict=True):
            assert f"sev-{sev}" in node.classes
            text = node.text()
            assert f["message"] in text and f["action"] in text
            for e in f["evidence"]:
                assert e["path"] in text
                if e["line"] is not None:
                    assert f"{e['path']}:{e['line']}" in text
                if e["text"] is not None:
                    assert e["text"] in text
    grub = next(f for f in doc["findings"] if "grub.cfg" in f["message"])
    assert any(HOSTILE in (e["text"] or "") for e in grub["evidence"])
    # every guest change: its diff line for line, added and removed lines marked as such
    changes = doc["disks"][0]["guest_changes"]
    assert len(changes) >= 5
    articles = dom.by_id("changes").find_all("article", "change")
    assert len(articles) == len(changes)
    for node, c in zip(articles, changes, strict=True):
        assert c["path"] in node.find_all("h4")[0].text()
        lines = c["diff"].splitlines()
        spans = node.find_all("pre")[0].find_all("span")
        assert [s.text() for s in spans] == lines
        adds = [s.text() for s in spans if "add" in s.classes]
        dels = [s.text() for s in spans if "del" in s.classes]
        assert adds == [x for x in lines if x.startswith("+") and not x.startswith("+++")]
        assert dels == [x for x in lines if x.startswith("-") and not x.startswith("---")]
    fstab = next(a for a, c in zip(articles, changes, strict=True) if c["path"] == "/etc/fstab")
    assert f" # /etc/fstab {HOSTILE}" in fstab.text()
    # before and after: the rows that change are marked, the others are not
    (disk,) = doc["disks"]
    src_disk, fitted = doc["before"]["disks"][0], disk["fitted"]
    marked = {r.find_all("th")[0].text() for r in dom.by_id("disk-table").find_all("tr", "chg")}
    for key, label in (("controller", "controller"), ("controller_model", "model"),
                       ("bus", "bus"), ("unit", "unit"), ("path", "file")):  # fmt: skip
        assert (label in marked) == (src_disk[key] != fitted[key]), label
    assert "file" in marked and "format" in marked  # raw file → qcow2 file
    nic_marked = {r.find_all("th")[0].text() for r in dom.by_id("nic-table").find_all("tr", "chg")}
    assert "MAC" in nic_marked  # dropped without --keep-macs
    # the disk: chain, output, digest, verify result
    card = dom.by_id("disk-0").text()
    assert disk["digest"] in card and disk["output"]["path"] in card
    assert disk["source"]["chain"][0]["path"] in card and "verified" in card


def test_csp_stops_a_script_that_got_in(hostile_run: tuple[dict, Path, Path]) -> None:
    """Defence in depth: plant a script and an image handler; neither may run."""
    _doc, page, tmp = hostile_run
    planted = tmp / "planted.html"
    planted.write_text(
        page.read_text(encoding="utf-8").replace(
            "</body>",
            '<script>document.title="ran"</script>'
            '<img src="data:,x" onerror="document.title=\'handler ran\'"></body>',
        ),
        encoding="utf-8",
    )
    dom = chromium_dom(planted, tmp)
    title = dom.find_all("title")[0].text()
    assert title.startswith("vmferry migrate: ") and "ran" not in title


def test_phone_width_never_scrolls_sideways(hostile_run: tuple[dict, Path, Path]) -> None:
    """A copy without the CSP measures itself in a narrow window (headless Chromium's narrowest
    is about 500 px): the page may be long, never wider than the window."""
    _doc, page, tmp = hostile_run
    probe = tmp / "probe.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
    probe.write_text(
        text.replace(
            "</body>",
            "<script>document.documentElement.dataset.widths = "
            "document.documentElement.scrollWidth + ' ' + window.innerWidth</script></body>",
        )
    )
    dom = chromium_dom(probe, tmp, width=400)
    scroll, inner = map(int, dom.find_all("html")[0].attrs["data-widths"].split())
    assert inner <= 520, inner  # really narrow
    assert scroll <= inner, f"page is {scroll} px wide in a {inner} px window"


# --- other documents ---------------------------------------------------------------------------


def test_blocked_document_says_why_and_has_no_target_column(guest: Path, tmp_path: Path) -> None:
    doc = migrate(guest, "hyperv-gen2", tmp_path / "out").to_json()
    assert doc["status"] == "blocked"
    dom = parse(render_html(doc))
    assert "status-blocked" in dom.by_id("status").classes
    (box,) = dom.find_all("div", "blockers")
    (blocker,) = [f for f in doc["findings"] if f["severity"] == "blocker"]
    assert blocker["message"] in box.text() and blocker["action"] in box.text()
    assert "after (target)" not in dom.by_id("machine").text()
    assert not dom.by_id("machine").find_all("tr", "chg")
    assert "nothing planned: the migration is blocked" in dom.by_id("changes").text()
    assert "not-carried" in dom.by_id("disk-summary").text()
    assert not (tmp_path / "out").exists()


def test_dry_run_document_shows_the_planned_diffs(guest: Path, tmp_path: Path) -> None:
    doc = migrate(guest, "kvm", tmp_path / "out", dry_run=True).to_json()
    assert doc["status"] == "planned"
    dom = parse(render_html(doc))
    assert dom.by_id("status").text() == "dry run: nothing was written"
    changes = doc["disks"][0]["guest_changes"]
    assert changes and len(dom.by_id("changes").find_all("article", "change")) == len(changes)
    assert "Planned; nothing was written." in dom.by_id("changes").text()
    # a bare image on IDE becomes a virtio disk: the controller row is marked as changed
    marked = {r.find_all("th")[0].text() for r in dom.by_id("disk-table").find_all("tr", "chg")}
    assert {"controller", "model"} <= marked
    assert "—" in dom.by_id("disk-summary").text()  # nothing verified: no result to show


def test_binary_change_is_shown_as_its_summary(guest: Path, tmp_path: Path) -> None:
    """An initramfs driver addition (an ``append`` change) is described, not dumped."""
    doc = migrate(guest, "kvm", tmp_path / "out", dry_run=True).to_json()
    append = Change(
        rule="initramfs",
        path=f"/boot/initrd.img-{KVER}",
        before="",
        after="",
        why="the initramfs lacks the target's storage drivers",
        kind="append",
        data=b"\x07" * 4096,
        old_size=1 << 20,
        summary="virtio_blk.ko, virtio_pci.ko (+2 dependencies), module indexes",
    )
    doc["disks"][0]["guest_changes"].append(append.to_json())
    dom = parse(render_html(doc))
    node = dom.by_id("changes").find_all("article", "change")[-1]
    assert not node.find_all("pre")
    (binary,) = node.find_all("p", "binary")
    assert append.summary in binary.text()
    assert "1.0 MiB → 1.0 MiB (+4.0 KiB)" in binary.text()


def test_long_diff_is_capped_and_says_so(guest: Path, tmp_path: Path) -> None:
    doc = migrate(guest, "kvm", tmp_path / "out", dry_run=True).to_json()
    big = Change(
        rule="fstab",
        path="/etc/fstab",
        before="".join(f"/dev/sda{i} /m{i} ext4 defaults 0 2\n" for i in range(3000)),
        after="".join(f"UUID={i} /m{i} ext4 defaults 0 2\n" for i in range(3000)),
        why="many mounts",
    )
    doc["disks"][0]["guest_changes"] = [big.to_json()]
    dom = parse(render_html(doc))
    (pre,) = dom.by_id("changes").find_all("pre")
    spans = pre.find_all("span")
    assert len(spans) == MAX_DIFF_LINES + 1
    total = len(big.diff().splitlines())
    assert f"{total - MAX_DIFF_LINES} more lines in the JSON document" in spans[-1].text()


def test_failed_document_shows_the_error_and_the_failed_check(guest: Path, tmp_path: Path) -> None:
    """A document a caller records after a failure: the error (a real vmferry error's JSON)
    and a disk whose verification failed are shown as such; odd numbers do not crash."""
    doc = migrate(guest, "kvm", tmp_path / "out").to_json()
    out_path = doc["disks"][0]["output"]["path"]
    doc["status"] = "failed"
    doc["error"] = CorruptImageError(f"bad {HOSTILE}", path=out_path).to_json()
    doc["disks"][0]["verify"] = {**doc["disks"][0]["verify"], "digest_ok": False, "ok": False}
    doc["disks"][0]["seconds"] = float("nan")  # json.loads accepts NaN
    dom = parse(render_html(json.loads(json.dumps(doc))))
    assert "status-failed" in dom.by_id("status").classes
    error = dom.by_id("notes").text()
    assert f"bad {HOSTILE}" in error and out_path in error and "CorruptImageError" in error
    card = dom.by_id("disk-0").text()
    assert "FAILED" in card and "DIFFERS" in card
    assert "FAILED" in dom.by_id("disk-summary").text()


# --- writing -----------------------------------------------------------------------------------


def test_write_replaces_whole_and_refuses_bad_input(guest: Path, tmp_path: Path) -> None:
    doc = migrate(guest, "kvm", tmp_path / "out", dry_run=True).to_json()
    where = tmp_path / "reports"
    where.mkdir()
    page = where / "r.html"
    page.write_text("old report")
    assert write_html(doc, page) == page
    assert page.read_text().startswith("<!doctype html>")
    assert [p.name for p in where.iterdir()] == ["r.html"]
    with pytest.raises(UsageError, match="schema"):
        write_html({**doc, "schema": "vmferry-migrate/999"}, page)
    with pytest.raises(UsageError, match="lacks findings"):
        render_html({k: v for k, v in doc.items() if k != "findings"})
    with pytest.raises(UsageError):
        render_html([doc])  # type: ignore[arg-type]
    assert page.read_text().startswith("<!doctype html>")  # the old page stays
    with pytest.raises(UsageError, match="directory"):
        write_html(doc, where)
    with pytest.raises(UsageError, match="does not exist"):
        write_html(doc, where / "missing" / "r.html")
    assert [p.name for p in where.iterdir()] == ["r.html"]
