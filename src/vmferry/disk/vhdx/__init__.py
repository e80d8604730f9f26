"""Hyper-V VHDX / AVHDX images (MS-VHDX v1.0), with log replay and crash-safe updates."""

from vmferry.disk.vhdx.driver import Vhdx

__all__ = ["Vhdx"]
