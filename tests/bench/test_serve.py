"""bench/serve.py's pure helpers: the per-worker CPU split that tells an unevenly loaded server apart."""

from __future__ import annotations

import os

import pytest

from bench import serve


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({1: 10.0, 2: 10.0}, {1: 13.0, 2: 11.0}, [0.75, 0.25]),    # one worker did three quarters
        ({1: 0.0, 2: 0.0}, {1: 2.0, 2: 2.0}, [0.5, 0.5]),
        ({1: 5.0}, {1: 5.0, 2: 1.0}, [1.0, 0.0]),                  # a worker that started mid-run
        ({1: 1.0, 2: 1.0}, {1: 1.0, 2: 1.0}, []),                  # no CPU used: no split to report
    ],
)
def test_worker_split_by_hand(before: dict, after: dict, expected: list) -> None:
    assert serve.worker_split(before, after) == expected


def test_child_cpu_s_sees_this_process_under_its_parent() -> None:
    children = serve.child_cpu_s(os.getppid())
    assert os.getpid() in children and children[os.getpid()] >= 0.0


@pytest.mark.parametrize("allowed", [0, 1, 19_999, 20_000, 20_001, 29_999, 30_000, 30_001, 500_000])
def test_the_reported_filter_strategy_is_the_services(allowed: int) -> None:
    """bench.serve labels each filter scenario with indexer.topk's rule; keep them one rule."""
    import numpy as np

    from indexer.topk import Allowed, FaissTopK

    n = 1_000_000
    topk = FaissTopK.__new__(FaissTopK)  # the rule reads only the catalog size and thresholds
    topk.count = n
    mask = np.zeros(n, dtype=bool)
    mask[:allowed] = True
    assert serve.service_strategy(allowed, n) == topk.filter_strategy(Allowed(mask))
