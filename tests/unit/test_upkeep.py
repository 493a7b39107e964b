"""block-rbd upkeep's rounds (block_rbd/upkeep.py): which steps run, and a failing step
logged once per outage, not every round."""

import pytest

from block_rbd import attachments, upkeep
from block_rbd.config import from_dict
from block_rbd.errors import ClusterError
from block_rbd.mappers import nbd


@pytest.fixture
def steps(mocker):
    upkeep._failing.clear()
    return {"heal": mocker.patch.object(nbd, "heal", return_value=[]),
            "fuse": mocker.patch.object(attachments, "follow_size", return_value=[]),
            "sizes": mocker.patch.object(nbd, "follow_sizes", return_value=[]),
            "sweep": mocker.patch.object(nbd, "sweep", return_value=[])}


def test_the_cluster_is_asked_only_in_size_rounds(steps, mocker):
    config = from_dict({})
    upkeep.once(config)
    steps["heal"].assert_called_once_with(config, None, None)
    steps["fuse"].assert_called_once_with(config, names=("fuse",))
    steps["sweep"].assert_called_once_with(config)
    cluster = mocker.sentinel.cluster
    upkeep.once(config, cluster)
    assert steps["heal"].call_args.args[1] is cluster and steps["heal"].call_args.args[2] is not None
    steps["sizes"].assert_not_called()
    upkeep.once(config, cluster, sizes=True)
    steps["sizes"].assert_called_once_with(config, cluster)


def test_run_checks_sizes_every_size_every_rounds(steps, mocker, monkeypatch):
    monkeypatch.setattr(upkeep, "SIZE_EVERY", 3)
    mocker.patch.object(upkeep, "Cluster")
    upkeep.run(from_dict({}), interval=0.01, rounds=7)
    assert steps["heal"].call_count == 7 and steps["sizes"].call_count == 3  # rounds 0, 3, 6


def test_a_failing_step_is_logged_once_per_outage_and_the_others_still_run(steps, caplog):
    caplog.set_level("INFO", logger="block-rbd")
    config = from_dict({})
    steps["sizes"].side_effect = ClusterError("cannot reach the cluster: timed out")
    for _ in range(3):
        upkeep.once(config, cluster=object(), sizes=True)
    assert steps["heal"].call_count == 3 and steps["fuse"].call_count == 3
    steps["sizes"].side_effect = None
    upkeep.once(config, cluster=object(), sizes=True)
    assert [r.getMessage() for r in caplog.records] == [
        "upkeep: nbd sizes: cannot reach the cluster: timed out", "upkeep: nbd sizes works again"]
