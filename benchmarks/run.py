"""Benchmark driver: ``python -m benchmarks.run SCENARIO ARGS [options]``.

Scenarios (each prints ONE JSON line on stdout; progress goes to stderr)::

    idle N          N devices connect, say hello and stay idle
    storm N         N devices connect at once (a reconnect storm): time until all acked
    fleet N         N idle devices held a minute, heartbeats on, tool calls to one more
    calls C S       C concurrent callers for S seconds, through one device (echo)
    ingest K M B    K devices stream M agent_data events of ~B bytes each
    cleanup         a device with pending calls closes / is killed
    compare         all of the above at the issue's sizes, gateway and ceiling
                    alternately, 3 times each; then the ratios against the targets

``--target gateway|ceiling|both`` picks what is measured (default: gateway;
compare: both); ``--repeat N`` runs each target N times, alternating, and the
line holds medians (and each run's key figures). Servers listen on 127.0.0.1
only; every load loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from benchmarks import load, scenarios
from benchmarks.profile import Profiler, summarize
from benchmarks.scenarios import Context
from benchmarks.servers import (
    ROOT,
    Database,
    Server,
    raise_nofile_limit,
    start_ceiling,
    start_gateway,
)

TARGETS = ("gateway", "ceiling")
# The targets of issue 14 (performance, round two).
CALLS_MIN_RATIO = 0.90
CALLS_MAX_P99_OVER_P50 = 3.0
EVENTS_MIN_PER_S = 100_000
IDLE_MAX_KB = 18.0
IDLE_MAX_RATIO = 1.2
CLEANUP_MAX_MS = 1000.0
STORM_MAX_RATIO = 1.3
FLEET_MAX_KB = 18.0
FLEET_MAX_HOLD_CPU_PCT = 5.0
# Key figures repeated per run in the line, next to the medians.
RUN_KEYS = ("throughput", "p50_ms", "p99_ms", "max_ms", "kb_per_conn", "server_cpu_pct",
            "generator_cores", "machine_busy_cores", "close_presence_ms_max",
            "close_calls_ms_max", "kill_presence_ms_max", "kill_calls_ms_max",
            "connect_s", "hold_server_cpu_pct", "hold_server_kernel_pct", "probe_p50_ms",
            "probe_p99_ms", "deflate_negotiated")

Measure = Callable[[Context], Awaitable[dict[str, Any]]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- aggregation


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure across runs; other values from the last run."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run.get(key) for run in runs]
        numbers = [v for v in values if _numeric(v)]
        if numbers and all(v is None or _numeric(v) for v in values):
            out[key] = round(statistics.median(numbers), 3)
        elif all(isinstance(v, list) for v in values):
            out[key] = list(dict.fromkeys(x for v in values for x in v))[:5]
        else:
            out[key] = values[-1]
    out["runs"] = [{k: run.get(k) for k in RUN_KEYS if k in run} for run in runs]
    return out


def _ratio(a: Any, b: Any) -> float | None:
    if not _numeric(a) or not _numeric(b) or b == 0:
        return None
    return round(a / b, 3)


def _worst(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if _numeric(r.get(key))]
    return max(values) if values else None


def judge(name: str, params: dict[str, Any], line: dict[str, Any],
          results: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ratios gateway/ceiling and whether the issue's targets are met (None: not measured)."""
    gw, ce = line.get("gateway"), line.get("ceiling")
    ratio: dict[str, Any] = {}
    goal: dict[str, Any] = {}
    if gw is None:
        return ratio, goal
    if name == "calls":
        ratio = {"throughput": _ratio(gw["throughput"], ce["throughput"]) if ce else None,
                 "p50_ms": _ratio(gw["p50_ms"], ce["p50_ms"]) if ce else None,
                 "p99_ms": _ratio(gw["p99_ms"], ce["p99_ms"]) if ce else None}
        p99_over_p50 = _ratio(gw["p99_ms"], gw["p50_ms"])
        goal = {
            "calls_vs_ceiling": ratio["throughput"], "calls_vs_ceiling_min": CALLS_MIN_RATIO,
            "p99_over_p50": p99_over_p50, "p99_over_p50_max": CALLS_MAX_P99_OVER_P50,
            "met": None if ratio["throughput"] is None or p99_over_p50 is None else (
                ratio["throughput"] >= CALLS_MIN_RATIO
                and p99_over_p50 <= CALLS_MAX_P99_OVER_P50),
        }
    elif name == "ingest":
        ratio = {"throughput": _ratio(gw["throughput"], ce["throughput"]) if ce else None}
        expected = params["k"] * params["m"]
        stored = all(r.get("rows_stored") == expected
                     and r.get("run_statuses") == {"completed": params["k"]}
                     for r in results["gateway"])
        goal = {"events_per_s": gw["throughput"], "events_per_s_min": EVENTS_MIN_PER_S,
                "every_event_stored": stored,
                "met": _numeric(gw["throughput"]) and gw["throughput"] >= EVENTS_MIN_PER_S
                and stored}
    elif name == "idle":
        ratio = {"kb_per_conn": _ratio(gw["kb_per_conn"], ce["kb_per_conn"]) if ce else None,
                 "connect_rate": _ratio(gw["throughput"], ce["throughput"]) if ce else None}
        held = all(r["connections"] == params["n"] and r["unexpected_closes"] == 0
                   for r in results["gateway"])
        goal = {"kb_per_conn": gw["kb_per_conn"], "kb_per_conn_max": IDLE_MAX_KB,
                "vs_ceiling": ratio["kb_per_conn"], "vs_ceiling_max": IDLE_MAX_RATIO,
                "all_held": held,
                "met": None if ratio["kb_per_conn"] is None else (
                    gw["kb_per_conn"] <= IDLE_MAX_KB and ratio["kb_per_conn"] <= IDLE_MAX_RATIO
                    and held)}
    elif name == "storm":
        ratio = {"connect_s": _ratio(gw["connect_s"], ce["connect_s"]) if ce else None}
        held = all(r["connections"] == params["n"] for r in results["gateway"])
        goal = {"connect_s": gw["connect_s"], "vs_ceiling": ratio["connect_s"],
                "vs_ceiling_max": STORM_MAX_RATIO, "all_acked": held,
                "met": None if ratio["connect_s"] is None else (
                    ratio["connect_s"] <= STORM_MAX_RATIO and held)}
    elif name == "fleet":
        ratio = {"kb_per_conn": _ratio(gw["kb_per_conn"], ce["kb_per_conn"]) if ce else None}
        held = all(r["connections"] == params["n"] and r["unexpected_closes"] == 0
                   for r in results["gateway"])
        goal = {"kb_per_conn": gw["kb_per_conn"], "kb_per_conn_max": FLEET_MAX_KB,
                "hold_cpu_pct": gw["hold_server_cpu_pct"],
                "hold_cpu_pct_max": FLEET_MAX_HOLD_CPU_PCT, "all_held": held,
                "probe_p50_ms": gw.get("probe_p50_ms"), "probe_p99_ms": gw.get("probe_p99_ms"),
                "met": gw["kb_per_conn"] <= FLEET_MAX_KB and held
                and gw["hold_server_cpu_pct"] <= FLEET_MAX_HOLD_CPU_PCT}
    elif name == "cleanup":
        runs = results["gateway"]
        worst = {k: _worst(runs, k) for k in ("close_presence_ms_max", "close_calls_ms_max",
                                              "kill_presence_ms_max", "kill_calls_ms_max")}
        clean = all(not r.get("failures") for r in runs)
        goal = {"worst_ms": worst, "max_ms": CLEANUP_MAX_MS, "no_failures": clean,
                "met": clean and all(v is not None and v <= CLEANUP_MAX_MS
                                     for v in worst.values())}
    return ratio, goal


# ---------------------------------------------------------------- running


async def _measure(ctx: Context, measure: Measure) -> dict[str, Any]:
    try:
        return await measure(ctx)
    finally:
        for proc, _ in ctx.workers:
            if proc.is_alive():
                proc.terminate()
        await ctx.reap()


def source_version(root: Path) -> str | None:
    """The commit of the gateway tree measured (``+dirty`` when gateway/ has changes)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "migrations"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty.strip() else "")) or None


def run_scenario(name: str, params: dict[str, Any], measure: Measure,
                 opts: argparse.Namespace, db: Database | None) -> dict[str, Any]:
    targets = list(TARGETS) if opts.target == "both" else [opts.target]
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    run_dir = Path(tempfile.mkdtemp(prefix=f"gw-bench-{name}-"))
    extra_env = dict(kv.split("=", 1) for kv in opts.gateway_env)
    load_before = os.getloadavg()[0]
    try:
        for rep in range(opts.repeat):
            for target in (targets if rep % 2 == 0 else targets[::-1]):
                server: Server
                if target == "gateway":
                    assert db is not None
                    server = start_gateway(db, run_dir, extra_env=extra_env,
                                           root=opts.gateway_root)
                else:
                    server = start_ceiling(run_dir, compress=_env_true(
                        extra_env.get("GATEWAY_WS_COMPRESS", "false")))
                profile_path = None
                if opts.profile:
                    opts.profile.mkdir(parents=True, exist_ok=True)
                    label = "-".join(str(v) for v in params.values())
                    profile_path = opts.profile / f"{name}-{label}-{target}-{rep}.txt"
                try:
                    ctx = Context(server, db, opts.procs, profile_path)
                    figures = asyncio.run(_measure(ctx, measure))
                except BaseException:
                    log(f"{target} log tail ({server.log_path}):\n{server.log_tail()}")
                    raise
                finally:
                    exit_code = server.stop()
                figures["server_exit"] = exit_code
                if profile_path is not None and profile_path.exists():
                    summary = summarize(profile_path)
                    profile_path.with_suffix(".json").write_bytes(orjson.dumps(summary))
                    figures["profile"] = str(profile_path)
                results[target].append(figures)
                log(f"[{name} {params} {target} #{rep + 1}] "
                    + orjson.dumps({k: figures.get(k) for k in RUN_KEYS if k in figures}).decode())
    finally:
        if opts.keep_logs:
            log(f"logs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    line: dict[str, Any] = {
        "scenario": name, "params": params, "repeat": opts.repeat,
        "cores": os.cpu_count(), "loadavg_1m_before": round(load_before, 2),
        "gateway_env": extra_env,
        "gateway_root": str(opts.gateway_root),
        "gateway_version": source_version(opts.gateway_root),
    }
    for target in targets:
        line[target] = medians(results[target])
    line["ratio"], line["goal"] = judge(name, params, line, results)
    return line


def _env_true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def scenario_measure(name: str, params: dict[str, Any], opts: argparse.Namespace) -> Measure:
    client = opts.client
    if name == "idle":
        return lambda ctx: scenarios.idle(ctx, params["n"], hold_s=opts.hold,
                                          concurrency=opts.concurrency, client=client)
    if name == "storm":
        # Everyone at once: as many connects in flight as there are devices.
        return lambda ctx: scenarios.idle(ctx, params["n"], hold_s=1.0,
                                          concurrency=max(1, params["n"] // ctx.procs),
                                          client=client)
    if name == "fleet":
        return lambda ctx: scenarios.idle(ctx, params["n"], hold_s=opts.fleet_hold,
                                          concurrency=opts.concurrency, client=client,
                                          probe_calls=opts.probe_calls)
    if name == "calls":
        return lambda ctx: scenarios.calls(ctx, params["c"], params["s"], warmup_s=opts.warmup,
                                           client=client)
    if name == "ingest":
        return lambda ctx: scenarios.ingest(ctx, params["k"], params["m"], params["b"],
                                            warmup_events=opts.ingest_warmup,
                                            event_acks=getattr(opts, "event_acks", False))
    if name == "cleanup":
        return lambda ctx: scenarios.cleanup(ctx, trials=opts.trials)
    raise ValueError(name)


def _emit(line: dict[str, Any]) -> None:
    print(orjson.dumps(line).decode(), flush=True)


def _summary_row(line: dict[str, Any]) -> dict[str, Any]:
    gw, ce = line.get("gateway") or {}, line.get("ceiling") or {}
    name = line["scenario"]
    key = {"idle": "kb_per_conn", "fleet": "kb_per_conn", "storm": "connect_s",
           "cleanup": "max_ms"}.get(name, "throughput")
    return {"scenario": name, "params": line["params"], "figure": key,
            "client": gw.get("client") or ce.get("client"),
            "gateway": gw.get(key), "ceiling": ce.get(key),
            "ratio": (line.get("ratio") or {}).get(key), "goal": line.get("goal")}


def _table(rows: list[dict[str, Any]]) -> str:
    out = [f"{'scenario':<22}{'figure':<13}{'gateway':>12}{'ceiling':>12}{'ratio':>8}  target"]
    for row in rows:
        params = " ".join(str(v) for v in row["params"].values())
        goal = row["goal"] or {}
        met = {True: "MET", False: "NOT MET", None: "n/a"}[goal.get("met")]
        detail = {k: v for k, v in goal.items() if k != "met"}
        out.append(f"{(row['scenario'] + ' ' + params):<22}{row['figure']:<13}"
                   f"{row['gateway']!s:>12}{row['ceiling']!s:>12}{row['ratio']!s:>8}  "
                   f"{met} {orjson.dumps(detail).decode()}"
                   + (f"  [client: {row['client']}]" if row.get("client") else ""))
    return "\n".join(out)


COMPARE_FULL: list[tuple[str, dict[str, Any]]] = [
    ("idle", {"n": 1000}), ("idle", {"n": 10_000}), ("storm", {"n": 10_000}),
    ("fleet", {"n": 18_500}), ("calls", {"c": 32, "s": 10.0}),
    ("ingest", {"k": 10, "m": 5000, "b": 200}), ("cleanup", {}),
]
COMPARE_QUICK: list[tuple[str, dict[str, Any]]] = [
    ("idle", {"n": 20}), ("storm", {"n": 40}), ("fleet", {"n": 20}),
    ("calls", {"c": 4, "s": 1.0}), ("ingest", {"k": 2, "m": 50, "b": 200}), ("cleanup", {}),
]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", choices=("gateway", "ceiling", "both"), default=None,
                        help="what to measure (default gateway; compare: both)")
    common.add_argument("--repeat", type=int, default=None,
                        help="runs per target, alternating; medians reported "
                             "(default 1; compare: 3)")
    common.add_argument("--procs", type=int, default=2,
                        help="load generator worker processes (default 2)")
    common.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"),
                        help="PostgreSQL for the gateway (default: an embedded one in a "
                             "temporary directory; env BENCH_DATABASE_URL)")
    common.add_argument("--pg-tmp-root", default=None,
                        help="parent directory of the embedded PostgreSQL (default: $TMPDIR)")
    common.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the gateway (e.g. GATEWAY_LOG_LEVEL=warning)")
    common.add_argument("--gateway-root", type=Path, default=ROOT, metavar="DIR",
                        help="source tree whose run_gateway.py to run (default: this one; "
                             "another worktree to A/B a change)")
    common.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy the server in each measured window (calls, ingest) into DIR")
    common.add_argument("--keep-logs", action="store_true", help="keep server logs")
    common.add_argument("--hold", type=float, default=5.0, help="idle: seconds held (5)")
    common.add_argument("--concurrency", type=int, default=32,
                        help="idle: connects in flight per worker process (32)")
    common.add_argument("--warmup", type=float, default=1.0, help="calls: warm-up seconds (1)")
    common.add_argument("--ingest-warmup", type=int, default=200, metavar="EVENTS",
                        help="ingest: events per device in a warm-up round before the measured "
                             "one (200; 0: none, a cold process)")
    common.add_argument("--trials", type=int, default=5, help="cleanup: trials per mode (5)")
    common.add_argument("--client", choices=scenarios.CLIENTS, default=None,
                        help="idle, storm, fleet and calls devices: python (aiohttp, offers "
                             "no deflate) or node (Node ws, offers permessage-deflate like "
                             "real devices; default when node and clients/js/node_modules "
                             "are there)")
    common.add_argument("--fleet-hold", type=float, default=60.0,
                        help="fleet: seconds held (60)")
    common.add_argument("--probe-calls", type=int, default=60,
                        help="fleet: tool calls to one more device during the hold (60)")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    idle = sub.add_parser("idle", parents=[common], help="N idle devices")
    idle.add_argument("n", type=int)
    storm = sub.add_parser("storm", parents=[common], help="N devices connect at once")
    storm.add_argument("n", type=int)
    fleet = sub.add_parser("fleet", parents=[common],
                           help="N idle devices held a minute, with tool calls to one more")
    fleet.add_argument("n", type=int)
    calls = sub.add_parser("calls", parents=[common], help="C callers for S seconds")
    calls.add_argument("c", type=int)
    calls.add_argument("s", type=float)
    ingest = sub.add_parser("ingest", parents=[common], help="K devices x M events x B bytes")
    ingest.add_argument("k", type=int)
    ingest.add_argument("m", type=int)
    ingest.add_argument("b", type=int)
    ingest.add_argument("--event-acks", action="store_true",
                        help="devices ask for event_acks and number their events (gateway)")
    sub.add_parser("cleanup", parents=[common], help="disconnect cleanup time")
    compare = sub.add_parser("compare", parents=[common],
                             help="every scenario, gateway vs ceiling, with the targets")
    compare.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    return parser


def _quiet_logs() -> None:
    """stdout is for JSON lines: the embedded database's start/stop logs go to stderr."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    _quiet_logs()
    compare = opts.scenario == "compare"
    opts.target = opts.target or ("both" if compare else "gateway")
    opts.repeat = opts.repeat or (3 if compare else 1)
    if opts.profile and not Profiler.available():
        log("py-spy not found (pip install py-spy): profiling skipped")
    nofile = raise_nofile_limit()
    if compare:
        plan = COMPARE_QUICK if opts.quick else COMPARE_FULL
        if opts.quick:  # a smoke run: the fleet's minute is not needed
            opts.fleet_hold = min(opts.fleet_hold, 1.0)
            opts.probe_calls = min(opts.probe_calls, 3)
    else:
        keys = {"idle": ("n",), "storm": ("n",), "fleet": ("n",), "calls": ("c", "s"),
                "ingest": ("k", "m", "b"), "cleanup": ()}
        plan = [(opts.scenario, {k: getattr(opts, k) for k in keys[opts.scenario]})]
    if opts.client is None:
        opts.client = "node" if load.node_available() else "python"
        if opts.client == "python":
            log("node or clients/js/node_modules/ws not found: devices are aiohttp clients")
    if opts.scenario in ("idle", "storm", "fleet") and opts.n + 200 > nofile:
        log(f"warning: RLIMIT_NOFILE is {nofile}; {opts.n} devices may not fit")
    db = Database.open(opts.database_url, tmp_root=opts.pg_tmp_root) \
        if opts.target != "ceiling" else None
    lines = []
    started = time.monotonic()
    try:
        for name, params in plan:
            line = run_scenario(name, params, scenario_measure(name, params, opts), opts, db)
            _emit(line)
            lines.append(line)
    finally:
        if db is not None:
            db.close()
    if compare:
        rows = [_summary_row(line) for line in lines]
        log("\n" + _table(rows))
        _emit({"scenario": "compare", "repeat": opts.repeat, "generator_procs": opts.procs,
               "cores": os.cpu_count(), "elapsed_s": round(time.monotonic() - started, 1),
               "summary": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
