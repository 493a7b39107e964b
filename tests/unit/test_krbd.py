"""krbd at its exact kernel interface (block_rbd/mappers/krbd.py).

KernelRbdBus replaces block_rbd.mappers.krbd.RbdSysfs: it parses what is
written to /sys/bus/rbd/add_single_major the way drivers/block/rbd.c
(rbd_add_parse_args, rbd_parse_options, rbd_parse_param) and
net/ceph/ceph_common.c + messenger.c (ceph_parse_mon_ips/ceph_parse_ips,
ceph_parse_param, get_secret) do, fails with the kernel's errnos, and on
success creates /sys/bus/rbd/devices/N, /sys/block/rbdN/ro and a real block
device node with the rbd major.  The cephx key is looked up where the
kernel's request_key() looks: the writing process's keyring.
"""

import base64
import ctypes
import errno
import logging
import os
import platform
import re
import shutil
import stat
import struct
import time

import pytest

from block_rbd import deadline, process
from block_rbd.config import from_dict
from block_rbd.errors import CommandError, DeviceBusy, FeaturesUnsupported, HotplugTimeout, MapperError
from block_rbd.mappers import krbd
from block_rbd.mappers.krbd import KrbdMapper, RbdSysfs, kernel_mon_addrs, uses_msgr2
from block_rbd.target import ImageSpec

# ---- the kernel keyring through the real syscalls -------------------------------------------

_KEYCTL = {"x86_64": 250, "aarch64": 219, "ppc64le": 271, "s390x": 280, "i686": 288}
KEYCTL_CLEAR, KEYCTL_SEARCH, KEYCTL_READ = 7, 10, 11
KEY_SPEC_PROCESS_KEYRING = -2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def keyctl(*args):
    number = _KEYCTL.get(platform.machine())
    if number is None:
        pytest.skip("keyctl syscall number unknown on %s" % platform.machine())
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def kernel_has_ceph_key_type():
    """add_key("ceph", ...) fails with ENODEV unless libceph registered the key type."""
    number = krbd._ADD_KEY.get(platform.machine())
    serial = _libc.syscall(ctypes.c_long(number), b"ceph", b"block-rbd-probe", b"", ctypes.c_size_t(0),
                           ctypes.c_int(KEY_SPEC_PROCESS_KEYRING))
    return serial >= 0 or ctypes.get_errno() != errno.ENODEV


class KeyTypeSubstitute:
    """Stands in for ctypes.CDLL in krbd when the kernel lacks the "ceph" key type
    (no libceph: this machine).  add_key then makes a "user" key with the very same
    description, payload and destination keyring, so the key's arrival in the kernel
    keyring is checked for real."""

    calls = []

    def __init__(self, *_args, **_kwargs):
        self.syscall = self._Syscall()

    class _Syscall:
        restype = ctypes.c_long

        def __call__(self, number, key_type, description, payload, length, keyring):
            KeyTypeSubstitute.calls.append((number.value, key_type, description, keyring.value))
            return _libc.syscall(number, b"user", description, payload, length, keyring)


@pytest.fixture
def key_type(monkeypatch):
    """The kernel key type add_kernel_key's keys get here ("ceph" or, without libceph, "user")."""
    keyctl(KEYCTL_CLEAR, ctypes.c_long(KEY_SPEC_PROCESS_KEYRING))
    if kernel_has_ceph_key_type():
        kind = b"ceph"
    else:
        KeyTypeSubstitute.calls = []
        monkeypatch.setattr(krbd.ctypes, "CDLL", KeyTypeSubstitute)
        kind = b"user"
    yield kind
    keyctl(KEYCTL_CLEAR, ctypes.c_long(KEY_SPEC_PROCESS_KEYRING))


def process_keyring_key(key_type, description):
    """(serial, payload) of a key in this process's keyrings, as request_key would find it."""
    serial = keyctl(KEYCTL_SEARCH, ctypes.c_long(KEY_SPEC_PROCESS_KEYRING), ctypes.c_char_p(key_type),
                    ctypes.c_char_p(description.encode()), ctypes.c_long(0))
    buf = ctypes.create_string_buffer(256)
    length = keyctl(KEYCTL_READ, ctypes.c_long(serial), buf, ctypes.c_long(len(buf)))
    return serial, buf.raw[:length]


def make_cephx_secret(seed=7):
    """A cephx key as `ceph-authtool --gen-key` makes it: le16 type=1 (AES), le32 sec, le32 nsec,
    le16 len=16, 16 bytes of key; base64."""
    blob = struct.pack("<HIIH", 1, 1700000000, 0, 16) + bytes(range(seed, seed + 16))
    return base64.b64encode(blob).decode()


# ---- the kernel's rbd bus ------------------------------------------------------------------

SPACES = " \f\n\r\t\v"  # next_token() in rbd.c
CEPH_MAX_MON = 31
RBD_MAX_SNAP_NAME_LEN = 255 - len("snap_")
CEPH_MON_PORT = 6789
RBD_MAJOR = 251
MS_MODES = ("legacy", "crc", "secure", "prefer-crc", "prefer-secure")
# features the kernel's rbd supports (RBD_FEATURES_SUPPORTED, 5.x): layering, striping,
# exclusive-lock, object-map, fast-diff, deep-flatten, data-pool, operations
KERNEL_FEATURES = 1 | 2 | 4 | 8 | 16 | 32 | 128 | 256
JOURNALING = 64

# libceph's ceph_parameters and rbd's rbd_parameters: name -> kind
CEPH_PARAMS = {
    "abort_on_full": "flag", "cephx_sign_messages": "flag_no", "crc": "flag_no", "crush_location": "string",
    "read_from_replica": "string", "fsid": "string", "ip": "string", "key": "string", "mount_timeout": "u32",
    "ms_mode": "string", "name": "string", "osd_idle_ttl": "u32", "osdkeepalive": "u32",
    "osd_request_timeout": "u32", "share": "flag_no", "secret": "string", "tcp_nodelay": "flag_no",
    "rxbounce": "flag",
}
RBD_PARAMS = {
    "alloc_size": "u32", "compression_hint": "string", "exclusive": "flag", "lock_on_read": "flag",
    "lock_timeout": "u32", "notrim": "flag", "_pool_ns": "string", "queue_depth": "u32",
    "read_only": "flag", "read_write": "flag", "ro": "flag", "rw": "flag",
}


def _fail(code, why):
    raise OSError(code, "%s (%s)" % (os.strerror(code), why))


def _next_token(buf):
    buf = buf.lstrip(SPACES)
    end = 0
    while end < len(buf) and buf[end] not in SPACES:
        end += 1
    return buf[:end], buf[end:]


def parse_ips(text):
    """ceph_parse_ips(..., delim=','): "ip[:port]" or "[ipv6][:port]", comma separated."""
    addrs = []
    pos = 0
    while True:
        if len(addrs) == CEPH_MAX_MON:
            _fail(errno.EINVAL, "more than %d monitors" % CEPH_MAX_MON)
        if text[pos:pos + 1] == "[":
            end = text.find("]", pos)
            if end < 0:
                _fail(errno.EINVAL, "missing matching ']'")
            host = text[pos + 1:end]
            family = "ipv6"
            pos = end + 1
        else:
            end = pos
            while end < len(text) and text[end] not in ",:":
                end += 1
            host, family, pos = text[pos:end], "ipv4", end
        if family == "ipv4":
            parts = host.split(".")
            if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
                # no DNS resolution in the kernel without CONFIG_CEPH_LIB_USE_DNS_RESOLVER
                _fail(errno.EINVAL, "not an address: %r" % host)
        elif not re.fullmatch(r"[0-9a-fA-F:.]+", host) or "::" not in host and host.count(":") != 7:
            _fail(errno.EINVAL, "not an IPv6 address: %r" % host)
        port = CEPH_MON_PORT
        if text[pos:pos + 1] == ":":
            pos += 1
            digits = ""
            while pos < len(text) and text[pos].isdigit():
                digits += text[pos]
                pos += 1
            port = int(digits or 0) or CEPH_MON_PORT
            if port > 65535:
                _fail(errno.EINVAL, "port %d" % port)
        addrs.append(("[%s]:%d" if family == "ipv6" else "%s:%d") % (host, port))
        if pos == len(text):
            return addrs
        if text[pos] != ",":
            _fail(errno.EINVAL, "expected ',' at %r" % text[pos:])
        pos += 1


def parse_options(text):
    """rbd_parse_options(): strsep(',') then ceph_parse_param(), then rbd_parameters."""
    opts = {}
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if sep and not key:
            continue  # "=value": skipped by rbd_parse_options
        name = key
        kind = CEPH_PARAMS.get(key) or RBD_PARAMS.get(key)
        if kind is None and key.startswith("no") and CEPH_PARAMS.get(key[2:]) == "flag_no":
            name, kind, value = key[2:], "flag_no", False
            if sep:
                _fail(errno.EINVAL, "%s takes no value" % key)
            opts[name] = value
            continue
        if kind is None:
            _fail(errno.EINVAL, "Unknown parameter '%s'" % key)
        if kind in ("flag", "flag_no"):
            if sep:
                _fail(errno.EINVAL, "%s takes no value" % key)
            opts[name] = True
        elif kind == "u32":
            if not sep or not value.isdigit() or int(value) >= 1 << 32:
                _fail(errno.EINVAL, "%s expects an unsigned 32-bit number" % key)
            opts[name] = int(value)
        else:
            if not sep:
                _fail(errno.EINVAL, "%s expects a value" % key)
            opts[name] = value
    if "ms_mode" in opts and opts["ms_mode"] not in MS_MODES:
        _fail(errno.EINVAL, "Bad ms_mode")
    if "mount_timeout" in opts and opts["mount_timeout"] > (2 ** 31 - 1) // 1000:
        _fail(errno.EINVAL, "mount_timeout out of range")
    if "queue_depth" in opts and opts["queue_depth"] < 1:
        _fail(errno.EINVAL, "queue_depth out of range")
    if "alloc_size" in opts and (opts["alloc_size"] < 512 or opts["alloc_size"] & (opts["alloc_size"] - 1)):
        _fail(errno.EINVAL, "alloc_size must be a power of 2 >= 512")
    if opts.get("compression_hint", "none") not in ("none", "compressible", "incompressible"):
        _fail(errno.EINVAL, "Bad compression_hint")
    return opts


class KernelRbdBus(RbdSysfs):
    """Test double of the kernel's rbd bus; replaces RbdSysfs (same methods)."""

    def __init__(self, base, mons, images, key_type, cephx_key):
        super().__init__(root=os.path.join(base, "sys", "bus", "rbd"), dev_root=os.path.join(base, "dev"))
        self.sys_root = os.path.join(base, "sys")
        self.mons = mons            # [("v1"|"v2", "ip:port")]: the cluster's monmap
        self.images = images        # {(pool, ns, image): {"snaps": {...}, "features": int, "id": str}}
        self.key_type = key_type    # the kernel key type the keys get here
        self.cephx_key = cephx_key  # base64 secret the cluster knows for the user
        self.lines = []             # every line written to add_single_major
        self.removes = []
        self.busy = {}              # dev_id -> open count (a guest holds the device)
        self.exclusive_held = set()  # images whose exclusive lock another client holds
        # rbd_get_client(): a map reuses the libceph client of an earlier one when its mons and
        # libceph options (ceph_compare_options(): mount_timeout and ms_mode among them) are the
        # same and neither said noshare; every client is its own cluster session
        self.clients = {}
        os.makedirs(os.path.join(self.root, "devices"))
        os.makedirs(self.dev_root)
        for name in ("add", "remove", "add_single_major", "remove_single_major"):
            open(os.path.join(self.root, name), "w").close()

    # -- the write to add_single_major ---------------------------------------------------

    def add(self, line):
        assert self._attr_path("add").endswith("add_single_major")
        self.lines.append(line)
        buf = line
        mon_addrs, buf = _next_token(buf)
        if not mon_addrs:
            _fail(errno.EINVAL, "no monitor address(es) provided")
        options, buf = _next_token(buf)
        if not options:
            _fail(errno.EINVAL, "no options provided")
        pool, buf = _next_token(buf)
        if not pool:
            _fail(errno.EINVAL, "no pool name provided")
        image, buf = _next_token(buf)
        if not image:
            _fail(errno.EINVAL, "no image name provided")
        snap, buf = _next_token(buf)
        snap = snap or "-"
        if len(snap) > RBD_MAX_SNAP_NAME_LEN:
            _fail(errno.ENAMETOOLONG, "snapshot name")
        addrs = parse_ips(mon_addrs)
        opts = parse_options(options)
        self._authenticate(opts)
        msgr2 = opts.get("ms_mode", "legacy") != "legacy"
        known = {addr for kind, addr in self.mons if kind == ("v2" if msgr2 else "v1")}
        if not known & set(addrs):
            # hunting among monitors that never answer in this protocol: mount_timeout
            _fail(errno.ETIMEDOUT, "no monitor answered with ms_mode=%s" % opts.get("ms_mode", "legacy"))
        namespace = opts.get("_pool_ns", "")
        info = self.images.get((pool, namespace, image))
        if not any(p == pool for p, _n, _i in self.images) or info is None:
            _fail(errno.ENOENT, "pool, namespace or image not found")
        if snap != "-" and snap not in info["snaps"]:
            _fail(errno.ENOENT, "snapshot not found")
        if info["features"] & ~KERNEL_FEATURES:
            _fail(errno.ENXIO, "image uses unsupported features")
        if opts.get("exclusive") and (pool, namespace, image) in self.exclusive_held:
            _fail(errno.EBUSY, "exclusive lock held by another client")
        read_only = bool(opts.get("read_only") or opts.get("ro")) or snap != "-"
        self._create(pool, namespace, image, snap, info, read_only, opts, self._client(addrs, opts))

    def _client(self, addrs, opts):
        shared = {k: v for k, v in opts.items() if k in CEPH_PARAMS}
        if shared.get("share", True) is False:
            key = object()  # noshare: a client of its own
        else:
            key = (tuple(sorted(addrs)), tuple(sorted(shared.items())))
        return self.clients.setdefault(key, 4100 + len(self.clients))

    def _authenticate(self, opts):
        if "secret" in opts:
            pytest.fail("a cephx secret was written in the map line (secret=): it belongs in the keyring")
        name = opts.get("name", "guest")
        if "key" not in opts:
            _fail(errno.EACCES, "no secret for client.%s" % name)
        try:
            _serial, payload = process_keyring_key(self.key_type, opts["key"])
        except OSError as exc:
            # get_secret(): request_key() failed
            _fail(exc.errno if exc.errno in (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED) else errno.ENOKEY,
                  "key %s not found" % opts["key"])
        # ceph_crypto_key_decode(): type, created, len, secret
        if len(payload) < 12:
            _fail(errno.EINVAL, "short key")
        key_type, _sec, _nsec, length = struct.unpack("<HIIH", payload[:12])
        if key_type != 1 or length != 16 or len(payload) != 12 + length:
            _fail(errno.EINVAL, "not a ceph AES key")
        if opts["key"] != "client." + name or payload != base64.b64decode(self.cephx_key):
            _fail(errno.EACCES, "cephx authentication failed for client.%s" % name)

    def _create(self, pool, namespace, image, snap, info, read_only, opts, client):
        devices = os.path.join(self.root, "devices")
        taken = {int(d) for d in os.listdir(devices)}
        dev_id = min(set(range(len(taken) + 1)) - taken)  # ida_simple_get: lowest free id
        attrs = {
            "pool": pool, "pool_id": "2", "pool_ns": namespace, "name": image, "image_id": info["id"],
            "current_snap": snap, "snap_id": "18446744073709551614" if snap == "-" else "4",
            "client_addr": "127.0.0.1:0/%d" % (1000 + client), "client_id": "client.%d" % client,
            "cluster_fsid": "6a1f3c9e-0000-4000-8000-000000000001", "major": str(RBD_MAJOR),
            "minor": str(dev_id << 4), "size": str(info.get("size", 64 << 20)),
            "features": "0x%016x" % info["features"],
            "config_info": self.lines[-1],  # rbd_config_info_show(): the line as written
        }
        path = os.path.join(devices, str(dev_id))
        os.makedirs(path)
        for attr, value in attrs.items():
            with open(os.path.join(path, attr), "w") as handle:
                handle.write(value + "\n")
        block = os.path.join(self.sys_root, "block", "rbd%d" % dev_id)
        os.makedirs(block)
        with open(os.path.join(block, "ro"), "w") as handle:
            handle.write("1\n" if read_only else "0\n")
        os.mknod(os.path.join(self.dev_root, "rbd%d" % dev_id), stat.S_IFBLK | 0o660,
                 os.makedev(RBD_MAJOR, dev_id << 4))

    # -- the write to remove_single_major -------------------------------------------------

    def remove(self, dev_id, force=False):
        assert self._attr_path("remove").endswith("remove_single_major")
        line = "%s%s" % (dev_id, " force" if force else "")
        self.removes.append(line)
        match = re.fullmatch(r"\s*(-?\d+)(?:\s+(\S{0,5}))?\s*", line)  # sscanf("%d %5s")
        if not match or int(match.group(1)) < 0:
            _fail(errno.EINVAL, "bad remove line %r" % line)
        if match.group(2) and match.group(2) != "force":
            _fail(errno.EINVAL, "bad remove option at '%s'" % match.group(2))
        number = int(match.group(1))
        path = os.path.join(self.root, "devices", str(number))
        if not os.path.isdir(path):
            _fail(errno.ENOENT, "no rbd%d" % number)
        if self.busy.get(str(number)) and not match.group(2):
            _fail(errno.EBUSY, "rbd%d is open" % number)
        shutil.rmtree(path)
        shutil.rmtree(os.path.join(self.sys_root, "block", "rbd%d" % number))
        os.unlink(os.path.join(self.dev_root, "rbd%d" % number))


# ---- fixtures ------------------------------------------------------------------------------

MON_HOST = "[v2:127.0.0.1:3300/0,v1:127.0.0.1:6789/0]"
MONMAP = [("v2", "127.0.0.1:3300"), ("v1", "127.0.0.1:6789")]


class FakeCluster:
    def __init__(self, mon_host=MON_HOST):
        self._mon_host = mon_host

    def mon_host(self):
        return self._mon_host


@pytest.fixture
def secret():
    return make_cephx_secret()


@pytest.fixture
def keyring(tmp_path, secret):
    path = tmp_path / "ceph.client.dom0a.keyring"
    path.write_text("[client.dom0a]\n\tkey = %s\n\tcaps mon = \"profile rbd\"\n" % secret)
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture
def config(keyring):
    return from_dict({"ceph": {"id": "dom0a", "keyring": keyring}, "timeouts": {"map": 20, "unmap": 1}})


@pytest.fixture
def bus(tmp_path, key_type, secret):
    images = {
        ("rbd", "", "vm1"): {"snaps": {"gold"}, "features": 1 | 4 | 8 | 16 | 32, "id": "10a2b3c4"},
        ("rbd", "", "vm2"): {"snaps": set(), "features": 1, "id": "10a2b3c5"},
        ("rbd", "tenant", "vm1"): {"snaps": set(), "features": 1, "id": "10a2b3c6"},
        ("rbd", "", "journaled"): {"snaps": set(), "features": 1 | 4 | JOURNALING, "id": "10a2b3c7"},
    }
    return KernelRbdBus(str(tmp_path / "k"), MONMAP, images, key_type, secret)


@pytest.fixture
def mapper(config, bus):
    return KrbdMapper(config, FakeCluster(), sysfs=bus, sys_root=bus.sys_root)


# ---- mapping: the exact line ----------------------------------------------------------------

def test_map_writes_the_exact_kernel_line(mapper, bus, key_type, secret):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    assert bus.lines == ["127.0.0.1:6789 name=dom0a,key=client.dom0a,mount_timeout=20 rbd vm1 -"]
    assert mapping.mapper == "krbd" and mapping.spec == ImageSpec("rbd", "vm1")
    assert mapping.read_only is False
    assert mapping.device == os.path.join(bus.dev_root, "rbd0")
    st = os.stat(mapping.device)
    assert stat.S_ISBLK(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (RBD_MAJOR, 0)
    assert mapping.details["id"] == "0" and mapping.details["client_id"] == "client.4100"
    # the key is in this process's kernel keyring, as request_key() finds it, with the exact bytes
    _serial, payload = process_keyring_key(key_type, "client.dom0a")
    assert payload == base64.b64decode(secret)
    with open("/proc/keys") as handle:
        assert re.search(r" %s\s+client\.dom0a: %d" % (key_type.decode(), len(payload)), handle.read())


def test_add_key_goes_to_the_process_keyring(mapper, key_type):
    if key_type != b"user":
        pytest.skip("checks the substitute's record of the add_key call")
    mapper.map(ImageSpec("rbd", "vm1"), False)
    assert KeyTypeSubstitute.calls == [(krbd._ADD_KEY[platform.machine()], b"ceph", b"client.dom0a", KEY_SPEC_PROCESS_KEYRING)]


def test_this_kernel_lacks_the_ceph_key_type_and_says_so(config, monkeypatch):
    """Without libceph (this machine) add_key("ceph") fails with ENODEV: a one-line MapperError."""
    if kernel_has_ceph_key_type():
        pytest.skip("this kernel has libceph's ceph key type")
    with pytest.raises(MapperError, match=r"^add_key\(ceph, client.dom0a\) failed: No such device$"):
        krbd.add_kernel_key("dom0a", make_cephx_secret())


def test_bad_base64_secret(key_type):
    with pytest.raises(MapperError, match="keyring entry for client.dom0a is not valid base64"):
        krbd.add_kernel_key("dom0a", "not base64!")


def test_read_only_map(mapper, bus):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), True)
    assert bus.lines == ["127.0.0.1:6789 name=dom0a,key=client.dom0a,mount_timeout=20,read_only rbd vm1 -"]
    assert mapping.read_only is True
    with open(os.path.join(bus.sys_root, "block", "rbd0", "ro")) as handle:
        assert handle.read() == "1\n"


def test_namespace_goes_in_pool_ns(mapper, bus):
    mapping = mapper.map(ImageSpec("rbd", "vm1", "tenant"), False)
    assert bus.lines == ["127.0.0.1:6789 name=dom0a,key=client.dom0a,_pool_ns=tenant,mount_timeout=20 rbd vm1 -"]
    assert mapping.spec == ImageSpec("rbd", "vm1", "tenant")


def test_snapshot_field_and_snapshots_map_read_only(mapper, bus):
    mapping = mapper.map(ImageSpec("rbd", "vm1", "", "gold"), True)
    assert bus.lines[-1].endswith(" rbd vm1 gold")
    assert mapping.spec.snap == "gold" and mapping.read_only


def test_map_is_idempotent_per_image_snapshot_and_mode(mapper, bus):
    first = mapper.map(ImageSpec("rbd", "vm1"), False)
    again = mapper.map(ImageSpec("rbd", "vm1"), False)
    assert again.device == first.device
    assert len(bus.lines) == 1
    ro = mapper.map(ImageSpec("rbd", "vm1"), True)             # another mode: another device
    snap = mapper.map(ImageSpec("rbd", "vm1", "", "gold"), True)  # a snapshot: another device
    ns = mapper.map(ImageSpec("rbd", "vm1", "tenant"), False)    # same name, other namespace
    assert [m.device for m in (first, ro, snap, ns)] == [os.path.join(bus.dev_root, "rbd%d" % i) for i in range(4)]
    assert len(bus.lines) == 4


def test_config_and_target_options_pass_through(keyring, bus):
    config = from_dict({"ceph": {"id": "dom0a", "keyring": keyring},
                        "krbd": {"options": ["queue_depth=128", "mount_timeout=7"]}})
    mapper = KrbdMapper(config, FakeCluster(), sysfs=bus, sys_root=bus.sys_root)
    mapper.map(ImageSpec("rbd", "vm2"), True, ("notrim", "alloc_size=65536"))
    assert bus.lines == ["127.0.0.1:6789 name=dom0a,key=client.dom0a,queue_depth=128,mount_timeout=7,"
                         "notrim,alloc_size=65536,read_only rbd vm2 -"]


@pytest.mark.parametrize("mode, addr", [("crc", "127.0.0.1:3300"), ("secure", "127.0.0.1:3300"),
                                        ("prefer-crc", "127.0.0.1:3300"), ("legacy", "127.0.0.1:6789")])
def test_ms_mode_selects_the_monitor_addresses(mapper, bus, mode, addr):
    mapper.map(ImageSpec("rbd", "vm2"), False, ("ms_mode=%s" % mode,))
    assert bus.lines[-1] == "%s name=dom0a,key=client.dom0a,ms_mode=%s,mount_timeout=20 rbd vm2 -" % (addr, mode)


def test_msgr2_without_ms_mode_would_hang_the_kernel(mapper, bus):
    """The double's contract check: v2 addresses without ms_mode time out in the kernel."""
    mapper.map(ImageSpec("rbd", "vm2"), False)  # the key is in the keyring now
    with pytest.raises(OSError) as info:
        bus.add("127.0.0.1:3300 name=dom0a,key=client.dom0a rbd vm1 -")
    assert info.value.errno == errno.ETIMEDOUT


def test_several_monitors_and_ipv6(config, bus):
    bus.mons = [("v1", "[::1]:6789"), ("v2", "[::1]:3300"), ("v1", "[fe80::2]:6789")]
    mapper = KrbdMapper(config, FakeCluster("[v2:[::1]:3300/0,v1:[::1]:6789/0] [v1:[fe80::2]:6789/0]"),
                        sysfs=bus, sys_root=bus.sys_root)
    mapper.map(ImageSpec("rbd", "vm2"), False)
    assert bus.lines == ["[::1]:6789,[fe80::2]:6789 name=dom0a,key=client.dom0a,mount_timeout=20 rbd vm2 -"]


def test_no_secret_is_ever_written(mapper, bus, secret):
    mapper.map(ImageSpec("rbd", "vm1"), False)
    assert secret not in bus.lines[0] and "secret=" not in bus.lines[0]


# ---- mapping: the kernel's errnos -------------------------------------------------------------

@pytest.mark.parametrize("spec, options, error, message", [
    (ImageSpec("rbd", "nope"), (), MapperError, "image, snapshot or pool not found"),
    (ImageSpec("nopool", "vm1"), (), MapperError, "image, snapshot or pool not found"),
    (ImageSpec("rbd", "vm1", "nons"), (), MapperError, "image, snapshot or pool not found"),
    (ImageSpec("rbd", "vm1", "", "nosnap"), (), MapperError, "image, snapshot or pool not found"),
    (ImageSpec("rbd", "journaled"), (), FeaturesUnsupported, "features this kernel's rbd driver lacks"),
    (ImageSpec("rbd", "vm1"), ("bogus",), MapperError, "the kernel rejected the map options"),
    (ImageSpec("rbd", "vm1"), ("queue_depth=deep",), MapperError, "the kernel rejected the map options"),
    (ImageSpec("rbd", "vm1"), ("ms_mode=fancy",), MapperError, "the kernel rejected the map options"),
    (ImageSpec("rbd", "vm1"), ("alloc_size=1000",), MapperError, "the kernel rejected the map options"),
])
def test_kernel_errors_are_one_line_errors(mapper, bus, spec, options, error, message):
    with pytest.raises(error) as info:
        mapper.map(spec, spec.snap is not None, options)
    assert str(info.value) == "krbd map of %s failed: %s" % (spec, message) or message in str(info.value)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(os.path.join(bus.root, "devices")) == []
    assert os.listdir(bus.dev_root) == []


def test_exclusive_lock_held_elsewhere_is_ebusy(mapper, bus):
    bus.exclusive_held.add(("rbd", "", "vm1"))
    with pytest.raises(MapperError, match="another client holds the image's exclusive lock"):
        mapper.map(ImageSpec("rbd", "vm1"), False, ("exclusive",))


def test_key_missing_from_the_keyring_is_enokey(bus):
    with pytest.raises(OSError) as info:
        bus.add("127.0.0.1:6789 name=other,key=client.other rbd vm1 -")
    assert info.value.errno == errno.ENOKEY


def test_wrong_user_for_the_key_is_refused(mapper, bus):
    mapper.map(ImageSpec("rbd", "vm1"), False)  # puts client.dom0a's key in the keyring
    with pytest.raises(OSError) as info:
        bus.add("127.0.0.1:6789 name=admin,key=client.dom0a rbd vm2 -")
    assert info.value.errno == errno.EACCES


@pytest.mark.parametrize("line, code", [
    ("", errno.EINVAL),
    ("127.0.0.1:6789", errno.EINVAL),
    ("127.0.0.1:6789 name=dom0a,key=client.dom0a", errno.EINVAL),
    ("127.0.0.1:6789 name=dom0a,key=client.dom0a rbd", errno.EINVAL),
    ("mon.example:6789 name=dom0a,key=client.dom0a rbd vm1 -", errno.EINVAL),
    ("127.0.0.1:99999 name=dom0a,key=client.dom0a rbd vm1 -", errno.EINVAL),
    ("127.0.0.1;6789 name=dom0a,key=client.dom0a rbd vm1 -", errno.EINVAL),
    ("127.0.0.1:6789 name=dom0a,key=client.dom0a,read_only=1 rbd vm1 -", errno.EINVAL),
    ("127.0.0.1:6789 name=dom0a,key=client.dom0a rbd vm1 " + "s" * 251, errno.ENAMETOOLONG),
])
def test_the_double_rejects_what_the_kernel_rejects(bus, mapper, line, code):
    mapper.map(ImageSpec("rbd", "vm2"), False)  # the key is in the keyring now
    with pytest.raises(OSError) as info:
        bus.add(line)
    assert info.value.errno == code


def test_the_double_accepts_what_ceph_krbd_writes(bus, mapper):
    """The line Ceph's own src/krbd.cc builds (name=, key=, options, _pool_ns last)."""
    mapper.map(ImageSpec("rbd", "vm2"), False)
    bus.add("127.0.0.1:6789 name=dom0a,key=client.dom0a,queue_depth=64,_pool_ns=tenant rbd vm1 -")
    bus.add("127.0.0.1:6789,127.0.0.2 name=dom0a,key=client.dom0a,nocrc,noshare,,=x rbd vm1 gold")
    assert len(os.listdir(os.path.join(bus.root, "devices"))) == 3


def test_success_without_a_device_is_an_error(mapper, bus, monkeypatch):
    monkeypatch.setattr(bus, "_create", lambda *args: None)
    with pytest.raises(MapperError, match="reported success but no device appeared"):
        mapper.map(ImageSpec("rbd", "vm1"), False)


# ---- discovery ------------------------------------------------------------------------------

def test_mapped_reads_sysfs_attributes(mapper, bus):
    mapper.map(ImageSpec("rbd", "vm1"), False)
    mapper.map(ImageSpec("rbd", "vm1", "", "gold"), True)
    mapper.map(ImageSpec("rbd", "vm1", "tenant"), True)
    found = {(str(m.spec), m.read_only, m.device) for m in mapper.mapped()}
    assert found == {("rbd/vm1", False, bus.dev_root + "/rbd0"), ("rbd/vm1@gold", True, bus.dev_root + "/rbd1"),
                     ("rbd/tenant/vm1", True, bus.dev_root + "/rbd2")}
    assert mapper.find(ImageSpec("rbd", "vm1"), True) is None
    assert mapper.find(ImageSpec("rbd", "vm1", "tenant"), True).device == bus.dev_root + "/rbd2"


def test_availability(mapper, bus, mocker, tmp_path):
    assert mapper.unavailable() is None
    absent = KrbdMapper(mapper.config, FakeCluster(), sysfs=RbdSysfs(root=str(tmp_path / "none")))
    run = mocker.patch.object(process, "run", side_effect=CommandError(
        "modprobe rbd failed: modprobe: FATAL: Module rbd not found in directory /lib/modules/6.1"))
    assert absent.unavailable() == ("no rbd driver in this kernel (modprobe rbd failed: modprobe: FATAL: "
                                    "Module rbd not found in directory /lib/modules/6.1)")
    assert run.call_args.args[0] == ["modprobe", "rbd"]
    run.side_effect = None
    assert absent.unavailable() == "no rbd driver in this kernel"  # modprobe "worked", still no bus


# ---- unmapping ------------------------------------------------------------------------------

def test_unmap_writes_the_device_id(mapper, bus):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    mapper.unmap(mapping)
    assert bus.removes == ["0"]
    assert mapper.mapped() == [] and not os.path.exists(mapping.device)
    mapper.unmap(mapping)  # already gone (ENOENT): idempotent
    assert bus.removes == ["0", "0"]


def test_unmap_retries_a_busy_device_then_succeeds(mapper, bus, monkeypatch):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    bus.busy["0"] = 1
    original = bus.remove

    def remove(dev_id, force=False):
        if len(bus.removes) == 2:
            bus.busy.clear()  # the guest let go
        return original(dev_id, force)
    monkeypatch.setattr(bus, "remove", remove)
    mapper.unmap(mapping)
    assert bus.removes == ["0", "0", "0"]
    assert mapper.mapped() == []


def test_unmap_of_a_device_that_stays_busy_is_bounded(mapper, bus):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    bus.busy["0"] = 1
    started = time.monotonic()
    with pytest.raises(DeviceBusy, match="rbd0 is still in use after 1 s"):
        mapper.unmap(mapping)
    assert 0.9 < time.monotonic() - started < 3
    assert all(line == "0" for line in bus.removes)  # never forced: the guest's data comes first
    assert len(mapper.mapped()) == 1


def test_unmap_of_a_busy_device_is_bounded_by_the_runs_budget(mapper, bus, config):
    config = from_dict({"ceph": {"id": "dom0a", "keyring": config.keyring}, "timeouts": {"unmap": 30}})
    mapper = KrbdMapper(config, FakeCluster(), sysfs=bus, sys_root=bus.sys_root)
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    bus.busy["0"] = 1
    started = time.monotonic()
    with deadline.budget(deadline.Deadline(1.0)):
        with pytest.raises(DeviceBusy, match="rbd0 is still in use after 1 s"):
            mapper.unmap(mapping)
    assert 0.9 < time.monotonic() - started < 3


def test_every_map_shares_the_hosts_one_kernel_client(mapper, bus):
    """The kernel reuses a libceph client only for the same mons and options, mount_timeout
    among them: a value taken from each run's budget left would give each map a cluster session
    of its own (a boot storm of 32 maps: ~30 s each under emulation, against 3.5 s in all)."""
    with deadline.budget(deadline.Deadline(8.6)):
        first = mapper.map(ImageSpec("rbd", "vm1"), False)
    with deadline.budget(deadline.Deadline(30)):
        second = mapper.map(ImageSpec("rbd", "vm2"), False)
    third = mapper.map(ImageSpec("rbd", "vm1", "tenant"), False)
    assert bus.lines == ["127.0.0.1:6789 name=dom0a,key=client.dom0a,mount_timeout=20 rbd vm1 -",
                         "127.0.0.1:6789 name=dom0a,key=client.dom0a,mount_timeout=20 rbd vm2 -",
                         "127.0.0.1:6789 name=dom0a,key=client.dom0a,_pool_ns=tenant,mount_timeout=20 rbd vm1 -"]
    assert first.details["client_id"] == second.details["client_id"] == third.details["client_id"]
    assert len(bus.clients) == 1


def test_no_map_starts_once_the_runs_budget_is_used_up(mapper, bus):
    with deadline.budget(deadline.Deadline(0)):
        with pytest.raises(HotplugTimeout, match="used up before krbd map$"):
            mapper.map(ImageSpec("rbd", "vm1"), False)
    assert bus.lines == []


def test_unmap_other_errors(mapper, bus, monkeypatch):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)

    def remove(dev_id, force=False):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(bus, "remove", remove)
    with pytest.raises(MapperError, match="krbd unmap of .*rbd0 failed: Invalid argument"):
        mapper.unmap(mapping)


# ---- pure: mon_host as the kernel wants it ------------------------------------------------------

@pytest.mark.parametrize("mon_host, msgr2, expected", [
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0]", False, "10.0.0.1:6789"),
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0]", True, "10.0.0.1:3300"),
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0],[v2:10.0.0.2:3300/0,v1:10.0.0.2:6789/0]", False,
     "10.0.0.1:6789,10.0.0.2:6789"),
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0] [v2:10.0.0.2:3300/0,v1:10.0.0.2:6789/0]", True,
     "10.0.0.1:3300,10.0.0.2:3300"),
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0], [v1:10.0.0.2:6789/0]", True, "10.0.0.1:3300"),
    ("v1:10.0.0.1:6789/0,v2:10.0.0.1:3300/0", False, "10.0.0.1:6789"),
    ("10.0.0.1:6789,10.0.0.2:6790", False, "10.0.0.1:6789,10.0.0.2:6790"),
    ("10.0.0.1 10.0.0.2", False, "10.0.0.1:6789,10.0.0.2:6789"),
    ("10.0.0.1,10.0.0.2", True, "10.0.0.1:3300,10.0.0.2:3300"),
    ("10.0.0.1:6789/0", False, "10.0.0.1:6789"),
    ("[::1]:6789", False, "[::1]:6789"),
    ("[::1]", True, "[::1]:3300"),
    ("[2001:db8::1]:6789,[2001:db8::2]:6789", False, "[2001:db8::1]:6789,[2001:db8::2]:6789"),
    ("[v2:[2001:db8::1]:3300/0,v1:[2001:db8::1]:6789/0]", False, "[2001:db8::1]:6789"),
    ("[v2:[2001:db8::1]:3300/0,v1:[2001:db8::1]:6789/0]", True, "[2001:db8::1]:3300"),
    ("[v2:[::1]:3300/0,v1:[::1]:6789/0] [v2:[::2]:3300/0,v1:[::2]:6789/0]", False, "[::1]:6789,[::2]:6789"),
    ("localhost", False, "127.0.0.1:6789"),
    ("localhost:6790", True, "127.0.0.1:6790"),
    ("[v2:127.0.0.1:40001,v1:127.0.0.1:40002]", False, "127.0.0.1:40002"),  # as testcluster.py writes it
])
def test_kernel_mon_addrs(mon_host, msgr2, expected):
    assert kernel_mon_addrs(mon_host, msgr2) == expected
    assert parse_ips(expected)  # and the kernel's parser takes the result


@pytest.mark.parametrize("mon_host, msgr2, fault", [
    ("[v2:10.0.0.1:3300/0]", False, "no v1 monitor address in mon_host"),
    ("[v1:10.0.0.1:6789/0]", True, "no v2 monitor address in mon_host"),
    ("", False, "no v1 monitor address"),
    ("no-such-host.invalid", False, "cannot resolve monitor host 'no-such-host.invalid'"),
    ("[v2:10.0.0.1:3300/0", False, "unbalanced '\\['"),
])
def test_kernel_mon_addrs_faults(mon_host, msgr2, fault):
    with pytest.raises(MapperError, match=fault):
        kernel_mon_addrs(mon_host, msgr2)


@pytest.mark.parametrize("options, msgr2", [
    ((), False), (("ms_mode=legacy",), False), (("ms_mode=crc",), True), (("ms_mode=prefer-secure",), True),
    (("queue_depth=2", "ms_mode=secure"), True), (("ms_modes=crc",), False),
])
def test_uses_msgr2(options, msgr2):
    assert uses_msgr2(options) is msgr2


def test_real_cluster_mon_host_gives_a_line_the_kernel_accepts(ceph_cluster):
    """mon_host as the real test cluster's configuration gives it."""
    from block_rbd.cluster import Cluster
    config = from_dict({"ceph": {"conf": ceph_cluster.conf, "id": ceph_cluster.user,
                                 "keyring": ceph_cluster.user_keyring}})
    with Cluster(config) as cluster:
        mon_host = cluster.mon_host()
    v1 = [ip_port for kind, ip, port in ceph_cluster.mon_addrs if kind == "v1"
          for ip_port in ["%s:%s" % (ip, port)]]
    v2 = ["%s:%s" % (ip, port) for kind, ip, port in ceph_cluster.mon_addrs if kind == "v2"]
    assert parse_ips(kernel_mon_addrs(mon_host, False)) == v1
    assert parse_ips(kernel_mon_addrs(mon_host, True)) == v2


# ---- msgr2-only monitors ----------------------------------------------------------------------

V2_ONLY = "[v2:127.0.0.1:3300/0]"


def test_v2_only_monitors_get_ms_mode_prefer_crc_and_say_so(config, bus, caplog, mocker):
    """A minimal generated ceph.conf may name v2 addresses only: with no ms_mode set,
    the map chooses prefer-crc itself (the kernel speaks msgr2 from 5.11) and logs it."""
    mocker.patch.object(krbd.platform, "release", return_value="6.1.0-28-amd64")
    mapper = KrbdMapper(config, FakeCluster(V2_ONLY), sysfs=bus, sys_root=bus.sys_root)
    with caplog.at_level(logging.INFO, logger="block-rbd"):
        mapping = mapper.map(ImageSpec("rbd", "vm2"), True)
    assert bus.lines == ["127.0.0.1:3300 name=dom0a,key=client.dom0a,mount_timeout=20,read_only,"
                         "ms_mode=prefer-crc rbd vm2 -"]
    assert mapping.read_only
    assert "mon_host offers only msgr2 addresses: krbd maps rbd/vm2 with ms_mode=prefer-crc" in caplog.text


def test_v2_only_monitors_on_a_kernel_without_msgr2_fail_in_one_line(config, bus, mocker):
    mocker.patch.object(krbd.platform, "release", return_value="5.10.0-30-amd64")
    mapper = KrbdMapper(config, FakeCluster(V2_ONLY), sysfs=bus, sys_root=bus.sys_root)
    with pytest.raises(MapperError, match=r"^mon_host offers only msgr2 \(v2\) monitor addresses and this "
                                          r"kernel \(5\.10\.0-30-amd64\) has no msgr2 client \(Linux 5\.11\+\): "
                                          r"add the monitors' v1 addresses to mon_host in ceph\.conf, or use "
                                          r"mapper nbd$"):
        mapper.map(ImageSpec("rbd", "vm2"), False)
    assert bus.lines == []


def test_an_ms_mode_of_ones_own_is_kept(config, bus, mocker):
    """Set by the operator: never overridden (legacy with v2-only monitors fails as before)."""
    mocker.patch.object(krbd.platform, "release", return_value="6.1.0-28-amd64")
    mapper = KrbdMapper(config, FakeCluster(V2_ONLY), sysfs=bus, sys_root=bus.sys_root)
    mapper.map(ImageSpec("rbd", "vm2"), False, ("ms_mode=secure",))
    assert bus.lines[-1] == "127.0.0.1:3300 name=dom0a,key=client.dom0a,ms_mode=secure,mount_timeout=20 rbd vm2 -"
    with pytest.raises(MapperError, match="no v1 monitor address in mon_host"):
        mapper.map(ImageSpec("rbd", "vm1"), False, ("ms_mode=legacy",))


def test_monitors_with_v1_addresses_change_nothing(mapper, bus):
    mapper.map(ImageSpec("rbd", "vm2"), False)
    assert "ms_mode" not in bus.lines[-1]


@pytest.mark.parametrize("release, msgr2", [
    ("6.12.38+deb13-amd64", True), ("6.1.0-28-amd64", True), ("5.11.0", True),
    ("5.10.0-30-amd64", False), ("4.19.0-27-amd64", False), ("weird", False)])
def test_kernel_has_msgr2(release, msgr2):
    assert krbd.kernel_has_msgr2(release) is msgr2
