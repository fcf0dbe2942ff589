"""The cyclic garbage collector's policy for a process holding many connections.

CPython runs a full collection (generation 2, every tracked object walked)
whenever the objects promoted since the last one exceed a quarter of all
long-lived objects. A process gaining thousands of connections, each a few
hundred objects that live for hours, crosses that quarter again and again: in
a reconnect storm of 10,000 devices that was 18 full collections taking 4.7 s
of a 7.9 s storm, each a pause of a quarter second for every device and call
on the process (``python -m benchmarks.run storm 10000``).

So: what start-up built is frozen (it is never garbage), the young
generations are collected less often (10,000 new objects instead of 700), and
a full collection is considered after 1,000 young collections instead of 100
(still only when the quarter rule holds). Cycles that die young are still
found by the young collections; those of long-lived connections wait for the
next full one, about every 10 million allocations.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
MIDDLE_THRESHOLD = 20
OLD_THRESHOLD = 50


def settle_after_start_up() -> None:
    """Call once the process is built and before it takes traffic."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
