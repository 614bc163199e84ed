"""How many intra-op threads the package's linear algebra uses.

torch runs each operation on all its intra-op threads (one per core by default). For a small matrix the work per
thread is too short to pay for the threads' synchronisation, and on cores that other processes share, every
operation waits for its slowest thread: benchmarks/threads.py measured the bases of the testbed's 160 small
matrices 7.6× slower on torch's default two threads than on one on cores other users kept busy, 27× beside one more
CPU-bound job. A small matrix gets one thread; a large one keeps torch's setting (``torch.set_num_threads``,
``OMP_NUM_THREADS``), untouched, so that nothing gets slower where cores are free (docs/performance.md#threads).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Below this much work, ``m · n · min(m, n)`` for an ``(m, n)`` weight (the order of its SVD's or Gram
#: eigendecomposition's flops), one intra-op thread; from it on, torch's setting. SD 1.5's 320 × 768 (7.9e7; 2.1×
#: faster on one thread, 6.6× beside a busy core) and the testbed's 64 × 576 convs are below; 320 × 1280 (1.3e8),
#: 640 × 640 (2.6e8) and above are not (benchmarks/threads.py; docs/performance.md#threads).
SMALL_WORK: float = 1.0e8


def threads_for(shape: tuple[int, ...]) -> int:
    """Intra-op threads for the SVD of a weight of ``shape`` (conv flattened): 1 below :data:`SMALL_WORK`, else
    torch's current setting."""
    m, n = shape[0], 1
    for d in shape[1:]:
        n *= d
    return 1 if m * n * min(m, n) < SMALL_WORK else torch.get_num_threads()


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``count``, and restore the count it had after the
    block, also when it raises. The setting is the process's (torch has no per-thread one): other Python threads
    running torch operations meanwhile use it too."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
