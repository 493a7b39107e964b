"""Access modes through the hotplug path, two simulated hosts on the real cluster."""

import itertools
import json
import time
import uuid

import pytest

from access_hosts import Host, watchers

MODES = ("r", "w", "r!", "w!")


@pytest.fixture(scope="session")
def host_users(ceph_cluster):
    """cephx users of four simulated dom0s (made once: get-or-create)."""
    return [("brbd-h%d" % i, ceph_cluster.make_user("brbd-h%d" % i)) for i in range(1, 5)]


@pytest.fixture
def hosts(ceph_cluster, tmp_path, libxl, host_users, make_image):
    # Depends on make_image so that it is torn down (everything unmapped) first.
    made = [Host("host%d" % (i + 1), ceph_cluster, tmp_path, user, keyring, libxl)
            for i, (user, keyring) in enumerate(host_users[:3])]
    yield made
    for host in made:  # nothing left mapped, whatever a test did
        for path in reversed(host.added):
            host.remove(path)


def target_of(ceph_cluster, image, mode):
    """(libxl mode, params suffix) for an access mode: `!` only via the target."""
    if mode.endswith("!"):
        return mode[0], ",mode=" + mode
    return mode, ""


def add(host, ceph_cluster, image, mode, domid, vm, name=None):
    xl_mode, extra = target_of(ceph_cluster, image, mode)
    path = host.backend(image, mode=xl_mode, domid=domid, vm=vm, params_extra=extra, name=name)
    return path, host.add(path)


def attached(host, ceph_cluster, image, mode, domid, vm, name=None):
    """add() that must succeed: the backend path."""
    path, result = add(host, ceph_cluster, image, mode, domid, vm, name)
    assert result.returncode == 0, result.stderr
    return path


def error_of(libxl, path):
    return libxl.keys(path).get("hotplug-error", "")


def locks(host, image):
    result = host.cli("locks", image, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["registrations"]


def granted(requested, existing, who):
    if requested.endswith("!") or who == "incoming":
        return True
    if requested == "w":
        return False
    return existing not in ("w", "w!")


# Host 1's VM holds the image; host 2 asks for another VM, for the same VM as an incoming
# live migration, or for the same VM as a second `xl create` of one fixed-uuid config.
@pytest.mark.parametrize("requested,existing,who",
                         list(itertools.product(MODES, MODES, ("other-vm", "incoming", "created-twice"))))
def test_matrix_through_hotplug(hosts, libxl, ceph_cluster, make_image, requested, existing, who):
    h1, h2 = hosts[0], hosts[1]
    image = make_image()
    vm_a = str(uuid.uuid4())
    vm_b = str(uuid.uuid4()) if who == "other-vm" else vm_a
    domid = 10 + MODES.index(requested) * 12 + MODES.index(existing) * 3
    path1, first = add(h1, ceph_cluster, image, existing, domid, vm_a, name="web")
    assert first.returncode == 0, first.stderr
    started = time.monotonic()
    path2, second = add(h2, ceph_cluster, image, requested, domid + 1, vm_b,
                        name="web--incoming" if who == "incoming" else "web")
    elapsed = time.monotonic() - started
    if granted(requested, existing, who):
        assert second.returncode == 0, second.stderr
        assert libxl.keys(path2)["hotplug-status"] == "connected"
        assert {r["key"] for r in locks(h1, image)} == {"host1:" + path1, "host2:" + path2}
    else:
        assert second.returncode == 1
        message = error_of(libxl, path2)
        assert "\n" not in message
        # the guest reads hotplug-error: the holder's host and domid, not its VM uuid
        assert "%s refused: attached %s by a VM (host host1, domid %d" % (requested, existing, domid) \
            in message and vm_a not in message, message
        assert ("the same VM on another host, and this domain is not an incoming live migration"
                in message) == (who == "created-twice")
        assert "physical-device" not in libxl.keys(path2)
        assert elapsed < 10
        assert [r["key"] for r in locks(h1, image)] == ["host1:" + path1]
    assert h2.remove(path2).returncode == 0
    assert h1.remove(path1).returncode == 0
    assert locks(h1, image) == []


def test_registration_records_holder_and_client(hosts, libxl, ceph_cluster, make_image, rbd_admin):
    h1 = hosts[0]
    image = make_image()
    vm = str(uuid.uuid4())
    path = attached(h1, ceph_cluster, image, "w", 7, vm)
    (reg,) = locks(h1, image)
    assert reg["host"] == "host1" and reg["holder"] == path and reg["vm"] == vm
    assert reg["domid"] == "7" and reg["devid"] == path.rsplit("/", 1)[1] and reg["mode"] == "w"
    assert reg["state"] == "alive" and abs(reg["since"] - time.time()) < 60
    assert reg["client"] in watchers(rbd_admin[1], image)
    # Survives the process: the hotplug script has exited, the record is in Ceph.
    text = h1.cli("locks", image).stdout
    assert "host1:" + path in text and "alive" in text


def test_remove_is_idempotent_and_never_removes_another_hosts(hosts, libxl, ceph_cluster, make_image):
    h1, h2 = hosts[0], hosts[1]
    image = make_image()
    path1 = attached(h1, ceph_cluster, image, "w", 20, None)
    # host2 runs remove for a backend of the same path it never added.
    assert h2.remove(path1).returncode == 0
    assert [r["key"] for r in locks(h1, image)] == ["host1:" + path1]
    assert h1.remove(path1).returncode == 0
    assert h1.remove(path1).returncode == 0
    assert locks(h1, image) == []


@pytest.mark.parametrize("features", [None, 1], ids=["exclusive-lock", "layering-only"])
def test_w_attachment_accepts_writes(hosts, libxl, ceph_cluster, make_image, rbd_admin, features):
    """The registration (and a held access mutex) never blocks the mapper's writes."""
    import rbd
    h1 = hosts[0]
    image = make_image(features=features)
    _handle, ioctx = rbd_admin
    path = attached(h1, ceph_cluster, image, "w", 30, None)
    device = libxl.keys(path)["physical-device-path"]
    with rbd.Image(ioctx, image, read_only=True) as img:
        header = "rbd_header." + img.id()
    ioctx.lock_exclusive(header, "block-rbd.access", "test", desc="held by the test", duration=30)
    try:
        payload = b"block-rbd access %s\n" % features.__repr__().encode()
        payload = payload.ljust(4096, b"\0")
        started = time.monotonic()
        import os
        fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            buf.write(payload)
            assert os.pwrite(fd, buf, 0) == 4096
        finally:
            os.close(fd)
        assert time.monotonic() - started < 5
    finally:
        ioctx.unlock(header, "block-rbd.access", "test")
    with rbd.Image(ioctx, image, read_only=True) as img:
        assert img.read(0, 4096) == payload


def test_foreign_watcher_refuses_w_not_r(hosts, libxl, ceph_cluster, make_image, rbd_admin):
    import rbd
    h1 = hosts[0]
    image = make_image()
    handle, ioctx = rbd_admin
    with rbd.Image(ioctx, image) as outside:
        addr = handle.get_addrs()
        path, result = add(h1, ceph_cluster, image, "w", 40, None)
        assert result.returncode == 1
        assert "w refused: watched by a client outside block-rbd" in error_of(libxl, path)
        assert addr not in error_of(libxl, path)
        path_r = attached(h1, ceph_cluster, image, "r", 41, None)
        assert h1.remove(path_r).returncode == 0
        # Once the outside client owns the exclusive lock, r is refused too.
        outside.write(b"x" * 512, 0)
        path_r2, result = add(h1, ceph_cluster, image, "r", 42, None)
        assert result.returncode == 1
        assert "r refused: a client outside block-rbd owns the exclusive lock" in error_of(libxl, path_r2)
        # Forced modes are never refused.
        path_f = attached(h1, ceph_cluster, image, "r!", 43, None)
        assert h1.remove(path_f).returncode == 0


def test_live_migration_across_hosts(hosts, libxl, ceph_cluster, make_image):
    h1, h2, h3 = hosts
    image = make_image()
    vm = str(uuid.uuid4())
    src = attached(h1, ceph_cluster, image, "w", 50, vm)
    dst = attached(h2, ceph_cluster, image, "w", 51, vm, name="web--incoming")  # while the source holds
    other, result = add(h3, ceph_cluster, image, "w", 52, None)
    assert result.returncode == 1 and "refused" in error_of(libxl, other)
    assert h1.remove(src).returncode == 0  # source done
    assert [r["key"] for r in locks(h1, image)] == ["host2:" + dst]
    assert h2.remove(dst).returncode == 0


def test_failed_migration_keeps_source(hosts, libxl, ceph_cluster, make_image):
    h1, h2, h3 = hosts
    image = make_image()
    vm = str(uuid.uuid4())
    src = attached(h1, ceph_cluster, image, "w", 55, vm)
    dst = attached(h2, ceph_cluster, image, "w", 56, vm, name="web--incoming")
    assert h2.remove(dst).returncode == 0  # migration failed: destination torn down
    assert [r["key"] for r in locks(h1, image)] == ["host1:" + src]
    other, result = add(h3, ceph_cluster, image, "w", 57, None)
    assert result.returncode == 1, "the source still holds the image"
    assert h1.remove(src).returncode == 0


def test_same_host_migration_shares_the_mapping(hosts, libxl, ceph_cluster, make_image):
    h1, h2 = hosts[0], hosts[1]
    image = make_image()
    vm = str(uuid.uuid4())
    a = attached(h1, ceph_cluster, image, "w", 60, vm)
    b = attached(h1, ceph_cluster, image, "w", 61, vm)
    assert libxl.keys(a)["physical-device-path"] == libxl.keys(b)["physical-device-path"]
    regs = locks(h1, image)
    assert len(regs) == 2 and all(r["state"] == "alive" for r in regs)
    assert regs[0]["client"] == regs[1]["client"]
    assert h1.remove(a).returncode == 0
    (left,) = locks(h1, image)
    assert left["key"] == "host1:" + b and left["state"] == "alive"
    other, result = add(h2, ceph_cluster, image, "w", 62, None)
    assert result.returncode == 1
    assert h1.remove(b).returncode == 0


def test_pygrub_sequence(hosts, libxl, ceph_cluster, make_image):
    h1, h2 = hosts[0], hosts[1]
    image = make_image()
    vm = str(uuid.uuid4())
    boot = attached(h1, ceph_cluster, image, "w", 0, None)  # dom0 reads the kernel
    assert locks(h1, image)[0]["identity"] == "dom0@host1"
    other, result = add(h2, ceph_cluster, image, "w", 70, None)
    assert result.returncode == 1 and "by dom0 (host host1, domid 0" in error_of(libxl, other)
    assert h1.remove(boot).returncode == 0
    guest = attached(h1, ceph_cluster, image, "w", 71, vm)
    assert h1.remove(guest).returncode == 0


def test_cli_map_registers_as_dom0(hosts, ceph_cluster, make_image):
    h1, h2 = hosts[0], hosts[1]
    image = make_image()
    result = h1.cli("map", image, "--mode", "w")
    assert result.returncode == 0, result.stderr
    try:
        assert [r["key"] for r in locks(h1, image)] == ["host1:manual"]
        refused = h2.cli("map", image, "--mode", "w")
        assert refused.returncode == 1 and "w refused: attached w by dom0 (host host1" in refused.stderr
    finally:
        assert h1.cli("unmap", image).returncode == 0
    assert locks(h1, image) == []
