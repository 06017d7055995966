"""Readahead of chunk blobs: what a sequential reader has loaded ahead of it."""

from __future__ import annotations

import hashlib

from puzzlefs.reader._readahead import NEAR, Readahead


def digests(n: int) -> list[bytes]:
    return [hashlib.sha256(str(i).encode()).digest() for i in range(n)]


def test_a_reader_served_from_the_cache_keeps_the_loaders_ahead() -> None:
    """Every blob the reader reaches was prefetched (a hit), and the window must still
    move on with it: all of the stream gets queued, each blob once, ahead of use."""
    stream = digests(200)
    at = {"pos": -1}
    queued_when: dict[bytes, int] = {}  # blob -> where the reader was when it was queued

    def prefetch(keys: list[tuple[bytes, bool]]) -> None:
        for d, compressed in keys:
            assert compressed and d not in queued_when
            queued_when[d] = at["pos"]

    ra = Readahead(None, stream, prefetch=prefetch)
    ra.enable()
    sequential = []
    for pos, d in enumerate(stream):
        at["pos"] = pos
        sequential += [ra.accessed(d, True) for _ in range(3)]  # 3 reads of each blob
    assert sequential[:3] == [False] * 3 and all(sequential[6:])
    assert set(queued_when) == set(stream[2:])  # the first two start the walk
    for d, when in queued_when.items():
        assert 0 < stream.index(d) - when <= NEAR  # ahead of the reader, not too far


def test_a_random_reader_gets_no_prefetch() -> None:
    stream = digests(100)
    queued: list[bytes] = []
    ra = Readahead(None, stream, prefetch=lambda keys: queued.extend(d for d, _ in keys))
    ra.enable()
    assert not any(ra.accessed(stream[i]) for i in (50, 10, 90, 30, 70, 20))
    assert queued == []


def test_unknown_blobs_and_a_disabled_readahead_do_nothing() -> None:
    stream = digests(10)
    queued: list[bytes] = []
    ra = Readahead(None, stream, prefetch=lambda keys: queued.extend(d for d, _ in keys))
    assert not any(ra.accessed(d) for d in stream)  # not enabled: a one-shot reader
    ra.enable()
    assert not ra.accessed(b"\0" * 32)
    assert queued == []
