"""block_rbd.backup.extents: zero detection and extent arithmetic."""

import os
import random

import pytest

from block_rbd.backup import extents

B = extents.BLOCK


def test_nonzero_runs():
    assert extents.nonzero_runs(bytes(4 * B)) == []
    data = bytearray(8 * B)
    data[0] = 1
    data[3 * B + 5] = 1
    data[4 * B] = 1
    data[8 * B - 1] = 1
    assert extents.nonzero_runs(bytes(data)) == [(0, B), (3 * B, 5 * B), (7 * B, 8 * B)]


def test_nonzero_runs_partial_last_block():
    data = bytes(B) + b"\x01" * 10
    assert extents.nonzero_runs(data) == [(B, B + 10)]


def reference_runs(data):
    """nonzero_runs the plain way: block by block."""
    runs = []
    for pos in range(0, len(data), B):
        if any(data[pos:pos + B]):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], min(pos + B, len(data)))
            else:
                runs.append((pos, min(pos + B, len(data))))
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_nonzero_runs_matches_block_by_block(seed):
    rnd = random.Random(seed)
    size = rnd.choice([0, 1, B - 1, B, 3 * B + 10, 70 * B, 300 * B + rnd.randrange(B)])
    data = bytearray(size)
    for _ in range(rnd.randrange(8)):  # data and zeros, at any offset and length
        start, length = rnd.randrange(size + 1), rnd.choice([1, B // 2, B, B + 1, 2 * B - 1, 5 * B, 80 * B])
        length = min(length, size - start)
        data[start:start + length] = rnd.choice([rnd.randbytes(length), b"\x01" * length, bytes(length)])
    assert len(data) == size
    data = bytes(data)
    assert extents.nonzero_runs(data) == reference_runs(data)


def test_zero_gaps_complement():
    assert extents.zero_gaps([], 10) == [(0, 10)]
    assert extents.zero_gaps([(0, 10)], 10) == []
    assert extents.zero_gaps([(2, 4), (6, 8)], 10) == [(0, 2), (4, 6), (8, 10)]


def test_chunks_split():
    assert list(extents.chunks([(0, 10), (20, 3)], size=4)) == [(0, 4), (4, 4), (8, 2), (20, 3)]


def test_merge():
    assert extents.merge([(10, 5), (0, 5), (5, 5), (30, 1), (31, 0)]) == [(0, 15), (30, 1)]
    assert extents.merge([(0, 10), (2, 3)]) == [(0, 10)]


def test_outside():
    assert extents.outside(0, 100, [(10, 10), (50, 10)]) == [(0, 10), (20, 30), (60, 40)]
    assert extents.outside(10, 10, [(0, 100)]) == []


def test_is_zero_long():
    assert extents.is_zero(bytes(extents.CHUNK + 1))
    assert not extents.is_zero(bytes(extents.CHUNK) + b"\x01")
    assert os.urandom(0) == b"" and extents.is_zero(b"")
