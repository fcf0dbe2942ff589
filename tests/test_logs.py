"""The JSON log line: the keys every line carries, redaction, context and tracebacks.

``render_json_line`` is the whole JSON processor chain in one step; these
check it writes what structlog's standard chain wrote, on its own (no
global configuration is touched).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import uuid
from pathlib import Path
from typing import Any

import orjson
import structlog

from gateway.logs import REDACTED, render_json_line


def render(method: str, **event: Any) -> dict[str, Any]:
    line = render_json_line(None, method, dict(event))
    assert isinstance(line, bytes) and line.index(b"\n") == len(line) - 1  # one line, ended
    value = orjson.loads(line)
    assert isinstance(value, dict)
    return value


def in_fresh_context(func: Any) -> Any:
    """Run with a context of its own, so bound variables do not leak between tests."""
    return contextvars.Context().run(func)


def test_a_line_has_event_level_and_utc_timestamp() -> None:
    before = dt.datetime.now(dt.UTC)
    line = in_fresh_context(lambda: render("info", event="tool_call", outcome="ok",
                                           duration_ms=1.25))
    after = dt.datetime.now(dt.UTC)
    assert line["event"] == "tool_call"
    assert line["level"] == "info"
    assert line["outcome"] == "ok" and line["duration_ms"] == 1.25
    assert line["timestamp"].endswith("Z"), line
    moment = dt.datetime.fromisoformat(line["timestamp"])
    assert before <= moment <= after


class Lines:
    """A structlog logger's output, one rendered line per call."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def msg(self, line: bytes) -> None:
        self.lines.append(orjson.loads(line))

    info = debug = warning = error = critical = exception = msg


def test_levels_through_a_structlog_logger() -> None:
    """Through the filtering bound logger the gateway configures (no global set-up): warn
    is written as warning, exception as error with its traceback, and levels below the
    threshold are not written at all."""
    out = Lines()
    log = structlog.wrap_logger(
        out, processors=[render_json_line],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))

    def log_each() -> None:
        log.debug("hidden")
        log.info("shown")
        log.warn("warned")
        log.warning("warned")
        try:
            raise KeyError("missing")
        except KeyError:
            log.exception("failed")
        log.critical("down")

    in_fresh_context(log_each)
    assert [(line["event"], line["level"]) for line in out.lines] == [
        ("shown", "info"), ("warned", "warning"), ("warned", "warning"),
        ("failed", "error"), ("down", "critical")]
    assert "KeyError: 'missing'" in out.lines[3]["exception"]


def test_bound_context_is_merged_and_explicit_keys_win() -> None:
    def log_with_context() -> tuple[dict[str, Any], dict[str, Any]]:
        structlog.contextvars.bind_contextvars(request_id="req-7", device_id="bound")
        first = render("info", event="x")
        second = render("info", event="x", device_id="explicit")
        return first, second

    first, second = in_fresh_context(log_with_context)
    assert first["request_id"] == "req-7" and first["device_id"] == "bound"
    assert second["device_id"] == "explicit" and second["request_id"] == "req-7"


def test_cleared_context_leaves_no_keys() -> None:
    def log_after_clear() -> dict[str, Any]:
        structlog.contextvars.bind_contextvars(user_id="u-1")
        structlog.contextvars.clear_contextvars()
        return render("info", event="x")

    assert "user_id" not in in_fresh_context(log_after_clear)


def test_secret_keys_are_blanked_whoever_logs_them() -> None:
    def log_secrets() -> dict[str, Any]:
        structlog.contextvars.bind_contextvars(token="bound-secret")
        return render("info", event="x", Authorization="Bearer abc", jwt_secret="s3cret",
                      password="hunter2", user_id="u-1")

    line = in_fresh_context(log_secrets)
    for key in ("token", "Authorization", "jwt_secret", "password"):
        assert line[key] == REDACTED, line
    assert line["user_id"] == "u-1"
    assert b"s3cret" not in orjson.dumps(line) and b"bound-secret" not in orjson.dumps(line)


def test_exception_becomes_a_traceback_string() -> None:
    try:
        raise ValueError("broken thing")
    except ValueError as exc:
        error = exc
    line = in_fresh_context(lambda: render("error", event="request_failed", exc_info=error))
    assert "exc_info" not in line
    assert "Traceback" in line["exception"] and "ValueError: broken thing" in line["exception"]


def test_values_json_cannot_hold_are_written_as_text() -> None:
    """An odd value never breaks the line: a path is written as its path, an object with
    str(), and what orjson knows (UUIDs, datetimes) natively."""

    class Odd:
        def __str__(self) -> str:
            return "odd-value"

    run_id = uuid.uuid4()
    line = in_fresh_context(lambda: render("info", event="x", thing=Odd(), items={1, 2},
                                           path=Path("/var/lib/gateway"), run_id=run_id))
    assert line["thing"] == "odd-value"
    assert line["path"] == "/var/lib/gateway"
    assert line["run_id"] == str(run_id)
    assert isinstance(line["items"], str)


def test_the_lean_bound_logger_writes_what_structlogs_own_does() -> None:
    """The gateway's wrapper class (one call shallower per line): the same levels and
    filtering, bound context under explicit keys, %-arguments, DropEvent, exc_info."""
    from gateway.logs import lean_bound_logger

    def lines_of(wrapper_class: Any) -> list[dict[str, Any]]:
        out = Lines()

        def drop_marked(_logger: Any, _method: str, event_dict: Any) -> Any:
            if event_dict.get("drop"):
                raise structlog.DropEvent
            return event_dict

        log = structlog.wrap_logger(out, processors=[drop_marked, render_json_line],
                                    wrapper_class=wrapper_class)

        def log_each() -> None:
            bound = log.bind(device_id="bound", user_id="u-1")
            bound.debug("hidden")
            bound.info("shown", device_id="explicit", n=1)
            bound.info("interpolated %s of %d", "two", 3)
            bound.info("dropped", drop=True)
            bound.warning("warned")
            try:
                raise KeyError("missing")
            except KeyError:
                bound.exception("failed")
            bound.critical("down")

        in_fresh_context(log_each)
        for line in out.lines:
            del line["timestamp"]
            if "exception" in line:
                line["exception"] = "KeyError: 'missing'" in line["exception"]
        return out.lines

    lean = lines_of(lean_bound_logger(logging.INFO))
    assert lean == lines_of(structlog.make_filtering_bound_logger(logging.INFO))
    assert [(line["event"], line["level"]) for line in lean] == [
        ("shown", "info"), ("interpolated two of 3", "info"), ("warned", "warning"),
        ("failed", "error"), ("down", "critical")]
    assert lean[0]["device_id"] == "explicit" and lean[0]["user_id"] == "u-1"
    assert lean[3]["exception"] is True
    quiet = Lines()
    at_warning = structlog.wrap_logger(quiet, processors=[render_json_line],
                                       wrapper_class=lean_bound_logger(logging.WARNING))
    in_fresh_context(lambda: (at_warning.info("hidden"), at_warning.warning("shown")))
    assert [line["event"] for line in quiet.lines] == ["shown"]


def test_info_lines_leave_once_per_loop_iteration_warnings_at_once() -> None:
    """JsonLines: inside a running loop info lines wait in the stream's buffer for a
    callback of the next iteration; a warning flushes them with itself; outside a loop
    every line is flushed as it is written."""
    import asyncio
    import io

    from gateway.logs import JsonLines

    raw = io.BytesIO()
    lines = JsonLines(io.BufferedWriter(raw))  # type: ignore[arg-type]
    lines.info(b'{"event":"outside"}\n')
    assert raw.getvalue() == b'{"event":"outside"}\n'

    async def in_loop() -> None:
        lines.info(b'{"event":"a"}\n')
        lines.debug(b'{"event":"b"}\n')
        assert raw.getvalue().count(b"\n") == 1  # both wait
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert raw.getvalue().endswith(b'{"event":"a"}\n{"event":"b"}\n')
        lines.info(b'{"event":"c"}\n')
        lines.warning(b'{"event":"w"}\n')
        assert raw.getvalue().endswith(b'{"event":"c"}\n{"event":"w"}\n')

    asyncio.run(in_loop())

    async def last_iteration() -> None:
        lines.info(b'{"event":"last"}\n')  # the loop ends before its flush runs

    asyncio.run(last_iteration())

    async def next_loop() -> None:
        lines.info(b'{"event":"next"}\n')
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(next_loop())  # a flush left pending on a closed loop does not hold it
    assert raw.getvalue().endswith(b'{"event":"last"}\n{"event":"next"}\n')
