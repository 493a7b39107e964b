"""rbd-nbd at its exact command-line interface (block_rbd/mappers/nbd.py).

The list-mapped outputs below are what Ceph 16.2's src/tools/rbd_nbd/rbd-nbd.cc
(do_list_mapped_devices) prints with --format json: one JSON array of objects
with id (the daemon's pid), pool, namespace, image, snap ("" for the head,
"@ID" when mapped by --snap-id), device and cookie.
"""

import os

import pytest

from block_rbd import process
from block_rbd.config import from_dict
from block_rbd.errors import CommandError, MapperError
from block_rbd.mappers import nbd as nbd_mod
from block_rbd.mappers.nbd import NbdMapper, option_args, parse_list_mapped
from block_rbd.process import Result
from block_rbd.target import ImageSpec

EMPTY = "[]"
ONE = ('[{"id":41235,"pool":"rbd","namespace":"","image":"vm1","snap":"","device":"/dev/nbd0",'
       '"cookie":"0d9a3f4e-2f5b-4a0c-9b4e-6f8f1c2d3e4f"}]')
SEVERAL = ('[{"id":41235,"pool":"rbd","namespace":"","image":"vm1","snap":"","device":"/dev/nbd0",'
           '"cookie":"0d9a3f4e-2f5b-4a0c-9b4e-6f8f1c2d3e4f"},'
           '{"id":41301,"pool":"rbd","namespace":"tenant","image":"vm1","snap":"gold","device":"/dev/nbd1",'
           '"cookie":"5a1b2c3d-0000-4000-8000-00000000abcd"},'
           '{"id":41377,"pool":"tank","namespace":"","image":"db","snap":"@4","device":"/dev/nbd15",'
           '"cookie":""}]')
PRETTY = """[
    {
        "id": 41235,
        "pool": "rbd",
        "namespace": "",
        "image": "vm1",
        "snap": "",
        "device": "/dev/nbd0",
        "cookie": "0d9a3f4e-2f5b-4a0c-9b4e-6f8f1c2d3e4f"
    }
]
"""


@pytest.fixture
def sys_root(tmp_path):
    """/sys/block/nbdN/ro for the devices in the recordings: nbd1 is read-only."""
    for name, ro in (("nbd0", "0"), ("nbd1", "1"), ("nbd15", "0")):
        os.makedirs(tmp_path / "block" / name)
        (tmp_path / "block" / name / "ro").write_text(ro + "\n")
    os.makedirs(tmp_path / "module" / "nbd")
    return str(tmp_path)


@pytest.fixture
def config():
    return from_dict({"ceph": {"conf": "/etc/ceph/c.conf", "id": "dom0a", "keyring": "/etc/ceph/dom0a.keyring"},
                      "timeouts": {"map": 20, "unmap": 10, "op": 5}})


@pytest.fixture
def mapper(config, sys_root):
    return NbdMapper(config, sys_root=sys_root)


class RbdNbd:
    """A recording stand-in for block_rbd.process.run when the command is rbd-nbd."""

    def __init__(self, listed=EMPTY):
        self.listed = listed
        self.calls = []
        self.map_result = Result([], 0, "/dev/nbd3\n", "")
        self.unmap_error = None

    def __call__(self, argv, *, timeout, check=True, input=None, env=None, quiet=False):
        assert input is None and env is None
        self.calls.append((list(argv), timeout))
        if argv[:2] == ["rbd-nbd", "list-mapped"]:
            return Result(argv, 0, self.listed, "")
        if argv[:2] == ["rbd-nbd", "map"]:
            if self.map_result.returncode and check:
                raise CommandError("rbd-nbd map failed: " + process.last_line(self.map_result.stderr),
                                   returncode=self.map_result.returncode, stderr=self.map_result.stderr)
            return self.map_result
        if argv[:2] == ["rbd-nbd", "unmap"]:
            if self.unmap_error:
                raise self.unmap_error
            return Result(argv, 0, "", "")
        raise AssertionError("unexpected command %r" % argv)


@pytest.fixture
def rbd_nbd(mocker):
    fake = RbdNbd()
    mocker.patch.object(process, "run", side_effect=fake)
    return fake


# ---- list-mapped parsing --------------------------------------------------------------------

def test_parse_empty(sys_root):
    assert parse_list_mapped(EMPTY, sys_root) == []
    assert parse_list_mapped("", sys_root) == []


def test_parse_one(sys_root):
    (mapping,) = parse_list_mapped(ONE, sys_root)
    assert mapping.mapper == "nbd"
    assert mapping.spec == ImageSpec("rbd", "vm1")
    assert mapping.device == "/dev/nbd0" and mapping.read_only is False
    assert mapping.details == {"pid": 41235}


def test_parse_pretty(sys_root):
    assert [m.device for m in parse_list_mapped(PRETTY, sys_root)] == ["/dev/nbd0"]


def test_parse_several_with_namespace_snapshot_and_read_only(sys_root):
    mappings = parse_list_mapped(SEVERAL, sys_root)
    assert [(str(m.spec), m.device, m.read_only) for m in mappings] == [
        ("rbd/vm1", "/dev/nbd0", False),
        ("rbd/tenant/vm1@gold", "/dev/nbd1", True),
        ("tank/db@@4", "/dev/nbd15", False),  # mapped by snap id: never equal to a block-rbd spec
    ]


def test_parse_older_output_without_namespace(sys_root):
    text = '[{"id":1,"pool":"rbd","image":"vm1","snap":"-","device":"/dev/nbd0"}]'
    (mapping,) = parse_list_mapped(text, sys_root)
    assert mapping.spec == ImageSpec("rbd", "vm1")


@pytest.mark.parametrize("text", ["rbd-nbd: invalid output format", "id pool image\n1 rbd vm1", "[{"])
def test_parse_garbage(text, sys_root):
    with pytest.raises(MapperError, match="rbd-nbd list-mapped printed something that is not JSON"):
        parse_list_mapped(text, sys_root)


# ---- map ------------------------------------------------------------------------------------

def test_map_argv_exactly(mapper, rbd_nbd):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    assert rbd_nbd.calls == [
        (["rbd-nbd", "list-mapped", "--format", "json"], 5),
        (["rbd-nbd", "map", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring", "/etc/ceph/dom0a.keyring",
          "rbd/vm1"], 20),
    ]
    assert mapping.device == "/dev/nbd3" and mapping.mapper == "nbd" and not mapping.read_only


def test_map_read_only_namespace_snapshot_and_options(config, sys_root, rbd_nbd):
    config = from_dict({"ceph": {"conf": "/c", "id": "dom0a", "keyring": "/k"},
                        "nbd": {"options": ["try_netlink", "io_timeout=30"]}})
    NbdMapper(config, sys_root=sys_root).map(ImageSpec("rbd", "vm1", "tenant", "gold"), True, ("exclusive",))
    assert rbd_nbd.calls[-1][0] == [
        "rbd-nbd", "map", "-c", "/c", "--id", "dom0a", "--keyring", "/k", "--read-only",
        "--try-netlink", "--io-timeout", "30", "--exclusive", "rbd/tenant/vm1@gold"]


def test_map_reuses_an_existing_mapping(mapper, rbd_nbd):
    rbd_nbd.listed = SEVERAL
    mapping = mapper.map(ImageSpec("rbd", "vm1", "tenant", "gold"), True)
    assert mapping.device == "/dev/nbd1" and mapping.details["reused"]
    assert [c[0][1] for c in rbd_nbd.calls] == ["list-mapped"]
    # the same image in the other mode is a new mapping
    mapper.map(ImageSpec("rbd", "vm1", "tenant", "gold"), False)
    assert rbd_nbd.calls[-1][0][1] == "map"


def test_map_takes_the_last_line_of_stdout(mapper, rbd_nbd):
    rbd_nbd.map_result = Result([], 0, "some notice\n/dev/nbd7\n", "")
    assert mapper.map(ImageSpec("rbd", "vm1"), False).device == "/dev/nbd7"


@pytest.mark.parametrize("stdout", ["", "\n", "done\n"])
def test_map_that_prints_no_device(mapper, rbd_nbd, stdout):
    rbd_nbd.map_result = Result([], 0, stdout, "")
    with pytest.raises(MapperError, match="^rbd-nbd map of rbd/vm1 printed no device$"):
        mapper.map(ImageSpec("rbd", "vm1"), False)


@pytest.mark.parametrize("stderr, cause", [
    ("2023-01-01T00:00:00.000+0000 7f 0 set uid:gid\nrbd-nbd: failed to find unused device\n",
     "rbd-nbd: failed to find unused device"),
    ("rbd-nbd: failed to open image: (2) No such file or directory\n",
     "rbd-nbd: failed to open image: (2) No such file or directory"),
])
def test_map_failure_is_one_line_with_the_tools_cause(mapper, rbd_nbd, stderr, cause):
    rbd_nbd.map_result = Result([], 1, "", stderr)
    with pytest.raises(MapperError) as info:
        mapper.map(ImageSpec("rbd", "vm1"), False)
    assert str(info.value) == "rbd-nbd map of rbd/vm1 failed: %s" % cause


def test_no_secret_in_argv(mapper, rbd_nbd):
    mapper.map(ImageSpec("rbd", "vm1"), True, ("exclusive",))
    argv = rbd_nbd.calls[-1][0]
    assert "--key" not in argv and not any(a.startswith(("--key=", "--secret")) for a in argv)
    assert argv[argv.index("--keyring") + 1] == "/etc/ceph/dom0a.keyring"


# ---- unmap ----------------------------------------------------------------------------------

def test_unmap_argv_exactly(mapper, rbd_nbd):
    rbd_nbd.listed = ONE
    (mapping,) = mapper.mapped()
    mapper.unmap(mapping)
    assert rbd_nbd.calls[-1] == (["rbd-nbd", "unmap", "/dev/nbd0"], 10)


def test_unmap_of_a_device_already_gone_does_nothing(mapper, rbd_nbd):
    rbd_nbd.listed = ONE
    (mapping,) = mapper.mapped()
    rbd_nbd.listed = EMPTY
    mapper.unmap(mapping)
    assert [c[0][1] for c in rbd_nbd.calls] == ["list-mapped", "list-mapped"]


def test_unmap_failure(mapper, rbd_nbd):
    rbd_nbd.listed = ONE
    (mapping,) = mapper.mapped()
    rbd_nbd.unmap_error = CommandError("rbd-nbd unmap failed: rbd-nbd: failed to unmap: (16) Device or resource busy")
    with pytest.raises(MapperError, match="^rbd-nbd unmap of /dev/nbd0 failed: .*Device or resource busy$"):
        mapper.unmap(mapping)


# ---- options and availability ---------------------------------------------------------------------

@pytest.mark.parametrize("options, args", [
    ((), []),
    (("exclusive",), ["--exclusive"]),
    (("try_netlink", "io_timeout=30"), ["--try-netlink", "--io-timeout", "30"]),
    (("device=/dev/nbd5",), ["--device", "/dev/nbd5"]),
])
def test_option_args(options, args):
    assert option_args(options) == args


def test_unavailable_without_rbd_nbd(mapper, mocker):
    mocker.patch.object(nbd_mod.shutil, "which", return_value=None)
    assert mapper.unavailable() == "rbd-nbd is not installed (apt-get install rbd-nbd)"


def test_unavailable_without_the_nbd_driver(config, tmp_path, mocker):
    mocker.patch.object(nbd_mod.shutil, "which", return_value="/usr/bin/rbd-nbd")
    run = mocker.patch.object(process, "run", side_effect=CommandError(
        "modprobe nbd failed: modprobe: FATAL: Module nbd not found"))
    assert NbdMapper(config, sys_root=str(tmp_path)).unavailable() == (
        "no nbd driver in this kernel (modprobe nbd failed: modprobe: FATAL: Module nbd not found)")
    assert run.call_args.args[0] == ["modprobe", "nbd"]


def test_available_with_the_module_loaded(mapper, mocker):
    mocker.patch.object(nbd_mod.shutil, "which", return_value="/usr/bin/rbd-nbd")
    run = mocker.patch.object(process, "run")
    assert mapper.unavailable() is None
    run.assert_not_called()


def test_real_rbd_nbd_on_this_kernel_fails_cleanly(config, tmp_path):
    """This machine has no nbd driver: the real tool's failure becomes one MapperError line."""
    if not os.path.exists("/usr/bin/rbd-nbd"):
        pytest.skip("rbd-nbd not installed (Debian package rbd-nbd)")
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has nbd: the real run belongs to the Xen-in-QEMU tests")
    cfg = from_dict({"ceph": {"conf": str(tmp_path / "none.conf"), "id": "dom0a", "keyring": str(tmp_path / "k")},
                     "timeouts": {"map": 10}})
    with pytest.raises(MapperError) as info:
        NbdMapper(cfg)._map(ImageSpec("rbd", "vm1"), False, ())
    assert str(info.value).startswith("rbd-nbd map of rbd/vm1 failed: ")
    assert "\n" not in str(info.value)
