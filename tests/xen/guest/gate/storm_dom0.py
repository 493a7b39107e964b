#!/usr/bin/python3
"""Boot storm in dom0 against the real xenstored: N concurrent `block-rbd add`s of
distinct images through the hotplug path as libxl runs it (backend dir written first,
then /etc/xen/scripts/block-rbd add with XENBUS_PATH...), then N concurrent removes,
against the floor storm measured in the same run (N concurrent bare maps of the mapper,
each followed by one xenstore-write).  Prints one STORM line.

Exit 1 unless every floor map and every remove succeeded and every add either connected
or failed cleanly (hotplug-status=error, one hotplug-error line, exit 1) within libxl's
hotplug timeout, timed as libxl times it (from the fork).  With --require-all every add
must also connect, when the floor storm left the product most of its budget: under TCG
16 concurrent `rbd-nbd map`s alone take ~25 s of the 30 s, which is the emulator's cost,
not the product's."""

import argparse
import base64
import ctypes
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor



def gate_config(path="/brbd/config"):
    """The harness's /brbd/config (KEY='value' lines, sh-quoted)."""
    import shlex
    with open(path) as fh:
        return dict(shlex.split(line)[0].split("=", 1) for line in fh if "=" in line)


GATE = gate_config()
SCRIPT = "/etc/xen/scripts/block-rbd"
CONF = "/etc/ceph/ceph.conf"
USER = GATE["BRBD_ID"]
KEYRING = GATE["BRBD_KEYRING"]
POOL = GATE["BRBD_POOL"]
MON_V2 = GATE["BRBD_MON_V2"]
# libxl kills a hotplug script still running after this long (LIBXL_HOTPLUG_TIMEOUT)
LIBXL_TIMEOUT = 40
BUDGET = 30  # block-rbd's timeouts.hotplug (default; dom0's block-rbd.yaml keeps it)
# --require-all applies when the floor storm took at most this share of the budget
FLOOR_SHARE = 1 / 3
# a storm run that takes this long has hung; let it run past libxl's limit to see how long
RUN_LIMIT = 120


def run(argv, timeout=60, **kw):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, **kw)


def xs_write(*pairs):
    run(["xenstore-write"] + list(pairs), check=True)


def xs_read(path):
    p = run(["xenstore-read", path])
    return p.stdout.strip() if p.returncode == 0 else None


def concurrently(fn, items):
    started = time.monotonic()
    with ThreadPoolExecutor(len(items)) as pool:
        out = list(pool.map(fn, items))
    return out, time.monotonic() - started


# ---- floor: the mapper's bare map + one xenstore-write
def kernel_key():
    """client.USER's secret into this process's keyring, as the krbd mapper does."""
    with open(KEYRING) as fh:
        secret = [ln.split("=", 1)[1].strip() for ln in fh if ln.strip().startswith("key")][0]
    raw = base64.b64decode(secret)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    serial = libc.syscall(248, b"ceph", ("client.%s" % USER).encode(), raw, len(raw), -2)
    if serial < 0:
        raise OSError(ctypes.get_errno(), "add_key")


def krbd_devices():
    return set(os.listdir("/sys/bus/rbd/devices"))


def floor_map(mapper, image, path):
    started = time.monotonic()
    if mapper == "krbd":
        line = "%s name=%s,key=client.%s,ms_mode=prefer-crc %s %s -" % (MON_V2, USER, USER, POOL, image)
        with open("/sys/bus/rbd/add_single_major", "w") as fh:
            fh.write(line)
        dev = [d for d in krbd_devices()
               if open("/sys/bus/rbd/devices/%s/name" % d).read().strip() == image]
        device = "/dev/rbd%s" % dev[0]
    else:
        p = run(["rbd-nbd", "map", "-c", CONF, "--id", USER, "--keyring", KEYRING,
                 "%s/%s" % (POOL, image)], timeout=120, check=True)
        device = p.stdout.strip().splitlines()[-1]
    xs_write(path + "/physical-device-path", device)
    return time.monotonic() - started, device


def floor_unmap(mapper, device):
    if mapper == "krbd":
        with open("/sys/bus/rbd/remove_single_major", "w") as fh:
            fh.write(device[len("/dev/rbd"):])
    else:
        run(["rbd-nbd", "unmap", device], timeout=120, check=True)


# ---- the hotplug path
def backend(domid, image, mapper):
    """What libxl writes before it runs the script (tests/xen/recorded/hotplug)."""
    path = "backend/vbd/%d/51712" % domid
    keys = {"frontend": "/local/domain/%d/device/vbd/51712" % domid,
            "params": "%s:%s,mapper=%s" % (POOL, image, mapper), "script": SCRIPT,
            "frontend-id": str(domid), "online": "1", "removable": "0", "bootable": "1",
            "state": "2", "dev": "xvda", "type": "phy", "mode": "w", "device-type": "disk",
            "discard-enable": "1"}
    pairs = []
    for k, v in keys.items():
        pairs += [path + "/" + k, v]
    xs_write(*pairs, "/local/domain/%d/vm" % domid, "/vm/00000000-0000-4000-8000-%012d" % domid)
    return path


def hotplug(command, path):
    env = dict(os.environ, XENBUS_PATH=path, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend",
               script=SCRIPT)
    started = time.monotonic()
    try:
        p = run([SCRIPT, command], env=env, cwd="/", timeout=RUN_LIMIT)
        rc, err = p.returncode, p.stderr.strip()
    except subprocess.TimeoutExpired:
        rc, err = "hung", "still running after %d s" % RUN_LIMIT
    return time.monotonic() - started, rc, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mapper", choices=["krbd", "nbd"], required=True)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--prefix", default="storm-")
    ap.add_argument("--first-domid", type=int, default=200)
    ap.add_argument("--label", default="")
    ap.add_argument("--require-all", action="store_true", help="every add must connect")
    a = ap.parse_args()
    n, m = a.images, a.mapper
    label = a.label or m
    images = ["%s%d" % (a.prefix, i) for i in range(n)]
    problems = []

    # floor storm
    run(["modprobe", "rbd" if m == "krbd" else "nbd"], check=True)  # krbd: libceph's key type
    if m == "krbd":
        kernel_key()
    scratch = ["backend/vbd/%d/51999" % (a.first_domid + i) for i in range(n)]
    floor, floor_wall = concurrently(lambda iv: _try(floor_map, m, iv[0], iv[1]), list(zip(images, scratch)))
    floor_ok = sum(1 for r in floor if not isinstance(r, str))
    for r in floor:
        if isinstance(r, str):
            problems.append("floor map: " + r)
        else:
            _try(floor_unmap, m, r[1])
    for p in scratch:
        run(["xenstore-rm", p])

    # add storm, then remove storm
    paths = [backend(a.first_domid + i, img, m) for i, img in enumerate(images)]
    adds, add_wall = concurrently(lambda p: hotplug("add", p), paths)
    add_ok = add_clean = 0
    for path, (secs, rc, err) in zip(paths, adds):
        status = xs_read(path + "/hotplug-status")
        dev = xs_read(path + "/physical-device-path")
        in_time = secs <= LIBXL_TIMEOUT
        if rc == 0 and status == "connected" and dev and os.path.exists(dev):
            add_ok += 1
            add_clean += in_time
            if in_time:
                continue
        error = xs_read(path + "/hotplug-error") or ""
        clean = (rc == 1 and status == "error" and error and "\n" not in error
                 and "Traceback" not in err and in_time)
        add_clean += clean
        problems.append("add %s: rc=%s %.1f s%s status=%s %s: %s" % (
            path, rc, secs, "" if in_time else " (libxl kills at %d s)" % LIBXL_TIMEOUT, status,
            "failed cleanly" if clean else "NOT CLEAN", error or last_lines(err)))
    for path in paths:
        xs_write(path + "/online", "0", path + "/state", "6")
    removes, remove_wall = concurrently(lambda p: hotplug("remove", p), paths)
    remove_ok = sum(1 for _secs, rc, _err in removes if rc == 0)
    for path, (secs, rc, err) in zip(paths, removes):
        if rc != 0:
            problems.append("remove %s: rc=%s %.1f s: %s" % (path, rc, secs, last_lines(err)))
    for i in range(n):
        run(["xenstore-rm", "/local/domain/0/backend/vbd/%d" % (a.first_domid + i),
             "/local/domain/%d" % (a.first_domid + i)])

    add_times = sorted(t for t, _rc, _e in adds)
    for line in problems:
        print(line)
    print("storm %s: %d disks; floor %d/%d in %.1f s; add %d/%d in %.1f s (ratio %.2fx, slowest add %.1f s);"
          " remove %d/%d in %.1f s" % (label, n, floor_ok, n, floor_wall, add_ok, n, add_wall,
                                        add_wall / floor_wall, add_times[-1], remove_ok, n, remove_wall))
    print("STORM %s n=%d floor_ok=%d floor_wall=%.2f add_ok=%d add_wall=%.2f ratio=%.2f remove_ok=%d "
          "remove_wall=%.2f" % (label, n, floor_ok, floor_wall, add_ok, add_wall, add_wall / floor_wall,
                                remove_ok, remove_wall))
    need_all = a.require_all and floor_wall <= BUDGET * FLOOR_SHARE
    if a.require_all and not need_all:
        print("not every add has to connect: the floor storm alone took %.1f s of the %d s budget"
              % (floor_wall, BUDGET))
    ok = floor_ok == remove_ok == add_clean == n and (add_ok == n or not need_all)
    sys.exit(0 if ok else 1)


def last_lines(err):
    """The end of a run's stderr without its verbose "ran (...)" lines."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("block-rbd: ran ")]
    return " | ".join(lines[-2:])[-400:]


def _try(fn, *args):
    try:
        return fn(*args)
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return "%s%r: %s" % (fn.__name__, args[1:], exc)


if __name__ == "__main__":
    main()
