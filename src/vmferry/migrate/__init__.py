"""``vmferry migrate``: a whole VM from one hypervisor to another, so that it boots.

    from vmferry.migrate import migrate
    result = migrate("web01.vmx", "kvm", "out/")
    result.status, result.findings, result.disks, result.config_path
    json.dumps(result.to_json())          # exactly the --json document (docs/migrate.md)

Modules, one job each: ``source`` (any SOURCE → model + disks), ``plan`` (names, translation,
guest plan), ``preflight`` (findings), ``pipeline`` (one streaming pass per disk), ``verify``,
``package`` (target config / OVA, written last), ``state`` (resume), ``result`` (JSON).
"""

from __future__ import annotations

from vmferry.migrate.findings import Evidence, Finding
from vmferry.migrate.result import DiskResult, MigrationResult
from vmferry.migrate.run import migrate

__all__ = ["DiskResult", "Evidence", "Finding", "MigrationResult", "migrate"]
