"""The nbd generic netlink messages (block_rbd/mappers/nbd_netlink.py), byte for byte as
linux/netlink.h, linux/genetlink.h and linux/nbd-netlink.h lay them out (host order)."""

import errno
import os
import struct

import pytest

from block_rbd.mappers import nbd_netlink as nl


def test_get_family():
    msg = nl.get_family(b"nbd", seq=7)
    # nlmsghdr: len, type GENL_ID_CTRL, flags REQUEST|ACK, seq, pid 0
    assert msg[:16] == struct.pack("=IHHII", len(msg), 0x10, 0x5, 7, 0)
    # genlmsghdr: CTRL_CMD_GETFAMILY, version 1; CTRL_ATTR_FAMILY_NAME "nbd\0" (len 8)
    assert msg[16:] == bytes([3, 1, 0, 0]) + struct.pack("=HH", 8, 2) + b"nbd\0"
    assert len(msg) == 28


def test_disconnect():
    msg = nl.disconnect(0x22, index=5, seq=1)
    assert msg == struct.pack("=IHHII", 28, 0x22, 0x5, 1, 0) + bytes([2, 1, 0, 0]) + struct.pack("=HHI", 8, 1, 5)


def test_resize_names_the_backend():
    msg = nl.resize(0x22, index=3, size=50331648, backend="abc", seq=2)
    body = bytes([3, 1, 0, 0]) + struct.pack("=HHI", 8, 1, 3) + struct.pack("=HHQ", 12, 2, 50331648) \
        + struct.pack("=HH", 8, 10) + b"abc\0"
    assert msg == struct.pack("=IHHII", 16 + len(body), 0x22, 0x5, 2, 0) + body


def test_attributes_are_padded_to_four_bytes():
    assert nl.attr(10, b"abcde") == struct.pack("=HH", 9, 10) + b"abcde\0\0\0"
    assert nl.parse_attrs(nl.attr(10, b"abcde") + nl.attr(1, b"\x05\0\0\0")) == {10: b"abcde", 1: b"\x05\0\0\0"}


def test_replies():
    ack = struct.pack("=IHHII", 36, 2, 0, 9, 0) + struct.pack("=i", 0) + b"\0" * 16
    err = struct.pack("=IHHII", 36, 2, 0, 10, 0) + struct.pack("=i", -errno.EBUSY) + b"\0" * 16
    (kind, seq, payload), (kind2, seq2, payload2) = nl.parse_replies(ack + err)
    assert (kind, seq, nl.error_of(payload)) == (2, 9, 0)
    assert (kind2, seq2, nl.error_of(payload2)) == (2, 10, errno.EBUSY)


def test_family_id_from_newfamily():
    payload = bytes([1, 2, 0, 0]) + nl.attr(2, b"nbd\0") + nl.attr(1, struct.pack("=H", 0x1d))
    assert nl.family_id(payload) == 0x1d
    with pytest.raises(nl.NetlinkError):
        nl.family_id(bytes([1, 2, 0, 0]) + nl.attr(2, b"nbd\0"))


def test_a_kernel_without_nbd_netlink_is_one_error():
    """A kernel without the nbd module: the family lookup fails, and says so."""
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has nbd: the real netlink calls run in the Xen-in-QEMU gate")
    with nl.Nbd(timeout=2) as kernel:
        with pytest.raises(nl.NetlinkError, match="no nbd netlink family"):
            kernel.disconnect(0)


def test_set_timeout_names_the_backend():
    msg = nl.set_timeout(0x22, index=0, seconds=60, backend="brbd-1", seq=4)
    body = bytes([3, 1, 0, 0]) + struct.pack("=HHI", 8, 1, 0) + struct.pack("=HHQ", 12, 4, 60) \
        + struct.pack("=HH", 11, 10) + b"brbd-1\0" + b"\0"
    assert msg == struct.pack("=IHHII", 16 + len(body), 0x22, 0x5, 4, 0) + body
