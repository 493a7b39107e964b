"""`block-rbd doctor`: is this dom0 ready to attach RBD disks?

Each check returns (level, message); levels are ok, warn and fail.  Checks
run in the order an operator would debug: configuration, credentials,
cluster, mappers, Xen, then this host's own records.
"""

import os
import stat
import time

from . import mappers
from .cluster import Cluster, bindings, keyring_secret, translate
from .errors import BlockRbdError, XenstoreError
from .mappers.krbd import uses_msgr2

OK, WARN, FAIL = "ok", "warn", "fail"


def check_credentials(config):
    results = []
    conf = config["ceph.conf"]
    results.append((OK, "ceph.conf %s is readable" % conf) if os.access(conf, os.R_OK)
                   else (FAIL, "ceph.conf %s is not readable" % conf))
    try:
        keyring = config.keyring  # refused if anyone but root could change it
        keyring_secret(keyring, config["ceph.id"])
    except BlockRbdError as exc:
        return results + [(FAIL, str(exc))]
    mode = stat.S_IMODE(os.stat(keyring).st_mode)
    if mode & 0o077:
        results.append((WARN, "keyring %s is mode %04o: make it 0600 (it holds a secret)" % (keyring, mode)))
    else:
        results.append((OK, "keyring %s holds a key for client.%s (mode %04o)" % (keyring, config["ceph.id"], mode)))
    return results


def check_cluster(config, cluster):
    rados, _rbd = bindings()
    pool = config["pool"]
    try:
        fsid = cluster.fsid()
        with cluster.ioctx(pool) as ioctx:
            try:
                ioctx.stat("rbd_directory")  # exists in every pool that holds rbd images
            except rados.Error as exc:
                raise translate(exc, "pool %s has no rbd_directory (is it an rbd pool?)" % pool) from None
    except BlockRbdError as exc:
        return [(FAIL, "cluster: %s" % exc)]
    return [(OK, "cluster %s reachable as client.%s; pool %s is an rbd pool" % (fsid, config["ceph.id"], config["pool"]))]


def check_mappers(config, cluster):
    results = []
    usable = []
    for name in mappers.AUTO_ORDER:
        mapper = mappers.get(name, config, cluster)
        reason = mapper.unavailable()
        if reason:
            results.append((WARN, "mapper %s: not usable: %s" % (name, reason)))
        else:
            usable.append(name)
            results.append((OK, "mapper %s: usable" % name))
    wanted = config["mapper"]
    if wanted == "auto":
        results.append((OK, "mapper auto picks %s" % usable[0]) if usable
                       else (FAIL, "no mapper is usable on this host"))
    elif wanted not in usable:
        results.append((FAIL, "configured mapper %s is not usable here" % wanted))
    if "krbd" in usable:
        try:
            mon_host = cluster.mon_host()
        except BlockRbdError:
            mon_host = ""
        has_v1 = "v1:" in mon_host or ("v2:" not in mon_host and mon_host)
        if mon_host and not has_v1 and not uses_msgr2(config["krbd.options"]):
            results.append((WARN, "the monitors offer msgr2 only: set krbd: {options: [ms_mode=prefer-crc]}"))
    return results


def check_xen(xs=None):
    results = []
    script = "/etc/xen/scripts/block-rbd"
    if os.access(script, os.X_OK):
        results.append((OK, "%s is installed" % script))
    else:
        results.append((WARN, "%s is missing or not executable (make install)" % script))
    if xs is not None:
        try:
            xs.read_optional("/local/domain/0/name")
            results.append((OK, "xenstored answers"))
        except XenstoreError as exc:
            results.append((FAIL, "%s (is xenstored running?)" % exc))
    try:
        with open("/proc/xen/capabilities") as handle:
            dom0 = "control_d" in handle.read()
    except OSError:
        dom0 = False
    results.append((OK, "running in a Xen dom0") if dom0 else (WARN, "not a Xen dom0 (no control_d in /proc/xen/capabilities)"))
    return results


def check_records(config, xs):
    """Holders recorded locally whose Xen backend no longer exists; releases still pending."""
    from .attachments import local_state
    state = local_state(config)
    results = []
    try:
        records, pending = state.records(), state.pending()
        corrupt, ledger, aside = state.corrupt_records(), state.corrupt_ledger(), state.set_aside_files()
    except BlockRbdError as exc:  # a state_dir or ledger_dir refused
        return [(FAIL, str(exc))]
    for record in records:
        for holder in record.holders:
            if holder.startswith("backend/") and xs is not None and not xs.exists(holder):
                results.append((WARN, "%s is recorded as used by %s, which no longer exists in xenstore"
                                % (record.image, holder)))
    for item in pending:
        results.append((WARN, "%s: the cluster-wide release of %s is pending since %s "
                        "(block-rbd release-pending completes it)"
                        % (item.image, item.holder, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.since)))))
    for bad in corrupt:
        results.append((WARN, "%s: the remove of its disk unmaps what is mapped and sets it aside" % bad))
    for bad in ledger:
        results.append((WARN, "%s: a pending release or registration note; block-rbd release-pending sets it "
                        "aside" % bad))
    for path in aside:
        results.append((WARN, "%s: set aside, unreadable; what it named may still be registered in Ceph "
                        "(block-rbd locks IMAGE): check, then delete it" % path))
    return results


def run(config, xs=None):
    results = check_credentials(config)
    with Cluster(config) as cluster:
        results += check_cluster(config, cluster)
        results += check_mappers(config, cluster)
    results += check_xen(xs)
    results += check_records(config, xs)
    return results
