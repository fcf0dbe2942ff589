"""Command line: ``serve`` (default), ``migrate``, ``prune``, ``token``, ``device``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import asyncpg
import structlog

from gateway.config import (
    ConfigError,
    Secrets,
    Settings,
    add_arguments,
    describe,
    flags_from_namespace,
    positive_int,
    positive_seconds,
)
from gateway.config import load_settings as build_settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

COMMANDS = ("serve", "migrate", "prune", "token", "device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_gateway.py",
        description="Device gateway: WebSockets to desktop devices, an internal API for "
                    "services, run logs in PostgreSQL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment variables (flags override them):\n" + describe(),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gateway (the default)")
    add_arguments(serve)
    migrate = commands.add_parser("migrate", help="apply pending migrations and exit")
    add_arguments(migrate)
    prune = commands.add_parser(
        "prune", help="remove finished runs older than the retention period, and their events")
    prune.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                       help="age in days (default: GATEWAY_RETENTION_DAYS)")
    prune.add_argument("--dry-run", action="store_true",
                       help="only count what would be removed")
    add_arguments(prune)
    token = commands.add_parser("token", help="mint a device JWT with the configured secret")
    token.add_argument("--sub", required=True, help="the user id (JWT sub)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (3600)")
    add_arguments(token)
    device = commands.add_parser("device", help="a device simulator that answers tools")
    device.add_argument("--token", help="device JWT (default: minted from the dev secret)")
    device.add_argument("--sub", default="dev-user", help="user id when minting (dev-user)")
    device.add_argument("--device-id", required=True)
    device.add_argument("--agent-id", action="append", default=None,
                        help="agent ids to advertise (default: stream)")
    device.add_argument("--url", help="gateway WebSocket URL "
                        "(default: ws://127.0.0.1:<public port>/api/v1/ws/device)")
    device.add_argument("--quiet", action="store_true", help="do not log every frame")
    device.add_argument("--event-acks", action="store_true",
                        help="ask for agent_ack (PROTOCOL §1.8): number events, resend "
                             "what was not acked after a reconnect")
    device.add_argument("--no-reconnect", action="store_true",
                        help="exit when the connection ends (default: reconnect with back-off)")
    device.add_argument("--reconnect-max-s", type=_argument(positive_seconds), default=30.0,
                        metavar="S",
                        help="longest back-off between reconnects (30)")
    device.add_argument("--max-unacked", type=_argument(positive_int), default=1024, metavar="N",
                        help="events a run keeps unconfirmed; with --event-acks its agent "
                             "then waits for acks (1024)")
    add_arguments(device)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        settings = build_settings(os.environ, flags_from_namespace(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    from gateway.logs import configure_logging

    configure_logging(level=settings.log_level, fmt=settings.log_format)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
        "serve": cmd_serve, "migrate": cmd_migrate, "prune": cmd_prune, "token": cmd_token,
        "device": cmd_device,
    }
    try:
        return handlers[args.command](settings, args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def _database(settings: Settings) -> tuple[str, Callable[[], None], Callable[[], None]]:
    """The DSN to use, a stop function, and an immediate-stop function."""
    if settings.database_url is not None:
        return settings.database_url, lambda: None, lambda: None
    from gateway.dev.embedded_db import EmbeddedDbError, EmbeddedPostgres, stop_server_immediately

    try:
        embedded = EmbeddedPostgres.start(settings.data_dir)
    except EmbeddedDbError as exc:
        raise ConfigError(str(exc)) from None

    def stop_now() -> None:
        stop_server_immediately(embedded.pgdata)

    return embedded.dsn, embedded.stop, stop_now


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.app import run
    from gateway.dev.devmode import resolve_secrets

    secrets = resolve_secrets(settings)
    if settings.workers > 1:
        return _serve_workers(settings, secrets, args)
    dsn, stop_db, stop_db_now = _database(settings)
    try:
        return run(settings, secrets, dsn, stop_db_now)
    except (OSError, asyncpg.PostgresError) as exc:
        log.error("gateway_failed", error=str(exc))
        print(f"gateway failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_db()


def _serve_workers(settings: Settings, secrets: Secrets, args: argparse.Namespace) -> int:
    """GATEWAY_WORKERS=N: this process supervises N workers (gateway/cluster/workers.py)."""
    from gateway.cluster.workers import Supervisor, check
    from gateway.dev.devmode import print_banner
    from gateway.systemd import SystemdNotifier

    check(settings)
    dsn, stop_db, _ = _database(settings)  # the embedded database once, for every worker
    try:
        if settings.dev_mode:
            print_banner(settings, secrets, public_port=settings.public_port,
                         internal_port=settings.internal_port)
        notifier = SystemdNotifier(settings.notify_socket)
        return Supervisor(settings, secrets, dsn, flags_from_namespace(args), notifier).run()
    finally:
        stop_db()


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.migrate import MigrationError, apply_migrations, default_migrations_dir

    dsn, stop_db, _ = _database(settings)

    async def migrate() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return await apply_migrations(conn, default_migrations_dir())
        finally:
            await conn.close()

    try:
        applied = asyncio.run(migrate())
    except MigrationError as exc:
        print(f"migration error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_db()
    log.info("migrate_finished", applied=applied, up_to_date=not applied)
    return 0


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A settings parser (``gateway.config``) as an argparse type: same rule, same message."""

    def convert(value: str) -> T:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None

    return convert


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {value!r}") from None
    if not days > 0 or days == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of days: {value!r}")
    return days


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    """By hand what the retention loop does: the same batches, the same lock."""
    from gateway.runs import retention
    from gateway.store import create_pool

    days = args.older_than if args.older_than is not None else settings.retention_days
    if days <= 0:
        raise ConfigError("GATEWAY_RETENTION_DAYS is 0 (keep everything): give --older-than DAYS")
    dsn, stop_db, _ = _database(settings)

    async def prune() -> retention.PruneResult:
        pool = await create_pool(dsn, min_size=1, max_size=1)
        try:
            if args.dry_run:
                runs, events = await retention.count_expired(pool, days)
                return retention.PruneResult(runs, events)
            return await retention.prune(pool, days)
        finally:
            await pool.close()

    try:
        result = asyncio.run(prune())
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"prune failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_db()
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result.runs} runs and {result.events} events finished more than "
          f"{days:g} days ago")
    if result.busy:
        print("stopped early: another process is pruning (run again later)", file=sys.stderr)
        return 3
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.auth import mint_device_token
    from gateway.dev.devmode import resolve_secrets

    # A configured secret is used as given; only dev mode reads (or makes) the dev one.
    secret = settings.jwt_secret or resolve_secrets(settings).jwt_secret
    algorithm = next((a for a in settings.jwt_algorithms if a.startswith("HS")), None)
    if secret is None or algorithm is None:
        raise ConfigError("token needs an HS* algorithm and GATEWAY_JWT_SECRET (or dev mode)")
    if not args.sub.strip():
        raise ConfigError("--sub must not be empty")
    if args.ttl <= 0:
        raise ConfigError("--ttl must be positive")
    print(mint_device_token(secret=secret, subject=args.sub, ttl_s=args.ttl,
                            algorithm=algorithm, audience=settings.jwt_audience,
                            issuer=settings.jwt_issuer))
    return 0


def cmd_device(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.auth import mint_device_token
    from gateway.dev.devmode import resolve_secrets
    from gateway.dev.simulator import SimulatorOptions, run_simulator

    token = args.token
    mint: Callable[[], str] | None = None
    if token is None:
        secret = resolve_secrets(settings).jwt_secret
        if secret is None:
            raise ConfigError("give --token, or run in dev mode / set GATEWAY_JWT_SECRET")

        def mint() -> str:
            return mint_device_token(secret=secret, subject=args.sub, ttl_s=24 * 3600,
                                     audience=settings.jwt_audience, issuer=settings.jwt_issuer)

        token = mint()
    url = args.url or f"ws://127.0.0.1:{settings.public_port}/api/v1/ws/device"
    options = SimulatorOptions(url=url, token=token, device_id=args.device_id,
                               agent_ids=tuple(args.agent_id or ("stream",)),
                               verbose=not args.quiet, event_acks=args.event_acks,
                               reconnect=not args.no_reconnect,
                               reconnect_max_s=args.reconnect_max_s,
                               max_unacked=args.max_unacked, mint_token=mint)
    return asyncio.run(run_simulator(options))


if __name__ == "__main__":  # `python -m gateway.cli`: how `serve --workers N` starts each worker
    sys.exit(main())
