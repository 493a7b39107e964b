"""The kernel nbd driver's generic netlink interface (linux/nbd-netlink.h), what we need of it.

rbd-nbd sets devices up through netlink (`--try-netlink`; Ceph 18.2.5+ by
default) so that they outlive their daemon: the kernel keeps the device and
its I/O waiting for a new daemon (`rbd-nbd attach`) for the reattach timeout.
Such a device is ended by NBD_CMD_DISCONNECT: the ioctl reaches only its
sockets, and with its daemon gone the device would stay configured.

Messages are built and parsed by pure functions (unit-tested byte for byte);
one small class talks to the kernel.
"""

import errno
import os
import socket
import struct

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2

NBD_FAMILY = b"nbd"
NBD_GENL_VERSION = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_BACKEND_IDENTIFIER = 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_GENLHDR = struct.Struct("=BBH")     # cmd, version, reserved
_NLATTR = struct.Struct("=HH")       # len, type


class NetlinkError(OSError):
    pass


def _pad(n):
    return (n + 3) & ~3


def attr(kind, payload):
    """One nlattr, padded to 4 bytes."""
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (_pad(length) - length)


def message(family, cmd, version, attrs, seq, flags=NLM_F_REQUEST | NLM_F_ACK):
    """nlmsghdr + genlmsghdr + attributes."""
    body = _GENLHDR.pack(cmd, version, 0) + b"".join(attrs)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, flags, seq, 0) + body


def get_family(name, seq):
    return message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, [attr(CTRL_ATTR_FAMILY_NAME, name + b"\0")], seq)


def disconnect(family, index, seq):
    return message(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, [attr(NBD_ATTR_INDEX, struct.pack("=I", index))],
                   seq)


def reconfigure(family, index, attrs, backend, seq):
    """NBD_CMD_RECONFIGURE; a device with a backend identifier needs it given."""
    attrs = [attr(NBD_ATTR_INDEX, struct.pack("=I", index))] + list(attrs)
    if backend:
        attrs.append(attr(NBD_ATTR_BACKEND_IDENTIFIER, backend.encode() + b"\0"))
    return message(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, attrs, seq)


def resize(family, index, size, backend, seq):
    return reconfigure(family, index, [attr(NBD_ATTR_SIZE_BYTES, struct.pack("=Q", size))], backend, seq)


def set_timeout(family, index, seconds, backend, seq):
    """The request timeout in seconds; 0: none (the kernel then only warns every 30 s)."""
    return reconfigure(family, index, [attr(NBD_ATTR_TIMEOUT, struct.pack("=Q", seconds))], backend, seq)


def parse_attrs(data):
    """{type: payload} of a run of nlattrs."""
    found = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _NLATTR.size:offset + length]
        offset += _pad(length)
    return found


def parse_replies(data):
    """[(type, seq, payload)] of the netlink messages in one datagram."""
    replies = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        replies.append((kind, seq, data[offset + _NLMSGHDR.size:offset + length]))
        offset += _pad(length)
    return replies


def error_of(payload):
    """The errno of an NLMSG_ERROR reply (0: the ACK)."""
    (code,) = struct.unpack_from("=i", payload)
    return -code


def family_id(payload):
    """The family id in a CTRL_CMD_NEWFAMILY reply (after its genlmsghdr)."""
    attrs = parse_attrs(payload[_GENLHDR.size:])
    if CTRL_ATTR_FAMILY_ID not in attrs:
        raise NetlinkError(errno.ENOENT, "no family id in the reply")
    return struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])[0]


class Nbd:
    """One conversation with the kernel's nbd family; a context manager."""

    def __init__(self, timeout=5.0):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        self.seq = 0
        self.family = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def _call(self, build):
        """Send build(seq); the payload of the reply (or of the ACK); NetlinkError on an error reply."""
        self.seq += 1
        self.sock.send(build(self.seq))
        while True:
            for kind, seq, payload in parse_replies(self.sock.recv(65536)):
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = error_of(payload)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                return payload

    def _family(self):
        if self.family is None:
            try:
                self.family = family_id(self._call(lambda seq: get_family(NBD_FAMILY, seq)))
            except NetlinkError as exc:
                raise NetlinkError(exc.errno, "no nbd netlink family (%s)" % exc.strerror) from None
        return self.family

    def disconnect(self, index):
        family = self._family()
        self._call(lambda seq: disconnect(family, index, seq))

    def resize(self, index, size, backend):
        family = self._family()
        self._call(lambda seq: resize(family, index, size, backend, seq))

    def set_timeout(self, index, seconds, backend):
        family = self._family()
        self._call(lambda seq: set_timeout(family, index, seconds, backend, seq))
