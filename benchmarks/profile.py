"""Sampling profiles of the gateway under load, with py-spy (``pip install py-spy``).

``Profiler(pid, path)`` records while a measurement window is open (py-spy's
``--format raw``: collapsed stacks, one ``frame;frame;... count`` per line);
``summarize(path)`` turns that into self and inclusive shares per function,
and the same restricted to the gateway's own code.

``python -m benchmarks.profile FILE [--top N]`` prints a summary of a raw file.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

_LINE = re.compile(r":\d+\)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
PY_SPY_RATE = 200


class Profiler:
    """py-spy record on ``pid`` from ``start()`` to ``stop()`` (SIGINT makes it write out)."""

    def __init__(self, pid: int, path: Path, *, rate: int = PY_SPY_RATE) -> None:
        self.pid = pid
        self.path = path
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("py-spy") is not None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.pid), "--rate", str(self.rate),
             "--nonblocking", "--format", "raw", "--output", str(self.path),
             "--duration", "600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.path if self.path.exists() else None


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file-relative path)``, without the line."""
    frame = _LINE.sub(")", frame)
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def _own(frame: str) -> bool:
    return "(gateway/" in frame


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Self/inclusive shares of samples per function; gateway's own functions apart."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    own_incl: Counter[str] = Counter()
    own_self: Counter[str] = Counter()  # samples whose innermost gateway frame is this one
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
        own = [f for f in frames if _own(f)]
        for frame in set(own):
            own_incl[frame] += count
        if own:
            own_self[own[-1]] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / max(total, 1), 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "self_pct": share(self_counts),
        "inclusive_pct": share(incl_counts),
        "gateway_inclusive_pct": share(own_incl),
        "gateway_innermost_pct": share(own_self),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarize a py-spy raw profile.")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = summarize(args.file, args.top)
    if args.json:
        print(orjson.dumps(summary).decode())
        return
    print(f"samples: {summary['samples']}")
    for key in ("self_pct", "inclusive_pct", "gateway_inclusive_pct", "gateway_innermost_pct"):
        print(f"\n== {key}")
        for name, pct in summary[key]:
            print(f"{pct:6.1f}%  {name}")


if __name__ == "__main__":
    main()
