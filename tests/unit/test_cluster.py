"""The Ceph seam's pure parts (block_rbd/cluster.py); its calls run against the real cluster elsewhere."""

from block_rbd.cluster import Cluster
from block_rbd.config import from_dict


def test_a_connection_serves_only_the_configuration_it_was_made_from():
    base = {"ceph": {"conf": "/etc/ceph/ceph.conf", "id": "xen-dom0"}, "timeouts": {"connect": 5, "op": 5}}
    cluster = Cluster(from_dict(base))
    assert cluster.serves(from_dict(dict(base, pool="other", mapper="fuse")))  # not part of a connection
    assert not cluster.serves(from_dict(dict(base, ceph={"conf": "/etc/ceph/ceph.conf", "id": "other"})))
    assert not cluster.serves(from_dict(dict(base, timeouts={"connect": 9, "op": 5})))
    assert not cluster.connected  # nothing was contacted
