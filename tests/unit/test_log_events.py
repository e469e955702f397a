"""Every log event the package emits is a constant snake_case name listed in the log reference.

An AST scan of ``scheduler_daemon/`` collects the event of every structlog
and stdlib logging call (``log.info("tick_failed", ...)``,
``logger.warning("sd_notify_failed", extra=...)``) and of the events a tick
body defers until its commit (``(logging.INFO, "chain_steps_fired", {...})``).
The reference is the table in docs/operations.md (linked from the README):
it must list exactly these events, each with the level(s) it is logged at.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "scheduler_daemon"
REFERENCE = ROOT / "docs" / "operations.md"
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
METHODS = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "exception": "ERROR"}
METHODS["critical"] = "CRITICAL"
LOGGERS = {"log", "logger"}
#: Re-emits the events a tick body collected, each checked where it was collected.
DEFERRED_EMIT = ("scheduler/body.py", "event")

Found = dict[str, set[str | None]]  # event -> levels (None: decided at run time)


def _level_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "logging":
        return node.attr if isinstance(getattr(logging, node.attr, None), int) else None
    return None


def scan() -> tuple[Found, list[str]]:
    """(events with their levels, problems: calls whose event is not a constant snake_case name)."""
    found: Found = {}
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        module = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(module):
            event: ast.expr | None = None
            level: str | None = None
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in LOGGERS
            ):
                method = node.func.attr
                if method == "log" and len(node.args) >= 2:
                    event, level = node.args[1], _level_of(node.args[0])
                elif method in METHODS and node.args:
                    event, level = node.args[0], METHODS[method]
                elif method in (*METHODS, "log"):
                    problems.append(f"{rel}:{node.lineno}: a log call without an event")
            elif isinstance(node, ast.Tuple) and len(node.elts) == 3 and _level_of(node.elts[0]) is not None:
                event, level = node.elts[1], _level_of(node.elts[0])  # a deferred (level, event, fields)
            if isinstance(node, ast.Assign) and node in module.body and isinstance(node.value, ast.Call):
                called = ast.unparse(node.value.func)
                names = [ast.unparse(target) for target in node.targets]
                if called in ("get_logger", "logging.getLogger", "structlog.get_logger") and names[0] not in LOGGERS:
                    problems.append(f"{rel}:{node.lineno}: a logger named {names[0]}: the scan looks at log and logger")
            if event is None:
                continue
            if isinstance(event, ast.Constant) and isinstance(event.value, str) and SNAKE.match(event.value):
                found.setdefault(event.value, set()).add(level)
            elif (rel, ast.unparse(event)) != DEFERRED_EMIT:
                problems.append(f"{rel}:{node.lineno}: event {ast.unparse(event)} is not a constant snake_case name")
    return found, problems


def reference() -> dict[str, set[str]]:
    """The log reference table: event -> the levels its row names."""
    text = REFERENCE.read_text()
    section = text[text.index("\n## Log reference\n") :]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| ([A-Z, ]+) \|", section, flags=re.M)
    assert rows, f"no log reference table in {REFERENCE}"
    table: dict[str, set[str]] = {}
    for event, levels in rows:
        assert event not in table, f"{event} listed twice in the log reference"
        table[event] = {level.strip() for level in levels.split(",")}
    return table


def test_every_event_is_a_constant_snake_case_name() -> None:
    found, problems = scan()
    assert not problems, "\n".join(problems)
    assert len(found) > 80  # the scan sees the package's calls


def test_the_log_reference_lists_exactly_the_events_emitted_at_their_levels() -> None:
    found, _ = scan()
    table = reference()
    assert sorted(found.keys() - table.keys()) == [], "emitted but missing from the log reference"
    assert sorted(table.keys() - found.keys()) == [], "in the log reference but never emitted"
    wrong = {
        e: (sorted(str(x) for x in levels), sorted(table[e]))
        for e, levels in found.items()
        if not levels - {None} <= table[e]
    }
    assert wrong == {}, "levels emitted (left) not named in the reference (right)"


def test_the_readme_links_the_log_reference() -> None:
    assert "docs/operations.md#log-reference" in (ROOT / "README.md").read_text()


def test_the_scan_flags_an_fstring_and_a_phrase() -> None:
    bad = ast.parse('log.warning(f"{what} failed")\nlogger.info("sd_notify works again")\n')
    events = [node.args[0] for node in ast.walk(bad) if isinstance(node, ast.Call)]
    assert [isinstance(e, ast.Constant) and bool(SNAKE.match(e.value)) for e in events] == [False, False]
