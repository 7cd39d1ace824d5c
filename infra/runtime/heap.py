"""The cyclic garbage collector, kept off the hot paths of ingest and the worker."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Freeze what start-up made, and collect the young generation less often.

    Both hot paths parse JSON into many short-lived dicts and lists: a 100-change POST thousands
    that live until the broker acknowledges, a worker batch up to 2,000 records. At the default
    gen-0 threshold (700 allocations) the collector traverses them again and again, and each
    full collection walks every object made at start (~100,000 in ingest, more under Faust): the
    largest item of both profiles once (BENCHMARKS.md, "Figures behind the code's choices",
    charged to `orjson.loads`, whose allocations set it off). Start-up objects are frozen
    out of collection; young collections run every 10,000 allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
