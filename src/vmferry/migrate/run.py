"""``migrate``: read the source, preflight, stream every disk, verify, write the config.

Order matters for safety.  Nothing is written before the preflight passes.  Each disk appears
under its final name only when complete and synced, and is verified (digest re-read through the
driver, structural check) before the next one starts; the resume state records it then.  The
target config is written last, so its presence means the migration is complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmferry.errors import CorruptImageError, UsageError, VmferryError
from vmferry.migrate import state as st
from vmferry.migrate.package import config_names, write_config
from vmferry.migrate.pipeline import stream_disk
from vmferry.migrate.plan import DiskPlan, MigrationPlan, build_plan, destination
from vmferry.migrate.preflight import preflight
from vmferry.migrate.result import DiskResult, MigrationResult
from vmferry.migrate.verify import check_output, replan_guest, verify_disk
from vmferry.ops.progress import Progress


def migrate(
    source: str | os.PathLike[str],
    target: str,
    outdir: str | os.PathLike[str],
    *,
    format: str | None = None,
    dry_run: bool = False,
    keep_macs: bool = False,
    resume: bool = False,
    firmware: str | None = None,
    memory: int | None = None,
    cpus: int | None = None,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    progress: Progress | None = None,
    vmid: int | None = None,
) -> MigrationResult:
    """Migrate the VM at ``source`` to ``target`` into ``outdir``; see docs/migrate.md.

    ``vmid``: the Proxmox VM id (100-999999999, default 100); a usage error for other targets.
    """
    started = time.monotonic()
    started_at = _utc_now()
    out = Path(os.path.abspath(outdir))
    if out.exists() and not out.is_dir():
        raise UsageError("the output must be a directory", path=str(out))
    prior = st.load(out) if out.is_dir() else None
    if prior is not None and not resume and not dry_run:
        raise UsageError(
            "OUTDIR holds an interrupted (or finished) migration",
            path=str(out),
            hint="add --resume to finish it, or choose another -o directory",
        )
    plan = build_plan(
        source, target, out, format=format, keep_macs=keep_macs, firmware=firmware,
        memory=memory, cpus=cpus, allowed_dirs=allowed_dirs, vmid=vmid,
    )  # fmt: skip
    try:
        result = _run(plan, prior if resume else None, dry_run, progress, started)
    finally:
        plan.close()
    result.started_at, result.finished_at = started_at, _utc_now()
    return result


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fingerprint(plan: MigrationPlan) -> dict[str, Any]:
    """The files the source consists of (an archive or compressed file, not its scratch)."""
    layers: list[list[str]] = []
    for d in plan.disks:
        sd = d.src
        if sd.ova is not None or sd.xva is not None:
            layers.append([str(sd.ova or sd.xva)])
        elif sd.path is not None and (sd.disk.compression or "").lower() == "gzip":
            layers.append([str(sd.path)])
        else:
            layers.append([x["path"] for x in d.layers])
    return st.fingerprint(plan.source.config, layers)


def _resumable(plan: MigrationPlan, prior: dict[str, Any] | None, fp: dict[str, Any]) -> set[int]:
    if prior is None:
        return set()
    if prior.get("fingerprint") != fp:
        raise UsageError(
            "the source changed since the interrupted migration started",
            path=str(plan.outdir),
            hint="migrate into a new -o directory (disks of two source states must not mix)",
        )
    then = (prior.get("target"), prior.get("format"), prior.get("vmid"))
    if then != (plan.profile.name, plan.fmt.name, plan.vmid):
        raise UsageError(
            f"OUTDIR holds a migration to {destination(*then)}, "
            f"not {destination(plan.profile.name, plan.fmt.name, plan.vmid)}",
            path=str(plan.outdir),
            hint="use the same --to/--format/--vmid, or another -o directory",
        )
    disks = prior.get("disks") or {}
    return {d.index for d in plan.disks if st.finished(disks.get(str(d.index)), d.out_path)}


def _run(
    plan: MigrationPlan,
    prior: dict[str, Any] | None,
    dry_run: bool,
    progress: Progress | None,
    started: float,
) -> MigrationResult:
    fp = _fingerprint(plan)
    done = _resumable(plan, prior, fp)
    t = time.monotonic()
    preflight(plan, skip_disks=frozenset(done))
    result = _result(plan, dry_run)
    result.timings["preflight_s"] = time.monotonic() - t
    result.resume = {
        "state_file": str(plan.outdir / st.STATE_NAME),
        "resumed": prior is not None,
        "disks_skipped": sorted(done),
    }
    if result.blockers:
        result.status = "blocked"
    if result.blockers or dry_run:
        result.timings["total_s"] = time.monotonic() - started
        return result
    if prior is not None and prior.get("status") == "completed" and _config_present(plan):
        return _already_complete(plan, prior, result, started)
    names = [d.out_name for d in plan.disks if d.fitted is not None] + config_names(plan)
    plan.outdir.mkdir(parents=True, exist_ok=True)
    if prior is not None:
        result.resume["removed_leftovers"] = st.remove_leftovers(plan.outdir, set(names))
    for d in plan.disks:
        if d.fitted is not None and d.index not in done and d.out_path.exists():
            raise UsageError("output already exists", path=str(d.out_path),
                             hint="remove it or choose another -o directory")  # fmt: skip
    for name in config_names(plan):
        if (plan.outdir / name).exists():
            raise UsageError("output already exists", path=str(plan.outdir / name),
                             hint="remove it or choose another -o directory")  # fmt: skip
    state: dict[str, Any] = {
        "fingerprint": fp,
        "source": str(plan.source.given),
        "target": plan.profile.name,
        "format": plan.fmt.name,
        "vmid": plan.vmid,
        "status": "running",
        "disks": {k: v for k, v in ((prior or {}).get("disks") or {}).items() if int(k) in done},
    }
    st.save(plan.outdir, state)
    try:
        _disks(plan, result, state, done, progress)
        t = time.monotonic()
        config_path, files, notes = write_config(plan)
        result.notes += notes
        if plan.fmt.ova:
            check = check_output(config_path, "ova")
            if not check["clean"]:
                raise CorruptImageError(
                    "the OVA failed its check: " + "; ".join(check["corruptions"][:3]),
                    path=str(config_path),
                )
            for d in plan.disks:  # packed and checked: the standalone disks are intermediate
                if d.fitted is not None and d.out_path.exists():
                    d.out_path.unlink()
            result.notes.append("disks are packed in the OVA (manifest checked)")
        result.timings["config_s"] = time.monotonic() - t
    except VmferryError as exc:
        state["status"], state["error"] = "failed", exc.to_json()
        st.save(plan.outdir, state)
        raise
    result.config_path = config_path
    result.outputs = [d.out_path for d in plan.disks
                      if d.fitted is not None and not plan.fmt.ova] + files  # fmt: skip
    state["status"] = "completed"
    state["config"] = [str(p) for p in files]
    st.save(plan.outdir, state)
    result.status = "completed"
    result.timings["total_s"] = time.monotonic() - started
    return result


def _disks(
    plan: MigrationPlan,
    result: MigrationResult,
    state: dict[str, Any],
    done: set[int],
    progress: Progress | None,
) -> None:
    todo = [d for d in plan.disks if d.fitted is not None]
    verify_s = 0.0
    for k, d in enumerate(todo, 1):
        dr = next(r for r in result.disks if r.index == d.index)
        if d.index in done:
            entry = state["disks"][str(d.index)]
            dr.status, dr.digest = "resumed", entry.get("digest")
            dr.bytes_written = int(entry.get("bytes_written", 0))
            dr.verify = entry.get("verify")
            continue
        overlay = None
        if plan.guest is not None and plan.guest.disk_index == d.index:
            plan.guest.apply()
            overlay = plan.guest.overlay
        state["disks"][str(d.index)] = {"status": "running", "output": d.out_name}
        st.save(plan.outdir, state)
        sr = stream_disk(d.chain, overlay, d.virtual_size, d.out_path, plan.fmt.driver,
                         d.options, progress, f"disk {k}/{len(todo)} {d.out_name}")  # fmt: skip
        dr.bytes_read, dr.bytes_written, dr.seconds = sr.bytes_read, sr.bytes_written, sr.seconds
        dr.digest = sr.digest
        t = time.monotonic()
        dr.verify = verify_disk(d.out_path, plan.fmt.driver, sr.digest, d.virtual_size)
        if overlay is not None and plan.guest is not None:
            dr.guest_after = replan_guest(d.out_path, plan.fmt.driver, plan.profile.name,
                                          plan.firmware, plan.guest.controller)  # fmt: skip
        verify_s += time.monotonic() - t
        _output_json(dr, d)
        if not dr.verify["ok"]:
            problems = dr.verify["check"]["corruptions"][:3]
            raise CorruptImageError(
                "the written disk does not verify: "
                + ("content digest differs" if not dr.verify["digest_ok"] else "; ".join(problems)),
                path=str(d.out_path),
            )
        dr.status = "done"
        state["disks"][str(d.index)] = {
            "status": "done",
            "output": d.out_name,
            "digest": sr.digest,
            "bytes_written": sr.bytes_written,
            "verify": dr.verify,
            "stamp": st.file_stamp(d.out_path),
        }
        st.save(plan.outdir, state)
    result.timings["disks_s"] = sum(r.seconds for r in result.disks)
    result.timings["verify_s"] = verify_s


def _output_json(dr: DiskResult, d: DiskPlan) -> None:
    if d.out_path.exists():
        s = d.out_path.stat()
        dr.output["file_size"] = s.st_size
        dr.output["allocated_bytes"] = s.st_blocks * 512


def _config_present(plan: MigrationPlan) -> bool:
    names = config_names(plan)
    return bool(names) and all((plan.outdir / n).exists() for n in names)


def _already_complete(
    plan: MigrationPlan, prior: dict[str, Any], result: MigrationResult, started: float
) -> MigrationResult:
    for dr in result.disks:
        entry = (prior.get("disks") or {}).get(str(dr.index)) or {}
        dr.status, dr.digest = "resumed", entry.get("digest")
        dr.verify = entry.get("verify")
    files = [Path(p) for p in prior.get("config") or []]
    result.config_path = files[-1] if plan.fmt.ova and files else (files[0] if files else None)
    result.outputs = [d.out_path for d in plan.disks if not plan.fmt.ova] + files
    result.status = "completed"
    result.notes.append("the migration in OUTDIR was already complete; nothing redone")
    result.timings["total_s"] = time.monotonic() - started
    return result


def _result(plan: MigrationPlan, dry_run: bool) -> MigrationResult:
    src = plan.source
    tr = plan.translation
    session = plan.guest
    disks: list[DiskResult] = []
    changes = []
    if session is not None and session.plan is not None:
        changes = [c.to_json() for c in session.plan.changes]
    for d in plan.disks:
        dr = DiskResult(
            index=d.index,
            boot=d.boot,
            source={
                "label": d.src.label,
                "chain": d.layers,
                "format": d.layers[0]["format"] if d.layers else None,
            },
            virtual_size=d.virtual_size,
            data_bytes=d.data_bytes,
            output={
                "name": d.out_name,
                "path": str(d.out_path),
                "format": plan.fmt.name,
                "driver": plan.fmt.driver,
                "options": dict(d.options),
                "virtual_size": d.out_size,
                "required_bytes": d.required,
                "in_ova": plan.fmt.ova,
            },
            fitted=d.fitted.to_json() if d.fitted is not None else None,
            status="planned" if d.fitted is not None else "not-carried",
            guest_changes=changes if session is not None and session.disk_index == d.index else [],
        )
        disks.append(dr)
    guest = None
    if session is not None:
        rep = session.report
        guest = {
            "disk": session.disk_index,
            "os": rep.get("os"),
            "partition_table": rep.get("partition_table"),
            "firmware": session.firmware,
            "bootloader": {k: rep["bootloader"].get(k) for k in ("type", "kinds", "configs")},
            "kernels": [
                {k: kern.get(k) for k in ("version", "image", "initramfs", "drivers")}
                for kern in rep.get("kernels", [])
            ],
            "guest_tools": rep.get("guest_tools"),
            "bootable": session.plan.bootable if session.plan is not None else None,
        }
    elif plan.probe.windows:
        guest = {"os": {"family": "windows"}, "evidence": list(plan.probe.windows)}
    return MigrationResult(
        status="planned",
        dry_run=dry_run,
        source=src.to_json(),
        target={
            "name": plan.profile.name,
            "requested": plan.requested_target,
            "description": plan.profile.description,
            "format": plan.fmt.name,
            "format_details": plan.fmt.to_json(),
            "vmid": plan.vmid,
            "firmware": plan.firmware,
            "boot_controller": plan.boot_disk.fitted.controller_model
            if plan.boot_disk and plan.boot_disk.fitted
            else None,
        },
        outdir=plan.outdir,
        before=src.model.to_json(),
        after=tr.model.to_json() if tr is not None else None,
        guest=guest,
        findings=list(plan.findings),
        disks=disks,
        choices=list(plan.choices) + (list(tr.choices) if tr else []),
        not_carried=list(tr.not_carried) if tr else [],
        space=dict(plan.space),
    )
