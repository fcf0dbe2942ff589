"""Where an idle connection's memory goes: tracemalloc inside the server, N devices apart.

``python -m benchmarks.memory N [--target gateway|ceiling] [--top 25]``

The server runs under ``benchmarks/_traced.py`` (tracemalloc started before
anything is imported; SIGUSR1 dumps a snapshot). Snapshots are taken after a
16-device warm-up and after N more devices said hello; the difference, per
allocation site and per gateway frame, divided by N, is printed. tracemalloc
sees Python allocations only (not the kernel's socket buffers, nor malloc
arenas' slack), so its total is below the RSS growth that ``idle`` reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from benchmarks import load
from benchmarks.scenarios import Context, expect, split, warm_up_devices
from benchmarks.servers import (
    ROOT,
    Database,
    Server,
    raise_nofile_limit,
    rss_bytes,
    start_ceiling,
    start_gateway,
)

TRACED = Path(__file__).resolve().parent / "_traced.py"


def _load_when_written(path: Path, within_s: float) -> tracemalloc.Snapshot:
    deadline = time.monotonic() + within_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))  # renamed into place once complete


async def _snapshot(server: Server, path: Path) -> tracemalloc.Snapshot:
    os.kill(server.pid, signal.SIGUSR1)
    return await asyncio.to_thread(_load_when_written, path, 120)


async def measure(ctx: Context, n: int, snap_dir: Path) -> dict[str, Any]:
    server = ctx.server
    tag = f"mem{server.public_port}"
    mint = load.TokenMinter(server.jwt_secret)
    await warm_up_devices(server, tag, mint)
    rss0 = rss_bytes(server.pid)
    before = await _snapshot(server, snap_dir / "before.snap")
    pipes = [ctx.spawn(load.idle_worker, {
        "ws_url": server.ws_url, "jwt_secret": server.jwt_secret, "tag": tag, "indices": r,
        "devices_per_user": 4, "concurrency": 32, "agent_ids": ["stream"],
        "connect_timeout_s": 120 + n / 20, "hold_timeout_s": 600 + n / 20,
    })[1] for r in split(n, ctx.procs)]
    for pipe in pipes:
        await expect(pipe, "ready", 60)
    for pipe in pipes:
        pipe.send("go")
    reports = [await expect(p, "connected", 300 + n / 20) for p in pipes]
    await asyncio.sleep(2.0)
    rss1 = rss_bytes(server.pid)
    after = await _snapshot(server, snap_dir / "after.snap")
    for pipe in pipes:
        pipe.send("stop")
    for pipe in pipes:
        await expect(pipe, "done", 120)
    await ctx.reap()
    connected = sum(r["connected"] for r in reports)
    return {"connected": connected, "rss_kb_per_conn": (rss1 - rss0) / 1024 / connected,
            "before": before, "after": after}


def report(result: dict[str, Any], top: int) -> None:
    n = result["connected"]
    after: tracemalloc.Snapshot = result["after"]
    before: tracemalloc.Snapshot = result["before"]
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"devices: {n}   RSS growth: {result['rss_kb_per_conn']:.2f} KB/conn   "
          f"traced Python growth: {total / 1024 / n:.2f} KB/conn")
    print(f"\n== by allocation line (bytes per connection, allocations per connection), top {top}")
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        name = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        print(f"{stat.size_diff / n:9.1f} B {stat.count_diff / n:6.2f}x  {name}:{frame.lineno}")
    print(f"\n== by innermost frame in gateway/ or benchmarks/ (bytes per connection), top {top}")
    sites: dict[str, int] = {}
    for stat in after.compare_to(before, "traceback"):
        own = [f for f in stat.traceback
               if "/gateway/" in f.filename or "/benchmarks/" in f.filename]
        key = (f"{own[-1].filename.replace(str(ROOT) + '/', '')}:{own[-1].lineno}"
               if own else "(no gateway frame: aiohttp/asyncio on its own)")
        sites[key] = sites.get(key, 0) + stat.size_diff
    for key, size in sorted(sites.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{size / n:9.1f} B  {key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int)
    parser.add_argument("--target", choices=("gateway", "ceiling"), default="gateway")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    opts = parser.parse_args()
    from benchmarks.run import _quiet_logs

    _quiet_logs()
    raise_nofile_limit()
    run_dir = Path(tempfile.mkdtemp(prefix="gw-bench-mem-"))
    db = Database.open(opts.database_url) if opts.target == "gateway" else None
    try:
        env = {"BENCH_TRACED_DIR": str(run_dir)}
        if db is not None:
            server = start_gateway(db, run_dir, extra_env=env,
                                   argv=[sys.executable, str(TRACED), "gateway"])
        else:
            server = start_ceiling(run_dir, extra_env=env,
                                   argv=[sys.executable, str(TRACED), "ceiling"])
        try:
            ctx = Context(server, db, opts.procs)
            result = asyncio.run(measure(ctx, opts.n, run_dir))
        finally:
            server.stop()
        report(result, opts.top)
    finally:
        if db is not None:
            db.close()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
