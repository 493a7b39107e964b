"""Extent arithmetic for backups, pure: zero runs, gaps, chunking, merging.

An extent is (offset, length); a run is (start, end) within one buffer.
"""

# Zero-detection granularity: the page size, as qemu-img uses it.
BLOCK = 4096
# One librbd read or write: the default object size, so a read is one OSD op.
CHUNK = 4 << 20

_ZERO = bytes(CHUNK)


def is_zero(data):
    # startswith compares in place (memcmp); slicing _ZERO would copy it first.
    return _ZERO.startswith(data) if len(data) <= CHUNK else not any(data)


def nonzero_runs(data, block=BLOCK):
    """[(start, end)] of the runs of `block`-sized pieces of data (bytes) holding a non-zero byte."""
    zero = _ZERO[:block]
    runs = []
    start = None
    size = len(data)
    for pos in range(0, size, block):
        # In place: a slice and compare per block cost 5 ms per 4 MiB, this 0.2 ms.
        if data.startswith(zero if pos + block <= size else zero[:size - pos], pos):
            if start is not None:
                runs.append((start, pos))
                start = None
        elif start is None:
            start = pos
    if start is not None:
        runs.append((start, size))
    return runs


def zero_gaps(runs, length):
    """The complement of runs within [0, length)."""
    gaps, pos = [], 0
    for start, end in runs:
        if start > pos:
            gaps.append((pos, start))
        pos = end
    if pos < length:
        gaps.append((pos, length))
    return gaps


def chunks(extents, size=CHUNK):
    """Split (offset, length) extents into pieces of at most `size` bytes."""
    for offset, length in extents:
        end = offset + length
        while offset < end:
            step = min(size, end - offset)
            yield offset, step
            offset += step


def merge(extents):
    """Sort and coalesce touching or overlapping (offset, length) extents."""
    merged = []
    for offset, length in sorted(extents):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, offset + length - last_off))
        elif length:
            merged.append((offset, length))
    return merged


def outside(offset, length, covered):
    """Parts of [offset, offset+length) not covered by the sorted, merged extents."""
    pieces, pos, end = [], offset, offset + length
    for c_off, c_len in covered:
        if c_off + c_len <= pos or c_off >= end:
            continue
        if c_off > pos:
            pieces.append((pos, c_off - pos))
        pos = max(pos, c_off + c_len)
    if pos < end:
        pieces.append((pos, end - pos))
    return pieces
