"""Daemons an older block-rbd left in its units' cgroups, moved into scopes (block_rbd/scopes.py)."""

import pytest

from block_rbd import process, scopes
from block_rbd.errors import BlockRbdError, CommandError

NBD_ARGV = ["rbd-nbd", "map", "rbd/vm1", "-c", "/etc/ceph/ceph.conf", "--id", "xen", "--keyring",
            "/etc/ceph/ceph.client.xen.keyring", "--try-netlink", "--cookie", "c00k1e", "--reattach-timeout", "30"]
FUSE_ARGV = ["rbd-fuse", "-c", "/etc/ceph/ceph.conf", "--id", "xen", "--keyring", "/k", "-p", "vms", "-s", "ns",
             "-r", "vm2", "/run/block-rbd/fuse/vms-ns-vm2"]


def fake_proc(tmp_path, processes):
    """/proc with {pid: (comm, uid, cgroup path, argv[, exe])}."""
    root = tmp_path / "proc"
    root.mkdir()
    (root / "self").mkdir()  # not a pid: skipped
    for pid, (comm, uid, cgroup, argv, *exe) in processes.items():
        d = root / str(pid)
        d.mkdir()
        (d / "exe").symlink_to(exe[0] if exe else "/usr/bin/" + comm)
        (d / "comm").write_text(comm + "\n")
        (d / "status").write_text("Name:\t%s\nUid:\t%d\t%d\t%d\t%d\n" % (comm, uid, uid, uid, uid))
        (d / "cgroup").write_text("0::%s\n" % cgroup)
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return str(root)


@pytest.fixture
def proc(tmp_path):
    return fake_proc(tmp_path, {
        101: ("rbd-nbd", 0, "/system.slice/block-rbd.service", NBD_ARGV),
        102: ("rbd-nbd", 0, "/system.slice/block-rbd-nbd-rbd-vm3-1a2b3c4d.scope",
              NBD_ARGV[:2] + ["rbd/vm3"] + NBD_ARGV[3:]),
        103: ("rbd-nbd", 65534, "/system.slice/block-rbd.service", NBD_ARGV),  # not root's: forged
        104: ("rbd-fuse", 0, "/system.slice/block-rbd-upkeep.service", FUSE_ARGV),
        105: ("python3", 0, "/system.slice/block-rbd.service", ["python3", "/etc/xen/scripts/block-rbd"]),
        106: ("rbd-nbd", 0, "/system.slice/ssh.service", NBD_ARGV),  # somebody else's
        107: ("rbd-nbd", 0, "/system.slice/block-rbd.service", NBD_ARGV, "/usr/bin/python3"),  # named so
        108: ("rbd-fuse", 0, "/system.slice/block-rbd.service", FUSE_ARGV, "/usr/bin/rbd-fuse (deleted)"),
    })


def test_strays_are_roots_daemons_inside_a_block_rbd_service(proc):
    assert scopes.strays(proc) == [(101, "nbd", "rbd/vm1", "block-rbd.service"),
                                   (104, "fuse", "vms/ns/vm2", "block-rbd-upkeep.service"),
                                   (108, "fuse", "vms/ns/vm2", "block-rbd.service")]  # upgraded under it


def test_fuse_image_follows_block_rbds_command_line():
    assert scopes.fuse_image(FUSE_ARGV) == "vms/ns/vm2"
    assert scopes.fuse_image(["rbd-fuse", "-r", "vm1", "/mnt"]) == "rbd/vm1"
    assert scopes.fuse_image(["rbd-fuse", "/mnt"]) is None


def test_adopt_argv_is_start_transient_unit_with_the_daemons_pid():
    scope = process.Scope("nbd", "rbd/vm1")
    assert scopes.adopt_argv(101, scope, "block-rbd-nbd-rbd-vm1-0000.scope") == [
        "busctl", "call", "--quiet", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        "block-rbd-nbd-rbd-vm1-0000.scope", "fail", "5",
        "PIDs", "au", "1", "101",
        "Description", "s", "block-rbd: rbd-nbd serving rbd/vm1 to Xen",
        "CollectMode", "s", "inactive-or-failed",
        "After", "as", "1", "network-online.target",
        "Before", "as", "2", "xendomains.service", "shutdown.target",
        "0"]


def test_adopt_all_moves_each_stray_and_logs_it(proc, tmp_path, monkeypatch, caplog):
    runtime = tmp_path / "run-systemd"
    runtime.mkdir()
    calls = []
    monkeypatch.setattr(process, "run", lambda argv, **kw: calls.append(argv))
    caplog.set_level("INFO", logger="block-rbd")
    moved = scopes.adopt_all(proc, runtime=str(runtime))
    assert [(pid, image) for pid, image, _unit in moved] == [(101, "rbd/vm1"), (104, "vms/ns/vm2"),
                                                             (108, "vms/ns/vm2")]
    assert [c[14] for c in calls] == ["101", "104", "108"]  # the PIDs' values
    assert all(unit.startswith(("block-rbd-nbd-rbd-vm1-", "block-rbd-fuse-vms-ns-vm2-")) for _p, _i, unit in moved)
    assert "rbd-nbd 101 serving rbd/vm1 moved from block-rbd.service into block-rbd-nbd-rbd-vm1-" in caplog.text


def test_without_systemd_nothing_is_moved(proc, tmp_path, monkeypatch):
    monkeypatch.setattr(process, "run", lambda argv, **kw: pytest.fail("ran %s" % argv))
    assert scopes.adopt_all(proc, runtime=str(tmp_path / "absent")) == []


def test_a_daemon_that_cannot_be_moved_is_named_and_the_others_still_move(proc, tmp_path, monkeypatch):
    runtime = tmp_path / "run-systemd"
    runtime.mkdir()
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        if argv[14] == "101":
            raise CommandError("busctl call failed: Unit block-rbd-nbd-rbd-vm1 already exists.")
    monkeypatch.setattr(process, "run", run)
    with pytest.raises(BlockRbdError) as info:
        scopes.adopt_all(proc, runtime=str(runtime))
    assert len(calls) == 3
    assert str(info.value) == ("could not move into a scope: nbd 101 (rbd/vm1): busctl call failed: "
                               "Unit block-rbd-nbd-rbd-vm1 already exists.")
