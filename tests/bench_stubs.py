"""Shared by the tests that stub kdfuse.tuning's measuring: a record of the chunk sizes measured."""

from __future__ import annotations


class SweepCalls:
    """The chunk sizes a stubbed ``bench_chunk_size`` was called with: ``calls`` has every call;
    ``chunks`` each sweep's candidates once, in the order its first round ran them (tuning runs
    rounds over the candidates, see autotune.tune). A sweep is one problem object: holding on to
    the last one keeps its id from being reused by the next."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.chunks: list[int] = []
        self._problem: object = None
        self._seen: set[int] = set()

    def record(self, problem: object, chunk_size: int) -> None:
        if problem is not self._problem:
            self._problem, self._seen = problem, set()
        if chunk_size not in self._seen:
            self._seen.add(chunk_size)
            self.chunks.append(chunk_size)
        self.calls.append(chunk_size)
