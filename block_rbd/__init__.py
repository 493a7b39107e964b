"""block-rbd: Ceph RBD images as native Xen disks."""

__version__ = "0.2.0"
