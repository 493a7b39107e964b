"""The pure helpers of block_rbd/registry.py (the rest runs against the real cluster in
tests/integration)."""

import pytest

from block_rbd.registry import addr_host


@pytest.mark.parametrize("addr, host", [
    ("127.0.0.1:0/519349328", "127.0.0.1"),       # what watchers_list() and get_addrs() say
    ("v2:10.0.0.5:0/7", "10.0.0.5"),
    ("v1:10.0.0.5:6789/0", "10.0.0.5"),
    ("[::1]:0/42", "::1"),
    ("v2:[fd00::2]:0/9", "fd00::2"),
])
def test_addr_host(addr, host):
    assert addr_host(addr) == host
