"""Readahead of chunk blobs: what a sequential reader has loaded ahead of it."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from puzzlefs.reader._readahead import NEAR, Readahead


def digests(n: int) -> list[bytes]:
    return [hashlib.sha256(str(i).encode()).digest() for i in range(n)]


def request(ra: Readahead, *blobs: bytes, compressed: bool = False) -> bool:
    """One read request that uses these blobs; whether the last looked sequential."""
    ra.next_request()
    return [ra.accessed(d, compressed) for d in blobs][-1]


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
        sequential += [request(ra, d, compressed=True) for _ in range(3)]  # 3 reads of each
    assert sequential[:3] == [False] * 3 and all(sequential[6:])
    assert set(queued_when) == set(stream[2:])  # the first two start the walk
    for d, when in queued_when.items():
        assert 0 < stream.index(d) - when <= NEAR  # ahead of the reader, not too far


def test_one_large_request_alone_reads_nothing_ahead() -> None:
    """A request whose blobs follow each other in the stream (1 MiB of a library, read
    around a page fault) is not yet a sequential reader; the next request going on
    from where it ended is, and the window then grows with every step."""
    stream = digests(100)
    queued: list[bytes] = []
    ra = Readahead(None, stream, prefetch=lambda keys: queued.extend(d for d, _ in keys))
    ra.enable()
    assert not request(ra, *stream[10:26])  # sixteen blobs in one request
    assert not request(ra, *stream[60:76])  # and elsewhere
    assert queued == []
    assert request(ra, *stream[76:80])  # goes on from 75
    assert queued and all(stream.index(d) > 76 for d in queued)
    assert ra._window >= 16


def test_a_random_reader_gets_no_prefetch() -> None:
    stream = digests(100)
    queued: list[bytes] = []
    ra = Readahead(None, stream, prefetch=lambda keys: queued.extend(d for d, _ in keys))
    ra.enable()
    assert not any(request(ra, stream[i]) for i in (50, 10, 90, 30, 70, 20))
    assert queued == []


def test_unknown_blobs_and_a_disabled_readahead_do_nothing() -> None:
    stream = digests(10)
    queued: list[bytes] = []
    ra = Readahead(None, stream, prefetch=lambda keys: queued.extend(d for d, _ in keys))
    assert not any(ra.accessed(d) for d in stream)  # not enabled: a one-shot reader
    ra.enable()
    assert not ra.accessed(b"\0" * 32)
    assert queued == []


def test_without_a_helper_hints_stop_and_loading_ahead_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import subprocess

    def no_helper(*args: object, **kwargs: object) -> None:
        raise OSError("no helper here")

    monkeypatch.setattr(subprocess, "Popen", no_helper)
    stream = digests(100)
    queued: list[bytes] = []
    ra = Readahead(str(tmp_path), stream, prefetch=lambda keys: queued.extend(d for d, _ in keys))
    ra.enable()
    for d in stream[:10]:
        request(ra, d)
    deadline = time.monotonic() + 10
    while ra._directory is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ra._directory is None  # the sender gave up on kernel hints
    assert ra._outbox is not None
    left = ra._outbox.qsize()  # what was handed over before it did
    before = len(queued)
    for d in stream[10:]:
        assert request(ra, d)
    assert len(queued) > before  # and the loaders still get the next blobs
    assert ra._outbox.qsize() == left  # no hint is queued for nobody any longer
