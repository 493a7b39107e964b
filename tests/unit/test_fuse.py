"""The fuse mapper (block_rbd/mappers/fuse.py): its pure parts here; the real
map/unmap through rbd-fuse + losetup against the test cluster at the end."""

import os
import re
import threading

import pytest

from block_rbd import process
from block_rbd.config import from_dict
from block_rbd.errors import CommandError, DeviceBusy, MapperError
from block_rbd.mappers import fuse as fuse_mod
from block_rbd.mappers.base import Mapping
from block_rbd.mappers.fuse import FuseMapper, loop_devices, parse_mountinfo
from block_rbd.target import ImageSpec

MOUNT_DIR = "/run/block-rbd/fuse"
# /proc/self/mountinfo as this kernel writes it with two rbd-fuse mounts of ours.
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw
54 27 0:39 / /run/block-rbd/fuse/rbd%2Fvm1 rw,nosuid,nodev,relatime - fuse.rbd-fuse rbd-fuse rw,user_id=0,group_id=0
55 27 0:40 / /run/block-rbd/fuse/rbd%2Ftenant%2Fvm2 rw,nosuid,nodev,relatime shared:5 - fuse.rbd-fuse rbd-fuse rw,user_id=0,group_id=0
56 27 0:41 / /run/block-rbd/fuse/deeper/rbd%2Fvm3 rw - fuse.rbd-fuse rbd-fuse rw
57 27 0:42 / /run/block-rbd/fuse-other/rbd%2Fvm4 rw - fuse.rbd-fuse rbd-fuse rw
58 27 0:43 / /run/block-rbd/fuse/tmpfs rw - tmpfs tmpfs rw
59 27 0:44 / /run/block-rbd/fuse/sshfs rw - fuse.sshfs host:/ rw
60 27 0:45 / /run/block-rbd/fuse/plain rw - fuse /dev/fuse rw
"""


def test_parse_mountinfo_finds_fuse_mounts_directly_below_mount_dir():
    assert parse_mountinfo(MOUNTINFO, MOUNT_DIR) == [
        "/run/block-rbd/fuse/rbd%2Fvm1", "/run/block-rbd/fuse/rbd%2Ftenant%2Fvm2",
        "/run/block-rbd/fuse/sshfs", "/run/block-rbd/fuse/plain"]
    assert parse_mountinfo(MOUNTINFO, MOUNT_DIR + "/") == parse_mountinfo(MOUNTINFO, MOUNT_DIR)


def test_parse_mountinfo_unescapes_spaces():
    text = "54 27 0:39 / /run/my\\040dir/rbd%2Fvm1 rw - fuse.rbd-fuse rbd-fuse rw\n"
    assert parse_mountinfo(text, "/run/my dir") == ["/run/my dir/rbd%2Fvm1"]


def test_parse_mountinfo_skips_malformed_lines():
    assert parse_mountinfo("garbage\n\n1 2 3\n", MOUNT_DIR) == []


@pytest.fixture
def sys_root(tmp_path):
    """/sys/block/loopN/{ro,loop/backing_file} for three attached loops and one free one."""
    for name, backing, ro in (("loop0", "/run/block-rbd/fuse/rbd%2Fvm1/vm1", "0"),
                              ("loop1", "/run/block-rbd/fuse/rbd%2Fvm1/vm1", "1"),
                              ("loop7", "/var/lib/images/disk with space.img", "0"),
                              # its directory entry dropped while the loop holds the file open
                              ("loop3", "/run/block-rbd/fuse/rbd%2Fvm2/vm2 (deleted)", "0"),
                              ("loop2", None, "0")):
        os.makedirs(tmp_path / "block" / name / "loop") if backing else os.makedirs(tmp_path / "block" / name)
        (tmp_path / "block" / name / "ro").write_text(ro + "\n")
        if backing:
            (tmp_path / "block" / name / "loop" / "backing_file").write_text(backing + "\n")
    return str(tmp_path)


def test_loop_devices(sys_root):
    found = loop_devices(sys_root)
    assert sorted(found) == ["/run/block-rbd/fuse/rbd%2Fvm1/vm1", "/run/block-rbd/fuse/rbd%2Fvm2/vm2",
                             "/var/lib/images/disk with space.img"]
    assert sorted(found["/run/block-rbd/fuse/rbd%2Fvm1/vm1"]) == [("loop0", False), ("loop1", True)]
    assert found["/run/block-rbd/fuse/rbd%2Fvm2/vm2"] == [("loop3", False)]
    assert found["/var/lib/images/disk with space.img"] == [("loop7", False)]


def test_loop_devices_without_any(tmp_path):
    assert loop_devices(str(tmp_path)) == {}


@pytest.fixture
def mapper(tmp_path, sys_root):
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    config = from_dict({"ceph": {"conf": "/etc/ceph/c.conf", "id": "dom0a", "keyring": "/k/dom0a.keyring"}})
    return FuseMapper(config, sys_root=sys_root, mountinfo=str(tmp_path / "mountinfo"))


def test_mapped_joins_mounts_and_loops(mapper):
    found = [(str(m.spec), m.read_only, m.device, m.details["file"]) for m in mapper.mapped()]
    assert sorted(found) == [
        ("rbd/vm1", False, "/dev/loop0", "/run/block-rbd/fuse/rbd%2Fvm1/vm1"),
        ("rbd/vm1", True, "/dev/loop1", "/run/block-rbd/fuse/rbd%2Fvm1/vm1"),
    ]
    assert mapper.find(ImageSpec("rbd", "vm1"), True).device == "/dev/loop1"
    assert mapper.find(ImageSpec("rbd", "vm2", "tenant"), False) is None  # mounted, no loop yet


def test_mountpoint_is_one_per_image_for_all_modes(mapper):
    assert mapper.mountpoint(ImageSpec("rbd", "vm1")) == "/run/block-rbd/fuse/rbd%2Fvm1"
    assert mapper.mountpoint(ImageSpec("rbd", "vm1", "", "snap")) == "/run/block-rbd/fuse/rbd%2Fvm1"
    assert mapper.mountpoint(ImageSpec("rbd", "vm1", "ns")) == "/run/block-rbd/fuse/rbd%2Fns%2Fvm1"


def test_mount_argv_has_no_secret(mapper):
    assert mapper.mount_argv(ImageSpec("rbd", "vm1"), "/m") == [
        "rbd-fuse", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring", "/k/dom0a.keyring",
        "-r", "vm1", "/m"]
    assert mapper.mount_argv(ImageSpec("rbd", "vm1", "tenant"), "/m") == [
        "rbd-fuse", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring", "/k/dom0a.keyring",
        "-s", "tenant", "-r", "vm1", "/m"]
    assert mapper.mount_argv(ImageSpec("vms", "vm1"), "/m") == [
        "rbd-fuse", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring", "/k/dom0a.keyring",
        "-p", "vms", "-r", "vm1", "/m"]


def test_snapshots_and_map_options_are_refused(mapper, mocker):
    run = mocker.patch.object(process, "run")
    with pytest.raises(MapperError, match="cannot map snapshots \\(rbd/vm1@s\\); use mapper=krbd or nbd"):
        mapper.map(ImageSpec("rbd", "vm1", "", "s"), True)
    with pytest.raises(MapperError, match="takes no map options \\(notrim\\+exclusive\\)"):
        mapper.map(ImageSpec("rbd", "vm9"), True, ("notrim", "exclusive"))
    run.assert_not_called()


@pytest.mark.parametrize("spec, line", [
    (ImageSpec("vms", "vm1"), "rbd-fuse crashed on being given the pool or namespace of vms/vm1 "
     "(rbd-fuse with libfuse 3.17, as on Debian 13, serves only pool rbd without a namespace): "
     "use mapper=nbd or mapper=krbd for it"),
    (ImageSpec("rbd", "vm1", "tenant"), "rbd-fuse crashed on being given the pool or namespace of "
     "rbd/tenant/vm1 "),
    (ImageSpec("rbd", "vm1"), "rbd-fuse mount of rbd/vm1 failed: rbd-fuse: free(): invalid pointer"),
])
def test_a_crash_on_the_pool_option_names_the_mappers_that_work(tmp_path, sys_root, mocker, spec, line):
    (tmp_path / "mountinfo").write_text("")
    config = from_dict({"fuse": {"mount_dir": str(tmp_path / "fuse")}})
    mapper = FuseMapper(config, sys_root=sys_root, mountinfo=str(tmp_path / "mountinfo"))
    mocker.patch.object(process, "run", side_effect=CommandError(
        "rbd-fuse: free(): invalid pointer", returncode=-6))
    with pytest.raises(MapperError, match="^" + re.escape(line)):
        mapper.map(spec, False)
    assert os.listdir(tmp_path / "fuse") == []  # the mount point went with the failure


@pytest.mark.parametrize("missing, reason", [
    ("rbd-fuse", "rbd-fuse is not installed (apt-get install rbd-fuse)"),
    ("losetup", "losetup is not installed (apt-get install mount)"),
    ("fusermount", "fusermount is not installed (apt-get install fuse)"),
])
def test_unavailable_names_the_package(mapper, mocker, missing, reason):
    mocker.patch.object(fuse_mod.shutil, "which", side_effect=lambda tool: None if tool == missing else "/x")
    assert mapper.unavailable() == reason


def _one_loop(tmp_path, timeout):
    """A mapper whose sysfs has one loop (loop5) on rbd/vm1's file, mounted at its point."""
    point = "/run/block-rbd/fuse/rbd%2Fvm1"
    os.makedirs(tmp_path / "sys" / "block" / "loop5" / "loop")
    (tmp_path / "sys" / "block" / "loop5" / "ro").write_text("0\n")
    backing = tmp_path / "sys" / "block" / "loop5" / "loop" / "backing_file"
    backing.write_text(point + "/vm1\n")
    (tmp_path / "mountinfo").write_text(
        "54 27 0:39 / %s rw,nosuid,nodev,relatime - fuse.rbd-fuse rbd-fuse rw\n" % point)
    config = from_dict({"timeouts": {"unmap": timeout}})
    mapper = FuseMapper(config, sys_root=str(tmp_path / "sys"), mountinfo=str(tmp_path / "mountinfo"))
    mapping = Mapping("fuse", ImageSpec("rbd", "vm1"), False, "/dev/loop5",
                      {"mountpoint": point, "file": point + "/vm1"})
    return mapper, mapping, backing


def test_unmap_unmounts_only_once_the_kernel_has_let_go_of_the_loop(tmp_path, mocker):
    mapper, mapping, backing = _one_loop(tmp_path, 10)
    calls = []

    def run(argv, **kwargs):
        calls.append((argv, backing.exists()))
        if argv[0] == "losetup":  # detached when its last opener closes, a moment later
            threading.Timer(0.2, backing.unlink).start()
        return process.Result(argv, 0, "", "")
    mocker.patch.object(process, "run", side_effect=run)
    mapper.unmap(mapping)
    assert calls == [(["losetup", "--detach", "/dev/loop5"], True),
                     (["fusermount", "-u", "/run/block-rbd/fuse/rbd%2Fvm1"], False)]


def test_unmap_of_a_loop_that_stays_attached_fails_and_keeps_the_mount(tmp_path, mocker):
    mapper, mapping, _backing = _one_loop(tmp_path, 0.3)
    run = mocker.patch.object(process, "run", return_value=process.Result([], 0, "", ""))
    with pytest.raises(DeviceBusy, match="^/dev/loop5 is still in use after 0 s; close it"):
        mapper.unmap(mapping)
    assert [c.args[0] for c in run.call_args_list] == [["losetup", "--detach", "/dev/loop5"]]


# ---- for real: rbd-fuse + losetup against the test cluster -------------------------------------

def test_real_map_unmap_both_modes(ceph_cluster, make_image, tmp_path):
    for tool in ("rbd-fuse", "losetup", "fusermount"):
        if not fuse_mod.shutil.which(tool):
            pytest.skip("%s not installed" % tool)
    from block_rbd.cluster import Cluster
    image = make_image(size=8 << 20)
    config = from_dict({"ceph": {"conf": ceph_cluster.conf, "id": ceph_cluster.user,
                                 "keyring": ceph_cluster.user_keyring},
                        "fuse": {"mount_dir": str(tmp_path / "fuse")}, "timeouts": {"unmap": 5}})
    spec = ImageSpec(ceph_cluster.pool, image)
    with Cluster(config) as cluster:
        mapper = FuseMapper(config, cluster)
        rw = mapper.map(spec, False)
        ro = mapper.map(spec, True)
        again = mapper.map(spec, False)
        assert again.device == rw.device
        assert rw.device != ro.device
        assert {(m.device, m.read_only) for m in mapper.mapped()} == {(rw.device, False), (ro.device, True)}
        point = mapper.mountpoint(spec)
        assert os.stat(str(tmp_path / "fuse")).st_mode & 0o777 == 0o700
        mapper.unmap(rw)
        assert point in mapper._mounts()  # the read-only loop still uses the mount
        mapper.unmap(ro)
        assert mapper.mapped() == []
        assert point not in mapper._mounts() and not os.path.exists(point)
        mapper.unmap(ro)  # idempotent
    with open("/proc/self/mountinfo") as handle:
        assert point.replace(" ", "\\040") not in handle.read()
