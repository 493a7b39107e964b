"""Backups of a snapshot to files, and restores from them, through librbd only.

format.py   the backup files: Ceph's rbd diff v1 stream, telling RAW/QCOW2/diff apart
extents.py  extent arithmetic (pure)
export.py   threaded librbd reads, zero scan, qemu-img calls; the backup itself
restore.py  a new image from a full backup plus increments
"""

from ..errors import BackupError
from .export import Progress, backup, verify_raw, write_raw
# Shadows the submodule of the same name: block_rbd.backup.restore is this function.
from .restore import restore

__all__ = ["BackupError", "Progress", "backup", "restore", "verify_raw", "write_raw"]
