"""Offline Linux guest inspection and repair: partitions, filesystems, OS facts, fix rules.

Nothing here mounts, runs guest binaries or needs root: every byte is read (and written, through
a copy-on-write :class:`~vmferry.guest.overlay.Overlay`) by vmferry's own parsers.
"""
