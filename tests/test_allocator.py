"""``gateway.allocator``: large blocks freed go back to the system.

Each case runs in a fresh interpreter (the allocator's state is per process):
large blocks interleaved with small long-lived ones, as large event frames
are with a connection's objects, then the large ones freed. With glibc's
default, its threshold has followed the first large block freed, the rest
came from the heap, and the freed middle of the heap stays resident.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

MIB = 1024 * 1024

SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil
    from gateway.allocator import return_large_blocks_when_freed

    applied = return_large_blocks_when_freed() if sys.argv[1] == "fixed" else None
    rss = lambda: psutil.Process().memory_info().rss
    first = bytearray(4 * 1024 * 1024)  # one large block freed: the default follows it
    del first
    base = rss()
    large, small = [], []
    for i in range(24):
        large.append(bytearray(3_670_016))  # a 3.5 MiB event frame (zeroed: resident)
        small.append(bytearray(2048))  # something that lives on, from the same heap
    held = rss()
    large.clear()
    print(json.dumps({"applied": applied, "held": held - base, "after": rss() - base}))
""")


def _run(mode: str) -> dict[str, int | bool | None]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                          text=True, timeout=60, check=True)
    result: dict[str, int | bool | None] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_returned_to_the_system_once_freed() -> None:
    fixed, default = _run("fixed"), _run("default")
    assert fixed["applied"] is True
    for case in (fixed, default):  # both held the 84 MiB while alive
        assert case["held"] >= 64 * MIB, case  # type: ignore[operator]
    # Freed: with the fixed threshold, all of it went back.
    assert fixed["after"] < 8 * MIB, fixed  # type: ignore[operator]
    # The control: glibc's default keeps it, so this test can tell the two apart.
    assert default["after"] > 48 * MIB, default  # type: ignore[operator]
