"""Run the gateway or the ceiling under tracemalloc; SIGUSR1 dumps a snapshot.

``python benchmarks/_traced.py gateway|ceiling [args]`` — used by
``benchmarks.memory``. Snapshots go to ``$BENCH_TRACED_DIR/before.snap`` then
``after.snap``.
"""

import tracemalloc

tracemalloc.start(12)

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_NAMES = iter(("before.snap", "after.snap"))


def _dump(signum: int, frame: object) -> None:
    name = next(_NAMES, None)
    if name is not None:
        directory = Path(os.environ.get("BENCH_TRACED_DIR", "."))
        tracemalloc.take_snapshot().dump(str(directory / (name + ".tmp")))
        os.replace(directory / (name + ".tmp"), directory / name)


signal.signal(signal.SIGUSR1, _dump)

if __name__ == "__main__":
    kind = sys.argv.pop(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if kind == "gateway":
        from gateway.cli import main as gateway_main

        sys.exit(gateway_main())
    else:
        from benchmarks.ceiling import main as ceiling_main

        ceiling_main()
