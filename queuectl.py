#!/usr/bin/env python3
# queuectl - a background job queue for shell commands in one file.
# MIT License. Copyright (c) 2026 the queuectl developers.
"""queuectl: queue shell commands in SQLite or PostgreSQL; run them with workers.

    python3 queuectl.py enqueue 'echo hello'
    python3 queuectl.py worker start --count 4
    python3 queuectl.py status

Jobs are retried with exponential backoff (delay = backoff_base ** attempt,
capped by backoff_max) and moved to a dead letter queue after max_retries
retries.  The CLI is a thin layer over two public classes:

    q = queuectl.Queue("/tmp/q.db")
    job_id = q.enqueue({"command": "echo hi", "max_retries": 1})
    queuectl.WorkerPool("/tmp/q.db", count=2, exit_when_idle=True).run()
    q.get(job_id)["state"]            # 'completed'

Standard library only; runs on CPython 3.6 and newer, on Linux and macOS.
"""

# Sections, in file order (search for the banner, e.g. "# Queue API #"):
#
#   Constants and configuration   every default and limit, with a #: comment
#   Errors                        QueueError, InvalidInput, NotFound, Conflict,
#                                 StoreError; main() turns them into exit codes
#   Time and parsing helpers      iso, parse_time, parse_duration, backoff_delay
#                                 next_tick, _Cron: cron expressions
#   Job validation                _validate_job -> _NewJob, parse_jobs_text
#   Schema and migrations         SQLite DDL: _SCHEMA_V1, _SCHEMA_V2, MIGRATIONS
#   Store                         the only SQL: _SQLStore (shared statements;
#                                 the claim, _SQLStore.claim with _CLAIM_SQL;
#                                 the state table, _READY and _MOVES, applied
#                                 by _SQLStore._move), records _Claim, _Result
#   Store: SQLite                 _SQLiteStore: BEGIN IMMEDIATE, PRAGMAs, files
#   Store: PostgreSQL             _PostgresStore: its claim is _PG_CLAIM_SQL,
#                                 its DDL _PG_SCHEMA; then open_store(address)
#   Queue API                     Queue: enqueue, get, list, retry, wait, ...
#   Job execution                 _Execution runs one command; kill_group
#   Worker: claim, record, ...    WorkerPool, _Reaper, _ThreadBatch
#   Dashboard                     serve_dashboard, _DashboardRoutes (JSON API,
#                                 /metrics)
#   Output formatting             tables and text for the CLI
#   CLI                           cmd_NAME handlers, each followed by its
#                                 _NAME_arguments (the command's options)
#   The table of commands, ...    _COMMANDS, build_parser, _ALIASES, main()
#   Dashboard page                the HTML/CSS/JS served at /  (passive text)
#   Benchmark                     `queuectl bench`: _Bench, run_bench

import _thread
import argparse
import collections
import contextlib
import json
import os
import re
import sqlite3
import sys
import time

# subprocess, select, signal and threading are imported where workers need
# them: an `enqueue` must start fast and pays for every module it imports.

__version__ = "1.0.0"
__all__ = [
    "Queue", "WorkerPool", "QueueError", "InvalidInput", "NotFound",
    "Conflict", "StoreError", "CONFIG_DEFAULTS", "STATES", "backoff_delay", "parse_time",
    "parse_duration", "serve_dashboard", "run_bench", "main",
]

###############################################################################
# Constants and configuration #################################################
###############################################################################

#: Where the database lives when neither --db nor $QUEUECTL_DB says.
DEFAULT_DB = os.path.join("~", ".queuectl", "queue.db")

#: PRAGMA application_id of a queuectl database ("QuCT").
APPLICATION_ID = 0x51754354

#: PRAGMA user_version this code writes; older databases are migrated.
SCHEMA_VERSION = 3

#: The schema version this code writes in PostgreSQL (meta row); older
#: schemas are migrated by _PG_MIGRATIONS.
PG_SCHEMA_VERSION = 3

#: Job states, in the order status shows them.
STATES = ("pending", "processing", "completed", "failed", "dead")

#: The largest duration a config value may give, in seconds.
MAX_SECONDS_CONFIG = 10 ** 9

#: Config keys, their defaults, and what a value must be.
CONFIG_DEFAULTS = {
    "max-retries": 3,
    "backoff-base": 2,
    "backoff-max": 3600,
    "poll-interval": 0.1,
    "job-timeout": 0,
    "lease-timeout": 30,
    "output-limit": 65536,
    "keep-completed": 604800,
    "keep-dead": 0,
}
_CONFIG_RULES = {
    # key: (type, minimum, minimum is exclusive, maximum, what a value must be)
    "max-retries": (int, 0, False, 2 ** 31 - 1,
                    "an integer >= 0 and <= 2147483647"),
    "backoff-base": (float, 1, False, 1000, "a number >= 1 and <= 1000"),
    "backoff-max": (float, 0, False, 10 ** 9,
                    "a number of seconds >= 0 and <= 1e9"),
    "poll-interval": (float, 0, True, 3600,
                      "a number of seconds > 0 and <= 3600"),
    "job-timeout": (float, 0, False, 10 ** 9,
                    "a number of seconds >= 0 (0 = none) and <= 1e9"),
    # Under half a second a beat's own write may outlast the lease: live
    # workers would take each other for dead and kill each other's jobs.
    "lease-timeout": (float, 0.5, False, 86400,
                      "a number of seconds >= 0.5 and <= 86400"),
    "output-limit": (int, 0, False, 1 << 30,
                     "a number of bytes >= 0 and <= 1073741824"),
    "keep-completed": ("duration", 0, False, MAX_SECONDS_CONFIG,
                       "a duration such as 30m, 12h or 7d (0 = for ever)"),
    "keep-dead": ("duration", 0, False, MAX_SECONDS_CONFIG,
                  "a duration such as 30m, 12h or 7d (0 = for ever)"),
}

#: Seconds between saves of a running job's output tail (logs --follow);
#: a job that prints nothing new is not saved.
TAIL_SAVE_EVERY = 1.0

#: Seconds between a worker process's clean-ups of old finished jobs
#: (keep-completed, keep-dead); the first runs when the worker starts.
CLEANUP_EVERY = 60.0

#: Finished jobs deleted per clean-up transaction: claims wait for no more.
CLEANUP_BATCH = 200

#: Seconds between reads of `logs --follow`.
FOLLOW_INTERVAL = 0.25

#: Seconds a command waits for the database lock before it gives up.
LOCK_WAIT = 60.0

#: Seconds between SIGTERM and SIGKILL when a job's process group is killed.
KILL_GRACE = 2.0

#: A job that runs longer than this gets its process group written to the
#: database, so that a recovering worker can kill it if this worker dies.
#: Shorter jobs skip that write: it is the biggest cost of a tiny job.
RECORD_GROUP_AFTER = 0.02

#: Commands longer than this many bytes (UTF-8) run from a private temporary
#: file: Linux refuses a single exec argument over 128 KiB.
LONG_COMMAND = 65536

#: A job's env: one NAME=value string may hold this many bytes (Linux
#: refuses a longer exec string with "argument list too long")...
MAX_ENV_ENTRY = 128 * 1024 - 1
#: ...and all of them this many (exec's total limit, shared with the
#: worker's own environment, is 2 MiB on Linux and 1 MiB on macOS).
MAX_ENV_TOTAL = 256 * 1024

#: An enqueue of at least this many jobs (SQLite, no dependencies) adds
#: them to the per-state counts in one statement, not one trigger per row.
BULK_COUNT_FROM = 1000

#: `copy` reads PostgreSQL up to this many rows, and this many bytes of
#: them (or one row), at a time (SQLite: a row at a time).
_STREAM_ROWS = 1000
_STREAM_TEXT = 4 << 20

#: A worker claims up to this many jobs per transaction when the queue is
#: deep (at least this many per thread are due); otherwise one at a time.
#: 32, not 8: on PostgreSQL a transaction's round trips cost more than
#: its rows (bench end-to-end +38%).  A batch-mate waits behind short
#: jobs only: once one runs past RECORD_GROUP_AFTER the rest go back.
CLAIM_BATCH = 32

#: Idle worker threads wait this long at most (or poll-interval, if
#: longer) for the one that polls for them before they look for themselves.
FOLLOWER_WAIT = 1.0

#: A finished job's result may wait this long to share a transaction with
#: the next ones; a job that runs longer than RECORD_GROUP_AFTER saves it.
RESULT_DELAY = 0.05

#: While the database cannot be written (disk full, locked by another
#: process), a worker thread retries after this many seconds, doubling...
STORE_RETRY_FIRST = 0.1
#: ...up to this many.
STORE_RETRY_MAX = 5.0

#: Seconds between a worker process's WAL checkpoints.
CHECKPOINT_EVERY = 30.0

#: The most seconds any delay, timeout, backoff or interval may be (about
#: 31 years), so every due time stays far inside the year 9999.
MAX_SECONDS = 10 ** 9

#: Worker threads in one process at most: run more processes for more.
MAX_WORKER_THREADS = 256
#: Open files a worker thread may need (its database connection's files,
#: its job's output pipe and pidfd, its pipe for failed execs), and the
#: process besides them.
FILES_PER_THREAD, FILES_PER_POOL = 6, 64

#: The largest count a user may give (retries, --limit, --offset,
#: --attempt): far inside SQLite's 64-bit integers.
MAX_COUNT = 2 ** 31 - 1

#: Seconds between a worker process's checks for due schedules (only while
#: there are schedules; the check is one indexed read).
SCHEDULE_CHECK_EVERY = 1.0

#: Schedule names: the id alphabet, at most this long (a tick's job id is
#: NAME:YYYYMMDDTHHMMSSZ and must stay a valid id).
SCHEDULE_NAME_MAX = 100

#: Upper bounds (seconds) of the run-duration histogram's buckets.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)

#: Seconds a dashboard connection may sit idle before it is closed.
HTTP_TIMEOUT = 15

#: Seconds `smoke-test` gives any one step before it calls it failed.
SMOKE_STEP_TIMEOUT = 60.0

#: The queue of a job that names none (SPEC 10).
DEFAULT_QUEUE = "default"

#: A unique key (--unique) is 1 to this many characters.
MAX_UNIQUE_KEY = 1024

#: Job ids: 1 to 128 of these characters.  (Patterns stay strings: re
#: compiles each on first use and caches it.  Compiled at import, this
#: module's patterns were 5% of an enqueue's instructions on Python 3.6.)
_ID_RE = r"^[A-Za-z0-9._:-]{1,128}$"

_JOB_FIELDS = ("command", "id", "max_retries", "priority", "run_at", "delay",
               "timeout", "cwd", "env", "after", "queue", "unique_key")
_MANAGED_FIELDS = ("state", "attempts", "last_error", "created_at",
                   "updated_at", "runs")
_JOB_FIELD_SET = frozenset(_JOB_FIELDS)  # one set test for a plain job

###############################################################################
# Errors ######################################################################
###############################################################################


class QueueError(Exception):
    """Any error queuectl reports to its user; exit status 1."""
    exit_code = 1


class InvalidInput(QueueError):
    """The user asked for something malformed; exit status 2."""
    exit_code = 2


class NotFound(QueueError):
    """No job (or attempt) matches."""


class Conflict(QueueError):
    """The request clashes with the queue's state (duplicate id, busy job)."""


class StoreError(QueueError):
    """The database failed: locked, full, unreachable or damaged.

    `transient`: it may pass (a lock held elsewhere, a full disk, a lost
    connection), so workers wait it out instead of exiting.  `reason`: the
    cause alone, for log lines that say where it happened themselves.
    """

    def __init__(self, message, transient=False, reason=None):
        QueueError.__init__(self, message)
        self.transient = transient
        self.reason = reason or message


###############################################################################
# Time and parsing helpers ####################################################
###############################################################################

_ISO_RE = (r"(?i)^([0-9]{4})-([0-9]{2})-([0-9]{2})"
           r"(?:[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(\.[0-9]+)?)?)?"
           r"[ ]*(Z|[+-][0-9]{2}:?[0-9]{2})?$")
_DURATION_RE = r"^([0-9]+(?:\.[0-9]+)?) *([smhdw]?)$"
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def iso(t):
    """Unix time -> '2026-11-26T07:00:00.123Z' (None stays None)."""
    if t is None:
        return None
    global _ISO_SECOND
    secs, ms = divmod(int(round(t * 1000)), 1000)
    cached = _ISO_SECOND  # (second, text): workers log many times a second
    if cached[0] != secs:
        cached = _ISO_SECOND = (secs, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                    time.gmtime(secs)))
    return "%s.%03dZ" % (cached[1], ms)


_ISO_SECOND = (None, "")


def parse_time(text):
    """ISO 8601 -> unix time.  'Z' or an offset is honoured; naive is local."""
    m = re.match(_ISO_RE, text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError("not an ISO 8601 time: %r" % (text,))
    import calendar
    y, mo, d, h, mi, s, frac, zone = m.groups()
    fields = (int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0))
    if not (1970 <= fields[0] <= 9999 and 1 <= fields[1] <= 12
            and 1 <= fields[2] <= calendar.monthrange(*fields[:2])[1]
            and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        raise ValueError("not a valid date and time in the years 1970-9999:"
                         " %r" % (text,))
    fraction = float(frac) if frac else 0.0
    if zone is None:
        seconds = time.mktime(fields + (0, 0, -1)) + fraction
    else:
        offset = 0
        if zone.upper() != "Z":
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            if int(digits[:2]) > 23 or int(digits[2:]) > 59:
                raise ValueError("not a valid UTC offset: %r" % (zone,))
            offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        seconds = calendar.timegm(fields + (0, 0, 0)) - offset + fraction
    if seconds < 0:  # 1970-01-01 with an offset east of UTC
        raise ValueError("before 1970-01-01T00:00:00Z: %r" % (text,))
    if seconds >= _YEAR_10000:  # 9999-12-31 with an offset west of UTC
        raise ValueError("after 9999-12-31T23:59:59Z: %r" % (text,))
    return seconds


_YEAR_10000 = 253402300800  # 10000-01-01T00:00:00Z, which iso() cannot say


_DIGITS_RE = r"^[0-9]+$"
_INTEGER_RE = r"^[+-]?[0-9]+$"
_DECIMAL_RE = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


def _parse_number(text, kind):
    """ASCII decimal text -> int (kind int) or float; ValueError otherwise.
    int() and float() alone also take other scripts' digits ('٣', '３'),
    underscores ('3_0') and 'inf'."""
    text = text.strip()
    if not re.match(_INTEGER_RE if kind is int else _DECIMAL_RE, text):
        raise ValueError("not a number: %r" % (text,))
    if kind is int:
        # As many digits still name a number out of every field's range,
        # and int() refuses over 4,300 on 3.7+ (with advice to programmers).
        text = text[:_MAX_DIGITS]
    return kind(text)


_MAX_DIGITS = 400


def parse_duration(text):
    """'90', '90s', '15m', '12h', '7d', '2w' -> seconds."""
    m = re.match(_DURATION_RE, str(text).strip().lower())
    if not m:
        raise ValueError("not a duration: %r (try 30s, 15m, 12h or 7d)" % (text,))
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds > MAX_SECONDS:
        raise ValueError("a duration may be at most 1e9 seconds, got %r"
                         % (text,))
    return seconds


def parse_json(text):
    """Parse user JSON; refuse duplicate keys and absurd nesting (ValueError)."""
    try:
        return _JSON_DECODER.decode(text)  # one decoder for every line
    except RecursionError:
        raise ValueError("nested too deeply")
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python 3.7+'s limit
            raise ValueError("a number of more than 4300 digits")
        raise


def _unique_keys(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):  # rare: find the first repeated key
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError("duplicate key %s" % json.dumps(key))
            seen.add(key)
    return result


_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _seconds_text(value):
    """5.0 -> '5s', 0.25 -> '0.25s'."""
    return "%ss" % _number_text(value)


def _number_text(value):
    return ("%d" % value) if float(value).is_integer() else ("%g" % value)


def backoff_delay(failures, base, cap):
    """Seconds to wait after the given number of failed attempts."""
    try:
        delay = float(base) ** failures
    except OverflowError:
        delay = float("inf")
    return min(delay, float(cap))


def _random_id():
    return os.urandom(6).hex()


def _fill_ids(ids):
    """Random 12-hex-digit ids where `ids` has None (one urandom call)."""
    missing = sum(1 for job_id in ids if job_id is None)
    digits = os.urandom(6 * missing).hex()
    pool = iter([digits[i:i + 12] for i in range(0, len(digits), 12)])
    filled = [job_id if job_id is not None else next(pool) for job_id in ids]
    if len(set(filled)) != len(filled):  # a clash inside the batch
        return _fill_ids(ids)
    return filled


def _host():
    return os.uname()[1]


# -- cron expressions (SPEC 10 recurring jobs) -------------------------------

#: The five cron fields: (name, lowest, highest, names for 0/1, 2, ...).
_CRON_FIELDS = (
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                      "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_SHORTCUTS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
                   "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
                   "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                   "@hourly": "0 * * * *"}
#: Days next_tick searches before it calls an expression impossible
#: (28 years: every weekday of every date comes round again).
_CRON_SEARCH_DAYS = 28 * 366


class _Cron(object):
    """A parsed cron expression: a set of values per field.

    Day of month and day of week restricted both: a day matches when
    either does (cron's rule); a field that starts with `*` is
    unrestricted."""

    def __init__(self, text):
        if not isinstance(text, str):
            raise InvalidInput("a cron expression must be a string")
        self.text = " ".join(text.split())  # tabs would break `schedule list`
        expanded = _CRON_SHORTCUTS.get(self.text.lower(), self.text)
        if expanded.startswith("@"):
            raise InvalidInput("cron: unknown shortcut %s (known: %s)" % (
                _short_repr(self.text), ", ".join(sorted(_CRON_SHORTCUTS))))
        fields = expanded.split()
        if len(fields) != 5:
            raise InvalidInput(
                "cron: %s has %d field(s); give five: minute hour"
                " day-of-month month day-of-week (e.g. '30 2 * * *')"
                % (_short_repr(self.text), len(fields)))
        (self.minutes, self.hours, self.days, self.months,
         self.weekdays) = [_cron_field(text, *spec)
                           for text, spec in zip(fields, _CRON_FIELDS)]
        self.weekdays = set(d % 7 for d in self.weekdays)  # 7 is Sunday too
        self.any_day = fields[2].startswith("*")
        self.any_weekday = fields[4].startswith("*")

    def day_matches(self, day):
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return by_date and by_weekday
        return by_date or by_weekday


def _cron_field(text, name, low, high, names):
    """One field ('*/15', '1-5', 'mon-fri', '1,15') -> a set of values."""
    def value(word):
        if names and word.lower() in names:
            return names.index(word.lower()) + (low if low == 1 else 0)
        if not re.match(_DIGITS_RE, word):
            raise InvalidInput("cron: %s: %s is not a number%s" % (
                name, _short_repr(word), " or a name (%s-%s)" % (
                    names[0], names[-1]) if names else ""))
        number = int(word) if len(word.lstrip("0")) <= 2 else None
        if number is None or not low <= number <= high:
            raise InvalidInput("cron: %s: %s is out of range %d-%d" % (
                name, _clipped(word), low, high))
        return number
    values = set()
    for part in text.split(","):
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            digits = step_text.lstrip("0")
            if not re.match(_DIGITS_RE, step_text) or not digits:
                raise InvalidInput("cron: %s: step %s must be a whole number"
                                   " >= 1" % (name, _short_repr(step_text)))
            # A step past the field's range takes its first value only.
            step = int(digits) if len(digits) <= 4 else high + 1
        if span == "*":
            start, end = low, high
        else:
            first, dash, last = span.partition("-")
            start = value(first)
            end = value(last) if dash else (high if slash else start)
            if end < start:
                raise InvalidInput("cron: %s: range %s runs backwards"
                                   % (name, _short_repr(span)))
        values.update(range(start, end + 1, step))
    return values


def next_tick(cron, after):
    """The first time after unix time `after` that the cron expression
    (text or _Cron) names, in local time; None if it never does.

    Wall-clock semantics across daylight-saving changes: a time skipped by
    the clock going forward runs once, at the first valid time after it; a
    time the clock passes twice runs once, the first time.
    """
    import datetime
    cron = cron if isinstance(cron, _Cron) else _Cron(cron)
    wall = datetime.datetime.fromtimestamp(after).replace(
        second=0, microsecond=0) + datetime.timedelta(minutes=1)
    day, start = wall.date(), (wall.hour, wall.minute)
    for _ in range(_CRON_SEARCH_DAYS):
        if cron.day_matches(day):
            for hour in sorted(h for h in cron.hours if h >= start[0]):
                for minute in sorted(cron.minutes):
                    if (hour, minute) < start:
                        continue
                    for t in _local_times(day, hour, minute):
                        if t > after:
                            return t
        day += datetime.timedelta(days=1)
        start = (0, 0)
    return None


def _local_times(day, hour, minute):
    """The unix time at which the local clock first shows this minute (the
    first of two when the clock went back), or, in a gap, the first second
    after the gap; as a list."""
    wall = (day.year, day.month, day.day, hour, minute)
    guesses = []
    for isdst in (1, 0):
        with contextlib.suppress(OverflowError):  # a day the zone skipped
            guesses.append(time.mktime(wall + (0, 0, 0, isdst)))
    found = sorted(set(t for t in guesses if time.localtime(t)[:5] == wall))
    if found:
        return found[:1]
    if len(guesses) == 2:
        low, high = int(min(guesses)), int(max(guesses))
    else:  # mktime fails in a whole day skipped (Samoa, 2011-12-30); the
        # first second after it is within two days of the wall time read as
        # UTC (offsets are under 15 h, the gap at most a day)
        import calendar
        low = calendar.timegm(wall + (0, 0, 0)) - 2 * 86400
        high = low + 4 * 86400
    while low < high:  # the clock jumps over `wall` between the guesses
        middle = (low + high) // 2
        if time.localtime(middle)[:5] >= wall:
            high = middle
        else:
            low = middle + 1
    return [float(low)]


def _every_next(every, previous, now):
    """The next tick of an --every schedule after `now`: on the grid of its
    previous tick, skipping (not bursting) the ticks missed."""
    if now < previous:
        return previous
    import math
    return previous + every * (math.floor((now - previous) / every) + 1)


###############################################################################
# Job validation ##############################################################
###############################################################################


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value):
    """False for nan, inf and -inf."""
    return value == value and value not in (float("inf"), float("-inf"))


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and _finite(value)


def _check_id(value, what="id"):
    if not isinstance(value, str) or not re.match(_ID_RE, value):
        raise InvalidInput("%s must be 1-128 characters of A-Z a-z 0-9 . _ : -,"
                           " got %s" % (what, _short_repr(value)))
    return value


def _short_repr(value):
    return _clipped(json.dumps(value) if not isinstance(value, bytes)
                    else repr(value))


def _clipped(text):
    """At most 40 characters of a text quoted in an error (any other value
    as it is)."""
    if not isinstance(text, str) or len(text) <= 40:
        return text
    return text[:37] + "..."


def _field_number(spec, name, minimum, exclusive=False, integer=False):
    """A number field within [minimum, MAX_COUNT or MAX_SECONDS]."""
    value = spec[name]
    maximum = MAX_COUNT if integer else MAX_SECONDS
    ok = _is_int(value) if integer else _is_number(value)
    if ok:
        ok = (value > minimum if exclusive else value >= minimum) \
            and value <= maximum
    if not ok:
        kind = "an integer" if integer else "a number"
        raise InvalidInput("%s must be %s %s %s and <= %s, got %s" % (
            name, kind, ">" if exclusive else ">=", _number_text(minimum),
            _number_text(maximum), _short_repr(value)))
    return value


#: A validated new job: the values of its jobs row.
_NewJob = collections.namedtuple(
    "_NewJob", "id command priority run_at max_retries timeout cwd env queue"
    " unique_key")


def _validate_job(spec, config, now, cwd):
    """A JSON-like dict -> the values of a new jobs row (without deps).

    Raises InvalidInput naming the first bad field.
    """
    if not isinstance(spec, dict):
        raise InvalidInput("a job must be a JSON object, got %s"
                           % type(spec).__name__)
    for name in ([] if _JOB_FIELD_SET.issuperset(spec) else spec):
        if name in _MANAGED_FIELDS:
            raise InvalidInput("field '%s' is managed by queuectl and cannot"
                               " be set" % name)
        if name not in _JOB_FIELDS:
            raise InvalidInput("unknown field '%s' (fields: %s)"
                               % (name, ", ".join(_JOB_FIELDS)))
    command = spec.get("command")
    if not isinstance(command, str) or not command.strip():
        raise InvalidInput("command must be a non-empty string, got %s"
                           % _short_repr(command))
    if "\0" in command:
        raise InvalidInput("command must not contain NUL characters")
    if not _encodable(command):
        raise InvalidInput("command is not valid Unicode (a lone surrogate)")
    job_id = _check_id(spec["id"]) if "id" in spec else None
    max_retries = config["max-retries"]
    if "max_retries" in spec:
        max_retries = _field_number(spec, "max_retries", 0, integer=True)
    priority = 0
    if "priority" in spec:
        priority = spec["priority"]
        # Symmetric: the claim walks below the lowest priority in use.
        if not _is_int(priority) or abs(priority) > _TOP_PRIORITY:
            raise InvalidInput("priority must be an integer from -%d to %d,"
                               " got %s" % (_TOP_PRIORITY, _TOP_PRIORITY,
                                            _short_repr(priority)))
    run_at = _job_run_at(spec, now)
    timeout = config["job-timeout"] or None
    if "timeout" in spec:
        timeout = _field_number(spec, "timeout", 0, exclusive=True)
    job_cwd = _job_cwd(spec["cwd"]) if "cwd" in spec else cwd
    env = json.dumps(_job_env(spec), sort_keys=True) if "env" in spec else "{}"
    queue = _check_id(spec["queue"], "queue") if "queue" in spec \
        else DEFAULT_QUEUE
    return _NewJob(job_id, command, priority, run_at, max_retries, timeout,
                   job_cwd, env, queue, _job_unique_key(spec))


def _queue_names(names):
    """A list of queue names (or "a,b"), checked; duplicates dropped."""
    if isinstance(names, str):
        names = names.split(",")
    if not isinstance(names, (list, tuple)) or not names:
        raise InvalidInput("--queue needs one or more queue names, got %s"
                           % _short_repr(names))
    found = []
    for name in names:
        if _check_id(name, "queue") not in found:
            found.append(name)
    return found


def _job_unique_key(spec):
    """The job's unique key (SPEC 10), or None."""
    if spec.get("unique_key") is None:
        return None
    key = spec["unique_key"]
    if not isinstance(key, str) or not key or len(key) > MAX_UNIQUE_KEY \
            or "\0" in key or not _encodable(key):
        raise InvalidInput("unique_key must be a string of 1-%d characters"
                           " without NUL, got %s" % (MAX_UNIQUE_KEY,
                                                     _short_repr(key)))
    return key


def _job_run_at(spec, now):
    if "run_at" in spec and "delay" in spec:
        raise InvalidInput("give run_at or delay, not both")
    if "delay" in spec:
        return now + _field_number(spec, "delay", 0)
    if "run_at" in spec:
        try:
            return parse_time(spec["run_at"])
        except (ValueError, OverflowError) as exc:
            raise InvalidInput("run_at: %s" % exc)
    return now


def _job_cwd(value):
    if not isinstance(value, str) or not value or "\0" in value \
            or not _encodable(value):
        raise InvalidInput("cwd must be a non-empty path, got %s"
                           % _short_repr(value))
    if not os.path.isabs(value):
        value = os.path.join(_current_folder(), value)
    return os.path.normpath(value)


def _current_folder():
    """os.getcwd() as UTF-8 text, whatever the locale."""
    return _utf8_text(os.getcwd(), "the current folder's path")


def _utf8_text(text, what):
    """Text from the system (arguments, environment, os.getcwd()) as real
    UTF-8 text.  Python 3.6 under LANG=C hands non-ASCII bytes over as
    surrogate escapes, and a path joined from both kinds holds each."""
    if _isascii(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise InvalidInput("%s is not UTF-8: %s" % (what, _short_repr(text)))


def _native(path):
    """A UTF-8 text path as the bytes a system call takes: given text,
    Python 3.6 under LANG=C would encode it as ASCII and fail."""
    return path.encode("utf-8")


_isascii = getattr(str, "isascii", lambda text: False)  # 3.7+


def _encodable(text):
    """Is this text UTF-8 (no lone surrogates)?  A job's command, cwd and
    environment are stored as text and passed to its process as UTF-8,
    whatever the worker's locale."""
    if _isascii(text):  # the common case, without an encoding
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeError:
        return False


def _job_env(spec):
    env = spec["env"]
    if not isinstance(env, dict):
        raise InvalidInput("env must be an object of string to string, got %s"
                           % _short_repr(env))
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or not _encodable(key):
            raise InvalidInput("env: bad variable name %s" % _short_repr(key))
        if not isinstance(value, str) or "\0" in value \
                or not _encodable(value):
            raise InvalidInput("env: value of %s must be a string without NUL"
                               " or lone surrogates, got %s"
                               % (key, _short_repr(value)))
    sizes = [len(key.encode("utf-8")) + 1 + len(value.encode("utf-8"))
             for key, value in env.items()]
    for size, key in zip(sizes, env):
        if size > MAX_ENV_ENTRY:
            raise InvalidInput("env: %s=... is %d bytes; one variable can"
                               " reach a process with at most %d"
                               % (key, size, MAX_ENV_ENTRY))
    if sum(sizes) > MAX_ENV_TOTAL:
        raise InvalidInput("env: %d bytes in all; at most %d can reach a"
                           " process" % (sum(sizes), MAX_ENV_TOTAL))
    return env


def _job_after(spec):
    if "after" not in spec:
        return ()
    after = spec["after"]
    if isinstance(after, str):
        # Every part must be an id: `--after "$BUILD"` with BUILD unset (an
        # earlier enqueue failed) must not mean "run at once".
        after = after.split(",")
    if not isinstance(after, list):
        raise InvalidInput("after must be a list of job ids, got %s"
                           % _short_repr(after))
    return [_check_id(dep, "after") for dep in after]


def parse_jobs_text(text):
    """A JSON object, a JSON array of objects, or JSON Lines -> list of dicts."""
    if text.startswith("\ufeff"):  # a byte order mark (Windows Notepad)
        text = text[1:]
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("no jobs in input")
    if stripped[0] == "[":
        try:
            jobs = parse_json(stripped)
        except ValueError as exc:
            raise InvalidInput("invalid JSON: %s" % exc)
        return jobs
    try:
        return [parse_json(stripped)]
    except ValueError as exc:
        if "duplicate key" in str(exc) or "nested" in str(exc):
            raise InvalidInput("invalid JSON: %s" % exc)
    jobs = []
    # The decoder's own scanner, called on each line as decode() would call
    # it but without decode()'s two frames and two regex matches: 1.4 us a
    # line, a tenth of a 100,000-line `enqueue -f` on Python 3.6.  A line
    # it does not take whole (blank, padded, bad) goes through parse_json.
    scan = _JSON_DECODER.scan_once
    for number, line in enumerate(text.splitlines(), 1):
        try:
            job, end = scan(line, 0)
            if end == len(line):
                jobs.append(job)
                continue
        except (StopIteration, ValueError, RecursionError):
            pass
        if line.strip():
            try:
                jobs.append(parse_json(line))
            except ValueError as exc:
                raise InvalidInput("line %d: invalid JSON: %s" % (number, exc))
    return jobs


###############################################################################
# Schema and migrations #######################################################
###############################################################################

# Every statement here must run on SQLite 3.7.17: no partial indexes, no
# RETURNING, no UPSERT, no window functions.
_SCHEMA_V1 = (
    # seq is the enqueue order; `ready` is 1 exactly while the job may be
    # claimed (pending or failed, dependencies met), so one index serves the
    # claim without scanning finished jobs.
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        command TEXT NOT NULL,
        state TEXT NOT NULL,
        ready INTEGER,
        priority INTEGER NOT NULL DEFAULT 0,
        run_at REAL NOT NULL,
        max_retries INTEGER NOT NULL,
        timeout REAL,
        cwd TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0,
        runs INTEGER NOT NULL DEFAULT 0,
        waiting INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        worker_id TEXT,
        attempt_id INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS jobs_claim"
    " ON jobs (ready, priority DESC, run_at, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq)",
    # One row per execution.  n numbers a job's runs 1, 2, 3... for ever;
    # jobs.attempts counts the runs since the job was (re)queued.
    """CREATE TABLE IF NOT EXISTS attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_seq INTEGER NOT NULL,
        n INTEGER NOT NULL,
        worker_id TEXT,
        host TEXT,
        pgid INTEGER,
        proc_start TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        duration REAL,
        exit_code INTEGER,
        signal INTEGER,
        error TEXT,
        output TEXT,
        output_dropped INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_seq, n)",
    "CREATE INDEX IF NOT EXISTS attempts_ended ON attempts (ended_at)",
    # job_seq waits for dep_seq to complete.
    """CREATE TABLE IF NOT EXISTS deps (
        job_seq INTEGER NOT NULL,
        dep_seq INTEGER NOT NULL,
        PRIMARY KEY (job_seq, dep_seq))""",
    "CREATE INDEX IF NOT EXISTS deps_dep ON deps (dep_seq)",
    """CREATE TABLE IF NOT EXISTS workers (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat REAL NOT NULL,
        beat INTEGER NOT NULL DEFAULT 0)""",
    # User settings, plus internal keys starting with '_' (stop requests,
    # pause) that workers read in the same query.
    """CREATE TABLE IF NOT EXISTS config (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # Counts per state, kept by triggers, so `status` costs the same with a
    # million jobs as with ten.
    """CREATE TABLE IF NOT EXISTS counts (
        state TEXT PRIMARY KEY,
        n INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO counts (state, n) SELECT 'pending', 0 UNION ALL"
    " SELECT 'processing', 0 UNION ALL SELECT 'completed', 0 UNION ALL"
    " SELECT 'failed', 0 UNION ALL SELECT 'dead', 0",
    """CREATE TRIGGER IF NOT EXISTS jobs_count_insert AFTER INSERT ON jobs
       BEGIN UPDATE counts SET n = n + 1 WHERE state = NEW.state; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_count_delete AFTER DELETE ON jobs
       BEGIN UPDATE counts SET n = n - 1 WHERE state = OLD.state; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_count_update AFTER UPDATE OF state
       ON jobs WHEN OLD.state <> NEW.state BEGIN
         UPDATE counts SET n = n - 1 WHERE state = OLD.state;
         UPDATE counts SET n = n + 1 WHERE state = NEW.state; END""",
)

# Version 2: when each run was due (for wait times), and totals that only
# grow, kept by a trigger, for Prometheus counters and the histogram.
_SCHEMA_V2 = (
    "ALTER TABLE attempts ADD COLUMN due_at REAL",
    """CREATE TABLE IF NOT EXISTS totals (
        name TEXT PRIMARY KEY,
        value REAL NOT NULL)""",
    "INSERT OR IGNORE INTO totals (name, value) SELECT 'success', COUNT(*)"
    " FROM attempts WHERE ended_at IS NOT NULL AND error IS NULL",
    "INSERT OR IGNORE INTO totals (name, value) SELECT 'lost', COUNT(*)"
    " FROM attempts WHERE error = 'worker lost'",
    "INSERT OR IGNORE INTO totals (name, value) SELECT 'timeout', COUNT(*)"
    " FROM attempts WHERE error LIKE 'timed out%'",
    "INSERT OR IGNORE INTO totals (name, value) SELECT 'failure', COUNT(*)"
    " FROM attempts WHERE ended_at IS NOT NULL AND error IS NOT NULL"
    " AND error <> 'worker lost' AND error NOT LIKE 'timed out%'",
    "INSERT OR IGNORE INTO totals (name, value) SELECT 'duration_sum',"
    " COALESCE(SUM(duration), 0) FROM attempts WHERE ended_at IS NOT NULL",
    # le is a bucket's upper bound; 9e999 is +Inf.
    """CREATE TABLE IF NOT EXISTS duration_buckets (
        le REAL PRIMARY KEY,
        n INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO duration_buckets (le, n) SELECT b.le, (SELECT"
    " COUNT(*) FROM attempts WHERE ended_at IS NOT NULL AND"
    " COALESCE(duration, 0) <= b.le) FROM (%s) b" % " UNION ALL ".join(
        "SELECT %r AS le" % le for le in DURATION_BUCKETS + (9e999,)
    ).replace("inf", "9e999"),
    """CREATE TRIGGER IF NOT EXISTS attempts_finish AFTER UPDATE OF ended_at
       ON attempts WHEN OLD.ended_at IS NULL AND NEW.ended_at IS NOT NULL
       BEGIN
         UPDATE totals SET value = value + 1 WHERE name = CASE
           WHEN NEW.error IS NULL THEN 'success'
           WHEN NEW.error = 'worker lost' THEN 'lost'
           WHEN NEW.error LIKE 'timed out%' THEN 'timeout'
           ELSE 'failure' END;
         UPDATE totals SET value = value + COALESCE(NEW.duration, 0)
           WHERE name = 'duration_sum';
         UPDATE duration_buckets SET n = n + 1
           WHERE le >= COALESCE(NEW.duration, 0);
       END""",
)

# Version 3: SPEC 10 (long-lived queues), in three parts.
_SCHEMA_V3_CONTROL = (     # cancel, retry, logs --follow, retention
    # Cancel requests for processing jobs, by the claim (attempt) they
    # stop: workers read this (usually empty) table with every heartbeat.
    """CREATE TABLE IF NOT EXISTS cancels (
        attempt_id INTEGER PRIMARY KEY,
        job_seq INTEGER NOT NULL,
        requested_at REAL NOT NULL)""",
)
_SCHEMA_V3_QUEUES = (      # named queues with caps, unique jobs
    "ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default'",
    "ALTER TABLE jobs ADD COLUMN unique_key TEXT",
    # A queue exists once it is named, by a job or by `queue set`; a NULL
    # concurrency is no cap.  Claims read the capped and paused rows only.
    """CREATE TABLE IF NOT EXISTS queues (
        name TEXT PRIMARY KEY,
        concurrency INTEGER,
        paused INTEGER NOT NULL DEFAULT 0)""",
    # Jobs per state of every queue but 'default' (whose counts are the
    # totals minus these), kept by triggers that default jobs skip: a job
    # that names no queue pays one WHEN test per change.
    """CREATE TABLE IF NOT EXISTS queue_counts (
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (queue, state))""",
    """CREATE TRIGGER IF NOT EXISTS jobs_queue_insert AFTER INSERT ON jobs
       WHEN NEW.queue <> 'default' BEGIN
         INSERT OR IGNORE INTO queues (name) VALUES (NEW.queue);
         INSERT OR IGNORE INTO queue_counts (queue, state, n)
           VALUES (NEW.queue, NEW.state, 0);
         UPDATE queue_counts SET n = n + 1
           WHERE queue = NEW.queue AND state = NEW.state; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_queue_delete AFTER DELETE ON jobs
       WHEN OLD.queue <> 'default' BEGIN
         UPDATE queue_counts SET n = n - 1
           WHERE queue = OLD.queue AND state = OLD.state; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_queue_update AFTER UPDATE OF state
       ON jobs WHEN OLD.state <> NEW.state AND NEW.queue <> 'default' BEGIN
         UPDATE queue_counts SET n = n - 1
           WHERE queue = OLD.queue AND state = OLD.state;
         INSERT OR IGNORE INTO queue_counts (queue, state, n)
           VALUES (NEW.queue, NEW.state, 0);
         UPDATE queue_counts SET n = n + 1
           WHERE queue = NEW.queue AND state = NEW.state; END""",
    # A unique key is held by one pending, failed or processing job: taken
    # (primary key) by the enqueue that creates it, freed here when the job
    # completes, dies or is deleted.  Jobs without a key skip the triggers.
    """CREATE TABLE IF NOT EXISTS unique_keys (
        key TEXT PRIMARY KEY,
        job_seq INTEGER NOT NULL)""",
    """CREATE TRIGGER IF NOT EXISTS jobs_unique_free AFTER UPDATE OF state
       ON jobs WHEN NEW.unique_key IS NOT NULL
       AND NEW.state IN ('completed', 'dead') BEGIN
         DELETE FROM unique_keys WHERE key = NEW.unique_key
           AND job_seq = NEW.seq; END""",
    """CREATE TRIGGER IF NOT EXISTS jobs_unique_delete AFTER DELETE ON jobs
       WHEN OLD.unique_key IS NOT NULL BEGIN
         DELETE FROM unique_keys WHERE key = OLD.unique_key
           AND job_seq = OLD.seq; END""",
)
# Recurring jobs: a schedule is a job template (JSON, as `enqueue` takes
# it) with a cron expression or an interval.  next_run is the one fact that
# makes a tick happen once: the worker that moves it (compare-and-set in its
# write transaction) enqueues the tick's job.
_SCHEMA_V3_SCHEDULES = (
    """CREATE TABLE IF NOT EXISTS schedules (
        name TEXT PRIMARY KEY,
        cron TEXT,
        every REAL,
        job TEXT NOT NULL,
        overlap INTEGER NOT NULL DEFAULT 0,
        next_run REAL NOT NULL,
        last_job TEXT,
        last_run REAL,
        created_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS schedules_next_run ON schedules (next_run)",
)


def _trigger_as_stored(schema, name):
    """A CREATE TRIGGER of `schema` as sqlite_master keeps it."""
    return next(sql for sql in schema if " %s " % name in sql).replace(
        " IF NOT EXISTS", "", 1)


#: The INSERT triggers on jobs, as sqlite_master keeps them: a big enqueue
#: does their work in a few statements instead (_SQLiteStore._insert_rows).
_INSERT_TRIGGERS = {
    "jobs_count_insert": _trigger_as_stored(_SCHEMA_V1, "jobs_count_insert"),
    "jobs_queue_insert": _trigger_as_stored(_SCHEMA_V3_QUEUES,
                                            "jobs_queue_insert"),
}

#: MIGRATIONS[v] brings a database from user_version v to v + 1.
MIGRATIONS = {0: _SCHEMA_V1, 1: _SCHEMA_V2,
              2: _SCHEMA_V3_CONTROL + _SCHEMA_V3_QUEUES + _SCHEMA_V3_SCHEDULES}


###############################################################################
# Store: the one place that speaks SQL ########################################
###############################################################################
#
# Queue, WorkerPool, the reaper, the dashboard and the benchmark call a
# store's methods and never see a connection or a statement.  _SQLStore
# holds what every SQL database shares: the statements (written once, with
# `?`), the table of state changes, the transaction helpers and the
# translation of driver errors into StoreError.  _SQLiteStore holds what
# only SQLite says: its DDL and triggers, BEGIN IMMEDIATE under a
# process-wide lock, PRAGMAs, checkpoints, VACUUM, INDEXED BY, INSERT OR
# REPLACE/IGNORE, and how a file becomes a database.
#
# A store object belongs to one thread; each thread opens its own.

class _Claim(object):
    """A job as a worker claims it.  `started` and `forced` are the worker's."""

    __slots__ = ("seq", "id", "command", "timeout", "cwd", "env", "attempts",
                 "attempt_id", "started", "forced", "cancelled")

    def __init__(self, seq, job_id, command, timeout, cwd, env, attempts,
                 attempt_id, started):
        self.seq, self.id, self.command, self.timeout = (seq, job_id, command,
                                                         timeout)
        self.cwd, self.env, self.attempts = cwd, env, attempts
        self.attempt_id, self.started, self.forced = attempt_id, started, False
        self.cancelled = False  # the worker killed it for a cancel request


class _Result(object):
    """What one run of a job's command came to.  (A plain class, like
    _Claim: a namedtuple costs Python 3.6 a compile at import.)"""

    __slots__ = ("exit_code", "signal", "error", "output", "dropped", "pgid",
                 "ended")

    def __init__(self, exit_code, signal, error, output, dropped, pgid,
                 ended):
        self.exit_code, self.signal, self.error = exit_code, signal, error
        self.output, self.dropped, self.pgid = output, dropped, pgid
        self.ended = ended


#: What `ready` is in each state: 1 exactly while the job may be claimed
#: (pending with every dependency met, or failed), NULL otherwise, so one
#: index serves the claim without scanning finished jobs.
_READY = {"pending": "CASE WHEN waiting = 0 THEN 1 END", "failed": "1",
          "processing": "NULL", "completed": "NULL", "dead": "NULL"}

#: The state changes a job may make: to state <- from states.
_MOVES = {
    "processing": ("pending", "failed"),          # claimed
    "completed": ("processing",),                 # exit 0
    "failed": ("processing",),                    # a retry is scheduled
    "dead": ("processing", "pending", "failed"),  # no retries left, or buried
    "pending": ("processing", "dead", "completed"),  # handed back, retried
}

# Claim order: highest priority, then earliest run_at, then enqueue order.
# The claim reads one priority at a time (%s is "=", see _SQLStore._due):
# with the priority fixed, `run_at <= ?` bounds a range of the claim index,
# so jobs that are not due yet are never read.  Without it, when fewer than
# LIMIT jobs were due, the claim and the idle check read every delayed job:
# 55 ms each beside a million of them.
_CLAIM_SQL = ("SELECT seq, id, command, timeout, cwd, env, attempts, runs,"
              " run_at FROM jobs WHERE ready = 1 AND priority %s ?"
              " AND run_at <= ? ORDER BY priority DESC, run_at, seq LIMIT ?")
_CLAIM_AT_SQL = _CLAIM_SQL % "="      # the jobs due at one priority
_CLAIM_BELOW_SQL = _CLAIM_SQL % "<="  # the rest, in one scan (see _due)
# The next priority below a bound that has claimable jobs: one index seek.
_NEXT_PRIORITY_SQL = ("SELECT priority FROM jobs WHERE ready = 1 AND"
                      " priority <= ? ORDER BY priority DESC LIMIT 1")
#: Priorities _due visits one by one before it reads the rest in one scan
#: (a queue with thousands of distinct priorities costs at most this many
#: seeks more than a plain scan).
_PRIORITY_STEPS = 16
_TOP_PRIORITY = 2 ** 63 - 1  # priorities are 64-bit integers

# The queues a claim must look at: paused or capped (SPEC 10).
_LIMITED_QUEUES_SQL = ("SELECT name, concurrency, paused FROM queues"
                       " WHERE concurrency IS NOT NULL OR paused = 1")


#: A claim by a worker of every queue while no queue is paused or capped.
_NO_LIMITED_QUEUES = (" AND NOT EXISTS (SELECT 1 FROM queues WHERE paused = 1"
                      " OR concurrency IS NOT NULL)")
# An idle worker's check skips paused and full queues too.
_OPEN_QUEUES = (" AND queue NOT IN (SELECT name FROM queues WHERE paused = 1"
                " OR concurrency <= (SELECT COUNT(*) FROM jobs p WHERE"
                " p.state = 'processing' AND p.queue = queues.name))")


def _filtered(sql, where):
    """A claim-walk statement with a condition on queues (no parameters of
    its own: _quoted) before its ORDER BY."""
    return sql.replace(" ORDER BY", where + " ORDER BY", 1) if where else sql

#: _queue_plan's answer when no queue is paused or capped.
_NO_FILTER = ("", False)


def _claim_filter(served, blocked, one):
    """(condition on jobs.queue, one) for _queue_plan; None when the
    worker serves only blocked queues."""
    if served is not None:
        open_ = [name for name in served if name not in blocked]
        if not open_:
            return None
        return " AND queue IN (%s)" % _quoted(open_), one
    if blocked:
        return " AND queue NOT IN (%s)" % _quoted(blocked), one
    return "", one


def _quoted(names):
    """Queue names as SQL string literals, not parameters: a worker may
    serve, or meet, more paused and capped queues than SQLite 3.7.17's 999
    parameters a statement (and names come checked, but from a database
    too: quotes are doubled all the same)."""
    return ", ".join("'%s'" % name.replace("'", "''") for name in names)


_JOB_COLUMNS = ("seq, id, command, state, priority, run_at, max_retries,"
                " timeout, cwd, env, attempts, runs, last_error, worker_id,"
                " attempt_id, created_at, updated_at, waiting, queue,"
                " unique_key")
_ATTEMPT_COLUMNS = ("n, worker_id, host, pgid, started_at, ended_at, duration,"
                    " exit_code, signal, error, output_dropped")

# The stop request counter and the pause flag, read with every claim.
_CONTROL_SQL = (
    "SELECT COALESCE(MAX(CASE key WHEN '_stop_seq' THEN CAST(value AS INTEGER)"
    " END), 0), COALESCE(MAX(CASE key WHEN '_paused' THEN CAST(value AS"
    " INTEGER) END), 0) FROM config WHERE key IN ('_stop_seq', '_paused')")

# No unfinished job waits on this one (retention keeps those).
_UNAWAITED = ("NOT EXISTS (SELECT 1 FROM deps d JOIN jobs w ON w.seq ="
              " d.job_seq WHERE d.dep_seq = jobs.seq AND w.state NOT IN"
              " ('completed', 'dead'))")

# A worker's update of its own job: only while its claim still holds.
_CLAIM_HELD = " AND attempt_id = ?"

#: Ids per statement in `IN (...)` lists (SQLite allows 999 parameters).
_CHUNK = 500


def _to_number(text):
    """A config value as stored (text) -> int or float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


#: What copy --to carries over (the stop request counter stays behind).
_COPIED_TABLES = (
    ("queues", "name, concurrency, paused"),  # before jobs, which add theirs
    ("jobs", "seq, id, command, state, ready, priority, run_at, max_retries,"
     " timeout, cwd, env, attempts, runs, waiting, last_error, worker_id,"
     " attempt_id, created_at, updated_at, queue, unique_key"),
    ("unique_keys", "key, job_seq"),
    ("attempts", "id, job_seq, n, worker_id, host, pgid, proc_start,"
     " started_at, ended_at, duration, exit_code, signal, error, output,"
     " output_dropped, due_at"),
    ("deps", "job_seq, dep_seq"),
    # Asked of a worker that died first: recovery buries the job instead
    # of retrying it, on the copy as on the original.
    ("cancels", "attempt_id, job_seq, requested_at"),
    ("config", "key, value"),
    ("schedules", "name, cron, every, job, overlap, next_run, last_job,"
     " last_run, created_at"),
)


def _column_names(cols):
    """["a", "b"] of a _COPIED_TABLES column list "a, b"."""
    return [name.strip() for name in cols.split(",")]


def _random_beat():
    return int.from_bytes(os.urandom(6), "big")


def _fresh_jobs(jobs, afters, held):
    """[(job, after)] to insert: not those whose unique key is held, nor a
    second job of the batch with the key of an earlier one."""
    seen = set(held)
    fresh = []
    for job, after in zip(jobs, afters):
        if job.unique_key is None or job.unique_key not in seen:
            seen.add(job.unique_key)
            fresh.append((job, after))
    return fresh


def _chunks(items):
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _marks(items):
    return ",".join("?" * len(items))


class _SQLStore(object):
    """Every queue operation as SQL, for any database with a DB-API driver.

    Subclasses give: `_connect()`, `_begin_write()` (a context manager),
    `_driver_errors`, `_translate(exc)`, and the statements that differ.
    """

    #: While the database fails, a worker retries after this many seconds,
    #: doubling up to retry_max.
    retry_first, retry_max = STORE_RETRY_FIRST, STORE_RETRY_MAX
    #: Do workers on other hosts share this database?
    shared_by_hosts = False
    _TOTALS_SQL = "SELECT name, value FROM totals"
    _BUCKETS_SQL = "SELECT le, n FROM duration_buckets ORDER BY le"
    _in_write = False  # inside write(): a nested write() joins it

    def __init__(self, address, clock=time.time):
        self.address = address
        self.display = address  # what output may show (no password)
        self.clock = clock
        self.conn = None

    def now(self):
        """Unix time by the clock that judges due times and leases."""
        return self.clock()

    def wake(self):
        """Wake idle workers (after a resume)."""
        with self.write():
            self._wake_workers()

    def _wake_workers(self):
        pass  # SQLite workers poll; PostgreSQL sends NOTIFY

    def opened_by(self, pid):
        """Does process pid (of this host) have this database open?  None
        where that cannot be told (see _SQLiteStore.opened_by)."""
        return None

    def listen(self):
        pass

    def wait_for_work(self, timeout, stopping, wake_fd):
        """Sleep up to `timeout` s, or until the pool stops."""
        stopping.wait(timeout)

    def close(self):
        if self.conn is not None:
            with contextlib.suppress(*self._driver_errors):
                self.conn.close()
            self.conn = None

    # -- transactions and errors --------------------------------------------

    @contextlib.contextmanager
    def write(self, durable=False, deps=None):
        """One write transaction; driver errors leave as StoreError.

        durable=True: the commit survives power loss (enqueue); otherwise
        SQLite trades that for speed (worker state changes: see
        _SQLiteStore._set_durable); PostgreSQL commits durably always.
        deps: how the write meets the dependency graph, for PostgreSQL,
        whose writes run side by side (see _PostgresStore._begin_write;
        SQLite's never do): "alone" reads it to change it (an enqueue with
        --after, a retry, a delete), "shared" may complete, bury or delete
        jobs that others wait on, None does neither (beats, claims alone).
        """
        if self._in_write:  # inside another write: part of that one
            yield self
            return
        with self._translated():
            self._in_write = True
            try:
                with self._begin_write(durable, deps):
                    yield self
            finally:
                self._in_write = False

    @contextlib.contextmanager
    def read(self):
        """A consistent snapshot over several reads, released at once after."""
        with self._translated():
            self.conn.execute("BEGIN")
            try:
                yield self
            finally:
                if self.conn.in_transaction:
                    self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def _translated(self):
        try:
            yield
        except self._driver_errors as exc:
            raise self._translate(exc)

    def _all(self, sql, params=()):
        with self._translated():
            return self.conn.execute(sql, params).fetchall()

    def _one(self, sql, params=()):
        with self._translated():
            return self.conn.execute(sql, params).fetchone()

    def _run(self, sql, params=()):
        return self.conn.execute(sql, params)

    def _run_many(self, sql, rows):
        return self.conn.executemany(sql, rows)

    # -- state changes ------------------------------------------------------

    def _move(self, to_state, rows, sets="", held=False):
        """Move jobs to a state; returns how many moved.

        Every state change goes through here: it sets `ready` (_READY) and
        `updated_at`, moves only from the states _MOVES lists, and with
        held=True only while the worker's claim still holds.  A row of
        parameters is (updated_at, the `sets` values..., seq[, attempt id]).
        """
        if not rows:
            return 0
        return self._run_many(_move_sql(to_state, sets, held), rows).rowcount

    # -- config and control -------------------------------------------------

    def config(self):
        """Every config value (defaults filled in), plus internal '_' keys."""
        values = dict(CONFIG_DEFAULTS)
        for key, value in self._all("SELECT key, value FROM config"):
            values[key] = _to_number(value)
        return values

    def set_config(self, key, value):
        with self.write():
            self._upsert_config(key, value)

    def bump(self, key):
        """Add one to an internal counter (the stop request)."""
        with self.write():
            value = self.config().get(key, 0) + 1
            self._upsert_config(key, str(value))

    def control(self):
        """(stop request counter, paused) in one read."""
        return tuple(self._one(_CONTROL_SQL))

    # -- adding jobs --------------------------------------------------------

    def insert_jobs(self, jobs, afters, now, duplicates=None):
        """New jobs (with their dependencies) in one transaction; their ids.

        Generated ids have 48 random bits: a clash with an existing id is
        rare, but must not fail an enqueue: draw again and retry.  A job
        whose unique key another job holds is not inserted: its id is that
        job's, and `duplicates` (a list, if given) gets True in its place.
        On PostgreSQL a concurrent enqueue of the same key makes the key's
        insert wait, then fail: the retry reads the key's new holder.
        """
        keyed = any(j.unique_key is not None for j in jobs)
        new, new_afters = jobs, afters  # without keys: every job is new
        with self.write(durable=True,
                        deps="alone" if any(afters) else None):
            for tries_left in range(5, 0, -1):
                self._run("SAVEPOINT insert_jobs")
                try:
                    if keyed:
                        held = self._held_keys(jobs)
                        fresh = _fresh_jobs(jobs, afters, held)
                        new = [job for job, _ in fresh]
                        new_afters = [after for _, after in fresh]
                    self._refuse_given_ids([j.id for j in new
                                            if j.id is not None])
                    ids = _fill_ids([j.id for j in new])
                    if new:
                        self._insert_rows(ids, new, new_afters, now)
                    if keyed:
                        ids = self._take_keys(jobs, new, ids, held,
                                              duplicates)
                    elif duplicates is not None:
                        duplicates.extend([False] * len(jobs))
                except self._integrity_error:
                    self._run("ROLLBACK TO insert_jobs")
                    if tries_left == 1:
                        raise
                    continue
                self._run("RELEASE insert_jobs")
                if new:
                    self._wake_workers()
                return ids

    def _held_keys(self, jobs):
        """{unique key: id of the job holding it} for the keys of jobs."""
        keys = sorted(set(j.unique_key for j in jobs
                          if j.unique_key is not None))
        held = {}
        for chunk in _chunks(keys):
            held.update(self._run(
                "SELECT u.key, j.id FROM unique_keys u JOIN jobs j ON j.seq"
                " = u.job_seq WHERE u.key IN (%s)" % _marks(chunk), chunk))
        return held

    def _take_keys(self, jobs, new, ids, held, duplicates):
        """Record the keys the new jobs hold now (the first job of a batch
        with a key holds it; later ones are its duplicates).  Returns the
        id of each of jobs, in order."""
        new_ids = dict(zip([id(j) for j in new], ids))
        taken = []
        answer = []
        for job in jobs:
            key = job.unique_key
            if id(job) in new_ids and (key is None or key not in held):
                if key is not None:
                    held[key] = new_ids[id(job)]
                    taken.append((key, held[key]))
                answer.append((new_ids[id(job)], False))
            else:
                answer.append((held[key], True))
        if taken:
            self._run_many("INSERT INTO unique_keys (key, job_seq) SELECT ?,"
                           " seq FROM jobs WHERE id = ?", taken)
        if duplicates is not None:
            duplicates.extend(dup for _, dup in answer)
        return [job_id for job_id, _ in answer]

    def _insert_rows(self, ids, jobs, afters, now):
        params = [(job_id,) + tuple(job[1:]) + (now, now)
                  for job_id, job in zip(ids, jobs)]
        if not any(afters):
            self._run_many(
                "INSERT INTO jobs (id, command, priority, run_at, max_retries,"
                " timeout, cwd, env, queue, unique_key, created_at,"
                " updated_at, state, ready)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'pending',1)", params)
            return
        seqs = {}
        for job_id, param, after in zip(ids, params, afters):
            seqs[job_id] = self._insert_with_deps(param, after, seqs)

    def _refuse_given_ids(self, given):
        if len(set(given)) != len(given):
            seen = set()
            dup = next(i for i in given if i in seen or seen.add(i))
            raise Conflict("duplicate id '%s' in input" % dup)
        for chunk in _chunks(given):
            found = self._run("SELECT id FROM jobs WHERE id IN (%s)"
                              % _marks(chunk), chunk).fetchone()
            if found:
                raise Conflict("a job with id '%s' already exists" % found[0])

    def _insert_with_deps(self, param, after, seqs):
        dep_seqs = []
        for dep in after:
            if dep in seqs:
                dep_seqs.append((seqs[dep], "pending"))
                continue
            row = self._run("SELECT seq, state FROM jobs WHERE id = ?",
                            (dep,)).fetchone()
            if row is None:
                raise NotFound("after: no job with id '%s'" % dep)
            if row[1] == "dead":
                raise Conflict("after: job '%s' is dead; retry it first" % dep)
            dep_seqs.append(tuple(row))
        waiting = sum(1 for _, state in set(dep_seqs) if state != "completed")
        seq = self._insert_returning_seq(
            "INSERT INTO jobs (id, command, priority, run_at, max_retries,"
            " timeout, cwd, env, queue, unique_key, created_at, updated_at,"
            " state, ready, waiting) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,"
            "'pending',?,?)",
            param + (None if waiting else 1, waiting))
        self._insert_deps([(seq, dep_seq) for dep_seq, _ in set(dep_seqs)])
        return seq

    # -- reading jobs -------------------------------------------------------

    def resolve(self, prefix):
        """An id or unambiguous id prefix -> (seq, id)."""
        if not isinstance(prefix, str) or not re.match(_ID_RE, prefix):
            raise InvalidInput("not a valid job id: %s" % _short_repr(prefix))
        row = self._one("SELECT seq, id FROM jobs WHERE id = ?", (prefix,))
        if row:
            return tuple(row)
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = self._all("SELECT seq, id FROM jobs WHERE id > ? AND id < ?"
                         " ORDER BY id LIMIT 6", (prefix, upper))
        if not rows:
            raise NotFound("no job with id '%s'" % prefix)
        if len(rows) > 1:
            names = ", ".join(r[1] for r in rows[:5])
            raise InvalidInput("id prefix '%s' is ambiguous: %s%s" % (
                prefix, names, ", ..." if len(rows) > 5 else ""))
        return tuple(rows[0])

    def job(self, prefix, runs=False):
        """(job row, dependency ids, attempt rows or None) in one snapshot."""
        with self.read():
            seq = self.resolve(prefix)[0]
            row = self._one("SELECT %s FROM jobs WHERE seq = ?" % _JOB_COLUMNS,
                            (seq,))
            deps = [r[0] for r in self._all(
                "SELECT j.id FROM deps d JOIN jobs j ON j.seq = d.dep_seq"
                " WHERE d.job_seq = ? ORDER BY j.seq", (seq,))]
            attempts = self._all("SELECT %s FROM attempts WHERE job_seq = ?"
                                 " ORDER BY n" % _ATTEMPT_COLUMNS,
                                 (seq,)) if runs else None
        return row, deps, attempts

    def output(self, prefix, attempt=None):
        """(output, dropped bytes, attempt number) or None."""
        with self.read():
            seq = self.resolve(prefix)[0]
            if attempt is None:
                return self._one(
                    "SELECT output, output_dropped, n FROM attempts"
                    " WHERE job_seq = ? ORDER BY n DESC LIMIT 1", (seq,))
            return self._one("SELECT output, output_dropped, n FROM attempts"
                             " WHERE job_seq = ? AND n = ?", (seq, attempt))

    def jobs(self, state, limit, offset, queue=None):
        """Job rows in enqueue order, optionally of one state, paged."""
        if queue is not None:
            where = " AND state = ?" if state is not None else ""
            return self._all(
                "SELECT %s FROM jobs WHERE queue = ?%s ORDER BY seq LIMIT ?"
                " OFFSET ?" % (_JOB_COLUMNS, where), (queue,) + (
                    (state,) if state is not None else ()) + (limit, offset))
        if state is None:
            return self._all("SELECT %s FROM jobs ORDER BY seq LIMIT ? OFFSET ?"
                             % _JOB_COLUMNS, (limit, offset))
        return self._all("SELECT %s FROM jobs WHERE state = ? ORDER BY seq"
                         " LIMIT ? OFFSET ?" % _JOB_COLUMNS,
                         (state, limit, offset))

    def states(self, seqs):
        """{seq: state} of the jobs that still exist."""
        found = {}
        for chunk in _chunks(list(seqs)):
            found.update(self._all("SELECT seq, state FROM jobs WHERE seq IN"
                                   " (%s)" % _marks(chunk), chunk))
        return found

    def worker_rows(self):
        """Registered workers with the job each runs, oldest first."""
        return self._all(
            "SELECT w.id, w.pid, w.host, w.started_at, w.heartbeat, j.id"
            " FROM workers w LEFT JOIN jobs j ON j.worker_id = w.id"
            " AND j.state = 'processing' ORDER BY w.started_at, w.id")

    # -- named queues -------------------------------------------------------

    def queue_rows(self):
        """([(name, concurrency, paused)], {queue: {state: jobs}}, totals)
        of the named queues; 'default' is counted by the caller (the totals
        minus the rest).  Call inside read() for one snapshot."""
        rows = self._all("SELECT name, concurrency, paused FROM queues"
                         " ORDER BY name")
        counts = {}
        for name, state, n in self._all(
                "SELECT queue, state, CAST(SUM(n) AS BIGINT) FROM"
                " queue_counts GROUP BY queue, state"):
            counts.setdefault(name, dict.fromkeys(STATES, 0))[state] = n
        return rows, counts, self.counts()

    def set_queue(self, name, **values):
        """Create queue `name` if need be, and set its columns
        (concurrency, paused)."""
        with self.write():
            self._insert_queue(name)
            for column, value in sorted(values.items()):
                self._run("UPDATE queues SET %s = ? WHERE name = ?" % column,
                          (value, name))
            self._wake_workers()

    # -- figures ------------------------------------------------------------

    def stats(self, now, since):
        """Every `stats` figure from indexed range queries, one snapshot."""
        with self.read():
            return self._stats(now, since)

    def _stats(self, now, since):
        def one(sql, *args):
            return self._one(sql, args)[0]
        cutoff = now - since
        ended = "SELECT COUNT(*) FROM attempts WHERE ended_at >= ?"
        runs = one(ended, cutoff)
        ok = one(ended + " AND error IS NULL", cutoff)
        oldest = self._oldest_due(now)
        failing = self._all(
            "SELECT j.command, COUNT(*) AS n FROM attempts a JOIN jobs j"
            " ON j.seq = a.job_seq WHERE a.ended_at >= ? AND a.error IS NOT"
            " NULL GROUP BY j.command ORDER BY n DESC, j.command LIMIT 5",
            (cutoff,))
        return {
            "since_seconds": since,
            "counts": self.counts(),
            "finished_per_minute": dict(
                ("%dm" % m, one(ended, now - 60 * m) / float(m))
                for m in (1, 5, 15)),
            "runs": runs,
            "success_ratio": ok / float(runs) if runs else None,
            "run_seconds": self._percentiles("duration",
                                             "duration IS NOT NULL", cutoff),
            "wait_seconds": self._percentiles("started_at - due_at",
                                              "due_at IS NOT NULL", cutoff),
            "oldest_due_seconds": now - oldest if oldest is not None else None,
            "failing_commands": [{"command": c, "failures": n}
                                 for c, n in failing],
            "per_minute": self._per_minute(now, 60),
        }

    def _oldest_due(self, now):
        """The earliest run_at of a claimable job, one priority at a time
        as _due reads them (delayed jobs are never read)."""
        times, below = [], _TOP_PRIORITY
        for _ in range(_PRIORITY_STEPS):
            found = self._one(_NEXT_PRIORITY_SQL, (below,))
            if found is None:
                return min(times) if times else None
            times.extend(r[0] for r in self._all(
                "SELECT run_at FROM jobs WHERE ready = 1 AND priority = ?"
                " AND run_at <= ? ORDER BY run_at LIMIT 1", (found[0], now)))
            below = found[0] - 1
        times.extend(r[0] for r in self._all(
            "SELECT MIN(run_at) FROM jobs WHERE ready = 1 AND priority <= ?"
            " AND run_at <= ?", (below, now)) if r[0] is not None)
        return min(times) if times else None

    def _percentiles(self, expression, condition, cutoff):
        """p50, p95 and max of an expression over attempts ended since cutoff."""
        where = " FROM attempts WHERE ended_at >= ? AND " + condition
        count = self._one("SELECT COUNT(*)" + where, (cutoff,))[0]
        figures = {"p50": None, "p95": None, "max": None}
        if count:
            for name, fraction in (("p50", 0.5), ("p95", 0.95), ("max", 1.0)):
                figures[name] = self._one(
                    "SELECT %s AS v%s ORDER BY v LIMIT 1 OFFSET ?" % (
                        expression, where),
                    (cutoff, min(count - 1, int(fraction * count))))[0]
        return figures

    def _per_minute(self, now, minutes):
        """[{minute start, ok, failed}] for the last `minutes`, oldest first."""
        start = (int(now) // 60 - minutes + 1) * 60
        series = [{"t": iso(start + 60 * i), "ok": 0, "failed": 0}
                  for i in range(minutes)]
        for slot, ok, failed in self._all(self._PER_MINUTE_SQL,
                                          (start, start)):
            if 0 <= slot < minutes:
                series[slot]["ok"], series[slot]["failed"] = ok, failed
        return series

    def metric_samples(self):
        """What /metrics shows, read in one snapshot."""
        with self.read():
            totals = dict(self._all(self._TOTALS_SQL))
            queues = self.queue_rows()
            return {"counts": self.counts(), "totals": totals,
                    "queue_counts": queues[1],
                    "workers": self.worker_rows(), "config": self.config(),
                    "paused": self.control()[1],
                    "buckets": self._all(self._BUCKETS_SQL)}

    # -- changing jobs ------------------------------------------------------

    def _resolve_each(self, prefixes):
        """[(seq, id)] of the jobs named, each once however often named
        (`retry a a`, or an id and its prefix)."""
        rows = collections.OrderedDict()
        for prefix in _id_list(prefixes):
            seq, job_id = self.resolve(prefix)
            rows[seq] = job_id
        return list(rows.items())

    def retry_dead(self, prefixes, now):
        """Named dead jobs back to pending, attempts reset; their ids."""
        with self.write(deps="alone"):
            rows = self._resolve_each(prefixes)
            states = self.states([seq for seq, _ in rows])
            for seq, job_id in rows:
                if states[seq] != "dead":
                    raise Conflict("job '%s' is %s, not dead"
                                   % (job_id, states[seq]))
            return self._requeue([seq for seq, _ in rows], now)

    def retry_all_dead(self, now):
        with self.write(deps="alone"):
            seqs = [r[0] for r in self._run(
                "SELECT seq FROM jobs WHERE state = 'dead' ORDER BY seq")]
            return self._requeue(seqs, now)

    def _requeue(self, seqs, now, completed=()):
        """Finished jobs back to pending, waiting again for unfinished deps;
        and the pending jobs that wait for one of them that had `completed`
        wait for it again (those already started go on)."""
        self._run_many(
            "UPDATE jobs SET waiting = (SELECT COUNT(*) FROM deps d JOIN jobs j"
            " ON j.seq = d.dep_seq WHERE d.job_seq = ? AND j.state <>"
            " 'completed') WHERE seq = ?", [(seq, seq) for seq in seqs])
        self._retake_keys(seqs)
        self._move("pending", [(now, now, seq) for seq in seqs],
                   "attempts = 0, run_at = ?")
        if completed:
            self._run_many(
                "UPDATE jobs SET waiting = waiting + 1, ready = NULL WHERE seq"
                " IN (SELECT job_seq FROM deps WHERE dep_seq = ?) AND state ="
                " 'pending'", [(seq,) for seq in completed])
        for seq in seqs:
            dead = self._run(
                "SELECT j.id FROM deps d CROSS JOIN jobs j WHERE j.seq ="
                " d.dep_seq AND d.job_seq = ? AND j.state = 'dead' LIMIT 1",
                (seq,)).fetchone()
            if dead:
                raise Conflict("job '%s' waits on dead job '%s'; retry that"
                               " one too" % (self._id(seq), dead[0]))
        self._wake_workers()
        return [self._id(seq) for seq in seqs]

    def retry_finished(self, prefixes, now):
        """Completed or dead jobs run again (attempts reset, due now,
        attempt history kept), all or none; their ids."""
        with self.write(deps="alone"):
            rows = self._resolve_each(prefixes)
            states = self.states([seq for seq, _ in rows])
            for seq, job_id in rows:
                if states[seq] not in ("completed", "dead"):
                    raise Conflict("job '%s' is %s; only completed or dead"
                                   " jobs can be retried" % (job_id,
                                                             states[seq]))
            return self._requeue([seq for seq, _ in rows], now, [
                seq for seq, _ in rows if states[seq] == "completed"])

    def cancel(self, prefixes, now):
        """Cancel jobs, all or none: pending or failed ones are dead at once
        ('cancelled'); for processing ones a request is left that their
        worker reads with its next heartbeat.  Returns (dead ids, requested
        ids)."""
        with self.write(deps="shared"):
            rows = self._resolve_each(prefixes)
            states = self.states([seq for seq, _ in rows])
            for seq, job_id in rows:
                if states[seq] in ("completed", "dead"):
                    raise Conflict("job '%s' is %s; only pending, failed or"
                                   " processing jobs can be cancelled"
                                   % (job_id, states[seq]))
            now_dead, requested = [], []
            for seq, job_id in rows:
                if states[seq] == "processing":
                    self._request_cancel(seq, now)
                    requested.append(job_id)
                elif self._move("dead", [(now, seq)],
                                "last_error = 'cancelled'"):
                    self._bury_dependents(seq, now)
                    now_dead.append(job_id)
            return now_dead, requested

    def _request_cancel(self, seq, now):
        self._run("DELETE FROM cancels WHERE attempt_id NOT IN (SELECT"
                  " attempt_id FROM jobs WHERE state = 'processing' AND"
                  " attempt_id IS NOT NULL)")
        self._run("DELETE FROM cancels WHERE job_seq = ?", (seq,))
        self._run("INSERT INTO cancels (attempt_id, job_seq, requested_at)"
                  " SELECT attempt_id, seq, ? FROM jobs WHERE seq = ?",
                  (now, seq))

    def cancel_requests(self):
        """The claims (attempt ids) whose jobs were asked to stop."""
        return set(r[0] for r in self._all("SELECT attempt_id FROM cancels"))

    def save_tail(self, claim, output, dropped):
        """A running job's output so far (logs --follow), while its claim
        holds and the attempt is open."""
        with self.write():
            self._run("UPDATE attempts SET output = ?, output_dropped = ?"
                      " WHERE id = ? AND ended_at IS NULL",
                      (output, dropped, claim.attempt_id))

    def follow(self, seq):
        """(job state or None if deleted, last attempt row) in one snapshot:
        attempt (n, worker_id, host, ended_at, output, output_dropped)."""
        with self.read():
            row = self._one("SELECT state FROM jobs WHERE seq = ?", (seq,))
            attempt = self._one(
                "SELECT n, worker_id, host, ended_at, output, output_dropped"
                " FROM attempts WHERE job_seq = ? ORDER BY n DESC LIMIT 1",
                (seq,))
        return (row[0] if row else None), attempt

    def clean_up(self, state, cutoff, limit=CLEANUP_BATCH):
        """Delete up to `limit` jobs of a finished state last updated at or
        before cutoff that no unfinished job waits on.  They are looked for
        with a plain read (the scan holds no lock) and deleted, checked
        again, in one short transaction.  Returns (found, deleted)."""
        found = [r[0] for r in self._all(
            "SELECT seq FROM jobs WHERE state = ? AND updated_at <= ? AND "
            + _UNAWAITED + " ORDER BY seq LIMIT ?", (state, cutoff, limit))]
        if not found:
            return 0, 0
        with self.write(deps="shared"):
            seqs = [r[0] for r in self._run(
                "SELECT seq FROM jobs WHERE seq IN (%s) AND state = ? AND"
                " updated_at <= ? AND %s" % (_marks(found), _UNAWAITED),
                found + [state, cutoff])]
            self._delete_seqs(seqs)
        return len(found), len(seqs)

    def mark_clean_up(self, now, removed, took):
        """When the last clean-up ran, what it removed, how long it took."""
        with self.write():
            self._upsert_config("_cleanup_at", repr(float(now)))
            self._upsert_config("_cleanup_removed", str(int(removed)))
            self._upsert_config("_cleanup_took", repr(round(took, 3)))

    def _retake_keys(self, seqs):
        """A finished job run again holds its unique key again.  While
        another job holds it, the run is refused: two jobs with one key
        must never wait at once."""
        taken = {}
        for chunk in _chunks(list(seqs)):
            rows = self._run(
                "SELECT j.seq, j.id, j.unique_key, u.job_seq FROM jobs j LEFT"
                " JOIN unique_keys u ON u.key = j.unique_key WHERE j.seq IN"
                " (%s) AND j.unique_key IS NOT NULL" % _marks(chunk),
                chunk).fetchall()
            for seq, job_id, key, holder in rows:
                holder = taken.get(key, holder)
                if holder is not None and holder != seq:
                    raise Conflict(
                        "job '%s' has unique key %s, which job '%s' holds;"
                        " run again when that one has finished" % (
                            job_id, _short_repr(key), self._id(holder)))
                if holder is None:
                    self._run("INSERT INTO unique_keys (key, job_seq)"
                              " VALUES (?, ?)", (key, seq))
                    taken[key] = seq

    def delete(self, prefixes):
        """Delete jobs (and their attempts) that are not processing."""
        with self.write(deps="alone"):
            rows = self._resolve_each(prefixes)
            doomed = set(job_id for _, job_id in rows)
            states = self.states([seq for seq, _ in rows])
            for seq, job_id in rows:
                if states[seq] == "processing":
                    raise Conflict("job '%s' is processing; stop its worker"
                                   " first" % job_id)
                waiter = self._run(
                    "SELECT j.id FROM deps d JOIN jobs j ON j.seq = d.job_seq"
                    " WHERE d.dep_seq = ? AND j.state NOT IN"
                    " ('completed', 'dead') LIMIT 1", (seq,)).fetchone()
                if waiter and waiter[0] not in doomed:
                    raise Conflict("job '%s' is waited on by '%s'"
                                   % (job_id, waiter[0]))
            self._delete_seqs([seq for seq, _ in rows])
            return [job_id for _, job_id in rows]

    def purge(self, state, cutoff):
        """Delete jobs of a state last updated at or before cutoff, but
        not those an unfinished job waits on (as retention keeps them, and
        `delete` refuses them); count."""
        with self.write(deps="shared"):
            seqs = [r[0] for r in self._run(
                "SELECT seq FROM jobs WHERE state = ? AND updated_at <= ? AND "
                + _UNAWAITED, (state, cutoff))]
            self._delete_seqs(seqs)
        return len(seqs)

    def _delete_seqs(self, seqs):
        for chunk in _chunks(seqs):
            for sql in ("DELETE FROM attempts WHERE job_seq IN (%s)",
                        "DELETE FROM deps WHERE job_seq IN (%s)",
                        "DELETE FROM deps WHERE dep_seq IN (%s)",
                        "DELETE FROM jobs WHERE seq IN (%s)"):
                self._run(sql % _marks(chunk), chunk)

    def _id(self, seq):
        return self._run("SELECT id FROM jobs WHERE seq = ?",
                         (seq,)).fetchone()[0]

    # -- moving a queue between stores (copy --to) --------------------------

    def run_span(self):
        """(first start, last end) of every attempt (bench)."""
        return tuple(self._one("SELECT MIN(started_at), MAX(ended_at)"
                               " FROM attempts"))

    def is_empty(self):
        """No row of any table copy --to fills, nor a setting: a fit
        target (a queue paused or capped there would clash, or stay)."""
        return not any(self._one("SELECT 1 FROM %s LIMIT 1" % table)
                       for table, _ in _COPIED_TABLES)

    def export(self):
        """What copy --to writes, inside a read() the caller holds:
        (tables, totals, buckets).  tables yields (table, columns, rows)
        and rows yields each row, read from the snapshot as the target
        writes it: a few rows are held at a time (_stream), so a queue
        larger than memory copies too."""
        totals = dict(self._all(self._TOTALS_SQL))
        buckets = self._all(self._BUCKETS_SQL)
        tables = ((table, cols, self._stream(table, cols))
                  for table, cols in _COPIED_TABLES)
        return tables, totals, buckets

    def _stream(self, table, cols):
        """The table's rows (those columns, by the first), read as they
        are asked for."""
        with self._translated():  # SQLite steps a row at a time
            for row in self._run("SELECT %s FROM %s ORDER BY 1"
                                 % (cols, table)):
                yield row

    def import_all(self, tables, totals, buckets):
        """Write what export() reads, in one transaction, keeping every
        sequence number and id (attempts and dependencies refer to them).
        Returns {table: rows written}."""
        written = {}
        with self.write(durable=True):
            for table, cols, rows in tables:
                marks = ", ".join("?" * len(_column_names(cols)))
                written[table] = self._run_many(
                    "INSERT INTO %s (%s) VALUES (%s)" % (table, cols, marks),
                    rows).rowcount
            self._set_totals(totals, buckets)
            self._after_import()
        return written

    # -- workers: call these inside write() ---------------------------------

    def register(self, worker_ids, pid, host, now):
        # A random first beat: a worker registered again (after others took
        # it for dead) must not resume a count an observer already saw.
        self._run_many(self._REGISTER_SQL,
                       [(w, pid, host, now, now, _random_beat())
                        for w in worker_ids])

    def unregister(self, worker_ids):
        self._run_many("DELETE FROM workers WHERE id = ?",
                       [(w,) for w in worker_ids])

    def beat(self, pid, host, now):
        """Renew this process's lease; how many of its workers still hold
        one (0: others took it for dead and recovered its jobs)."""
        return self._run("UPDATE workers SET beat = beat + 1, heartbeat = ?"
                         " WHERE pid = ? AND host = ?",
                         (now, pid, host)).rowcount

    def anything_due(self, now, queues=None):
        """A plain read (no write lock): is any job claimable now (of the
        named queues, if given; not of a paused or full queue, so idle
        workers do not take the write lock for jobs they may not claim)?"""
        served = " AND queue IN (%s)" % _quoted(queues) if queues else ""
        with self._translated():
            return bool(self._due(now, 1, served + _OPEN_QUEUES))

    def _due(self, now, limit, where=""):
        """Up to `limit` claimable rows (_CLAIM_SQL's columns), in claim
        order, read one priority at a time so that jobs not due yet cost
        nothing: an index seek finds the next priority in use, a range of
        the claim index gives its due jobs.  `where` is a condition on
        queues that every statement of the walk adds."""
        rows, below = [], _TOP_PRIORITY
        next_priority = _filtered(_NEXT_PRIORITY_SQL, where)
        claim_at = _filtered(_CLAIM_AT_SQL, where)
        for _ in range(_PRIORITY_STEPS):
            found = self._run(next_priority, (below,)).fetchone()
            if found is None:
                return rows
            rows.extend(self._run(claim_at, (found[0], now,
                                             limit - len(rows))))
            if len(rows) >= limit:
                return rows
            below = found[0] - 1
        rows.extend(self._run(_filtered(_CLAIM_BELOW_SQL, where),
                              (below, now, limit - len(rows))))
        return rows


    def claim(self, worker_id, host, now, batch=1, deep_at=1, queues=None):
        """Claim due jobs in claim order: `batch` of them when at least
        `deep_at` are due, else one.  Returns a list of _Claim.  `queues`:
        the names of the queues to claim from (None: all).

        Each claim counts an attempt at once (so a job that keeps killing
        its worker still reaches the DLQ), and is guarded: the update's row
        count must say it won, whatever the transaction promises.
        """
        # Named queues (SPEC 10): a worker of every queue first claims as
        # before, on condition that no queue is paused or capped (the
        # common case).  Otherwise _queue_plan says which queues are open,
        # and the same walk runs with a condition on `queue` (the claim
        # index still leads), one job at a time while a capped queue the
        # worker serves has room.
        rows = []
        if queues is None:
            rows = self._due(now, deep_at, _NO_LIMITED_QUEUES)
        if not rows:
            plan = self._queue_plan(queues)
            if plan is None or (queues is None and plan == _NO_FILTER):
                return []  # nothing due, or only in closed queues
            where, one = plan
            if one:
                batch = deep_at = 1
            rows = self._due(now, deep_at, where)
        claims = []
        for seq, job_id, command, timeout, cwd, env, attempts, runs, due in \
                rows[:batch] if len(rows) >= deep_at else rows[:1]:
            attempt_id = self._insert_returning_seq(
                "INSERT INTO attempts (job_seq, n, worker_id, host,"
                " started_at, due_at) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, runs + 1, worker_id, host, now, due))
            claims.append(_Claim(seq, job_id, command, timeout, cwd, env,
                                 attempts + 1, attempt_id, now))
        moved = self._move(
            "processing", [(now, worker_id, c.attempt_id, c.seq)
                           for c in claims],
            "attempts = attempts + 1, runs = runs + 1, worker_id = ?,"
            " attempt_id = ?")
        if moved != len(claims):  # never under one writer; checked anyway
            lost = [c for c in claims if not self.claim_holds(c)]
            for claim in lost:
                self._run("DELETE FROM attempts WHERE id = ?",
                          (claim.attempt_id,))
            claims = [c for c in claims if c not in lost]
        return claims

    # -- named queues: caps and pauses in the claim --------------------------

    def _queue_plan(self, served):
        """How a claim by a worker serving `served` (names, None: all)
        filters queues: (condition, its parameters, one job only), or None
        when no queue it serves may give a job now.

        Paused queues are skipped; so is a capped queue with as many jobs
        processing as its cap.  The count is exact across workers and
        hosts: it is read under the lock of the queue's row (_lock_queues;
        SQLite's one writer already holds it), and while a capped queue
        has room each claim takes one job, so no batch overshoots a cap.
        A queue neither paused nor capped costs one read of a small table.
        """
        rows = self._run(_LIMITED_QUEUES_SQL).fetchall()
        blocked, capped = [], []
        for name, cap, paused in rows:
            if served is not None and name not in served:
                continue
            if paused:
                blocked.append(name)
            elif cap is not None:
                capped.append((name, cap))
        one = False
        if capped:
            # A queue full by a count without the lock is skipped (at worst
            # a job ended meanwhile: the next claim takes it); one with room
            # is counted again under its lock, where the count is exact.
            running = self._processing_per_queue([n for n, _ in capped])
            room = [(n, cap) for n, cap in capped if running.get(n, 0) < cap]
            blocked.extend(n for n, cap in capped if running.get(n, 0) >= cap)
            if room and self._lock_queues(sorted(n for n, _ in room)):
                running = self._processing_per_queue([n for n, _ in room])
            for name, cap in room:
                if running.get(name, 0) >= cap:
                    blocked.append(name)
                else:
                    one = True
        return _claim_filter(served, blocked, one)

    def _lock_queues(self, names):
        """Lock these queues' rows for this transaction; False when the
        store needs no lock (SQLite: the claim's write transaction is the
        only writer, so the count read before is exact)."""
        return False

    def _processing_per_queue(self, names):
        """{queue: jobs processing} for those queues (the jobs_state index:
        as many rows as jobs running)."""
        return dict(self._run(
            "SELECT queue, COUNT(*) FROM jobs WHERE state = 'processing' AND"
            " queue IN (%s) GROUP BY queue" % _quoted(names)).fetchall())

    def claim_holds(self, claim):
        """Is this claim still the job's current one?"""
        return self._one("SELECT 1 FROM jobs WHERE seq = ? AND state ="
                         " 'processing'" + _CLAIM_HELD,
                         (claim.seq, claim.attempt_id)) is not None

    def record_group(self, claim, pgid, start):
        """Where a running job's processes are, for recovery to kill."""
        self._run("UPDATE attempts SET pgid = ?, proc_start = ? WHERE id = ?",
                  (pgid, start, claim.attempt_id))

    def _save_runs(self, rows):
        """Each finished run's attempt row, while still open: rows of
        (started, ended, duration, exit code, signal, error, output,
        output dropped, pgid, attempt id)."""
        self._run_many(
            "UPDATE attempts SET started_at = ?, ended_at = ?, duration = ?,"
            " exit_code = ?, signal = ?, error = ?, output = ?,"
            " output_dropped = ?, pgid = COALESCE(pgid, ?)"
            " WHERE id = ? AND ended_at IS NULL", rows)

    def record_results(self, runs, config):
        """Store finished runs [(claim, _Result)] and move their jobs on.

        Every update is guarded by the claim, so a worker that lost its job
        to recovery cannot overwrite what came after.  Successes share a few
        statements (the common case); failures go one by one.  Returns
        [(new state or None if the claim was lost, next run_at)] in order.
        """
        self._save_runs([(c.started, r.ended, r.ended - c.started,
                          r.exit_code, r.signal, r.error, r.output,
                          r.dropped, r.pgid, c.attempt_id) for c, r in runs])
        done = self._complete([(c, r.ended) for c, r in runs
                               if r.error is None])
        outcome = []
        for claim, result in runs:
            if result.error is None:
                outcome.append(("completed", None) if claim.seq in done
                               else (None, None))
            else:
                outcome.append(self._fail(claim, result.error, config,
                                          result.ended))
        return outcome

    def _complete(self, finished):
        """Mark [(claim, end time)] completed, release their dependents;
        returns the seqs whose claims held."""
        if not finished:
            return set()
        moved = self._move("completed", [(ended, c.seq, c.attempt_id)
                                         for c, ended in finished],
                           "last_error = NULL, worker_id = NULL", held=True)
        done = [c for c, _ in finished]
        if moved != len(finished):  # rare: some claims were lost
            done = [c for c in done if self._run(
                "SELECT 1 FROM jobs WHERE seq = ? AND state = 'completed'"
                + _CLAIM_HELD, (c.seq, c.attempt_id)).fetchone()]
        # Dependents wait for one job fewer; the last one makes them ready.
        # Most jobs have none: one indexed read says so, and spares an
        # UPDATE per job (on PostgreSQL each fired the count trigger: a
        # third of the server's time per job, by pg_stat_statements).
        seqs = tuple(c.seq for c in done)
        if not seqs or not self._hold_dependents(seqs):
            return set(seqs)
        self._run_many(
            "UPDATE jobs SET waiting = waiting - 1, ready = CASE WHEN waiting"
            " = 1 THEN 1 END WHERE seq IN (SELECT job_seq FROM deps WHERE"
            " dep_seq = ?) AND state = 'pending' AND waiting > 0",
            [(seq,) for seq in seqs])
        return set(seqs)

    def _hold_dependents(self, seqs):
        """Does any job wait for one of these?  One indexed read."""
        return self._run("SELECT 1 FROM deps WHERE dep_seq IN (%s) LIMIT 1"
                         % _marks(seqs), seqs).fetchone() is not None

    def _fail(self, claim, error, config, now):
        """A failed run: retry later, or bury.  Returns (new state, run_at)."""
        row = self._run("SELECT attempts, max_retries FROM jobs WHERE seq = ?"
                        " AND state = 'processing'" + _CLAIM_HELD,
                        (claim.seq, claim.attempt_id)).fetchone()
        if row is None:
            return None, None
        failures, max_retries = row
        if error != "cancelled" and self._cancel_asked(claim):
            error = "cancelled"  # asked to stop, then lost: no retry either
        if error == "cancelled":
            self._run("DELETE FROM cancels WHERE attempt_id = ?",
                      (claim.attempt_id,))
        elif failures <= max_retries:
            run_at = now + backoff_delay(failures, config["backoff-base"],
                                         config["backoff-max"])
            self._move("failed", [(now, run_at, error, claim.seq,
                                   claim.attempt_id)],
                       "run_at = ?, last_error = ?, worker_id = NULL",
                       held=True)
            return "failed", run_at
        self._move("dead", [(now, error, claim.seq, claim.attempt_id)],
                   "last_error = ?, worker_id = NULL", held=True)
        self._bury_dependents(claim.seq, now)
        return "dead", None

    def _cancel_asked(self, claim):
        return self._run("SELECT 1 FROM cancels WHERE attempt_id = ?",
                         (claim.attempt_id,)).fetchone() is not None

    def _bury_dependents(self, seq, now):
        """A dead job takes everything that waits on it, transitively."""
        frontier = [seq]
        while frontier:
            dep = frontier.pop()
            dep_id = self._id(dep)
            # CROSS JOIN: SQLite walks deps first, by deps_dep; left free,
            # it walked every pending job by state (40 ms a dead job beside
            # 300,000 delayed ones, and `cancel` of many ids quadratic).
            waiting = [r[0] for r in self._run(
                "SELECT job_seq FROM deps d CROSS JOIN jobs j WHERE j.seq ="
                " d.job_seq AND d.dep_seq = ? AND j.state = 'pending' AND"
                " j.waiting > 0", (dep,))]
            self._move("dead", [(now, "dependency %s failed" % dep_id, s)
                                for s in waiting], "last_error = ?")
            frontier.extend(waiting)

    def hand_back(self, claim, now):
        """A run that does not count (forced stop, or claimed but never
        started): the job is pending again, in its old place.  False if the
        claim was lost meanwhile (recovered elsewhere).  A job asked to
        stop (cancel) is not handed back: it is dead, 'cancelled'."""
        if self._cancel_asked(claim):
            self._run("UPDATE attempts SET ended_at = ?, duration = ? -"
                      " started_at, error = 'cancelled' WHERE id = ? AND"
                      " ended_at IS NULL", (now, now, claim.attempt_id))
            return self._fail(claim, "cancelled", None, now)[0] is not None
        if self._move("pending", [(now, claim.seq, claim.attempt_id)],
                      "attempts = attempts - 1, runs = runs - 1,"
                      " worker_id = NULL, attempt_id = NULL", held=True):
            self._run("DELETE FROM attempts WHERE id = ?", (claim.attempt_id,))
            return True
        return False

    # -- recovery -----------------------------------------------------------

    def reaper_snapshot(self):
        """(worker rows, processing jobs) in one snapshot: a worker that
        registers and claims between two reads would look like the owner of
        an orphaned job."""
        with self.read():
            workers = self._all("SELECT id, pid, host, beat FROM workers")
            lost = self._all(self._PROCESSING_SQL)
        return workers, [(_Claim(seq, job_id, None, None, None, None, None,
                                 attempt_id, None), wid, host, pgid, start)
                         for seq, job_id, wid, attempt_id, host, pgid, start
                         in lost]

    def claims_of(self, worker_id):
        """The jobs that worker_id holds (as bare _Claim)."""
        return [_Claim(seq, job_id, None, None, None, None, None, attempt_id,
                       None) for seq, job_id, attempt_id in self._all(
                           "SELECT seq, id, attempt_id FROM jobs WHERE state"
                           " = 'processing' AND worker_id = ?", (worker_id,))]

    def recover(self, claim, config, now):
        """A dead worker's job: its run failed with 'worker lost'."""
        with self.write(deps="shared"):
            self._run("UPDATE attempts SET ended_at = ?, duration = ? -"
                      " started_at, error = 'worker lost' WHERE id = ? AND"
                      " ended_at IS NULL", (now, now, claim.attempt_id))
            return self._fail(claim, "worker lost", config, now)[0]


    # -- schedules (SPEC 10 recurring jobs) ---------------------------------

    def _lock_schedules(self):
        """Serialise changes to the set of schedules.  The config row
        `_schedules` (how many there are; workers read it with their
        settings and look for due ticks only while it is not 0) is written
        first, so concurrent adds and removes on any host count right."""
        self._upsert_config("_schedules", "1")

    def _count_schedules(self):
        count = self._run("SELECT COUNT(*) FROM schedules").fetchone()[0]
        self._upsert_config("_schedules", str(count))

    def add_schedule(self, row):
        """row: (name, cron, every, job template JSON, overlap, next_run,
        created_at)."""
        with self.write(durable=True):
            self._lock_schedules()
            if self._run("SELECT 1 FROM schedules WHERE name = ?",
                         (row[0],)).fetchone():
                raise Conflict("a schedule named '%s' already exists"
                               " (remove it first)" % row[0])
            self._run("INSERT INTO schedules (name, cron, every, job,"
                      " overlap, next_run, created_at)"
                      " VALUES (?,?,?,?,?,?,?)", row)
            self._count_schedules()

    def remove_schedule(self, name):
        with self.write():
            self._lock_schedules()
            if not self._run("DELETE FROM schedules WHERE name = ?",
                             (name,)).rowcount:
                raise NotFound("no schedule named '%s'" % name)
            self._count_schedules()

    def schedules(self, name=None):
        """Schedule rows (_SCHEDULE_COLUMNS), by name."""
        if name is None:
            return self._all(_SCHEDULES_SQL + " ORDER BY s.name")
        return self._all(_SCHEDULES_SQL + " WHERE s.name = ?", (name,))

    def schedules_due(self, now):
        """Is any schedule's tick due?  One indexed read."""
        return self._one("SELECT 1 FROM schedules WHERE next_run <= ?"
                         " LIMIT 1", (now,)) is not None

    def fire_schedules(self, now):
        """Enqueue each due tick's job, once whoever else tries; returns
        log events (worker, job id, event, detail)."""
        with self.write(durable=True):
            # One order for every worker: row locks taken in it cannot
            # deadlock (PostgreSQL).
            due = self._run(_SCHEDULES_SQL + " WHERE s.next_run <= ?"
                            " ORDER BY s.next_run, s.name", (now,)).fetchall()
            return [self._fire(row, now) for row in due]

    def _fire(self, row, now):
        name, cron, every, job, overlap, tick, last_job, _, _, state = row
        if cron is not None:
            following = next_tick(cron, max(now, tick)) or now + MAX_SECONDS
        else:
            following = _every_next(every, tick, now)
        # The compare-and-set: of all the workers that saw this tick due,
        # on any host, only the one whose update moves next_run goes on.
        if not self._run("UPDATE schedules SET next_run = ? WHERE name = ?"
                         " AND next_run = ?", (following, name, tick)).rowcount:
            return None
        if state in ("pending", "failed", "processing") and not overlap:
            return ("-", last_job, "schedule", "%s: tick %s skipped: the"
                    " previous job is still %s" % (name, iso(tick), state))
        job_id = "%s:%s" % (name, time.strftime("%Y%m%dT%H%M%SZ",
                                                time.gmtime(tick)))
        try:
            job_id, duplicate = self._enqueue_template(name, job, job_id,
                                                       tick, now)
        except (InvalidInput, Conflict, NotFound) as exc:
            return ("-", job_id, "schedule", "%s: tick %s not enqueued: %s"
                    % (name, iso(tick), exc))
        if duplicate:
            return ("-", job_id, "schedule", "%s: tick %s not enqueued: job"
                    " %s holds its unique key" % (name, iso(tick), job_id))
        return ("-", job_id, "schedule", "%s: tick %s enqueued"
                % (name, iso(tick)))

    def run_schedule(self, name, now):
        """Enqueue a schedule's job now (its ticks go on as they were)."""
        with self.write(durable=True):
            rows = self._run(_SCHEDULES_SQL + " WHERE s.name = ?",
                             (name,)).fetchall()
            if not rows:
                raise NotFound("no schedule named '%s'" % name)
            job_id = "%s:run-%s" % (name, _random_id()[:6])
            return self._enqueue_template(name, rows[0][3], job_id, now,
                                          now)[0]

    def _enqueue_template(self, name, template, job_id, tick, now):
        """The enqueue path (validation, insert_jobs) for a schedule's job,
        inside the caller's write transaction: (the job's id, True if a job
        holding the template's unique key stood in for it, as for
        `enqueue --unique`)."""
        spec = json.loads(template)
        spec["id"] = job_id
        job = _validate_job(spec, self.config(), now, spec["cwd"])
        duplicates = []
        job_id = self.insert_jobs([job], [_job_after(spec)], now,
                                  duplicates)[0]
        self._run("UPDATE schedules SET last_job = ?, last_run = ? WHERE"
                  " name = ?", (job_id, tick, name))
        return job_id, duplicates[0]


_SCHEDULE_COLUMNS = ("s.name, s.cron, s.every, s.job, s.overlap, s.next_run,"
                     " s.last_job, s.last_run, s.created_at, j.state")
_SCHEDULES_SQL = ("SELECT " + _SCHEDULE_COLUMNS + " FROM schedules s"
                  " LEFT JOIN jobs j ON j.id = s.last_job")


def _move_sql(to_state, sets="", held=False):
    """UPDATE for one state change (cached): see _READY and _MOVES."""
    key = (to_state, sets, held)
    sql = _MOVE_SQL.get(key)
    if sql is None:
        sources = ", ".join("'%s'" % s for s in _MOVES[to_state])
        sql = _MOVE_SQL[key] = (
            "UPDATE jobs SET state = '%s', ready = %s, updated_at = ?%s"
            " WHERE seq = ? AND state IN (%s)%s%s" % (
                to_state, _READY[to_state], ", " + sets if sets else "",
                sources, " AND ready = 1" if to_state == "processing" else "",
                _CLAIM_HELD if held else ""))
    return sql


_MOVE_SQL = {}


###############################################################################
# Store: SQLite ###############################################################
###############################################################################

# Serialises this process's SQLite write transactions: threads of one
# process queue here instead of sleeping in SQLite's busy handler.  Held
# only around one BEGIN IMMEDIATE ... COMMIT.
_WRITE_LOCK = _thread.allocate_lock()


class _SQLiteStore(_SQLStore):
    """The queue in one SQLite file (WAL mode), for one host."""

    _driver_errors = (sqlite3.Error,)
    _integrity_error = sqlite3.IntegrityError
    _REGISTER_SQL = ("INSERT OR IGNORE INTO workers (id, pid, host,"
                     " started_at, heartbeat, beat) VALUES (?, ?, ?, ?, ?, ?)")
    # INDEXED BY: the planner would otherwise scan the claim index.
    _PROCESSING_SQL = (
        "SELECT j.seq, j.id, j.worker_id, a.id, a.host, a.pgid, a.proc_start"
        " FROM jobs j INDEXED BY jobs_state JOIN attempts a"
        " ON a.id = j.attempt_id WHERE j.state = 'processing'")
    _PER_MINUTE_SQL = (
        "SELECT CAST((ended_at - ?) / 60 AS INTEGER) AS m,"
        " SUM(error IS NULL), SUM(error IS NOT NULL) FROM attempts"
        " WHERE ended_at >= ? GROUP BY m")

    def __init__(self, path, clock=time.time):
        path = _utf8_text(os.path.abspath(os.path.expanduser(path)),
                          "the database path")
        _SQLStore.__init__(self, path, clock)
        self.path = path
        self.durable = None  # the connection's synchronous=FULL, once set
        self.conn = self._connect()

    # -- opening: files, identity, migrations -------------------------------

    def _connect(self):
        path, native = self.path, _native(self.path)
        try:
            if os.path.islink(native) and not os.path.exists(native):
                raise OSError(0, _broken_link(native))
            if not os.path.exists(native):
                _create_database(path)
            _check_writable(path)
            conn = _sqlite_open(path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError("cannot open database %s: %s"
                             % (path, _reason(exc)))
        try:
            self.conn = conn
            self._check_schema()
            conn.execute("PRAGMA journal_size_limit=%d" % (8 << 20))
            self._set_durable(False)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_schema(self):
        """Refuse foreign, corrupt and newer databases; migrate older ones.

        Read in one transaction, so a database being created at this
        moment is not mistaken for a foreign one."""
        path = self.path
        try:
            with self.read():
                app = self._one("PRAGMA application_id")[0]
                version = self._one("PRAGMA user_version")[0]
        except StoreError as exc:
            if exc.transient:
                raise StoreError("cannot read %s: %s" % (path, exc.reason),
                                 transient=True)
            raise StoreError("%s is not a usable queuectl database: %s"
                             % (path, exc.reason))
        if app != APPLICATION_ID:
            raise StoreError("%s is not a queuectl database (application_id"
                             " %d); left untouched" % (path, app))
        if version > SCHEMA_VERSION:
            raise StoreError("%s was written by a newer queuectl (schema %d,"
                             " this one knows up to %d); upgrade queuectl"
                             % (path, version, SCHEMA_VERSION))
        if version < 1:  # queuectl marks a database only with its schema
            raise StoreError("%s is marked as a queuectl database but has no"
                             " schema version (user_version %d): damaged;"
                             " left untouched" % (path, version))
        if version < SCHEMA_VERSION:
            try:
                with self.write():
                    _migrate(self.conn, self._one("PRAGMA user_version")[0])
            except StoreError as exc:
                if exc.transient:
                    raise
                raise StoreError("cannot migrate %s from schema %d (left as it"
                                 " was): %s" % (path, version, exc.reason))

    def _set_durable(self, durable):
        """synchronous=FULL (an enqueue that printed its id survives power
        loss) or NORMAL (worker state: a lost change reruns a job)."""
        if durable != self.durable:
            self.conn.execute("PRAGMA synchronous=%s"
                              % ("FULL" if durable else "NORMAL"))
            self.durable = durable

    # -- transactions and errors --------------------------------------------

    def _begin_write(self, durable, deps=None):
        self._set_durable(durable)
        return _write_txn(self.conn)

    def _translate(self, exc):
        return StoreError("database: %s" % _store_reason(exc, self.path),
                          transient=_transient(exc),
                          reason=_store_reason(exc, self.path))

    def _insert_returning_seq(self, sql, params):
        return self._run(sql, params).lastrowid

    def _insert_rows(self, ids, jobs, afters, now):
        """A big enqueue does the work of the INSERT triggers in a few
        statements: the count trigger, fired once per row, was a third of
        the insert's time, and the queue trigger's WHEN test alone another
        third (6 us a row, measured).  The triggers are dropped and created
        again inside the enqueue's own transaction (and savepoint), so no
        other connection ever sees the database without them, and a failed
        insert rolls the drop back too.  Only while they read as this code
        wrote them; otherwise rows go the usual way."""
        if (len(jobs) < BULK_COUNT_FROM or any(afters)
                or not self._insert_triggers_as_written()):
            return _SQLStore._insert_rows(self, ids, jobs, afters, now)
        for name in _INSERT_TRIGGERS:
            self._run("DROP TRIGGER " + name)
        _SQLStore._insert_rows(self, ids, jobs, afters, now)
        self._run("UPDATE counts SET n = n + ? WHERE state = 'pending'",
                  (len(jobs),))
        named = collections.Counter(job.queue for job in jobs)
        named.pop("default", None)
        for queue, count in sorted(named.items()):
            # What jobs_queue_insert does for each of the `count` jobs.
            self._run("INSERT OR IGNORE INTO queues (name) VALUES (?)",
                      (queue,))
            self._run("INSERT OR IGNORE INTO queue_counts (queue, state, n)"
                      " VALUES (?, 'pending', 0)", (queue,))
            self._run("UPDATE queue_counts SET n = n + ? WHERE queue = ? AND"
                      " state = 'pending'", (count, queue))
        for sql in _INSERT_TRIGGERS.values():
            self._run(sql)

    def _insert_triggers_as_written(self):
        """Do the INSERT triggers on jobs read exactly as _INSERT_TRIGGERS?"""
        found = dict(self._run(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND"
            " tbl_name = 'jobs' AND sql LIKE '% AFTER INSERT ON jobs%'"))
        return found == _INSERT_TRIGGERS

    def _upsert_config(self, key, value):
        self._run("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)",
                  (key, str(value)))

    def _insert_deps(self, pairs):
        self._run_many("INSERT INTO deps (job_seq, dep_seq) VALUES (?, ?)",
                       pairs)

    def _insert_queue(self, name):
        self._run("INSERT OR IGNORE INTO queues (name) VALUES (?)", (name,))

    def counts(self):
        """{state: jobs} from the trigger-kept table: one row per state."""
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._all("SELECT state, n FROM counts"))
        return counts

    def _set_totals(self, totals, buckets):
        self._run_many("UPDATE totals SET value = ? WHERE name = ?",
                       [(v, k) for k, v in totals.items()])
        self._run_many("UPDATE duration_buckets SET n = ? WHERE le = ?",
                       [(n, le) for le, n in buckets])

    def _after_import(self):
        self._run("DELETE FROM config WHERE key = '_stop_seq'")

    # -- upkeep -------------------------------------------------------------

    def checkpoint(self):
        """Copy the WAL back so it can restart small, even when busy
        connections keep SQLite's own checkpoints from it."""
        self._all("PRAGMA wal_checkpoint(PASSIVE)")

    def vacuum(self):
        self._all("VACUUM")

    def opened_by(self, pid):
        """Does process pid have this file open (Linux: /proc/PID/fd)?
        None if its descriptors cannot be read (another user, no /proc)."""
        try:
            mine = os.stat(self.path)
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            return None
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile
                found = os.stat("/proc/%d/fd/%s" % (pid, fd))
                if (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino):
                    return True
        return False

    # -- for the benchmark --------------------------------------------------

    def fill_for_bench(self, total, pending, now):
        """`total` jobs, the last `pending` due and the rest completed."""
        rows = (("b%07d" % i, "pending" if i >= total - pending
                 else "completed", 1 if i >= total - pending else None,
                 now, now, now) for i in range(total))
        with self.write():
            self._run_many(
                "INSERT INTO jobs (id, command, state, ready, run_at,"
                " max_retries, cwd, created_at, updated_at) VALUES"
                " (?, 'true', ?, ?, ?, 3, '/', ?, ?)", rows)

    @staticmethod
    def describe():
        return "SQLite %s" % sqlite3.sqlite_version

    def claim_and_roll_back(self, host, now):
        """One claim transaction whose effects are undone (bench)."""
        with self._translated():
            self._run("BEGIN IMMEDIATE")
            try:
                self.claim("bench", host, now, 1)
            finally:
                self._run("ROLLBACK")


def _sqlite_open(path):
    # mode=rw: never let SQLite create a stray empty file at a mistyped path.
    quoted = path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return sqlite3.connect("file:%s?mode=rw" % quoted, uri=True,
                           timeout=LOCK_WAIT, isolation_level=None)


def _is_locked(exc):
    text = str(exc)
    return "locked" in text or "busy" in text


@contextlib.contextmanager
def _write_txn(conn):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    with _WRITE_LOCK:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full) may leave the transaction open.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


def _broken_link(native):
    """Why the symbolic link at the database path leads nowhere."""
    import errno
    try:
        os.stat(native)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "it is a loop of symbolic links"
    return ("it is a symbolic link to %s, which does not exist"
            % os.readlink(native).decode("utf-8", "replace"))


def _check_writable(path):
    # Workers and commands alike write (state, heartbeats, the WAL files
    # beside the database): refuse up front rather than half-way.
    native = _native(path)
    if not os.access(native, os.R_OK | os.W_OK):
        raise OSError(0, "the file is not readable and writable by this user")
    if not os.access(os.path.dirname(native), os.W_OK | os.X_OK):
        raise OSError(0, "its folder is not writable by this user (SQLite"
                      " keeps -wal and -shm files beside it)")


def _reason(exc):
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def _transient(exc):
    """Is this a database error that may go away (lock, full disk, I/O)?"""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in text for word in ("locked", "busy", "full", "disk i/o",
                                  "unable to open"))


def _store_reason(exc, path):
    """The real cause of a database error, in the user's words."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return ("database locked by another process for %s s"
                % _number_text(LOCK_WAIT))
    if "full" in text or ("i/o" in text and _disk_full(path)):
        return "disk full"
    return str(exc)


def _disk_full(path):
    try:
        return os.statvfs(os.path.dirname(_native(path)) or b".").f_bavail == 0
    except OSError:
        return False


def _create_database(path):
    """Build the database under a temporary name, then link it into place.

    So no process ever sees a half-made queuectl database: a file at `path`
    is either complete or not ours (an empty file is an error, not a queue).
    """
    _make_private_folders(os.path.dirname(_native(path)))
    tmp = "%s.%d-%s.tmp" % (path, os.getpid(), _random_id())
    os.close(os.open(_native(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600))
    try:
        conn = _sqlite_open(tmp)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            with _write_txn(conn):
                _migrate(conn, 0)
                conn.execute("PRAGMA application_id=%d" % APPLICATION_ID)
        finally:
            conn.close()
        try:
            os.link(_native(tmp), _native(path))
        except FileExistsError:
            pass  # another process created it first; theirs is as good
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(_native(tmp + suffix))


def _make_private_folders(folder):
    """Create the missing folders of a path, each 0700 whatever the umask:
    whoever can write there can make workers run commands."""
    parent = os.path.dirname(folder)
    if parent != folder and not os.path.isdir(parent):
        _make_private_folders(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
        os.chmod(folder, 0o700)


def _migrate(conn, version):
    while version < SCHEMA_VERSION:
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
        conn.execute("PRAGMA user_version=%d" % version)


###############################################################################
# Store: PostgreSQL ###########################################################
###############################################################################

class _PostgresStore(_SQLStore):
    """The queue in a PostgreSQL database (schema `queuectl`), for any
    number of hosts.  Differs from SQLite in: DDL (identity columns, a
    partial claim index, plpgsql triggers on striped counters), the claim
    (one statement, FOR UPDATE SKIP LOCKED), upserts (ON CONFLICT), the
    clock (the server's), wake-ups (LISTEN/NOTIFY) and reconnection."""

    _REGISTER_SQL = ("INSERT INTO workers (id, pid, host, started_at,"
                     " heartbeat, beat) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT"
                     " (id) DO NOTHING")
    _PROCESSING_SQL = (
        "SELECT j.seq, j.id, j.worker_id, a.id, a.host, a.pgid, a.proc_start"
        " FROM jobs j JOIN attempts a ON a.id = j.attempt_id"
        " WHERE j.state = 'processing'")
    _PER_MINUTE_SQL = (
        "SELECT CAST(FLOOR((ended_at - ?) / 60) AS INTEGER) AS m,"
        " SUM(CASE WHEN error IS NULL THEN 1 ELSE 0 END),"
        " SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END) FROM attempts"
        " WHERE ended_at >= ? GROUP BY m")
    _TOTALS_SQL = "SELECT name, SUM(value) FROM totals GROUP BY name"
    # Each run counts in its own bucket here: cumulative on reading.
    _BUCKETS_SQL = ("SELECT le, CAST(SUM(SUM(n)) OVER (ORDER BY le) AS BIGINT)"
                    " FROM duration_buckets GROUP BY le ORDER BY le")
    # Retry a lost server from 1 s, doubling, up to 30 s.
    retry_first, retry_max = 1.0, 30.0
    #: Workers on other hosts share this database: a worker that cannot
    #: renew its lease must kill its own jobs before others recover them.
    shared_by_hosts = True

    def __init__(self, url, clock=time.time):
        _SQLStore.__init__(self, url, clock)
        self.display = _redact(url)
        self.secrets = _url_secrets(url)  # never in an error either
        self.driver = _pg_driver()
        self._driver_errors = (self.driver.Error,)
        self._integrity_error = self.driver.IntegrityError
        self._sql_cache = {}
        self.offset = None  # server clock minus ours, measured on connect
        self.listening = False  # LISTEN again after a reconnect
        self.conn = self._connect()
        try:
            self._check_schema()
        except BaseException:
            self.close()
            raise

    # -- connecting ---------------------------------------------------------

    def _connect(self):
        """An autocommit session in schema queuectl, with keepalives and an
        idle-in-transaction limit well inside any lease: a host cut off
        mid-transaction cannot hold row locks for long."""
        # synchronous_commit on, whatever the server's default: unlike
        # SQLite's, whose unsynced commits die only with the machine (and
        # its workers), a PostgreSQL server that crashes forgets commits it
        # had acknowledged while its clients live on: a claim that a worker
        # went on to run, a result, a cancel that was reported done.
        # client_encoding UTF8: what queuectl's text is, whatever the
        # database's encoding or $PGCLIENTENCODING; a SQL_ASCII database
        # would otherwise hand psycopg 3 bytes (and its own checks failed).
        # jit off: every statement here reads a few rows, but with stale
        # statistics (a million jobs just added, not yet ANALYZEd) a cost
        # estimate passed jit_above_cost, and compiling took 200 ms of a
        # 0.04 ms idle check (measured).
        options = ("-c search_path=queuectl -c idle_in_transaction_session"
                   "_timeout=10000 -c application_name=queuectl"
                   " -c synchronous_commit=on -c jit=off")
        try:
            conn = _PGConnection(self.driver, self.address, dict(
                connect_timeout=10, options=options, client_encoding="UTF8",
                keepalives=1,
                keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                tcp_user_timeout=5000))
        except self.driver.Error as exc:
            reason = _pg_reason(exc, self.secrets)
            raise StoreError("cannot connect to %s: %s" % (
                self.display, reason), transient=True, reason=reason)
        self.conn = conn
        self._measure_clock()
        self._claim_stripe()
        if self.listening:
            conn.execute("LISTEN queuectl")
        return conn

    def _measure_clock(self):
        before = self.clock()
        server = self.conn.execute(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0]
        self.offset = float(server) - (before + self.clock()) / 2.0
        self.offset_at = time.monotonic()

    def _claim_stripe(self):
        """Take the lowest counter stripe no live session holds, for as
        long as this session lives (see _PG_STRIPE).  There are never more
        sessions than max_connections, so one is always free."""
        self.conn.execute(
            "SELECT set_config('queuectl.stripe', CAST(s AS TEXT), false)"
            " FROM generate_series(0, CAST(current_setting('max_connections')"
            " AS INTEGER)) AS s WHERE pg_try_advisory_lock(%d, s) LIMIT 1"
            % _PG_STRIPE_LOCK).fetchall()

    def now(self):
        """The server's clock, estimated locally (re-measured each minute):
        hosts whose clocks disagree still agree on every timestamp."""
        if time.monotonic() - self.offset_at > 60 and self.conn is not None:
            with contextlib.suppress(*self._driver_errors):
                self._measure_clock()
        return self.clock() + self.offset

    def _check_schema(self):
        """Create schema queuectl, or check it is ours and not newer."""
        with self.write():
            self._run("SELECT pg_advisory_xact_lock(?)", (APPLICATION_ID,))
            has_schema = self._run("SELECT 1 FROM pg_namespace WHERE nspname"
                                   " = 'queuectl'").fetchone()
            has_meta = self._run("SELECT to_regclass('queuectl.meta')"
                                 ).fetchone()[0]
            if not has_schema:
                for statement in _PG_SCHEMA:
                    self._run(statement)
                has_meta = True
            meta = dict(self._run("SELECT key, value FROM meta")) \
                if has_meta else {}
            if meta.get("application") != "queuectl":
                raise StoreError("%s has a schema 'queuectl' that is not"
                                 " queuectl's; left untouched" % self.display)
            text = meta.get("schema_version") or ""
            version = int(text) if re.match(r"^[0-9]{1,9}$", text) else 0
            if version < 1:  # queuectl writes it with the schema
                raise StoreError("%s has a queuectl schema but no schema"
                                 " version (%s): damaged; left untouched"
                                 % (self.display, _short_repr(text)))
            if version > PG_SCHEMA_VERSION:
                raise StoreError("%s was written by a newer queuectl (schema"
                                 " %d, this one knows up to %d); upgrade"
                                 " queuectl" % (self.display, version,
                                                PG_SCHEMA_VERSION))
            self._migrate(version)

    def _migrate(self, version):
        """Bring schema queuectl up to date, inside _check_schema's
        transaction and advisory lock (one host migrates; others wait)."""
        while version < PG_SCHEMA_VERSION:
            for statement in _PG_MIGRATIONS[version]:
                self._run(statement)
            version += 1
            self._run("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                      (str(version),))

    # -- transactions and errors --------------------------------------------

    @contextlib.contextmanager
    def _translated(self):
        if self.conn is None:  # lost earlier: reconnect first
            self.conn = self._connect()
        try:
            yield
        except self.driver.Error as exc:
            raise self._translate(exc)

    @contextlib.contextmanager
    def _begin_write(self, durable, deps=None):
        # Every commit is durable (_connect).  A write that may complete,
        # bury or delete jobs others wait on holds the dependency lock
        # shared, and one that reads the dependency graph to change it (an
        # enqueue with --after, a retry, a delete) holds it alone: row
        # locks did not order them, so a job enqueued --after A while a
        # worker completed A, or retried while its dependency completed,
        # waited for ever (neither saw the other's rows), and a delete
        # beside such an enqueue left it waiting on no job.  Beats and bare
        # claims take no part: a long write never delays them (a worker
        # whose beats wait fences itself).  The lock is a transaction's
        # first, so it cannot deadlock with row locks; no round trip is
        # added.
        lock = {None: None, "shared": "pg_advisory_xact_lock_shared",
                "alone": "pg_advisory_xact_lock"}[deps]
        try:  # a wait for the lock cut short must roll back too
            self.conn.execute("BEGIN" if lock is None else "BEGIN; SELECT"
                              " %s(%d, -1)" % (lock, _PG_STRIPE_LOCK))
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn is not None and not self.conn.closed:
                with contextlib.suppress(self.driver.Error):
                    self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def read(self):
        with self._translated():
            self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            try:
                yield self
            finally:
                # Not if the server went away meanwhile: _translate closed
                # the connection (conn None) for the next use to reconnect.
                if self.conn is not None and not self.conn.closed:
                    self.conn.execute("COMMIT")

    def _translate(self, exc):
        reason = _pg_reason(exc, self.secrets)
        lost = self.conn is None or self.conn.closed or isinstance(
            exc, (self.driver.OperationalError, self.driver.InterfaceError))
        if lost:
            self.close()  # reconnect on the next use
        return StoreError("database %s: %s" % (self.display, reason),
                          transient=lost, reason=reason)

    def _sql(self, sql):
        """`?` placeholders -> `%s` (and a literal % doubled), cached."""
        text = self._sql_cache.get(sql)
        if text is None:
            text = self._sql_cache[sql] = sql.replace("%", "%%").replace(
                "?", "%s")
        return text

    def _run(self, sql, params=()):
        return self.conn.execute(self._sql(sql) if params else sql,
                                 params or None)

    def _all(self, sql, params=()):
        with self._translated():
            return self._run(sql, params).fetchall()

    def _one(self, sql, params=()):
        with self._translated():
            return self._run(sql, params).fetchone()

    def _run_many(self, sql, rows):
        # psycopg 3 sends the batch in one pipeline: one round trip.
        return self.conn.executemany(self._sql(sql), list(rows))

    # -- many rows, one statement -------------------------------------------
    # Each statement on jobs or attempts fires their statement-level count
    # triggers once, whatever it changes: a batch of results saved row by
    # row fired them once per job (half the server's time per job, by
    # pg_stat_statements).  These take the rows as arrays, in one UPDATE.

    def _save_runs(self, rows):
        rows = [row[:6] + (_without_nul(row[6]),) + row[7:] for row in rows]
        if len(rows) < 2:
            return _SQLStore._save_runs(self, rows)
        self._run(_PG_SAVE_RUNS_SQL, _pg_arrays(rows, _PG_SAVE_RUNS_TYPES))

    def save_tail(self, claim, output, dropped):
        _SQLStore.save_tail(self, claim, _without_nul(output), dropped)

    def export(self):
        # The snapshot stays open, idle between fetches, while the target
        # writes and commits: the session's idle-in-transaction limit
        # (_connect) must not end it (it failed copies whose target
        # waited 10 s for its lock, a red-team pass).  That limit frees
        # the row locks of a cut-off worker; a snapshot holds none.
        self._run("SET LOCAL idle_in_transaction_session_timeout = 0")
        return _SQLStore.export(self)

    def _stream(self, table, cols):
        """The table's rows through cursors on the server (the drivers'
        own cursors fetch every row at once), each fetch at most
        _STREAM_ROWS rows and _STREAM_TEXT bytes (or one row): a second
        cursor reads each row's size first, so a run of big rows after
        small ones is not fetched a thousand at a time.  Declared by
        hand, as psycopg2 refuses a named cursor on an autocommit
        connection; read() holds the transaction they need."""
        names = _column_names(cols)
        size = " + ".join("COALESCE(octet_length(%s::text), 0)" % name
                          for name in names)
        with self._translated():
            self._run("DECLARE queuectl_sizes NO SCROLL CURSOR FOR SELECT %s"
                      " FROM %s ORDER BY %s" % (size, table, names[0]))
            self._run("DECLARE queuectl_rows NO SCROLL CURSOR FOR SELECT %s"
                      " FROM %s ORDER BY %s" % (cols, table, names[0]))
            sizes, more = [], True
            while True:
                if more and len(sizes) < _STREAM_ROWS:
                    fetched = self._run("FETCH FORWARD %d FROM queuectl_sizes"
                                        % _STREAM_ROWS).fetchall()
                    more = bool(fetched)
                    sizes.extend(row[0] for row in fetched)
                if not sizes:
                    break
                count, text = 1, sizes[0]
                while count < min(len(sizes), _STREAM_ROWS) \
                        and text + sizes[count] <= _STREAM_TEXT:
                    text += sizes[count]
                    count += 1
                del sizes[:count]
                for row in self._run("FETCH FORWARD %d FROM queuectl_rows"
                                     % count).fetchall():
                    yield row
            self._run("CLOSE queuectl_sizes")
            self._run("CLOSE queuectl_rows")

    def import_all(self, tables, totals, buckets):
        """As _SQLStore's, but up to _PG_IMPORT_ROWS rows a statement (as
        JSON, made rows by json_populate_recordset).  A statement a row fired
        the count trigger for every row, and each firing updates the
        same few rows again in one transaction, each time one more dead
        version to step over: copying 40,000 jobs took 13.5 s, 200,000
        over 5 minutes (a red-team pass)."""
        written = {}
        with self.write(durable=True):
            for table, cols, rows in tables:
                names = _column_names(cols)
                sql = ("INSERT INTO %s (%s) SELECT %s FROM"
                       " json_populate_recordset(NULL::%s, ?)"
                       % (table, cols, cols, table))
                written[table] = sum(
                    self._run(sql, (chunk,)).rowcount
                    for chunk in _json_chunks(
                        dict(zip(names, map(_without_nul, row)))
                        for row in rows))
            self._set_totals(totals, buckets)
            self._after_import()
        return written

    def _move(self, to_state, rows, sets="", held=False):
        if len(rows) < 2 or "?" in sets:
            return _SQLStore._move(self, to_state, rows, sets, held)
        types = (float, int, int) if held else (float, int)
        return self._run(_pg_move_many_sql(to_state, sets, held),
                         _pg_arrays(rows, types)).rowcount

    def _insert_rows(self, ids, jobs, afters, now):
        """Jobs without dependencies go in multi-row INSERTs: one statement
        (one round trip, one firing of the statement-level count trigger)
        per _PG_INSERT_ROWS jobs, where executemany() made one per job
        (about 4,600 jobs/s).  The casts (_PG_JOB_VALUES) pin each
        column's type whatever the driver sends for a parameter."""
        if any(afters):
            return _SQLStore._insert_rows(self, ids, jobs, afters, now)
        rows = [(job_id,) + tuple(job[1:]) + (now, now)
                for job_id, job in zip(ids, jobs)]
        for start in range(0, len(rows), _PG_INSERT_ROWS):
            chunk = rows[start:start + _PG_INSERT_ROWS]
            self._run(
                "INSERT INTO jobs (id, command, priority, run_at, max_retries,"
                " timeout, cwd, env, queue, unique_key, created_at,"
                " updated_at, state, ready)"
                " VALUES " + ",".join([_PG_JOB_VALUES] * len(chunk)),
                [value for row in chunk for value in row])

    def _insert_returning_seq(self, sql, params):
        column = "seq" if sql.startswith("INSERT INTO jobs") else "id"
        return self._run(sql + " RETURNING " + column, params).fetchone()[0]

    def _upsert_config(self, key, value):
        self._run("INSERT INTO config (key, value) VALUES (?, ?) ON CONFLICT"
                  " (key) DO UPDATE SET value = EXCLUDED.value",
                  (key, str(value)))

    def _insert_deps(self, pairs):
        self._run_many("INSERT INTO deps (job_seq, dep_seq) VALUES (?, ?)",
                       pairs)

    def _insert_queue(self, name):
        self._run("INSERT INTO queues (name) VALUES (?) ON CONFLICT (name)"
                  " DO NOTHING", (name,))

    def _wake_workers(self):
        # Delivered at COMMIT to every LISTENing worker, on every host.
        self._run("SELECT pg_notify('queuectl', '')")

    def counts(self):
        """{state: jobs}: summed over a few striped rows per state, so no
        single counter row serialises every worker on every host."""
        counts = dict.fromkeys(STATES, 0)
        counts.update(self._all("SELECT state, CAST(SUM(n) AS BIGINT) FROM"
                                " counts GROUP BY state"))
        return counts

    def checkpoint(self):
        pass  # the server keeps its own write-ahead log

    def _set_totals(self, totals, buckets):
        # Into stripe 0; the other stripes of a new schema are empty.
        self._run_many("UPDATE totals SET value = ? WHERE name = ? AND"
                       " stripe = 0", [(v, k) for k, v in totals.items()])
        own = [(n - below, le) for (le, n), below in
               zip(buckets, [0] + [n for _, n in buckets[:-1]])]
        self._run_many("UPDATE duration_buckets SET n = ? WHERE le = ? AND"
                       " stripe = 0", own)  # cumulative -> one bucket each

    def _after_import(self):
        self._run("DELETE FROM config WHERE key = '_stop_seq'")
        # Rows came with their own numbers: new ones must follow them.
        for table, column in (("jobs", "seq"), ("attempts", "id")):
            self._run("SELECT setval(pg_get_serial_sequence('queuectl.%s',"
                      " '%s'), COALESCE((SELECT MAX(%s) FROM %s), 0) + 1,"
                      " false)" % (table, column, column, table))

    def vacuum(self):
        """VACUUM cannot run in a transaction: each table on its own."""
        with self._translated():
            for table in ("jobs", "attempts", "deps"):
                self.conn.execute("VACUUM queuectl.%s" % table)

    # -- for the benchmark --------------------------------------------------

    def drop_queue(self):
        """Drop schema queuectl and everything in it (bench only: its
        figures are taken on a fresh queue)."""
        with self._translated():
            self.conn.execute("DROP SCHEMA IF EXISTS queuectl CASCADE")

    def fill_for_bench(self, total, pending, now):
        """`total` jobs, the last `pending` due and the rest completed."""
        with self.write():
            self._run(
                "INSERT INTO jobs (id, command, state, ready, run_at,"
                " max_retries, cwd, created_at, updated_at) SELECT"
                " 'b' || LPAD(CAST(i AS TEXT), 7, '0'), 'true', CASE WHEN"
                " i >= ? THEN 'pending' ELSE 'completed' END, CASE WHEN"
                " i >= ? THEN 1 END, ?, 3, '/', ?, ? FROM generate_series(0,"
                " ? - 1) AS g (i)", (total - pending, total - pending, now,
                                     now, now, total))

    def claim_and_roll_back(self, host, now):
        """One claim transaction whose effects are undone (bench)."""
        with self._translated():
            self.conn.execute("BEGIN")
            try:
                self.claim("bench", host, now, 1, 1)
            finally:
                self.conn.execute("ROLLBACK")

    def describe(self):
        return "PostgreSQL %s" % self._one("SHOW server_version")[0]

    # -- the claim ----------------------------------------------------------

    def claim(self, worker_id, host, now, batch=1, deep_at=1, queues=None):
        """One statement: lock due rows that no one else holds (SKIP
        LOCKED), open their attempts, mark them processing.  Due means due
        by the server's clock, whatever this host's says."""
        # `now` is the server's clock as this session measured it: the same
        # clock that set every run_at, so "due" means the same everywhere.
        # Named queues: as in _SQLStore.claim (the rows of capped queues
        # with room are locked first, in a statement of their own, so the
        # count of processing jobs read after it, by a fresh READ COMMITTED
        # snapshot, is exact: see _queue_plan).
        rows = []
        if queues is None:
            rows = self._run(_PG_CLAIM_ANY_SQL, (
                now, deep_at, deep_at, deep_at, batch, worker_id, host,
                worker_id)).fetchall()
        if not rows:
            plan = self._queue_plan(queues)
            if plan is None or (queues is None and plan == _NO_FILTER):
                return []
            where, one = plan
            if one:
                batch = deep_at = 1
            rows = self._run(_PG_CLAIM_SQL.replace(
                _PG_CLAIM_DUE, _PG_CLAIM_DUE + where), (
                    now, deep_at, deep_at, deep_at, batch, worker_id, host,
                    worker_id)).fetchall()
        return [_Claim(*row[1:]) for row in sorted(rows)]

    def _hold_dependents(self, seqs):
        """Lock the pending jobs that wait for these, in seq order: two
        workers releasing dependents they share never take them in opposite
        orders (a deadlock).  True if there are any."""
        return bool(self._run(
            "SELECT seq FROM jobs WHERE seq IN (SELECT job_seq FROM deps"
            " WHERE dep_seq IN (%s)) AND state = 'pending' ORDER BY seq"
            " FOR UPDATE" % _marks(seqs), seqs).fetchall())

    def _lock_queues(self, names):
        """Claims of a capped queue with room take turns: FOR UPDATE on its
        row, held to COMMIT, in name order (no deadlock between two
        workers); the caller counts again after it (a fresh snapshot)."""
        self._run("SELECT name FROM queues WHERE name IN (%s) ORDER BY name"
                  " FOR UPDATE" % _quoted(names)).fetchall()
        return True

    # -- listening ----------------------------------------------------------

    def listen(self):
        self.listening = True
        with self._translated():
            self.conn.execute("LISTEN queuectl")

    def wait_for_work(self, timeout, stopping, wake_fd):
        """Sleep until NOTIFY, the pool's wake-up pipe, or the timeout."""
        import select
        if self.conn is None or stopping.is_set():
            stopping.wait(min(timeout, 0.2))
            return
        try:
            ready = select.select([self.conn.fileno(), wake_fd], [], [],
                                  timeout)[0]
            if self.conn.fileno() in ready:
                self.conn.consume_notifies()
        except (OSError, ValueError, self.driver.Error):
            self.close()


class _PGConnection(object):
    """psycopg (3) or psycopg2 behind the calls the store makes:
    execute() returning a cursor, autocommit (the store says BEGIN)."""

    def __init__(self, driver, url, kwargs):
        self.driver = driver
        self.v3 = driver.__name__ == "psycopg"
        if self.v3:
            self.raw = driver.connect(url, autocommit=True, **kwargs)
        else:
            self.raw = driver.connect(url, **kwargs)
            self.raw.autocommit = True

    @property
    def closed(self):
        return bool(self.raw.closed)

    def execute(self, sql, params=None):
        if self.v3:
            return self.raw.execute(sql, params, prepare=False)
        cursor = self.raw.cursor()
        cursor.execute(sql, params)
        return cursor

    def executemany(self, sql, rows):
        """Returns the cursor; its rowcount is the sum over the rows."""
        cursor = self.raw.cursor()
        if rows:
            cursor.executemany(sql, rows)
        return cursor

    def fileno(self):
        return self.raw.fileno()

    def consume_notifies(self):
        if self.v3:
            self.raw.execute("SELECT 1")  # reads and drops the notices
        else:
            self.raw.poll()
            del self.raw.notifies[:]

    def close(self):
        self.raw.close()


def _pg_driver():
    """psycopg (3) if importable, else psycopg2: the one optional import."""
    try:
        import psycopg
        return psycopg
    except ImportError:
        pass
    try:
        import psycopg2
        return psycopg2
    except ImportError:
        raise StoreError('a postgresql:// database needs a driver: pip install'
                         ' "psycopg[binary]" (or the distribution package'
                         ' python3-psycopg2)')


def _pg_reason(exc, secrets):
    """A driver's error in one line, without the URL's password (libpq
    quotes the part of a URL it cannot read, password included)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text[:300]


def _without_nul(value):
    """PostgreSQL text cannot hold NUL: a job's output that has one (which
    SQLite keeps) gets U+FFFD there instead, as bad UTF-8 does."""
    if isinstance(value, str) and "\0" in value:
        return value.replace("\0", "\ufffd")
    return value


def _redact(url):
    """The URL without its password: what status, logs and errors show.

    Everything up to the last @ is taken for user:password (a password
    may hold an unencoded @ or /), and a password=... parameter goes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    at = rest.rfind("@")
    if at >= 0:
        user = rest[:at].split(":", 1)[0]
        rest = (user + "@" if user else "") + rest[at + 1:]
    rest = re.sub(r"(?i)([?&])password=[^&#]*(&|$)", r"\1", rest)
    return scheme + sep + re.sub(r"[?&]$", "", rest)


def _url_secrets(url):
    """The URL's passwords as written and %-decoded, longest first; and the
    pieces libpq may quote of one it cannot read (an unencoded @ / ? # :
    splits it into host, port and path)."""
    from urllib.parse import unquote
    rest = url.partition("://")[2]
    found = re.findall(r"(?i)[?&]password=([^&#]*)", rest)
    userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
    if ":" in userinfo:
        password = userinfo.split(":", 1)[1]
        found.append(password)
        found += [piece for piece in re.split(r"[@/?#:]", password)
                  if len(piece) >= 3]
    found += [unquote(secret) for secret in found]
    return sorted(set(secret for secret in found if secret), key=len,
                  reverse=True)


#: Jobs per multi-row INSERT of a PostgreSQL enqueue (12 parameters each;
#: a statement may have 65,535).
_PG_INSERT_ROWS = 500
#: Rows a statement when `copy` writes into PostgreSQL, and the most JSON
#: text one may carry (a message over 1 GB is refused by the server, and
#: output-limit allows 1 GiB of output per attempt).
_PG_IMPORT_ROWS = 1000
_PG_IMPORT_TEXT = 32 << 20


def _json_chunks(records):
    """JSON arrays of the records, each of at most _PG_IMPORT_ROWS of them
    and about _PG_IMPORT_TEXT characters (one record may be more).  Text
    as it is, not \\u-escaped: json_populate_recordset refuses an escape
    above U+007F where the database is not UTF8 (SQL_ASCII)."""
    parts, size = [], 0
    for record in records:
        part = json.dumps(record, ensure_ascii=False)
        if parts and (len(parts) >= _PG_IMPORT_ROWS
                      or size + len(part) > _PG_IMPORT_TEXT):
            yield "[" + ",".join(parts) + "]"
            parts, size = [], 0
        parts.append(part)
        size += len(part)
    if parts:
        yield "[" + ",".join(parts) + "]"
_PG_JOB_VALUES = ("(?, ?, CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION),"
                  " CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION), ?, ?, ?,"
                  " ?, CAST(? AS DOUBLE PRECISION),"
                  " CAST(? AS DOUBLE PRECISION),"
                  " 'pending', 1)")
_PG_SAVE_RUNS_SQL = (
    "UPDATE attempts a SET started_at = v.started_at, ended_at = v.ended_at,"
    " duration = v.duration, exit_code = v.exit_code, signal = v.signal,"
    " error = v.error, output = v.output, output_dropped = v.dropped,"
    " pgid = COALESCE(a.pgid, v.pgid) FROM unnest("
    "CAST(? AS DOUBLE PRECISION[]), CAST(? AS DOUBLE PRECISION[]),"
    " CAST(? AS DOUBLE PRECISION[]), CAST(? AS INTEGER[]),"
    " CAST(? AS INTEGER[]), CAST(? AS TEXT[]), CAST(? AS TEXT[]),"
    " CAST(? AS BIGINT[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[]))"
    " AS v (started_at, ended_at, duration, exit_code, signal, error,"
    " output, dropped, pgid, id) WHERE a.id = v.id AND a.ended_at IS NULL")
_PG_SAVE_RUNS_TYPES = (float, float, float, int, int, str, str, int, int,
                       int)


def _pg_arrays(rows, types):
    """Rows -> one list per column, each value made its column's type
    (psycopg 3 refuses a list that mixes ints and floats)."""
    return [[None if value is None else kind(value) for value in column]
            for column, kind in zip(zip(*rows), types)]


def _pg_move_many_sql(to_state, sets, held):
    """_move_sql for many jobs: their (updated_at, seq[, attempt id])
    come as arrays (cached)."""
    key = ("many", to_state, sets, held)
    sql = _MOVE_SQL.get(key)
    if sql is None:
        sql = _MOVE_SQL[key] = (
            "UPDATE jobs j SET state = '%s', ready = %s, updated_at = v.at%s"
            " FROM unnest(CAST(? AS DOUBLE PRECISION[]), CAST(? AS BIGINT[])"
            "%s) AS v (at, seq%s) WHERE j.seq = v.seq AND j.state IN (%s)%s"
            % (to_state, _READY[to_state], ", " + sets if sets else "",
               ", CAST(? AS BIGINT[])" if held else "",
               ", attempt_id" if held else "",
               ", ".join("'%s'" % s for s in _MOVES[to_state]),
               " AND j.attempt_id = v.attempt_id" if held else ""))
    return sql


# What a claim restricted to some queues extends (see _SQLStore.claim).
_PG_CLAIM_DUE = "WHERE ready = 1 AND run_at <= ?"

# The claim walks the claim index one priority at a time (prios: each
# step one index probe for the next lower priority), and within one
# priority reads due rows only: `run_at <= now` bounds an index range once
# the priority is fixed.  Read in one go over every priority, the delayed
# rows of a priority were all read before the next one (53 ms beside
# 1,000,000 jobs due tomorrow, against 0.24 ms walked: EXPLAIN ANALYZE).
_PG_CLAIM_SQL = """
WITH RECURSIVE prios AS (
    (SELECT priority FROM jobs WHERE ready = 1
     ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT j.priority FROM jobs j WHERE j.ready = 1
            AND j.priority < p.priority ORDER BY j.priority DESC LIMIT 1)
    FROM prios p WHERE p.priority IS NOT NULL),
due AS MATERIALIZED (
    SELECT d.seq, d.priority, d.run_at FROM prios p CROSS JOIN LATERAL (
        SELECT seq, priority, run_at FROM jobs
        WHERE ready = 1 AND run_at <= ? AND priority = p.priority
        ORDER BY run_at, seq LIMIT ? FOR UPDATE SKIP LOCKED) d
    LIMIT ?),
picked AS (
    SELECT seq, ROW_NUMBER() OVER (ORDER BY priority DESC, run_at, seq) AS k
    FROM due ORDER BY priority DESC, run_at, seq
    LIMIT CASE WHEN (SELECT COUNT(*) FROM due) >= ? THEN ? ELSE 1 END),
opened AS (
    INSERT INTO attempts (job_seq, n, worker_id, host, started_at, due_at)
    SELECT j.seq, j.runs + 1, ?, ?, EXTRACT(EPOCH FROM clock_timestamp()),
           j.run_at FROM jobs j JOIN picked p ON p.seq = j.seq
    RETURNING id, job_seq, started_at)
UPDATE jobs j SET state = 'processing', ready = NULL,
    attempts = j.attempts + 1, runs = j.runs + 1, worker_id = ?,
    attempt_id = o.id, updated_at = o.started_at
FROM opened o JOIN picked p ON p.seq = o.job_seq
WHERE j.seq = o.job_seq AND j.ready = 1
RETURNING p.k, j.seq, j.id, j.command, j.timeout, j.cwd, j.env, j.attempts,
    o.id, o.started_at"""

# Striped counters: each session adds to the rows of its own stripe, and
# readers sum the stripes.  Schema version 1 striped by backend pid modulo
# 16, so two sessions could share a row: each locked it for the rest of its
# transaction, and two of them taking two rows in opposite orders deadlocked
# (seen in CI).  Since version 3 a session takes the lowest stripe that no
# live session holds (an advisory lock, _claim_stripe) when it connects: no
# two sessions ever write the same counter row.
_PG_STRIPE_V1 = "pg_backend_pid() % 16"
_PG_STRIPE = "queuectl.stripe()"
# Advisory locks (this key, stripe); (this key, -1) is the dependency lock
# (_PostgresStore._begin_write).
_PG_STRIPE_LOCK = APPLICATION_ID

#: The claim of a worker of every queue while none is paused or capped.
_PG_CLAIM_ANY_SQL = _PG_CLAIM_SQL.replace(_PG_CLAIM_DUE,
                                          _PG_CLAIM_DUE + _NO_LIMITED_QUEUES)

# The counters' plpgsql, with %(stripe)s for the stripe expression of its
# schema version.
# Statement-level triggers with transition tables: a claim of 8 jobs,
# or an enqueue of 100,000, adds to each state's counter once.
_PG_COUNT_JOBS = """
CREATE OR REPLACE FUNCTION count_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO queuectl.counts AS c SELECT state, %(stripe)s, COUNT(*)
      FROM new_rows GROUP BY state
      ON CONFLICT (state, stripe) DO UPDATE SET n = c.n + EXCLUDED.n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO queuectl.counts AS c SELECT state, %(stripe)s, -COUNT(*)
      FROM old_rows GROUP BY state
      ON CONFLICT (state, stripe) DO UPDATE SET n = c.n + EXCLUDED.n;
  ELSE
    INSERT INTO queuectl.counts AS c SELECT state, %(stripe)s, SUM(d)
      FROM (SELECT o.state, -1 AS d FROM old_rows o JOIN new_rows n
            ON n.seq = o.seq WHERE n.state <> o.state
            UNION ALL
            SELECT n.state, 1 FROM old_rows o JOIN new_rows n
            ON n.seq = o.seq WHERE n.state <> o.state) AS moves
      GROUP BY state
      ON CONFLICT (state, stripe) DO UPDATE SET n = c.n + EXCLUDED.n;
  END IF;
  RETURN NULL;
END $$"""
# Runs that just ended: their results, durations and buckets (each run
# in its own bucket; readers add up the smaller ones).
_PG_COUNT_ATTEMPTS = """
CREATE OR REPLACE FUNCTION count_attempts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO queuectl.totals AS t
    SELECT CASE WHEN n.error IS NULL THEN 'success'
                WHEN n.error = 'worker lost' THEN 'lost'
                WHEN n.error LIKE 'timed out%%' THEN 'timeout'
                ELSE 'failure' END, %(stripe)s, COUNT(*)
    FROM old_rows o JOIN new_rows n ON n.id = o.id
    WHERE o.ended_at IS NULL AND n.ended_at IS NOT NULL GROUP BY 1
    UNION ALL
    SELECT 'duration_sum', %(stripe)s, SUM(COALESCE(n.duration, 0))
    FROM old_rows o JOIN new_rows n ON n.id = o.id
    WHERE o.ended_at IS NULL AND n.ended_at IS NOT NULL HAVING COUNT(*) > 0
    ON CONFLICT (name, stripe) DO UPDATE SET value = t.value + EXCLUDED.value;
  INSERT INTO queuectl.duration_buckets AS b
    SELECT (SELECT MIN(le) FROM queuectl.duration_buckets k
            WHERE k.stripe = 0 AND k.le >= COALESCE(n.duration, 0)),
           %(stripe)s, COUNT(*)
    FROM old_rows o JOIN new_rows n ON n.id = o.id
    WHERE o.ended_at IS NULL AND n.ended_at IS NOT NULL GROUP BY 1
    ON CONFLICT (le, stripe) DO UPDATE SET n = b.n + EXCLUDED.n;
  RETURN NULL;
END $$"""
# Named queues: row triggers whose WHEN default jobs fail.
_PG_COUNT_QUEUE_JOBS = """
CREATE OR REPLACE FUNCTION count_queue_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO queuectl.queues (name) VALUES (NEW.queue)
      ON CONFLICT (name) DO NOTHING;
  END IF;
  IF TG_OP <> 'INSERT' THEN
    INSERT INTO queuectl.queue_counts AS c
      VALUES (OLD.queue, OLD.state, %(stripe)s, -1)
      ON CONFLICT (queue, state, stripe) DO UPDATE SET n = c.n - 1;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO queuectl.queue_counts AS c
      VALUES (NEW.queue, NEW.state, %(stripe)s, 1)
      ON CONFLICT (queue, state, stripe) DO UPDATE SET n = c.n + 1;
  END IF;
  RETURN NULL;
END $$"""

_PG_SCHEMA = (
    "CREATE SCHEMA queuectl",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('application', 'queuectl'),"
    " ('schema_version', '1')",  # _PG_MIGRATIONS bring it up to date
    # COLLATE "C": id prefixes are byte ranges, as in SQLite.
    """CREATE TABLE jobs (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id TEXT COLLATE "C" NOT NULL UNIQUE,
        command TEXT NOT NULL,
        state TEXT NOT NULL,
        ready INTEGER,
        priority BIGINT NOT NULL DEFAULT 0,
        run_at DOUBLE PRECISION NOT NULL,
        max_retries BIGINT NOT NULL,
        timeout DOUBLE PRECISION,
        cwd TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        attempts BIGINT NOT NULL DEFAULT 0,
        runs BIGINT NOT NULL DEFAULT 0,
        waiting BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        worker_id TEXT,
        attempt_id BIGINT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    # Only claimable rows are in the claim index.
    "CREATE INDEX jobs_claim ON jobs (priority DESC, run_at, seq)"
    " WHERE ready = 1",
    "CREATE INDEX jobs_state ON jobs (state, seq)",
    """CREATE TABLE attempts (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        job_seq BIGINT NOT NULL,
        n BIGINT NOT NULL,
        worker_id TEXT,
        host TEXT,
        pgid BIGINT,
        proc_start TEXT,
        started_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        duration DOUBLE PRECISION,
        exit_code INTEGER,
        signal INTEGER,
        error TEXT,
        output TEXT,
        output_dropped BIGINT NOT NULL DEFAULT 0,
        due_at DOUBLE PRECISION)""",
    "CREATE INDEX attempts_job ON attempts (job_seq, n)",
    "CREATE INDEX attempts_ended ON attempts (ended_at)",
    """CREATE TABLE deps (
        job_seq BIGINT NOT NULL,
        dep_seq BIGINT NOT NULL,
        PRIMARY KEY (job_seq, dep_seq))""",
    "CREATE INDEX deps_dep ON deps (dep_seq)",
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        pid BIGINT NOT NULL,
        host TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL,
        beat BIGINT NOT NULL DEFAULT 0)""",
    "CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE counts (state TEXT, stripe INTEGER, n BIGINT NOT NULL,
        PRIMARY KEY (state, stripe))""",
    """CREATE TABLE totals (name TEXT, stripe INTEGER,
        value DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, stripe))""",
    """CREATE TABLE duration_buckets (le DOUBLE PRECISION, stripe INTEGER,
        n BIGINT NOT NULL, PRIMARY KEY (le, stripe))""",
    "INSERT INTO totals SELECT name, 0, 0 FROM (VALUES ('success'),"
    " ('failure'), ('timeout'), ('lost'), ('duration_sum')) AS t (name)",
    "INSERT INTO duration_buckets SELECT le, 0, 0 FROM (VALUES %s) AS b (le)"
    % ", ".join("(CAST('%r' AS DOUBLE PRECISION))" % le
                for le in DURATION_BUCKETS + (float("inf"),)),
    _PG_COUNT_JOBS % {"stripe": _PG_STRIPE_V1},
    "CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs REFERENCING"
    " NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_jobs()",
    "CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs REFERENCING"
    " OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_jobs()",
    "CREATE TRIGGER jobs_count_update AFTER UPDATE ON jobs REFERENCING"
    " OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION count_jobs()",
    _PG_COUNT_ATTEMPTS % {"stripe": _PG_STRIPE_V1},
    "CREATE TRIGGER attempts_finish AFTER UPDATE ON attempts REFERENCING"
    " OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT"
    " EXECUTE FUNCTION count_attempts()",
)

# Version 2: SPEC 10 (long-lived queues), in three parts, as in SQLite.
_PG_V2_CONTROL = (     # cancel, retry, logs --follow, retention
    """CREATE TABLE cancels (
        attempt_id BIGINT PRIMARY KEY,
        job_seq BIGINT NOT NULL,
        requested_at DOUBLE PRECISION NOT NULL)""",
)
_PG_V2_QUEUES = (      # named queues with caps, unique jobs (as SQLite)
    "ALTER TABLE jobs ADD COLUMN queue TEXT COLLATE \"C\" NOT NULL"
    " DEFAULT 'default'",
    "ALTER TABLE jobs ADD COLUMN unique_key TEXT",
    """CREATE TABLE queues (
        name TEXT COLLATE "C" PRIMARY KEY,
        concurrency BIGINT,
        paused INTEGER NOT NULL DEFAULT 0)""",
    # Striped like counts.
    """CREATE TABLE queue_counts (queue TEXT COLLATE "C", state TEXT,
        stripe INTEGER, n BIGINT NOT NULL,
        PRIMARY KEY (queue, state, stripe))""",
    _PG_COUNT_QUEUE_JOBS % {"stripe": _PG_STRIPE_V1},
    "CREATE TRIGGER jobs_queue_insert AFTER INSERT ON jobs FOR EACH ROW"
    " WHEN (NEW.queue <> 'default') EXECUTE FUNCTION count_queue_jobs()",
    "CREATE TRIGGER jobs_queue_delete AFTER DELETE ON jobs FOR EACH ROW"
    " WHEN (OLD.queue <> 'default') EXECUTE FUNCTION count_queue_jobs()",
    "CREATE TRIGGER jobs_queue_update AFTER UPDATE OF state ON jobs FOR EACH"
    " ROW WHEN (OLD.state <> NEW.state AND NEW.queue <> 'default')"
    " EXECUTE FUNCTION count_queue_jobs()",
    "CREATE TABLE unique_keys (key TEXT PRIMARY KEY, job_seq BIGINT NOT NULL)",
    """CREATE FUNCTION free_unique_key() RETURNS trigger LANGUAGE plpgsql
    AS $$
    BEGIN
      IF TG_OP = 'DELETE' THEN
        DELETE FROM queuectl.unique_keys
          WHERE key = OLD.unique_key AND job_seq = OLD.seq;
      ELSE
        DELETE FROM queuectl.unique_keys
          WHERE key = NEW.unique_key AND job_seq = NEW.seq;
      END IF;
      RETURN NULL;
    END $$""",
    "CREATE TRIGGER jobs_unique_free AFTER UPDATE OF state ON jobs FOR EACH"
    " ROW WHEN (NEW.unique_key IS NOT NULL AND NEW.state IN ('completed',"
    " 'dead')) EXECUTE FUNCTION free_unique_key()",
    "CREATE TRIGGER jobs_unique_delete AFTER DELETE ON jobs FOR EACH ROW"
    " WHEN (OLD.unique_key IS NOT NULL) EXECUTE FUNCTION free_unique_key()",
)
_PG_V2_SCHEDULES = (     # recurring jobs; see _SCHEMA_V3_SCHEDULES
    """CREATE TABLE schedules (
        name TEXT COLLATE "C" PRIMARY KEY,
        cron TEXT,
        every DOUBLE PRECISION,
        job TEXT NOT NULL,
        overlap INTEGER NOT NULL DEFAULT 0,
        next_run DOUBLE PRECISION NOT NULL,
        last_job TEXT COLLATE "C",
        last_run DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX schedules_next_run ON schedules (next_run)",
)

# Version 3: a stripe of its own per session (see _PG_STRIPE).  A session
# that never took one (an older queuectl, psql) writes to stripes below 0.
_PG_V3_STRIPES = (
    "CREATE FUNCTION stripe() RETURNS INTEGER LANGUAGE sql STABLE AS $$"
    " SELECT COALESCE(CAST(NULLIF(current_setting('queuectl.stripe', true),"
    " '') AS INTEGER), -1 - pg_backend_pid() % 16) $$",
) + tuple(text % {"stripe": _PG_STRIPE} for text in (
    _PG_COUNT_JOBS, _PG_COUNT_ATTEMPTS, _PG_COUNT_QUEUE_JOBS))

#: _PG_MIGRATIONS[v] brings schema queuectl from version v to v + 1.
_PG_MIGRATIONS = {1: _PG_V2_CONTROL + _PG_V2_QUEUES + _PG_V2_SCHEDULES,
                  2: _PG_V3_STRIPES}


def open_store(address=None, clock=time.time):
    """The store for a database address: a postgresql:// (or postgres://)
    URL, or a file path (default: $QUEUECTL_DB or ~/.queuectl/queue.db).
    `clock` gives unix time (tests fake it); PostgreSQL corrects it by the
    server's clock."""
    address = _store_address(address)
    scheme = "://" in address and re.match(
        r"^([A-Za-z][A-Za-z0-9+.-]*)://", address)
    if not scheme:
        return _SQLiteStore(address, clock)
    if scheme.group(1).lower() in ("postgresql", "postgres"):
        # Schemes are case-insensitive; libpq takes lower case only.
        return _PostgresStore(scheme.group(1).lower() + address[
            len(scheme.group(1)):], clock)
    raise InvalidInput("unsupported database URL scheme '%s://': give a file"
                       " path or a postgresql:// URL" % scheme.group(1))


def _store_address(address):
    """A database address as open_store takes it (None: the default), with
    a file path made absolute now, as a program may chdir later."""
    if address is None:
        address = default_db_path()
    if hasattr(address, "__fspath__"):  # a pathlib.Path
        address = os.fspath(address)
    if not isinstance(address, str):
        raise InvalidInput("the database must be a file path or a"
                           " postgresql:// URL as text, got %s"
                           % type(address).__name__)
    if not address.strip():
        # `--db "$UNSET"` must not fall back to the default queue.
        raise InvalidInput("the database path is empty: give a file path or"
                           " a postgresql:// URL")
    if "://" in address:
        return address
    return os.path.abspath(os.path.expanduser(address))


def default_db_path():
    """$QUEUECTL_DB (set but empty counts as unset, as XDG's variables do),
    else ~/.queuectl/queue.db."""
    return _utf8_text(os.path.expanduser(
        os.environ.get("QUEUECTL_DB") or DEFAULT_DB), "$QUEUECTL_DB")


###############################################################################
# Queue API ###################################################################
###############################################################################

def _job_dict(row, deps=None):
    (seq, job_id, command, state, priority, run_at, max_retries, timeout, cwd,
     env, attempts, runs, last_error, worker_id, _attempt, created, updated,
     waiting) = row[:18]
    job = {
        "id": job_id, "command": command, "state": state,
        "priority": priority, "run_at": iso(run_at),
        "max_retries": max_retries, "timeout": timeout, "cwd": cwd,
        "env": json.loads(env), "attempts": attempts,
        "last_error": last_error, "created_at": iso(created),
        "updated_at": iso(updated), "worker": worker_id,
        "queue": row[18], "unique_key": row[19],
    }
    if deps is not None:
        job["after"] = deps
        job["waiting_for"] = waiting
    return job


def _attempt_dict(row):
    keys = [c.strip() for c in _ATTEMPT_COLUMNS.split(",")]
    record = dict(zip(keys, row))
    record["attempt"] = record.pop("n")
    record["worker"] = record.pop("worker_id")
    record["started_at"] = iso(record["started_at"])
    record["ended_at"] = iso(record["ended_at"])
    return record


class Queue(object):
    """The job queue in a store.  One Queue per thread.

    Ids given to methods may be unambiguous prefixes.  Errors are raised as
    InvalidInput, NotFound, Conflict or StoreError (all QueueError).
    """

    def __init__(self, path=None, now=time.time):
        self.store = open_store(path, now)
        self.address = self.store.address  # to open more stores with
        self.path = self.store.display      # to show
        self.now = self.store.now

    def close(self):
        self.store.close()

    # -- adding jobs --------------------------------------------------------

    def enqueue(self, spec):
        """Add one job (a dict of SPEC fields); return its id."""
        return self.enqueue_many([spec])[0]

    def enqueue_many(self, specs, duplicates=None):
        """Add jobs all or nothing, in one transaction; return their ids.

        A job whose unique_key a pending, failed or processing job holds
        (or an earlier job of specs) is not added: its id in the answer is
        that job's, and `duplicates` (a list, if given) gets True for it."""
        if not isinstance(specs, list):
            raise InvalidInput("expected a JSON object or an array of objects")
        if not specs:
            raise InvalidInput("no jobs in input")
        now, cwd = self.now(), _current_folder()
        # Validated before the write lock is taken: a big file must not
        # hold up the workers while it is checked.
        config = self.store.config()
        jobs, afters = [], []
        for index, spec in enumerate(specs):
            try:
                jobs.append(_validate_job(spec, config, now, cwd))
                afters.append(_job_after(spec))
            except InvalidInput as exc:
                if len(specs) == 1:
                    raise
                raise InvalidInput("job %d: %s" % (index + 1, exc))
        return self.store.insert_jobs(jobs, afters, now, duplicates)

    # -- reading ------------------------------------------------------------

    def resolve(self, prefix):
        """An id or unambiguous id prefix -> the full id."""
        return self.store.resolve(prefix)[1]

    def get(self, job_id, runs=False):
        """The job as a dict; with runs=True, its attempt records too."""
        row, deps, attempts = self.store.job(job_id, runs)
        job = _job_dict(row, deps)
        if runs:
            job["runs"] = [_attempt_dict(r) for r in attempts]
        return job

    def output(self, job_id, attempt=None):
        """(text, dropped bytes, attempt number) of a job's last or n-th run."""
        row = self.store.output(job_id, attempt)
        if row is None:
            raise NotFound("job '%s' has no attempt %s" % (
                job_id, attempt if attempt is not None else "yet"))
        return row[0] or "", row[1], row[2]

    def list(self, state=None, limit=100, offset=0, queue=None):
        """Jobs in enqueue order, optionally of one state or queue, paged."""
        if state is not None and state not in STATES:
            raise InvalidInput("unknown state '%s' (states: %s)"
                               % (state, ", ".join(STATES)))
        if queue is not None:
            _check_id(queue, "queue")
        return [_job_dict(row) for row in self.store.jobs(state, limit, offset,
                                                          queue)]

    def queues(self):
        """Every queue (SPEC 10): [{name, counts, concurrency, paused}],
        'default' first, then by name."""
        with self.store.read():
            return self._queues()

    def _queues(self):
        rows, counts, totals = self.store.queue_rows()
        found = {DEFAULT_QUEUE: (None, 0)}
        for name, cap, paused in rows:
            found[name] = (cap, paused)
        for name in counts:
            found.setdefault(name, (None, 0))
        default = dict(totals)
        for name, per_state in counts.items():
            for state in STATES:
                default[state] -= per_state[state]
        counts[DEFAULT_QUEUE] = default
        return [{"name": name, "concurrency": found[name][0],
                 "paused": bool(found[name][1]),
                 "counts": counts.get(name, dict.fromkeys(STATES, 0))}
                for name in sorted(found, key=lambda n: (n != DEFAULT_QUEUE,
                                                         n))]

    def set_queue_concurrency(self, name, limit):
        """Cap the jobs of queue `name` processing at once; 0 or None: no
        cap.  Creates the queue if need be."""
        _check_id(name, "queue")
        if limit is not None and not (_is_int(limit) and
                                      0 <= limit <= MAX_COUNT):
            raise InvalidInput("--concurrency must be an integer >= 0 or"
                               " 'none', got %s" % _short_repr(limit))
        self.store.set_queue(name, concurrency=limit or None)

    def set_queue_paused(self, name, paused):
        """Pause (workers claim none of its jobs) or resume queue `name`;
        creates it if need be, so a queue can be paused before its jobs
        come."""
        _check_id(name, "queue")
        self.store.set_queue(name, paused=int(bool(paused)))

    def counts(self):
        """{state: number of jobs} for all five states."""
        return self.store.counts()

    def workers(self):
        """Registered workers that look alive, oldest first."""
        return _live_workers(self.store.worker_rows(),
                             self.store.config()["lease-timeout"], self.now())

    def stats(self, since=3600.0):
        """Throughput, success, run and wait times (see `queuectl stats`)."""
        if not since > 0:
            raise InvalidInput("--since must be > 0")
        return self.store.stats(self.now(), since)

    def metrics(self):
        """The Prometheus text exposition of the queue's gauges/counters."""
        return _metrics_text(self.store.metric_samples(), self.now())

    def status(self):
        """Counts, live workers, the pause flag, the path and the last
        clean-up of old finished jobs (`status`)."""
        with self.store.read():
            config = self.store.config()
            at = config.get("_cleanup_at")
            return {"counts": self.counts(), "workers": self.workers(),
                    "paused": self.is_paused(), "db": self.path,
                    "queues": self._queues(),
                    "cleanup": {"last": iso(at) if at else None,
                                "deleted": config.get("_cleanup_removed"),
                                "took_seconds": config.get("_cleanup_took"),
                                "keep_completed": config["keep-completed"],
                                "keep_dead": config["keep-dead"]}}

    def is_paused(self):
        return bool(self.store.control()[1])

    # -- changing jobs ------------------------------------------------------

    def retry(self, job_ids):
        """Dead jobs back to pending with attempts reset; returns the ids."""
        return self.store.retry_dead(job_ids, self.now())

    def retry_all(self):
        """Every dead job back to pending; returns their ids."""
        return self.store.retry_all_dead(self.now())

    def delete(self, job_ids):
        """Delete jobs (and their attempts) that are not processing."""
        return self.store.delete(job_ids)

    def retry_finished(self, job_ids):
        """Completed or dead jobs run again, due now, attempts reset to 0,
        their attempt history kept (`retry`); returns the ids."""
        return self.store.retry_finished(job_ids, self.now())

    def cancel(self, job_ids):
        """Cancel jobs, all or none.  Pending or failed ones become dead
        ('cancelled') at once; processing ones are killed by their worker
        within about a second.  Returns {"cancelled": ids, "stopping": ids}.
        A completed or dead job raises Conflict."""
        dead, stopping = self.store.cancel(job_ids, self.now())
        return {"cancelled": dead, "stopping": stopping}

    def follow(self, job_id, interval=FOLLOW_INTERVAL):
        """Yield a job's output as its attempts produce it, until it is
        completed or dead: ("attempt", n, worker, host) when an attempt
        starts, ("output", text) as text arrives, ("skipped", count) when
        the saved tail moved past unread characters, ("end", state)."""
        seq = self.store.resolve(job_id)[0]
        shown_n, shown = None, 0  # attempt shown, characters printed of it
        while True:
            state, attempt = self.store.follow(seq)
            if state is None:
                raise NotFound("job '%s' was deleted" % job_id)
            if attempt is not None:
                n, worker, host, ended, output, dropped = attempt
                if n != shown_n:
                    if shown_n is not None:  # the rest of the one before
                        last = self.store.output(job_id, shown_n)
                        for event in _new_output(last, shown):
                            yield event
                    shown_n, shown = n, 0
                    yield ("attempt", n, worker, host)
                for event in _new_output((output, dropped), shown):
                    yield event
                shown = max(shown, (dropped or 0) + len(output or ""))
            if state in ("completed", "dead") and (
                    attempt is None or attempt[3] is not None):
                yield ("end", state)
                return
            time.sleep(interval)

    def purge(self, state, older_than=0.0, vacuum=False):
        """Delete completed or dead jobs last updated `older_than` s ago."""
        if state not in ("completed", "dead"):
            raise InvalidInput("purge takes --state completed or dead, got '%s'"
                               % state)
        count = self.store.purge(state, self.now() - older_than)
        if vacuum:
            self.store.vacuum()
        return count

    # -- config and control -------------------------------------------------

    def config(self):
        """{key: value} of every setting, defaults included."""
        values = self.store.config()
        return dict((k, v) for k, v in values.items() if k in CONFIG_DEFAULTS)

    def config_get(self, key):
        key = config_key(key)
        return self.config()[key]

    def config_set(self, key, value):
        key = config_key(key)
        number = config_value(key, value)
        self.store.set_config(key, number)
        return number

    def request_stop(self):
        """Ask every worker running now to finish its jobs and exit."""
        self.store.bump("_stop_seq")

    def set_paused(self, paused):
        self.store.set_config("_paused", int(paused))
        if not paused:
            self.store.wake()

    def copy_to(self, address):
        """Copy every job (attempts, output, dependencies), the config and
        the counters into the empty store at `address`, in one transaction
        there.  Returns the number of jobs copied."""
        if address is None:  # not the default queue, unasked
            raise InvalidInput("copy needs a target database")
        if self.workers():
            raise Conflict("workers are running on %s; stop them first"
                           " (queuectl worker stop --wait)" % self.path)
        target = open_store(address)
        try:
            if target.address == self.address:
                raise InvalidInput("--to names the database being copied")
            if not target.is_empty():
                raise Conflict("%s already holds jobs, queues or settings;"
                               " copy only into an empty database"
                               % target.display)
            # One snapshot of the source, read as the target writes.
            written = None
            try:
                with self.store.read():
                    written = target.import_all(*self.store.export())
            except StoreError:
                if written is None:
                    raise
                # The copy is committed; only ending the snapshot, which
                # changed nothing, failed (the server went away).
        finally:
            target.close()
        return written["jobs"]

    # -- schedules (recurring jobs) -----------------------------------------

    def schedule_add(self, name, spec, cron=None, every=None, overlap=False):
        """Add a recurring job: `spec` as enqueue takes it, run on the cron
        expression (local time) or every `every` seconds; the schedule."""
        _check_schedule_name(name)
        if (cron is None) == (every is None):
            raise InvalidInput("give a cron expression or --every, not both"
                               if cron is not None else
                               "give a cron expression or --every DURATION")
        if every is not None and not (_is_number(every)
                                      and 1 <= every <= MAX_SECONDS):
            raise InvalidInput("--every must be at least 1s and at most 1e9"
                               " seconds, got %r" % (every,))
        parsed = _Cron(cron) if cron is not None else None
        template = _schedule_template(spec, self.store.config(), self.now())
        now = self.now()
        if parsed is not None:
            first = next_tick(parsed, now)
            if first is None:
                raise InvalidInput("cron: %s never happens (day of month and"
                                   " month never meet)" % _short_repr(cron))
        else:
            first = now + every
        self.store.add_schedule((name, parsed and parsed.text, every,
                                 json.dumps(template, sort_keys=True),
                                 1 if overlap else 0, first, now))
        return self.schedules(name)[0]

    def schedules(self, name=None):
        """Every schedule (or the one named) as a dict, by name."""
        rows = self.store.schedules(name)
        if name is not None and not rows:
            raise NotFound("no schedule named '%s'" % name)
        return [_schedule_dict(row) for row in rows]

    def schedule_remove(self, name):
        _check_schedule_name(name)
        self.store.remove_schedule(name)

    def schedule_run(self, name):
        """Enqueue one job of the schedule now; its id."""
        _check_schedule_name(name)
        return self.store.run_schedule(name, self.now())

    def wait(self, job_ids, timeout=None, interval=0.1):
        """Block until every job is completed or dead.

        Returns {id: state}; raises TimeoutError after `timeout` seconds and
        NotFound if a job is deleted while waited for.
        """
        if timeout is not None and not _is_number(timeout):
            raise InvalidInput("timeout must be a number of seconds, got %s"
                               % _short_repr(timeout))
        seqs = dict(self.store.resolve(i) for i in _id_list(job_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            states = self.store.states(seqs)
            gone = [seqs[s] for s in seqs if s not in states]
            if gone:
                raise NotFound("job '%s' was deleted" % gone[0])
            if all(s in ("completed", "dead") for s in states.values()):
                return dict((seqs[s], states[s]) for s in seqs)
            if deadline is not None and time.monotonic() >= deadline:
                waiting = [seqs[s] for s in seqs
                           if states[s] not in ("completed", "dead")]
                raise TimeoutError("timed out after %s; %d job(s) not"
                                   " finished: %s%s" % (
                                       _seconds_text(timeout), len(waiting),
                                       ", ".join(waiting[:10]),
                                       ", ..." if len(waiting) > 10 else ""))
            time.sleep(interval)


def _id_list(ids):
    """A list of job ids from the library: a lone id would be taken letter
    by letter, each letter a prefix of other jobs (`delete("ab")`)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidInput("job ids must be a list of ids, got %s"
                           % _short_repr(ids))
    return ids


def _new_output(row, shown):
    """Events for the part of a saved tail (output, dropped bytes) past the
    `shown` characters already printed of that attempt."""
    if row is None:
        return []
    output, dropped = row[0] or "", row[1] or 0
    events = []
    if shown < dropped:
        events.append(("skipped", dropped - shown))
        shown = dropped
    if dropped + len(output) > shown:
        events.append(("output", output[shown - dropped:]))
    return events


def _check_schedule_name(name):
    if not isinstance(name, str) or not re.match(_ID_RE, name) \
            or len(name) > SCHEDULE_NAME_MAX:
        raise InvalidInput("a schedule name is 1 to %d of A-Z a-z 0-9 . _ :"
                           " -, got %s" % (SCHEDULE_NAME_MAX,
                                           _short_repr(name)))


#: Job fields a schedule's template may not set: each tick is a new job.
_NOT_IN_SCHEDULES = {"id": "each tick makes a new job, named NAME:TIME",
                     "run_at": "the schedule says when",
                     "after": "each tick is a new job; ids it waits on"
                              " would be met once"}


def _schedule_template(spec, config, now):
    """A job spec checked as enqueue checks it, with cwd made absolute."""
    if not isinstance(spec, dict):
        raise InvalidInput("a job must be a JSON object")
    for field, why in sorted(_NOT_IN_SCHEDULES.items()):
        if field in spec:
            raise InvalidInput("a schedule's job cannot set %s: %s"
                               % (field.replace("_", "-"), why))
    template = dict(spec)
    template["cwd"] = _validate_job(spec, config, now, _current_folder()).cwd
    return template


def _schedule_dict(row):
    name, cron, every, job, overlap, next_run, last_job, last_run, \
        created_at, state = row
    return {"name": name, "cron": cron, "every": every,
            "job": json.loads(job), "overlap": bool(overlap),
            "next_run": iso(next_run), "last_job": last_job,
            "last_job_state": state if last_job else None,
            "last_run": iso(last_run), "created_at": iso(created_at)}


def config_key(key):

    """Accept 'max_retries' or 'max-retries'; refuse unknown keys."""
    canonical = str(key).replace("_", "-")
    if canonical not in CONFIG_DEFAULTS:
        raise InvalidInput("unknown config key '%s' (keys: %s)"
                           % (key, ", ".join(sorted(CONFIG_DEFAULTS))))
    return canonical


def config_value(key, text):
    """Parse and check a config value given as text."""
    kind, minimum, exclusive, maximum, what = _CONFIG_RULES[key]
    try:
        if kind == "duration":
            value = parse_duration(text)
        elif isinstance(text, str):
            value = _parse_number(text, kind)
        elif _is_int(text) or (kind is float and _is_number(text)):
            value = text  # from the Python API
        else:
            raise ValueError
        if not _finite(value):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput("%s must be %s, got %r" % (key, what,
                                                      _clipped(text)))
    if (value < minimum or (exclusive and value == minimum)
            or value > maximum):
        raise InvalidInput("%s must be %s, got %r" % (key, what,
                                                      _clipped(text)))
    return int(value) if float(value).is_integer() else value


def _live_workers(rows, lease_timeout, now):
    """The registered workers that look alive: on this host, their process
    exists; on others, they beat within the last two leases."""
    host = _host()
    stale = now - 2 * lease_timeout
    live = []
    for wid, pid, whost, started, heartbeat, job in rows:
        alive = _pid_alive(pid) if whost == host else heartbeat >= stale
        if alive:
            live.append({"id": wid, "pid": pid, "host": whost,
                         "started_at": iso(started),
                         "heartbeat": iso(heartbeat), "job": job})
    return live


def _metrics_text(samples, now):
    """Prometheus text format, version 0.0.4, from Store.metric_samples()."""
    lines = []

    def metric(name, kind, text, samples):
        lines.append("# HELP %s %s" % (name, text))
        lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            lines.append("%s%s %s" % (name, labels, _metric_value(value)))
    counts, totals = samples["counts"], samples["totals"]
    per_queue = dict(samples["queue_counts"])
    per_queue[DEFAULT_QUEUE] = dict(
        (s, counts[s] - sum(c[s] for c in samples["queue_counts"].values()))
        for s in STATES)
    metric("queuectl_jobs", "gauge", "Jobs by queue and state.",
           [('{queue="%s",state="%s"}' % (q, s), per_queue[q][s])
            for q in sorted(per_queue) for s in STATES])
    metric("queuectl_attempts_total", "counter",
           "Finished attempts by result.",
           [('{result="%s"}' % r, totals.get(r, 0))
            for r in ("success", "failure", "timeout", "lost")])
    workers = _live_workers(samples["workers"],
                            samples["config"]["lease-timeout"], now)
    metric("queuectl_workers", "gauge", "Live worker threads.",
           [("", len(workers))])
    metric("queuectl_paused", "gauge", "1 while workers claim nothing new.",
           [("", samples["paused"])])
    buckets = samples["buckets"]
    samples = [('_bucket{le="%s"}' % ("+Inf" if le == float("inf") else
                                      _number_text(le)), n)
               for le, n in buckets]
    lines.append("# HELP queuectl_run_duration_seconds Run time of finished"
                 " attempts.")
    lines.append("# TYPE queuectl_run_duration_seconds histogram")
    for suffix, value in samples + [("_sum", totals.get("duration_sum", 0)),
                                    ("_count", buckets[-1][1])]:
        lines.append("queuectl_run_duration_seconds%s %s"
                     % (suffix, _metric_value(value)))
    return "\n".join(lines) + "\n"


def _metric_value(value):
    """Every digit (repr): "%g" kept six, so a sum of run time past about
    1e6 s stood still for many scrapes, and rates of it read zero."""
    return ("%d" % value) if float(value).is_integer() else repr(float(value))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


###############################################################################
# Job execution ###############################################################
###############################################################################


def _process_start(pid):
    """Something that tells this process apart from a later one with its pid."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            # Field 22, counted after the parenthesised command name.
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        pass
    if sys.platform.startswith("linux"):
        return None
    import subprocess
    try:
        out = subprocess.check_output(["ps", "-o", "lstart=", "-p", str(pid)],
                                      stderr=subprocess.DEVNULL)
        return out.decode().strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _parent_pid(pid):
    """The parent of process pid (Linux), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_group(pgid, grace=KILL_GRACE, proc=None):
    """SIGTERM a process group, then SIGKILL whatever is left after `grace`."""
    import signal
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()  # reap our own child, or it lingers as a zombie
        if not group_alive(pgid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid):
    """Does the process group still have a member that is not a zombie?"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): zombies count as alive
    # Orphaned zombies wait for init to reap them, which can take a while in
    # a container; they must not hold up a kill for the whole grace period.
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _keep_tail(tail, chunk, limit):
    """Append chunk to the bytearray tail, keeping its last `limit` bytes."""
    tail += chunk
    excess = len(tail) - limit
    if excess > 0:
        del tail[:excess]
        return excess
    return 0


def _decode_output(tail, dropped):
    """The kept tail (bytes, `dropped` of the job's bytes before it) as
    text, bad bytes replaced; and the job's bytes dropped in all.  Counts
    are of the job's bytes, not of the text (a bad byte is one, though its
    U+FFFD is three in UTF-8); a character that the cut split is dropped
    whole rather than shown as U+FFFD."""
    start = 0
    if dropped:
        while start < min(3, len(tail)) and 0x80 <= tail[start] < 0xC0:
            start += 1
    return bytes(tail[start:]).decode("utf-8", "replace"), dropped + start


def _exits_within(proc, seconds):
    """True once proc has exited, False after `seconds` if it has not.

    What Popen.wait(seconds) does, but Popen.wait sleeps 1 ms before its
    second look: when a job's pipe ends, its shell is still exiting for
    some microseconds, so that millisecond was most of a short job's time
    (about 1 ms per job of `true`, measured).  This looks again after 50
    us, then backs off to 50 ms.  (Where Linux gives a pidfd, _follow
    waits on that instead, and the exit wakes it.)"""
    end = time.monotonic() + seconds
    delay = 0.00005
    while proc.poll() is None:
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
    return True


def _pidfd(pid):
    """A file descriptor that polls readable when child `pid` exits, or
    None (no os.pidfd_open before Python 3.9, none on macOS or Linux < 5.3)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:
        return None


def signal_name(number):
    import signal
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


class _Execution(object):
    """One run of a job's command: spawn, read a bounded tail, wait."""

    def __init__(self, job, output_limit, on_long_run, base_env=None,
                 on_output=None, spawn_folder=None):
        self.job = job
        self.output_limit = output_limit
        self.on_long_run = on_long_run  # called once with the process
        # Called with (tail, dropped) at most every TAIL_SAVE_EVERY seconds
        # while new output came, never in the first such interval.
        self.on_output = on_output
        self.base_env = base_env if base_env is not None else os.environb
        # The worker's own folder (_SpawnFolder) when jobs that run in it
        # may be started by _spawn_shell (see _direct_spawn_folder).
        self.spawn_folder = spawn_folder
        self.proc = None

    def run(self):
        """Returns (exit_code, signal, error, output, dropped bytes, pgid)."""
        job, script = self.job, None
        try:
            # Bytes, not text: Popen would encode text with the locale's
            # encoding, which is ASCII for Python 3.6 under LANG=C.
            # "--": a command that starts with - or + is a command, not
            # more options for sh (POSIX lets -c be followed by options).
            argv = [b"/bin/sh", b"-c", b"--", job.command.encode("utf-8")]
            extras = self._job_environment()
            if len(argv[3]) > LONG_COMMAND:
                script = _write_script(job.command)
                argv = ["/bin/sh", "-c", '. "$0"', script]
            cwd = job.cwd.encode("utf-8")
            if self.spawn_folder is not None \
                    and self.spawn_folder.serves(cwd):
                self.proc = _spawn_shell(argv, self.base_env, extras)
            if self.proc is None:
                import subprocess
                env = dict(self.base_env)
                env.update(extras)
                self.proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=_devnull(),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True)
        except Exception as exc:  # whatever it is, it ends this attempt only
            _remove(script)
            return (None, None, "cannot start: %s" % _start_error(exc, job),
                    "", 0, None)
        try:
            tail, dropped, timed_out = self._read_output()
        finally:
            self.proc.stdout.close()
            _remove(script)
        code = self.proc.wait()
        report = getattr(self.proc, "report", None)  # Popen has none
        failure = report.failure() if code == 255 and report else None
        if failure is not None:
            return (None, None, "cannot start: %s" % _start_error(failure, job),
                    "", 0, None)
        output, dropped = _decode_output(tail, dropped)
        if timed_out:
            error = "timed out after %s" % _seconds_text(job.timeout)
        elif code < 0:
            error = "killed by %s" % signal_name(-code)
        elif code > 0:
            error = "exit code %d" % code
        else:
            error = None
        return (code if code >= 0 else None, -code if code < 0 else None,
                error, output, dropped, self.proc.pid)

    def _job_environment(self):
        """What the job adds to the worker's environment (bytes: bytes)."""
        job = self.job
        env = {}
        if job.env != "{}":
            for key, value in json.loads(job.env).items():
                env[key.encode("utf-8")] = value.encode("utf-8")
        env[b"QUEUECTL_JOB_ID"] = job.id.encode()
        env[b"QUEUECTL_ATTEMPT"] = b"%d" % job.attempts
        return env

    def _read_output(self):
        """Keep the output's tail until the shell exits or times out.

        A job's lifetime is its process, not its pipe: a job that closes or
        redirects its output early still times out, still has its group
        recorded (on_long_run) and can still be killed by a forced stop.
        Where Linux gives a pidfd (Python 3.9+), one poll() wakes at output
        and at the exit alike; elsewhere each poll() is followed by a look
        at the process, and once the pipe has ended the process is
        followed on its own (_exits_within).
        """
        import select
        proc = self.proc
        exit_fd = _pidfd(proc.pid)
        poller = select.poll()
        poller.register(proc.stdout.fileno(), select.POLLIN)  # and HUP, ERR
        if exit_fd is not None:
            poller.register(exit_fd, select.POLLIN)
        try:
            return self._follow(poller, exit_fd)
        finally:
            if exit_fd is not None:
                os.close(exit_fd)

    def _follow(self, poller, exit_fd):
        """_read_output's loop: poller watches the pipe, and exit_fd (a
        pidfd, or None) too."""
        proc, limit = self.proc, self.output_limit
        fd = proc.stdout.fileno()
        started = time.monotonic()
        deadline = started + self.job.timeout if self.job.timeout else None
        tail, dropped, reported, pipe_open = bytearray(), 0, False, True
        saved_at, unsaved = started, False
        while True:
            now = time.monotonic()
            if not reported and now - started >= RECORD_GROUP_AFTER:
                reported = True
                self.on_long_run(proc)
            wait = RECORD_GROUP_AFTER if not reported else 1.0
            if unsaved and self.on_output is not None:
                if now - saved_at >= TAIL_SAVE_EVERY:
                    self.on_output(tail, dropped)
                    saved_at, unsaved = time.monotonic(), False
                else:
                    wait = min(wait, saved_at + TAIL_SAVE_EVERY - now)
            if deadline is not None:
                if now >= deadline:
                    kill_group(proc.pid, proc=proc)
                    return tail, dropped, True
                wait = min(wait, deadline - now)
            if not pipe_open and exit_fd is None:
                if _exits_within(proc, wait):
                    return tail, dropped, False
                continue
            ready = [found for found, _ in poller.poll(wait * 1000)]
            if exit_fd in ready or (exit_fd is None
                                    and proc.poll() is not None):
                # The shell has exited.  A background child may hold the
                # pipe, even write on: the job is over all the same, and the
                # child is left running.  What the shell wrote just before
                # it exited is still in the pipe (a red-team pass saw 2
                # jobs in 1,500 end with no output).
                if pipe_open:
                    if exit_fd is not None:
                        poller.unregister(exit_fd)
                    dropped += _drain(poller, fd, tail, limit)
                return tail, dropped, False
            if ready:  # the pipe: output, or its end
                chunk = os.read(fd, 65536)
                if chunk:
                    dropped += _keep_tail(tail, chunk, limit)
                    unsaved = True
                    continue
                pipe_open = False  # EOF: now follow the process itself
                poller.unregister(fd)


def _drain(poller, fd, tail, limit):
    """Read into tail what waits in the pipe fd (the one descriptor poller
    watches) as the shell has exited, and no more; returns the bytes
    dropped.  What a background child writes after that is not the job's
    output, and would push the shell's last lines out of the tail.  (A
    child that floods the pipe still can, before the exit is seen.)"""
    left, dropped = _bytes_waiting(fd), 0
    while left > 0 and poller.poll(0):
        chunk = os.read(fd, min(left, 65536))
        if not chunk:
            break
        left -= len(chunk)
        dropped += _keep_tail(tail, chunk, limit)
    return dropped


def _bytes_waiting(fd):
    """How many bytes the pipe fd holds now (FIONREAD); where that cannot
    be asked, 1 MiB (the most an unprivileged pipe holds on Linux)."""
    try:
        import fcntl
        import struct
        import termios
        answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", answer)[0]
    except (ImportError, AttributeError, OSError):
        return 1 << 20


def _direct_spawn_folder():
    """This process's folder (_SpawnFolder) when the jobs that run in it
    may be started by _spawn_shell, else None; for `worker start` only.

    Popen runs a page of Python for every job (the environment converted
    entry by entry, among others) and, before Python 3.10, forks the whole
    worker, whose pages then fault as the worker writes them: on 3.9 that
    was more CPU than a `true` job itself.  _direct_spawner's function
    (CPython's vfork, glibc's posix_spawn, or os.posix_spawn) does its work
    in C and vforks, but is called with no folder (so it serves jobs whose
    folder is the worker's own), and it does not close inherited
    descriptors as Popen's close_fds does: those above 2 are marked
    close-on-exec here, which is why a program that embeds WorkerPool (and
    may chdir or make descriptors inheritable) keeps Popen."""
    if _direct_spawner() is None:
        return None
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            fds = [int(name) for name in os.listdir(listing)]
        except (OSError, ValueError):
            continue
        for fd in fds:
            if fd > 2:
                with contextlib.suppress(OSError):  # the listing's own fd
                    os.set_inheritable(fd, False)
        try:
            folder = _folder_id(os.getcwdb())
        except OSError:  # the folder was removed
            return None
        return _SpawnFolder.watch(folder)
    return None


class _SpawnFolder(object):
    """The worker's own folder, and whether a job's folder is still it.

    Its path and inode tell most other folders apart (_folder_id), but not
    a mount over the same path: `mount --bind -o ro` of the folder onto
    itself leaves both alike, yet a job enqueued there must see the
    read-only view, and Popen, which changes into the folder by its path,
    gives it that.  So on Linux the mount table is watched (it polls
    POLLPRI when it changes, see proc(5)), and after any change every job
    goes through Popen."""

    def __init__(self, folder, mounts):
        self.folder = folder
        self.mounts = mounts  # /proc/self/mountinfo, open; None elsewhere
        self.remounted = False

    @classmethod
    def watch(cls, folder):
        if folder is None:
            return None
        if not sys.platform.startswith("linux"):
            return cls(folder, None)
        try:
            return cls(folder, os.open("/proc/self/mountinfo", os.O_RDONLY))
        except OSError:  # no /proc: a mount could not be seen
            return None

    def serves(self, cwd):
        """May the job whose folder is cwd (bytes) start in this one?"""
        if self.remounted or _folder_id(cwd) != self.folder:
            return False
        if self.mounts is not None:
            import select
            poller = select.poll()  # one per call: threads share the fd
            poller.register(self.mounts, select.POLLPRI)
            if poller.poll(0):
                self.remounted = True  # the event is seen once: keep it
        return not self.remounted


def _folder_id(path):
    """The folder at path (bytes) by name and by inode: the name tells two
    bind mounts of one folder apart (one may be read-only), the inode a
    folder removed and made again under the same name."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return path, found.st_dev, found.st_ino


def _spawn_shell(argv, base_env, extras):
    """Start a job's shell with _direct_spawner's function as Popen would
    start it in this folder: stdin from /dev/null, output and errors into
    one pipe, a new session, and the signals Python ignores back at their
    defaults (restore_signals), the environment base_env with extras over
    it.  None where it cannot: a standard descriptor is closed, or the
    spawner refuses (see below)."""
    stdin, spawner = _devnull(), _direct_spawner()
    read_end, write_end = os.pipe()
    pid = None
    try:
        if min(stdin, read_end, write_end) > 2:
            pid = spawner(argv, base_env, extras, stdin, write_end)
    except (NotImplementedError, ValueError):
        # No setsid (macOS before 10.15), or an environment entry Popen
        # takes and posix_spawn refuses (`env '=x=1'` gives the worker a
        # variable with an empty name): Popen starts this one.
        pass
    finally:
        os.close(write_end)
        if pid is None:
            os.close(read_end)
    if pid is None:
        return None
    report = getattr(spawner, "report_pipe", None)  # _VforkSpawn's only
    return _SpawnedShell(pid, read_end, report and report())


def _restored_signals():
    """The signals Python ignores and Popen's restore_signals undoes."""
    import signal
    return [getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
            if hasattr(signal, name)]


_DEFAULTED = []


def _signals_to_default():
    """The signals posix_spawn sets to SIG_DFL in a job's shell: those of
    _restored_signals, and every other one that is not ignored here.

    The others lose nothing by it (exec resets a caught signal, and one at
    SIG_DFL stays there), and halve the system calls of glibc's child
    before exec: it asks a signal outside the set for its disposition, then
    sets it; one inside it is only set.  126 rt_sigaction calls a job
    became 69, and a `true` job's CPU went from 613 to 601 us (strace;
    getrusage, median of 8 alternating rounds; glibc 2.36).  A signal
    ignored here stays ignored in the job (nohup stays nohup).  Worked out
    once: queuectl never ignores a signal later, and a handler set later
    is reset by glibc anyway."""
    if not _DEFAULTED:
        import signal
        restored = _restored_signals()
        others = []
        for number in range(1, signal.NSIG):
            if number in restored or number in (signal.SIGKILL,
                                                signal.SIGSTOP):
                continue
            try:
                handler = signal.getsignal(number)
            except (ValueError, OSError):
                continue  # not a signal here
            # None: a handler not set from Python, or a number libc keeps
            # for itself (glibc's 32 and 33): left to posix_spawn.
            if handler is not None and handler != signal.SIG_IGN:
                others.append(number)
        _DEFAULTED.append(restored + others)
    return _DEFAULTED[0]


_SPAWNER = []


def _direct_spawner():
    """The function _spawn_shell starts shells with, or None: CPython's own
    vfork (_VforkSpawn) on Linux with Python 3.11.6 to 3.13, else glibc's
    posix_spawn through ctypes (_LibcSpawn) where it can, else
    os.posix_spawn on Python 3.8+ (the first with setsid)."""
    if not _SPAWNER:
        spawner = _VforkSpawn.load() or _LibcSpawn.load()
        if spawner is None and sys.version_info >= (3, 8) \
                and hasattr(os, "posix_spawn"):
            spawner = _os_posix_spawn
        _SPAWNER.append(spawner)
    return _SPAWNER[0]


def _os_posix_spawn(argv, base_env, extras, stdin, output):
    env = dict(base_env)
    env.update(extras)
    dup2 = os.POSIX_SPAWN_DUP2  # novermin (3.8+, which _direct_spawner checks)
    return os.posix_spawn(  # novermin
        argv[0], argv, env, setsid=True, setsigdef=_signals_to_default(),
        file_actions=[(dup2, stdin, 0), (dup2, output, 1), (dup2, output, 2)])


class _LibcSpawn(object):
    """glibc's posix_spawn, called through ctypes: what os.posix_spawn
    does, without holding the GIL.

    os.posix_spawn holds the GIL until the child has exec'd (as Popen did
    before Python 3.11.6), so the worker's other threads wait out every
    spawn; through ctypes they run on.  Measured end-to-end (2,000 `true`
    jobs, two threads, a 2-core machine), alternating in one run: 1,965
    against 1,648 jobs/s on Python 3.12, 5-19% more on every Python from
    3.8 to 3.13 (README, Performance).  On 3.6 and 3.7 it is the only way not
    to fork the whole worker for each job: os.posix_spawn is new in 3.7
    and cannot start a new session before 3.8 (on 3.6, 2,187 us of CPU
    per `true` job against 1,141 with this, and 428 page faults against
    64).  Linux with glibc 2.26+ only (the first with POSIX_SPAWN_SETSID;
    the flag values below are glibc's); load() gives None elsewhere, and
    os.posix_spawn (3.8+) or Popen starts every job."""

    SETSIGDEF, SETSID = 0x04, 0x80  # glibc's <spawn.h>

    @classmethod
    def load(cls):
        try:
            name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
            major, minor = version.split(".")[:2]
            if name != "glibc" or (int(major), int(minor)) < (2, 26):
                return None
            import ctypes
            return cls(ctypes)
        except (AttributeError, ValueError, OSError, ImportError):
            return None  # not glibc, or a Python built without ctypes

    def __init__(self, ctypes):
        import array
        libc = ctypes.CDLL(None, use_errno=True)
        self.buffer, self.pid_of = ctypes.create_string_buffer, ctypes.byref
        self.pid_type = ctypes.c_int
        self.address_of = ctypes.addressof
        # argv and envp (char *[]) as an array.array of addresses: a ctypes
        # array of c_char_p spends about 2.5 us an entry on bookkeeping.
        code = [c for c in "ILQ" if array.array(c).itemsize
                == ctypes.sizeof(ctypes.c_void_p)][0]
        self.pointers = lambda addresses: array.array(code, addresses)
        # The pool's environment is the same for every job: its strings are
        # made once, (base_env, their buffer, {name: address}), and each
        # job adds its own few.
        self.base = None
        self.file_actions = {}
        # Looked up now, so a libc without them fails load(), not a job.
        self.spawn = libc.posix_spawn
        self.spawn.argtypes = [ctypes.c_void_p] * 6  # addresses pass as ints
        self.actions_init = libc.posix_spawn_file_actions_init
        self.add_dup2 = libc.posix_spawn_file_actions_adddup2
        # posix_spawnattr_t and sigset_t are opaque: glibc's are 336 and
        # 128 bytes; these buffers leave room to spare.  The attributes are
        # the same for every job and posix_spawn only reads them.
        self.attributes = self.buffer(1024)
        signals = self.buffer(1024)
        _check_errno(libc.posix_spawnattr_init(self.attributes))
        if libc.sigemptyset(signals) or any(
                libc.sigaddset(signals, number)
                for number in _signals_to_default()):
            raise OSError("cannot build a signal set")
        _check_errno(libc.posix_spawnattr_setsigdefault(self.attributes,
                                                        signals))
        _check_errno(libc.posix_spawnattr_setflags(
            self.attributes, ctypes.c_short(self.SETSIGDEF | self.SETSID)))

    def _strings(self, strings):
        """A buffer of these byte strings, each ending in NUL (the buffer
        must live until posix_spawn returns); and where each starts."""
        held = self.buffer(b"\0".join(strings))
        address, addresses = self.address_of(held), []
        for string in strings:
            addresses.append(address)
            address += len(string) + 1
        return held, addresses

    def __call__(self, argv, base_env, extras, stdin, output):
        argv = _argv_bytes(argv)
        # One tuple, replaced whole, and held here until the call returns:
        # two threads' first jobs may both build it, and neither may free
        # the strings the other's posix_spawn is reading.
        cached = self.base
        if cached is None or cached[0] is not base_env:
            entries = _env_entries(base_env)
            held, addresses = self._strings(list(entries.values()))
            cached = self.base = (base_env, held, dict(zip(
                entries, addresses)), self.pointers(addresses))
        base, envp = cached[2], cached[3]
        # argv and the job's own variables share one buffer (held in
        # `strings` until the call returns).
        strings, addresses = self._strings(
            argv + list(_env_entries(extras).values()))
        argvp = self.pointers(addresses[:len(argv)] + [0])
        if any(key in base for key in extras):  # the job's value wins
            envp = self.pointers(address for key, address in base.items()
                                 if key not in extras)
        envp = envp + self.pointers(addresses[len(argv):] + [0])
        pid = self.pid_type()
        _check_errno(self.spawn(  # ctypes releases the GIL meanwhile
            self.pid_of(pid), argv[0], self._file_actions(stdin, output),
            self.attributes, argvp.buffer_info()[0], envp.buffer_info()[0]))
        return pid.value

    def _file_actions(self, stdin, output):
        """The child's dup2s of stdin and the output pipe onto 0, 1 and 2.
        Made once per pair of descriptors (the kernel hands the same few
        numbers out again and again) and kept: posix_spawn only reads
        them, so threads may share them."""
        actions = self.file_actions.get((stdin, output))
        if actions is None:
            actions = self.buffer(1024)  # glibc's is 80 bytes
            _check_errno(self.actions_init(actions))
            for fd, target in ((stdin, 0), (output, 1), (output, 2)):
                _check_errno(self.add_dup2(actions, fd, target))
            actions = self.file_actions.setdefault((stdin, output), actions)
        return actions


class _VforkSpawn(object):
    """CPython's own vfork and exec, the C function Popen calls
    (_posixsubprocess.fork_exec), without Popen's page of Python; called
    as _spawn_shell calls _LibcSpawn, with the same result in the child.

    glibc's posix_spawn maps a new stack for every child and unmaps it once
    the child has exec'd.  In a process whose other threads run on other
    cores the unmap must interrupt those cores to flush their TLBs (and
    in a VM each interrupt sent is a trap to the hypervisor): by perf,
    over half of _LibcSpawn's time in a worker went to that unmap.  vfork
    runs the child on the caller's own stack.  Two threads spawning `sh -c
    true` this way used 94 against 130 us of their own CPU a job on 3.12
    (73 against 102 on 3.11, 78 against 108 on 3.13).

    fork_exec is private, its arguments changed in 3.9 and 3.11, and it
    holds the GIL while the child execs before 3.11.6: so it is used only
    on the Pythons whose argument list is known (checked once more: their
    subprocess still calls it and may vfork), else load() gives None."""

    @classmethod
    def load(cls):
        if not (sys.platform.startswith("linux")
                and (3, 11, 6) <= sys.version_info[:3] < (3, 14)):
            return None
        try:
            import _posixsubprocess
            import subprocess
        except ImportError:
            return None
        if getattr(subprocess, "_fork_exec", None) is not getattr(
                _posixsubprocess, "fork_exec", False) \
                or not getattr(subprocess, "_USE_VFORK", False):
            return None  # changed, or vfork turned off by its owner
        return cls(_posixsubprocess.fork_exec)

    def __init__(self, fork_exec):
        import threading
        self.fork_exec = fork_exec
        self.base = None  # (base_env, {name: b"name=value"}), made once
        self.threads = threading.local()  # each thread's _ReportPipe

    def __call__(self, argv, base_env, extras, stdin, output):
        argv = _argv_bytes(argv)
        cached = self.base
        if cached is None or cached[0] is not base_env:
            cached = self.base = (base_env, _env_entries(base_env))
        base, own = cached[1], _env_entries(extras)
        if any(key in base for key in own):  # the job's value wins
            env = [entry for key, entry in base.items() if key not in own]
        else:
            env = list(base.values())
        env.extend(own.values())
        # A child that cannot exec writes why on this thread's pipe and
        # exits 255; the pipe is read only then (_ReportPipe.failure), not
        # after every spawn: a pipe, a read and two closes per job, each
        # letting go of the GIL, cost more than the vfork saved.
        report = self.report_pipe()
        # Popen's arguments, in 3.11-3.13's order: no descriptor closed
        # (worker start made its own close-on-exec), no folder change,
        # stdin, stdout and stderr, the report pipe, restore_signals, a new
        # session, no process group, user, groups or umask, no
        # preexec_fn, vfork allowed.
        return self.fork_exec(
            argv, [argv[0]], False, (), None, env, stdin, -1, -1, output, -1,
            output, report.read_end, report.write_end, True, True, -1, None,
            None, None, -1, None, True)

    def report_pipe(self):
        """The calling thread's _ReportPipe: a thread spawns one child at
        a time, so what is on it is about that thread's last child."""
        report = getattr(self.threads, "report", None)
        if report is None:
            report = self.threads.report = _ReportPipe()
        return report


class _ReportPipe(object):
    """One worker thread's pipe for children that cannot exec: its write
    end is close-on-exec, so a child writes on it only if exec failed (and
    then exits 255); its read end does not block.  Closed with the
    thread's local data."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)

    def __del__(self, close=os.close):
        for fd in (self.read_end, self.write_end):
            try:
                close(fd)
            except OSError:
                pass

    def failure(self):
        """Why the last child could not exec (an OSError), or None if it
        did; asked only of a shell that exited 255.  The failed child had
        exited before its spawner returned: its report is here by then."""
        try:
            report = os.read(self.read_end, 4096)
        except BlockingIOError:
            return None
        # b"OSError:<errno in hex>:<where>", as Popen reads it.
        number = report.split(b":")[1:2]
        try:
            number = int(number[0], 16)
        except (IndexError, ValueError):
            number = 0
        if not number:
            return OSError("cannot run /bin/sh: %s" % report.decode(
                "ascii", "replace"))
        return OSError(number, os.strerror(number))


def _argv_bytes(argv):
    """argv as bytes, refused as posix_spawn refuses it."""
    argv = [os.fsencode(arg) for arg in argv]
    for arg in argv:
        if arg.find(b"\0") >= 0:  # not `in`: see _env_entries
            raise ValueError("embedded null byte")
    return argv


def _env_entries(env):
    """{name: b"name=value"}; refused as os.posix_spawn refuses them.
    find(), not `in`: `in` on bytes first tries its operand as an integer,
    and formats the error it then drops (3,400 instructions a test on 3.12:
    6% of a worker's own instructions per job, by callgrind)."""
    entries = {}
    for key, value in env.items():
        if not key or key.find(b"=") >= 0 or key.find(b"\0") >= 0 \
                or value.find(b"\0") >= 0:
            raise ValueError("illegal environment variable")
        entries[key] = key + b"=" + value
    return entries


def _check_errno(number):
    if number:
        raise OSError(number, os.strerror(number))


class _SpawnedShell(object):
    """What the worker uses of a Popen, for a shell from _spawn_shell."""

    def __init__(self, pid, read_end, report=None):
        self.pid = pid
        self.stdout = _PipeEnd(read_end)
        self.returncode = None
        # _VforkSpawn's _ReportPipe: if the shell exits 255, was it exec?
        self.report = report
        self._lock = _thread.allocate_lock()  # kill_group polls from others

    def poll(self):
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # SIGCHLD ignored: as Popen does
                    pid, status = self.pid, 0
                if pid:
                    self.returncode = (-os.WTERMSIG(status)
                                       if os.WIFSIGNALED(status)
                                       else os.WEXITSTATUS(status))
        return self.returncode

    def wait(self):
        while not _exits_within(self, 1.0):
            pass
        return self.returncode


class _PipeEnd(object):
    """The read end of a job's output pipe: what the worker uses of a
    file (os.fdopen makes a FileIO, with an fstat, for every job)."""

    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def close(self):
        os.close(self.fd)


_DEVNULL = []


def _devnull():
    """One /dev/null descriptor for every job's stdin (saves two syscalls)."""
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | getattr(
            os, "O_CLOEXEC", 0)))
    return _DEVNULL[0]


def _write_script(command):
    """A private file holding a command too long for one argv string."""
    import tempfile
    fd, path = tempfile.mkstemp(prefix="queuectl-", suffix=".sh")
    with os.fdopen(fd, "wb") as handle:
        handle.write(command.encode("utf-8"))
    return path


def _remove(path):
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _start_error(exc, job):
    cwd, reason = job.cwd.encode("utf-8"), _reason(exc)
    if isinstance(exc, OSError) and not os.path.isdir(cwd):
        # Python 3.6's Popen ends the reason with the folder's repr.
        repeated = (": %r" % cwd).lower()
        if reason.endswith(repeated):
            reason = reason[:-len(repeated)]
        return "cwd %s: %s" % (job.cwd, reason)
    return reason


###############################################################################
# Worker: claim, record, recover ##############################################
###############################################################################


def _allow_open_files(needed, count):
    """Raise this process's soft limit on open files to what `count`
    threads need, if the hard limit allows; else refuse the pool up front
    rather than fail thread by thread with 'unable to open database'."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft == infinite or soft >= needed:
        return
    if hard != infinite and hard < needed:
        raise InvalidInput("--count %d needs about %d open files; this process"
                           " may open %d (ulimit -n)" % (count, needed, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class _Reaper(object):
    """Finds dead workers and hands their jobs back to the queue.

    A worker is dead when its process is gone (same host), or when its beat
    counter has not moved for lease-timeout seconds of *our* monotonic clock:
    a wall clock that jumps cannot make a live worker look dead.
    """

    def __init__(self, own_ids):
        self.own_ids = set(own_ids)
        self.seen = {}  # worker id -> (beat, monotonic time first seen)

    def forget(self):
        """Start every lease afresh (after this process could not write)."""
        self.seen.clear()

    def dead_workers(self, workers, lease_timeout):
        """(ids of dead workers, ids of all registered) from worker rows."""
        host, mono = _host(), time.monotonic()
        dead, known = [], set(w[0] for w in workers)
        for wid in [w for w in self.seen if w not in known]:
            del self.seen[wid]  # gone: if it registers again, judge afresh
        for wid, pid, whost, beat in workers:
            if wid in self.own_ids:
                continue
            if whost == host and not _pid_alive(pid):
                dead.append(wid)
                continue
            first = self.seen.get(wid)
            if first is None or first[0] != beat:
                self.seen[wid] = (beat, mono)
            elif mono - first[1] >= lease_timeout:
                dead.append(wid)
        return dead, known

    def reap(self, store, log):
        """Recover the jobs of dead workers (killing their leftover
        processes on this host first), then forget those workers."""
        config = store.config()
        workers, processing = store.reaper_snapshot()
        dead, known = self.dead_workers(workers, config["lease-timeout"])
        pids = dict((w[0], w[1]) for w in workers)
        for claim, wid, host, pgid, start in processing:
            if wid in dead or wid not in known:
                if not _run_by_another_database(store, host, pids.get(wid),
                                                pgid):
                    _kill_orphans(host, pgid, start)
                state = store.recover(claim, config, store.now())
                if state:
                    log(wid, claim.id, "lost", "worker lost; now %s" % state)
        if dead:
            with store.write():
                store.unregister(dead)
            for wid in dead:
                self.seen.pop(wid, None)


def _run_by_another_database(store, host, worker_pid, pgid):
    """Is this run's process group the child of a live process that does
    not have this database open?  Then it is not an orphan of this queue:
    the database is a copy (`cp`, a backup restored) made while that worker
    ran, its worker row came along, and the job is the original's to run.
    (A frozen worker of this database has it open; an orphan of a dead one
    has lost its parent.)"""
    if host != _host() or not worker_pid or not pgid:
        return False
    return (_parent_pid(pgid) == worker_pid
            and store.opened_by(worker_pid) is False)


def _kill_orphans(host, pgid, start):
    """Kill a lost run's process group if it is still that run's."""
    if host != _host() or not pgid:
        return
    leader_start = _process_start(pgid)
    if leader_start is not None and leader_start != start:
        return  # the pid now belongs to someone else
    if group_alive(pgid):
        kill_group(pgid)


class _ThreadBatch(object):
    """A worker thread's claimed-but-unstarted jobs and unsaved results."""

    def __init__(self, retry_delay):
        self.queued = []
        self.claimed_at = None    # monotonic time of the last claim
        self.results = []
        self.first_result = None  # monotonic time the oldest result came
        self.retry_delay = retry_delay  # while the database fails
        self.busy = False         # counted in the pool's _busy
        self.polls = False        # holds the pool's _poll_turn
        self.seen = 0             # the pool's _seen_work when last looked
        self.doubt = False        # a failed write may have committed

    def add(self, job, result):
        if not self.results:
            self.first_result = time.monotonic()
        self.results.append((job, result))

    def results_due(self):
        return bool(self.results) and (
            time.monotonic() - self.first_result >= RESULT_DELAY)


class WorkerPool(object):
    """N worker threads in this process, sharing one stop flag.

    run() blocks until the pool stops and returns the exit status: 0 after
    a graceful stop (or idle exit, idle timeout, max_jobs), 1 after a forced
    stop or an error.

    idle_timeout: stop once S seconds passed with no job held by this pool
    and none it could claim (a job that falls due meanwhile is run, and the
    S seconds start again when it ends).  max_jobs: claim at most N jobs
    (runs) in all, finish them, and stop.  queues: names of the queues to
    claim from (default: all).
    """

    def __init__(self, path=None, count=1, poll_interval=None,
                 exit_when_idle=False, log=None, now=time.time,
                 idle_timeout=None, max_jobs=None, queues=None):
        import threading
        if not _is_int(count) or not 1 <= count <= MAX_WORKER_THREADS:
            raise InvalidInput("--count must be an integer from 1 to %d, got"
                               " %r" % (MAX_WORKER_THREADS, count))
        _allow_open_files(FILES_PER_POOL + FILES_PER_THREAD * count, count)
        if poll_interval is not None and not 0 < poll_interval <= 3600:
            raise InvalidInput("--poll-interval must be > 0 and <= 3600, got %r"
                               % poll_interval)
        if idle_timeout is not None and not (
                _is_number(idle_timeout) and idle_timeout > 0):
            raise InvalidInput("--idle-timeout must be a number of seconds"
                               " > 0, got %r" % idle_timeout)
        if max_jobs is not None and not (_is_int(max_jobs) and max_jobs >= 1):
            raise InvalidInput("--max-jobs must be an integer >= 1, got %r"
                               % max_jobs)
        if queues is not None:
            queues = _queue_names(queues)
        self.queues = queues
        # Resolved now, as Queue does: a program may chdir before run().
        self.address = self.path = _store_address(path)
        self.count = count
        self.poll_interval = poll_interval
        self.exit_when_idle = exit_when_idle
        self.idle_timeout = idle_timeout
        self.max_jobs = max_jobs
        self.exit_reason = None             # why the pool stopped by itself
        self.now = now
        self._log_lock = threading.Lock()
        self._log_stream = log
        self.stopping = threading.Event()   # claim nothing more
        self.forced = threading.Event()     # kill running jobs, requeue them
        self._finished = threading.Event()  # every worker thread has ended
        self._lock = threading.Lock()       # guards _running and _alive
        self._running = {}                  # worker id -> (process, job)
        self._alive = count                 # worker threads not yet ended
        self._drained = False               # a thread ended: nothing was due
        self._trouble = None                # why the database fails, if it does
        self.beat_ok = time.monotonic()     # the last beat that was written
        self.fenced = False                 # no job may start (see _fence_watch)
        self.lease_lost = False             # others recovered our jobs
        self.cancel_ids = frozenset()       # claims asked to stop (cancel),
                                            # replaced with every beat
        self._slots = max_jobs              # claims --max-jobs has left
        self._claiming = 0                  # claims in flight, slots reserved
        self._busy = 0                      # threads holding claimed jobs
        self._idle_since = time.monotonic()  # when _busy last became 0
        # One idle thread at a time polls the database for the pool (it
        # holds _poll_turn); the others wait on _work_seen until it sees
        # work: an idle pool reads once per poll-interval, not once per
        # thread (see _worth_a_transaction).
        self._poll_turn = threading.Lock()
        self._work_seen = threading.Condition()
        self._seen_work = 0                 # times a poll saw work
        self.failed = False
        self._ran = False
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.host, self.pid = _host(), os.getpid()
        # Encoded once: converting os.environ for every job is costly.
        self.base_env = dict(os.environb)
        # Set by `worker start` alone: see _direct_spawn_folder.
        self.spawn_folder = None
        suffix = _random_id()[:6]
        self.ids = ["%s-%d-%d-%s" % (self.host.split(".")[0], self.pid, n,
                                     suffix) for n in range(1, count + 1)]

    # -- control from other threads or signal handlers ----------------------

    def stop(self):
        """Graceful: finish running jobs, claim nothing new."""
        self.stopping.set()
        self._wake_idle()

    def force(self):
        """Kill running jobs' process groups and requeue them uncounted."""
        self.stopping.set()
        self.forced.set()
        self._wake_idle()

    def _wake_idle(self):
        # Threads idle in select() (PostgreSQL) wake on this pipe; safe in a
        # signal handler.  The threads waiting for the polling one wake on
        # _work_seen, which no signal handler's thread (the main one) holds.
        wake = self._wake_w
        if wake is not None:  # None once run() has closed it: its number
            with contextlib.suppress(OSError):  # may be another file's now
                os.write(wake, b"x")
        with self._work_seen:
            self._work_seen.notify_all()

    def _open_store(self):
        return open_store(self.address, self.now)

    def _open_store_patiently(self, give_up):
        """A thread's own connection.  A server that refuses it for now (a
        connection limit, a restart) is waited for as an outage is, with
        backoff; None once give_up() says the thread is not needed."""
        delay = 1.0
        while True:
            try:
                return self._open_store()
            except StoreError as exc:
                if not exc.transient:
                    raise
                self._store_failed(exc)
            waited_until = time.monotonic() + delay
            while time.monotonic() < waited_until:
                if give_up():
                    return None
                self._finished.wait(0.2)
            delay = min(delay * 2, 30.0)

    # -- main loop ----------------------------------------------------------

    def run(self):
        import threading
        if self._ran:
            raise Conflict("this WorkerPool has run; make a new one")
        self._ran = True
        self._idle_since = time.monotonic()
        store = self._open_store()
        self.path = store.display
        try:
            # Settings the threads use, refreshed with every beat.
            self.settings = config = store.config()
            self.stop_seq = config.get("_stop_seq", 0)
            # Neither may fail the pool: on a full disk or a locked database
            # the threads register with their first claim instead.
            self._guard(self._register, store)
            reaper = _Reaper(self.ids)
            self._guard(reaper.reap, store, self.log)
            # Ticks already due are enqueued before any thread looks for
            # work: with --exit-when-idle (a cron line) the threads would
            # otherwise end before the watcher's first pass, or just after
            # it, leaving the tick's job to the next start.
            if config.get("_schedules"):
                self._guard(self._fire_schedules, store)
            threads = [threading.Thread(target=self._work, args=(wid,),
                                        name=wid) for wid in self.ids]
            if store.shared_by_hosts:
                threads.append(threading.Thread(target=self._fence_watch,
                                                name="fence"))
            threads.append(threading.Thread(target=self._clean_up_loop,
                                            name="clean-up"))
            for thread in threads:
                thread.daemon = True
                thread.start()
            try:
                self._watch(store, reaper, threads)
            except BaseException:  # Ctrl-C in a program that embeds the
                self.force()       # pool: its threads must not run on
                self._watch(store, reaper, threads)  # unwatched
                raise
        finally:
            with contextlib.suppress(StoreError):
                with store.write():
                    store.unregister(self.ids)
            store.close()
            wake = (self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = None  # before their numbers go
            for fd in wake:
                os.close(fd)
        return 1 if self.forced.is_set() or self.failed else 0

    def _register(self, store):
        with store.write():
            store.register(self.ids, self.pid, self.host, store.now())

    def _watch(self, store, reaper, threads):
        """Beat, reap dead workers, and carry out a forced stop.

        Beats come every lease-timeout / 4 and reaps every lease-timeout / 2,
        but at least once a second, so a changed lease-timeout applies soon.
        """
        next_beat = next_reap = time.monotonic()
        next_schedules = next_beat + SCHEDULE_CHECK_EVERY  # run() fired them
        next_checkpoint = next_beat + CHECKPOINT_EVERY
        killed = announced = False
        while not self._finished.is_set():
            if self.forced.is_set() and not killed:
                killed = True
                self._kill_running()
            if self.stopping.is_set() and not announced:
                announced = True
                self.log("-", "-", "pool", "stopping: running jobs finish,"
                         " none start (a second signal forces)")
            mono = time.monotonic()
            if mono >= next_beat:
                if self._guard(self._beat, store):
                    self.beat_ok = time.monotonic()
                else:
                    # A lease runs only while its observer can write: after
                    # an outage every worker gets a whole lease to beat again.
                    reaper.forget()
                lease = self.settings["lease-timeout"]
                next_beat = mono + min(max(lease / 4.0, 0.05), 1.0)
            if mono >= next_reap:
                self._guard(reaper.reap, store, self.log)
                next_reap = mono + min(max(lease / 2.0, 0.05), 1.0)
            if mono >= next_schedules and self.settings.get("_schedules"):
                # Once a thread of an --exit-when-idle pool found nothing
                # due, ticks are left to the next start: one enqueued now
                # could find every thread gone and wait there anyway.
                if not (self.stopping.is_set() or self._drained):
                    self._guard(self._fire_schedules, store)
                next_schedules = mono + SCHEDULE_CHECK_EVERY
            if mono >= next_checkpoint:
                self._guard(store.checkpoint)
                next_checkpoint = mono + CHECKPOINT_EVERY
            # Short waits: a forced stop from a signal handler acts soon.
            self._finished.wait(min(0.2, max(0.0, min(next_beat, next_reap)
                                             - mono)))
        for thread in threads:
            thread.join()

    def _fire_schedules(self, store):
        """Enqueue the due ticks of schedules (SPEC 10); with no schedules
        the pool never gets here (settings `_schedules` is 0)."""
        now = store.now()
        if store.schedules_due(now):
            self.log_lines([e for e in store.fire_schedules(now) if e])

    def _fence_watch(self):
        """Hosts share the database: kill our own jobs before others may
        recover them.

        When this process has not renewed its lease for half of
        lease-timeout (a cut network, a lost server), the running jobs'
        process groups are killed (TERM, grace, KILL) and their claims
        marked like a forced stop: a partitioned host never runs a job at
        the same time as its retry elsewhere.  Its own thread, because the
        beat itself may hang on a dead connection.
        """
        while not self._finished.wait(0.2):
            silent = time.monotonic() - self.beat_ok
            if self.lease_lost:
                self.lease_lost = False
                self._kill_stale_jobs("taken for dead by other workers")
            elif silent < self.settings["lease-timeout"] / 2.0:
                self.fenced = False
            else:  # every round: nothing may run while fenced
                killed = self._kill_stale_jobs(
                    "lease not renewed for %.1fs" % silent,
                    quiet=self.fenced)
                self.fenced = True
                if killed:
                    self.log("-", "-", "fenced", "starting no job until the"
                             " lease is renewed")

    def _kill_stale_jobs(self, why, quiet=False):
        """Kill the running jobs whose claims others may take over; their
        claims are marked like a forced stop.  Returns how many."""
        with self._lock:
            running = [(proc, claim) for proc, claim in
                       self._running.values() if not claim.forced]
            for _, claim in running:
                claim.forced = True
        if running or not quiet:
            self.log("-", "-", "fenced", "%s: killing %d running job(s)"
                     % (why, len(running)))
        for proc, _ in running:
            kill_group(proc.pid, proc=proc)
        return len(running)

    def _beat(self, store):
        with store.write():
            now = store.now()
            if not store.beat(self.pid, self.host, now):
                # Taken for dead (frozen, cut off): our claims were
                # recovered, so our running jobs must die (see the fence),
                # and we register again to work on.
                self.lease_lost = True
                store.register(self.ids, self.pid, self.host, now)
        self.settings = store.config()
        self.cancel_ids = frozenset(store.cancel_requests())
        if self.cancel_ids:
            self._cancel_running()

    def _cancel_running(self):
        """Kill the running jobs someone cancelled (TERM, grace, KILL), each
        from its own thread so that beats go on."""
        import threading
        with self._lock:
            doomed = [(proc, claim) for proc, claim in self._running.values()
                      if claim.attempt_id in self.cancel_ids
                      and not claim.cancelled]
            for _, claim in doomed:
                claim.cancelled = True
        for proc, claim in doomed:
            self.log("-", claim.id, "cancelling", "killing its process group")
            killer = threading.Thread(target=kill_group, args=(proc.pid,),
                                      kwargs={"proc": proc}, name="cancel")
            killer.daemon = True
            killer.start()

    # -- retention ----------------------------------------------------------

    def _clean_up_loop(self):
        """Delete old finished jobs (keep-completed, keep-dead) when the
        pool starts and then every CLEANUP_EVERY seconds, in batches of
        CLEANUP_BATCH, each its own short transaction.  The first pass runs
        to its end even if the pool is done (--exit-when-idle) meanwhile; a
        stop request ends a pass between two batches."""
        store = None
        try:
            store = self._open_store_patiently(self._finished.is_set)
            while store is not None:
                self._guard(self._clean_up, store)
                if self._finished.wait(CLEANUP_EVERY):
                    break
        except Exception as exc:  # never fails the pool; logged
            self.log("-", "-", "error", "clean-up: %s: %s"
                     % (type(exc).__name__, exc))
        finally:
            if store is not None:
                store.close()

    def _clean_up(self, store):
        config, now, removed = self.settings, store.now(), 0
        started = time.monotonic()
        for state, key in (("completed", "keep-completed"),
                           ("dead", "keep-dead")):
            keep = config[key]
            while keep and not self.stopping.is_set():
                found, deleted = store.clean_up(state, now - keep)
                removed += deleted
                if found < CLEANUP_BATCH:
                    break
                self.stopping.wait(0.005)  # let a waiting claim in first
        store.mark_clean_up(now, removed, time.monotonic() - started)
        if removed:
            self.log("-", "-", "cleaned", "deleted %d finished job(s) older"
                     " than keep-completed / keep-dead" % removed)

    def _guard(self, fn, *args):
        """Run fn; a database error is logged, not raised.  True if it ran."""
        try:
            fn(*args)
        except StoreError as exc:
            if exc.transient:
                self._store_failed(exc)
            else:
                self.log("-", "-", "error", str(exc))
            return False
        return True

    def _store_failed(self, exc):
        """One log line per outage (disk full, locked by another process)."""
        with self._lock:
            first, self._trouble = self._trouble is None, exc.reason
        if first:
            self.log("-", "-", "error", "database unavailable: %s; running"
                     " jobs go on, results are kept until it is back"
                     % self._trouble)

    def _store_ok(self):
        if self._trouble is not None:
            with self._lock:
                was, self._trouble = self._trouble, None
            if was is not None:
                self.log("-", "-", "database", "available again")

    def _kill_running(self):
        with self._lock:
            running = list(self._running.values())
            for _, claim in running:
                claim.forced = True
        for proc, _ in running:
            kill_group(proc.pid, proc=proc)

    # -- one worker thread --------------------------------------------------

    def _work(self, wid):
        store = None
        try:
            # With --exit-when-idle, once a thread found nothing due, one
            # that never got a connection has nothing left to do either.
            store = self._open_store_patiently(
                lambda: self.stopping.is_set() or self._drained)
            if store is not None:
                self._loop(store, wid)
        except Exception as exc:  # report, and stop the other threads too
            self.log(wid, "-", "error", "%s: %s" % (type(exc).__name__, exc))
            self.failed = True
            self.stop()
        finally:
            if store is not None:
                store.close()
            with self._lock:
                self._alive -= 1
                if not self._alive:
                    self._finished.set()

    def _loop(self, store, wid):
        local = _ThreadBatch(store.retry_first)
        try:
            store.listen()
        except StoreError as exc:  # the next use reconnects and listens
            if not exc.transient:
                raise
            self._store_failed(exc)
        try:
            while True:
                try:
                    if not self._step(store, wid, local):
                        return
                    local.retry_delay = store.retry_first
                except StoreError as exc:
                    if not exc.transient:
                        raise
                    # Keep results and claims, start nothing, retry later.
                    self._store_failed(exc)
                    self._doubt_claims(local)
                    if self.stopping.is_set() and not (local.results or
                                                       local.queued):
                        return  # stopping, and nothing left to save
                    if self.forced.wait(local.retry_delay):
                        return  # forced out: unsaved runs are recovered
                    local.retry_delay = min(local.retry_delay * 2,
                                            store.retry_max)
        finally:
            self._stop_polling(local)

    def _step(self, store, wid, local):
        """Save, claim, run one job, or idle.  False when the thread is done."""
        if ((not local.queued or local.results_due() or self.stopping.is_set())
                and self._worth_a_transaction(store, local)):
            self._sync(store, wid, local)
            self._store_ok()
        if local.queued and self.fenced:
            self.stopping.wait(0.2)  # start nothing until the lease is back
            return True
        if local.queued:
            self._set_busy(local, True)
            claim = local.queued[0]
            ours = self._claim_still_ours(store, wid, claim, local)
            local.queued.pop(0)  # only now: the check may raise
            if ours:
                local.add(*self._execute(store, wid, claim, local))
            else:
                self._give_back(1)  # not run here: --max-jobs spent nothing
            return True
        self._set_busy(local, False)
        if self.stopping.is_set() or self.exit_when_idle or self._done():
            self._drained = self.exit_when_idle
            return False
        if not local.polls:  # the turn is free when the poller went busy
            local.polls = self._poll_turn.acquire(False)
        if local.polls:
            store.wait_for_work(self._poll_interval(), self.stopping,
                                self._wake_r)
        else:  # woken by the polling thread, stop(), or to take the turn
            with self._work_seen:
                self._work_seen.wait_for(
                    lambda: self._seen_work != local.seen
                    or self.stopping.is_set(),
                    max(self._poll_interval(), FOLLOWER_WAIT))
        return True

    def _claim_still_ours(self, store, wid, claim, local):
        """Before starting a job claimed a while ago, check the claim.

        A worker stopped (SIGSTOP, Ctrl-Z) for longer than the lease has had
        its claims recovered and started elsewhere; it must start none of
        them.  A claim younger than a quarter lease cannot have been
        recovered yet, so the common case costs no query.
        """
        fresh = min(self.settings["lease-timeout"] / 4.0, 1.0)
        if time.monotonic() - local.claimed_at < fresh:
            return True
        if store.claim_holds(claim):
            return True
        self.log(wid, claim.id, "stale", "claim recovered while this worker"
                 " was stopped; not started")
        return False

    @staticmethod
    def _doubt_claims(local):
        """A write failed, but its commit may have happened all the same
        (the server committed, then the connection died before it said
        so).  Jobs this thread holds may have been handed back and claimed
        by others since: each is checked before it starts.  Jobs it claimed
        unbeknown to itself are handed back by the next _sync."""
        local.claimed_at = float("-inf")
        local.doubt = True

    def _set_busy(self, local, busy):
        """A thread took claimed jobs (True) or has none left (False)."""
        if local.busy == busy:
            return
        local.busy = busy
        with self._lock:
            self._busy += 1 if busy else -1
            if not self._busy:
                self._idle_since = time.monotonic()

    def _done(self):
        """--max-jobs used up, or --idle-timeout passed (stops the pool)."""
        with self._lock:
            if self._slots == 0 and not self._claiming:
                self.exit_reason = self.exit_reason or (
                    "ran --max-jobs %d" % self.max_jobs)
                return True
            if (self.idle_timeout is None or self._busy or time.monotonic()
                    - self._idle_since < self.idle_timeout):
                return False
            self.exit_reason = self.exit_reason or (
                "idle for --idle-timeout %s" % _seconds_text(self.idle_timeout))
        self.stop()
        return True

    def _give_back(self, count):
        """Claims that were not made, or jobs handed back unstarted."""
        if self.max_jobs is not None and count:
            with self._lock:
                self._slots += count

    def _poll_interval(self):
        if self.poll_interval is not None:
            return self.poll_interval
        return self.settings["poll-interval"]

    def _worth_a_transaction(self, store, local):
        """Idle polls read first and take the write lock only for work.

        Only the thread holding the poll turn reads (with --exit-when-idle
        every thread, since each decides when to end); the others look
        once each time it sees work, and take the turn when it is free."""
        if (local.results or local.queued or local.doubt
                or self.stopping.is_set()):
            return True
        if not (self.exit_when_idle or local.polls
                or local.seen != self._seen_work):
            local.polls = self._poll_turn.acquire(False)
            if not local.polls:
                return False  # another idle thread polls for this one
        local.seen = self._seen_work
        stop_seq, paused = store.control()
        found = stop_seq != self.stop_seq or (
            not paused and store.anything_due(store.now(), self.queues))
        if found:
            self._stop_polling(local)
            with self._work_seen:  # the other idle threads look too
                self._seen_work += 1
                local.seen = self._seen_work
                self._work_seen.notify_all()
        return found

    def _stop_polling(self, local):
        if local.polls:
            local.polls = False
            self._poll_turn.release()

    def _sync(self, store, wid, local):
        """One transaction: save finished runs, then claim or release jobs.

        The thread's memory (local) changes only once the transaction has
        committed: a COMMIT that fails (disk full) loses no result."""
        queued = claimed = local.queued
        # Saving results may release or bury dependents (and handing jobs
        # back may bury a cancelled one's); a bare claim does neither.
        graph = "shared" if local.results or queued or local.doubt else None
        try:
            with store.write(deps=graph):
                now = store.now()
                events = self._save_results(store, local.results, now)
                if local.doubt:
                    events += self._release_unknown_claims(store, wid, queued,
                                                           now)
                stop_seq, paused = store.control()
                if stop_seq != self.stop_seq:
                    self.stop()
                if self.stopping.is_set() or paused:
                    queued = self._release(store, queued, now)
                elif not queued:
                    # Registered before claiming: a worker that others
                    # declared dead (stopped too long) must not hold jobs
                    # nobody owns.
                    store.register([wid], self.pid, self.host, now)
                    queued = claimed = self._claim(store, wid, now)
        except Exception:
            if claimed is not local.queued:  # rolled back: not claimed
                self._give_back(len(claimed))
            raise
        if queued is not local.queued:  # claimed, or handed back unstarted
            self._give_back(len(local.queued))
        if queued and queued is not local.queued:
            local.claimed_at = time.monotonic()
        local.results, local.queued, local.doubt = [], queued, False
        self._log_events(wid, events)

    def _release_unknown_claims(self, store, wid, queued, now):
        """Jobs this thread holds in the database but not in memory: a
        claim that committed though its answer was lost.  Nobody would run
        or recover them while this worker lives; they go back uncounted."""
        held = set(claim.attempt_id for claim in queued)
        return [(claim, "requeued", "claimed by a commit whose answer was"
                 " lost; not started") for claim in store.claims_of(wid)
                if claim.attempt_id not in held and store.hand_back(claim,
                                                                    now)]

    def _claim(self, store, wid, now):
        """One job, or CLAIM_BATCH of them when at least that many per
        thread are due: a deep queue pays one transaction per batch, while
        a shallow one leaves jobs for idle workers elsewhere.  Never more
        than --max-jobs has left: threads reserve their share first."""
        batch = CLAIM_BATCH
        if self.max_jobs is not None:
            # While this claim is in flight, the slots it reserved are
            # neither free nor spent: _done must not end the pool on them.
            with self._lock:
                batch = min(self._slots, CLAIM_BATCH)
                self._slots -= batch
                self._claiming += 1
        claims = []
        try:
            if batch:
                claims = store.claim(wid, self.host, now, batch,
                                     CLAIM_BATCH * self.count, self.queues)
        finally:
            self._give_back(batch - len(claims))
            if self.max_jobs is not None:
                with self._lock:
                    self._claiming -= 1
        return claims

    def _save_results(self, store, results, now):
        events = []
        runs = []
        for claim, result in results:
            if claim.forced:
                if store.hand_back(claim, now):
                    events.append((claim, "requeued", "stopped by force or"
                                   " fence; not counted"))
                else:
                    events.append((claim, "stale", "result dropped: the"
                                   " claim was lost"))
            else:
                runs.append((claim, result))
        config = self.settings
        for (state, run_at), (claim, result) in zip(
                store.record_results(runs, config), runs):
            error = result.error
            if state is None:
                detail = "result dropped: the claim was lost"
            elif state == "failed":
                detail = "%s; retry at %s" % (error, iso(run_at))
            elif state == "dead":
                detail = "%s; moved to DLQ" % error
            else:
                detail = ""
            events.append((claim, state or "stale", detail))
        return events

    def _release(self, store, queued, now):
        """Claimed jobs that never started go back, uncounted.  Returns []."""
        for claim in queued:
            store.hand_back(claim, now)
        return []

    def _log_events(self, wid, events):
        self.log_lines([(wid, claim.id, event, detail)
                        for claim, event, detail in events])

    def _execute(self, store, wid, claim, local):
        """Run one job; returns (claim, _Result) for the next transaction."""
        claim.started = store.now()
        if claim.attempt_id in self.cancel_ids:
            self.log(wid, claim.id, "cancelled", "before it started")
            return claim, _Result(None, None, "cancelled", "", 0, None,
                                  claim.started)
        self.log(wid, claim.id, "started", "attempt %d" % claim.attempts)
        limit = int(self.settings["output-limit"])
        try:
            run = _Execution(claim, limit,
                             lambda proc: self._on_long_run(
                                 store, wid, claim, local, proc),
                             self.base_env,
                             lambda tail, dropped: self._save_tail(
                                 store, claim, tail, dropped),
                             self.spawn_folder).run()
        finally:
            with self._lock:
                self._running.pop(wid, None)
        if claim.cancelled and run[2] is not None:
            run = run[:2] + ("cancelled",) + run[3:]
        return claim, _Result(*(run + (store.now(),)))

    def _save_tail(self, store, claim, tail, dropped):
        """A running job's output so far, for logs --follow on any host."""
        output, dropped = _decode_output(tail, dropped)
        try:
            store.save_tail(claim, output, dropped)
        except StoreError as exc:
            if not exc.transient:
                raise
            self._store_failed(exc)  # the job runs on; saved at its end

    def _on_long_run(self, store, wid, claim, local, proc):
        """A job ran past RECORD_GROUP_AFTER: now a write is worth it.

        Record its process group (for recovery), save earlier results, and
        hand back the batch-mates this thread cannot start soon."""
        self._remember(wid, proc, claim)
        try:
            with store.write(deps="shared"):
                store.record_group(claim, proc.pid, _process_start(proc.pid))
                now = store.now()
                events = self._save_results(store, local.results, now)
                self._release(store, local.queued, now)
        except StoreError as exc:
            if not exc.transient:
                raise
            self._store_failed(exc)  # the job runs on; saved at its end
            self._doubt_claims(local)
            return
        self._give_back(len(local.queued))
        local.results, local.queued = [], []
        self._log_events(wid, events)

    def _remember(self, wid, proc, claim):
        with self._lock:
            self._running[wid] = (proc, claim)
            claim.forced = self.forced.is_set()
            claim.cancelled = claim.attempt_id in self.cancel_ids
        if claim.forced or claim.cancelled:
            kill_group(proc.pid, proc=proc)

    def log(self, wid, job_id, event, detail):
        """One line per event: time, worker, job, event, detail."""
        self.log_lines([(wid, job_id, event, detail)])

    def log_lines(self, entries):
        """Several events in one write: a batch of results costs one call."""
        stream = self._log_stream if self._log_stream is not None else sys.stderr
        if stream is None or stream is False or not entries:
            return  # no log, or started with stderr closed (2>&-)
        stamp = iso(self.now())
        text = "".join("%s %s %s %s%s\n" % (
            stamp, wid, job_id, event, " " + _printable(detail) if detail
            else "") for wid, job_id, event, detail in entries)
        with self._log_lock:
            with contextlib.suppress(OSError, ValueError):
                stream.write(text)
                stream.flush()


###############################################################################
# Dashboard: a web page, JSON endpoints and Prometheus metrics ################
###############################################################################


def serve_dashboard(path, host="127.0.0.1", port=8765, read_only=False,
                    ready=None):
    """Serve the dashboard until interrupted.  ready(url) is called once the
    socket listens (the CLI prints the URL; --port 0 picks a free port)."""
    import http.server
    import socket
    import socketserver
    if not isinstance(host, str) or not host.strip():
        # socketserver would listen on every interface, and any Host passes
        raise InvalidInput("--host is empty: give an address to listen on"
                           " (127.0.0.1, or 0.0.0.0 for every interface)")
    if not _is_int(port) or not 0 <= port <= 65535:
        raise InvalidInput("--port must be an integer from 0 to 65535, got %r"
                           % (port,))

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        # Threads per request (3.6 has no ThreadingHTTPServer): a slow
        # client holds only its own thread, and only for HTTP_TIMEOUT.
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    handler = type("DashboardHandler", (_DashboardRoutes,
                                        http.server.BaseHTTPRequestHandler), {})
    try:
        server = Server((host, port), handler)
    except OSError as exc:
        raise QueueError("cannot listen on %s:%s: %s" % (host, port,
                                                          _reason(exc)))
    server.db_path = path
    server.read_only = read_only
    server.token = os.urandom(16).hex()
    server.port = server.server_address[1]
    server.allowed_hosts = _allowed_hosts(host, server.server_address[0],
                                          server.port)
    url = "http://%s:%d/" % ("[%s]" % host if ":" in host else host,
                             server.port)
    if ready is not None:
        ready(url)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def _allowed_hosts(host, bound, port):
    """Host headers we answer (lower case), or None for any: DNS rebinding
    must not reach a local page.

    Loopback is judged by the address the socket got, so every spelling
    of it (127.0.0.2, 127.1, LOCALHOST, ::ffff:127.0.0.1) is guarded; the
    names are the usual three, the --host given and the address itself.
    A browser leaves the port out of Host for port 80."""
    import ipaddress
    address = ipaddress.ip_address(bound.split("%")[0])  # no IPv6 scope
    mapped = getattr(address, "ipv4_mapped", None)
    if not (address.is_loopback or (mapped and mapped.is_loopback)):
        return None  # bound to a public address on purpose: any name for it
    names = set("[%s]" % name if ":" in name else name for name in
                ("127.0.0.1", "localhost", "::1", host.lower(), bound))
    allowed = set("%s:%d" % (name, port) for name in names)
    return allowed | names if port == 80 else allowed


class _HTTPError(Exception):
    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status


class _DashboardRoutes(object):
    """GET: the page, /api/..., /metrics.  POST: retry, delete or cancel a job.

    Mixed into http.server's handler when the dashboard starts, so that
    other commands never import the HTTP modules.
    """

    server_version = "queuectl/" + __version__
    timeout = HTTP_TIMEOUT
    # http.server's default, HTTP/0.9, answers a request line it cannot
    # read (or one without a version) with a bare body: no status line and
    # none of the security headers.  Nobody speaks 0.9 any more.
    default_request_version = "HTTP/1.0"

    def log_message(self, format, *args):
        pass  # one line per request would drown the terminal

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as
        JSON with the same headers as every other response."""
        self.close_connection = True
        if code == 501:  # a method we do not serve
            code, message = 405, "method not allowed: use GET or POST"
        self._send(code, "json", {"error": message or "bad request"})

    def do_OTHER(self):
        self.send_error(501)

    do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_TRACE = do_PATCH = do_OTHER

    def _answer(self, route):
        from urllib.parse import urlsplit, parse_qs
        url = urlsplit(self.path)
        query = dict((k, v[-1]) for k, v in parse_qs(url.query).items())
        queue = None
        try:
            self._check_host()
            if url.path != "/":  # the page itself needs no database
                queue = Queue(self.server.db_path)
            status, kind, body = route(url.path, query, queue)
        except _HTTPError as exc:
            status, kind, body = exc.status, "json", {"error": str(exc)}
        except InvalidInput as exc:
            status, kind, body = 400, "json", {"error": str(exc)}
        except NotFound as exc:
            status, kind, body = 404, "json", {"error": str(exc)}
        except QueueError as exc:
            status, kind, body = 409 if isinstance(exc, Conflict) else 500, \
                "json", {"error": str(exc)}
        except Exception as exc:  # an answer, never a dropped connection
            status, kind, body = 500, "json", {"error": "internal error: %s: %s"
                                               % (type(exc).__name__, exc)}
        finally:
            if queue is not None:
                queue.close()
        self._send(status, kind, body)

    def _check_host(self):
        allowed = self.server.allowed_hosts
        if len(self.headers.get_all("Host") or ()) > 1:
            raise _HTTPError(400, "more than one Host header")
        if allowed is not None and \
                (self.headers.get("Host") or "").lower() not in allowed:
            raise _HTTPError(403, "unexpected Host header")

    def _send(self, status, kind, body):
        nonce = os.urandom(12).hex()
        if kind == "html":
            body = body.replace("{{NONCE}}", nonce)
        if kind == "json":
            data = json.dumps(body, sort_keys=True).encode("utf-8")
            content_type = "application/json"
        elif kind == "html":
            data, content_type = body.encode("utf-8"), "text/html; charset=utf-8"
        else:
            data = body.encode("utf-8")
            content_type = "text/plain; version=0.0.4; charset=utf-8"
        with contextlib.suppress(OSError):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", _CSP % nonce)
            if status == 405:
                self.send_header("Allow", "GET, POST")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(data)

    def _get(self, path, query, queue):
        if path == "/":
            return 200, "html", _dashboard_page(self.server)
        if path == "/metrics":
            return 200, "text", queue.metrics()
        if path == "/api/status":
            return 200, "json", queue.status()
        if path == "/api/stats":
            since = _query_number(query, "since", 3600, float, 1)
            return 200, "json", queue.stats(since)
        if path == "/api/jobs":
            state = query.get("state") or None
            name = query.get("queue") or None
            limit = _query_number(query, "limit", 50, int, 1, 500)
            offset = _query_number(query, "offset", 0, int, 0)
            counts = queue.counts()
            if name is not None:
                counts = dict((q["name"], q["counts"]) for q in queue.queues(
                )).get(name, dict.fromkeys(STATES, 0))
            total = counts[state] if state in STATES else sum(counts.values())
            jobs = queue.list(state, limit, offset, name)
            return 200, "json", {"jobs": jobs,
                                 "total": total, "limit": limit,
                                 "offset": offset}
        if path.startswith("/api/jobs/"):
            job = queue.get(_path_segment(path[len("/api/jobs/"):]),
                            runs=True)
            if job["runs"]:
                job["output"], job["output_dropped"], _ = queue.output(
                    job["id"])
            return 200, "json", job
        raise _HTTPError(404, "no such page: %s" % path)

    def _post(self, path, query, queue):
        if self.server.read_only:
            raise _HTTPError(403, "this dashboard is read-only")
        origin = self.headers.get("Origin")
        if origin is not None and origin != "http://%s" % self.headers.get(
                "Host"):
            raise _HTTPError(403, "cross-origin request refused")
        if self.headers.get("X-Queuectl-Token") != self.server.token:
            raise _HTTPError(403, "missing or wrong X-Queuectl-Token")
        length = self.headers.get("Content-Length") or "0"
        if not re.match("^[0-9]{1,12}$", length):
            raise _HTTPError(400, "bad Content-Length: %s" % length[:40])
        try:  # the body is not used, but a request is read whole
            self.rfile.read(min(int(length), 65536))
        except OSError:  # socket.timeout: the body promised never came
            self.close_connection = True
            raise _HTTPError(408, "the request body did not arrive")
        parts = [_path_segment(part) for part in path.strip("/").split("/")]
        if len(parts) == 4 and parts[:2] == ["api", "jobs"]:
            if parts[3] == "retry":
                return 200, "json", {"retried": queue.retry([parts[2]])}
            if parts[3] == "delete":
                return 200, "json", {"deleted": queue.delete([parts[2]])}
            if parts[3] == "cancel":
                return 200, "json", queue.cancel([parts[2]])
        raise _HTTPError(404, "no such action: %s" % path)


def _path_segment(text):
    """A URL path segment as text: the page sends ids through
    encodeURIComponent, which writes the ':' of a schedule's jobs as %3A."""
    from urllib.parse import unquote
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput("not UTF-8 after %%-decoding: %s" % text[:80])


def _query_number(query, name, default, kind, minimum, maximum=MAX_COUNT):
    try:
        value = query.get(name)
        value = default if value is None else _parse_number(value, kind)
    except (ValueError, OverflowError):
        raise InvalidInput("%s must be a number" % name)
    if not minimum <= value <= maximum:  # also refuses nan
        raise InvalidInput("%s must be from %s to %s" % (
            name, _number_text(minimum), _number_text(maximum)))
    return value


###############################################################################
# Output formatting ###########################################################
###############################################################################

_COLOURS = {"pending": "33", "processing": "36", "completed": "32",
            "failed": "35", "dead": "31"}
# C0 and C1 controls (U+009B is an 8-bit CSI: the same escapes as ESC [),
# and the bidirectional overrides and isolates that make text read in
# another order than it is (a command that hides its real end).
_CONTROL_RE = r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"


def _printable(text):
    """Escape control characters so job text cannot break a table line or
    drive the terminal that shows it."""
    if text.isprintable():  # none of them (the common case: no regex)
        return text
    return re.sub(_CONTROL_RE, lambda m: ("\\x%02x" if m.group() < "\u0100"
                                          else "\\u%04x") % ord(m.group()),
                  text)


def _use_colour(stream):
    return stream.isatty() and "NO_COLOR" not in os.environ


def _paint(state, width, colour):
    text = state.ljust(width)
    return "\x1b[%sm%s\x1b[0m" % (_COLOURS[state], text) if colour else text


def _clip(text, width):
    text = _printable(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def _table(rows, headers, colour=False, state_col=None):
    """Left-aligned columns; the last column takes what is left of 80."""
    widths = [max(len(str(r[i])) for r in rows + [headers])
              for i in range(len(headers) - 1)]
    last = max(20, 79 - sum(w + 2 for w in widths))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))
             + "  " + headers[-1]]
    for row in rows:
        cells = []
        for i, w in enumerate(widths):
            if i == state_col:
                cells.append(_paint(row[i], w, colour))
            else:
                cells.append(str(row[i]).ljust(w))
        lines.append("  ".join(cells) + "  " + _clip(str(row[-1]), last))
    return "\n".join(line.rstrip() for line in lines)


def _job_rows(jobs):
    return [(j["id"], j["state"], "%d/%d" % (j["attempts"], j["max_retries"] + 1),
             j["priority"], _short_time(j["run_at"] if j["state"] in
                                        ("pending", "failed") else j["updated_at"]),
             j["command"]) for j in jobs]


def _dlq_table(jobs):
    """Dead jobs with their last error; command and error share what is
    left of 80 columns."""
    if not jobs:
        return "(no dead jobs)"
    headers = ("ID", "TRIES", "DIED (UTC)", "COMMAND", "LAST ERROR")
    rows = [(j["id"], "%d/%d" % (j["attempts"], j["max_retries"] + 1),
             _short_time(j["updated_at"])[5:16], _printable(j["command"]),
             j["last_error"] or "-") for j in jobs]
    used = sum(max(len(r[i]) for r in rows + [headers]) + 2 for i in range(3))
    room = max(79 - used - 2, 2 * 20)  # for both texts
    longest = max(len(r[3]) for r in rows + [headers])
    width = min(longest, max(room // 2, room - max(
        len(_printable(r[4])) for r in rows + [headers])))
    rows = [r[:3] + (_clip(r[3], width).ljust(width),) + r[4:] for r in rows]
    return _table(rows, headers)


def _short_time(stamp):
    return stamp[:19].replace("T", " ") if stamp else "-"


def _job_table(jobs, colour):
    if not jobs:
        return "(no jobs)"
    return _table(_job_rows(jobs), ("ID", "STATE", "TRIES", "PRI", "WHEN",
                                    "COMMAND"), colour, state_col=1)


def _show_text(job):
    fields = [
        ("id", job["id"]), ("state", job["state"]),
        ("command", _printable(job["command"])),
        ("attempts", "%d of %d" % (job["attempts"], job["max_retries"] + 1)),
        ("priority", job["priority"]), ("run_at", job["run_at"]),
        ("timeout", _seconds_text(job["timeout"]) if job["timeout"] else "none"),
        ("cwd", _printable(job["cwd"])),
        ("env", _printable(json.dumps(job["env"], sort_keys=True))),
        ("after", ", ".join(job["after"]) or "-"),
        ("queue", job["queue"]),
        ("unique_key", _printable(job["unique_key"] or "-")),
        ("last_error", _printable(job["last_error"] or "-")),
        ("worker", job["worker"] or "-"),
        ("created_at", job["created_at"]), ("updated_at", job["updated_at"]),
    ]
    lines = ["%-11s %s" % (k + ":", v) for k, v in fields]
    runs = job["runs"]
    if runs:
        lines.append("")
        rows = [(r["attempt"], _short_time(r["started_at"]),
                 "%.3fs" % r["duration"] if r["duration"] is not None else "-",
                 r["exit_code"] if r["exit_code"] is not None else "-",
                 r["worker"] or "-", r["error"] or ("running" if not
                                                    r["ended_at"] else "ok"))
                for r in runs]
        lines.append(_table(rows, ("#", "STARTED", "TOOK", "EXIT", "WORKER",
                                   "RESULT")))
    return "\n".join(lines)


def _stats_text(stats):
    def secs(value):
        return "-" if value is None else "%.3fs" % value
    counts = stats["counts"]
    rate = stats["finished_per_minute"]
    ratio = stats["success_ratio"]
    run, wait = stats["run_seconds"], stats["wait_seconds"]
    lines = [
        "jobs:         " + "  ".join("%s %d" % (s, counts[s]) for s in STATES),
        "runs/minute:  last 1m %.1f   5m %.1f   15m %.1f" % (
            rate["1m"], rate["5m"], rate["15m"]),
        "since %s:  %d runs, success %s" % (
            _duration_text(stats["since_seconds"]), stats["runs"],
            "-" if ratio is None else "%.1f%%" % (100 * ratio)),
        "run time:     p50 %s   p95 %s   max %s" % (
            secs(run["p50"]), secs(run["p95"]), secs(run["max"])),
        "wait time:    p50 %s   p95 %s   (due to started)" % (
            secs(wait["p50"]), secs(wait["p95"])),
        "oldest due:   %s" % ("-" if stats["oldest_due_seconds"] is None else
                              "%s waiting" % secs(stats["oldest_due_seconds"])),
    ]
    failing = stats["failing_commands"]
    lines.append("failing most:" + ("" if failing else " -"))
    for item in failing:
        lines.append("  %5d  %s" % (item["failures"],
                                    _clip(item["command"], 70)))
    return "\n".join(lines)


def _duration_text(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return _seconds_text(seconds)


def _queues_table(queues):
    rows = [(q["name"],) + tuple(q["counts"][s] for s in STATES) + (
        q["concurrency"] if q["concurrency"] is not None else "-",
        "yes" if q["paused"] else "no") for q in queues]
    return _table(rows, ("QUEUE",) + tuple(s.upper() for s in STATES) + (
        "CAP", "PAUSED"))


def _status_text(status, colour):
    lines = ["database: %s" % status["db"]]
    if status["paused"]:
        lines.append("paused: workers claim no new jobs (%s resume)" % _PROG)
    lines.append("")
    for state in STATES:
        lines.append("  %s %8d" % (_paint(state, 11, colour),
                                   status["counts"][state]))
    lines.append("  %-11s %8d" % ("total", sum(status["counts"].values())))
    queues = status["queues"]
    if len(queues) > 1 or queues[0]["paused"] or queues[0]["concurrency"]:
        lines.append("")
        lines.append(_queues_table(queues))
    workers = status["workers"]
    lines.append("")
    lines.append("workers: %d live" % len(workers))
    if workers:
        rows = [(w["id"], w["pid"], _short_time(w["started_at"]),
                 w["job"] or "-") for w in workers]
        lines.append(_table(rows, ("WORKER", "PID", "STARTED", "JOB")))
    lines.append("")
    lines.append(_cleanup_text(status["cleanup"]))
    return "\n".join(lines)


def _cleanup_text(cleanup):
    def keep(seconds):
        return _duration_text(seconds) if seconds else "for ever"
    policy = "keep-completed %s, keep-dead %s" % (
        keep(cleanup["keep_completed"]), keep(cleanup["keep_dead"]))
    if cleanup["last"] is None:
        return "clean-up: not run yet (%s)" % policy
    return "clean-up: %s, deleted %d (%s)" % (
        _short_time(cleanup["last"]), cleanup["deleted"] or 0, policy)


###############################################################################
# CLI #########################################################################
###############################################################################

#: The command as the user typed it, for usage lines, examples and hints:
#: `queuectl`, `./queuectl.py`, `python3 queuectl.py`, `python3 -m queuectl`.
#: main() sets it; error lines still start `queuectl: error:`.
_PROG = "queuectl"


def _prog_name(argv0):
    """sys.argv[0] -> how to run this queuectl again from the same shell."""
    if __name__ == "__main__" and __spec__ is not None:
        return "python3 -m " + __spec__.name
    if not argv0 or argv0.startswith("-"):
        return "queuectl"
    folder, base = os.path.split(argv0)
    if not folder:  # a script the shell found on PATH comes with its folder
        return ("python3 " + argv0) if argv0.endswith(".py") else argv0
    here = os.path.realpath(folder)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if any(p and os.path.realpath(p) == here for p in path):
        return base
    return argv0


def _named(text):
    """Example lines that start `queuectl ` use the name the user typed."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        body = line.lstrip()
        body = body[2:] if body.startswith("$ ") else body
        if body.startswith("queuectl "):
            lines[i] = line[:len(line) - len(body)] + _PROG + body[8:]
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, to the terminal's width as argparse finds it,
    but found without importing shutil: argparse makes a formatter for
    every option added (to check its metavar), and from 3.8 on each asks
    shutil.get_terminal_size.  The import was 8-11 M instructions of a
    100-140 M `enqueue` on 3.9-3.13 (callgrind)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24,
                 width=None):
        if width is None:
            width = _terminal_columns() - 2  # as argparse does
        super(_HelpFormatter, self).__init__(prog, indent_increment,
                                             max_help_position, width)


def _terminal_columns():
    """shutil.get_terminal_size().columns: $COLUMNS if a positive number,
    else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0  # no stdout, or not a terminal
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `queuectl: error:` line."""

    def error(self, message):
        # It may quote a URL given in the wrong place: not its password.
        message = re.sub(r"\w+://[^\s']+", lambda m: _redact(m.group()),
                         message)
        raise InvalidInput("%s (see '%s --help')" % (message, self.prog))


def _print(text=""):
    sys.stdout.write(text + "\n")


def _print_json(value):
    _print(json.dumps(value, indent=2, sort_keys=True))


def _emit(args, value, as_text):
    """--json prints the value; otherwise as_text(value) does the talking."""
    if args.json:
        _print_json(value)
    else:
        _print(as_text(value))
    return 0


def cmd_enqueue(args, queue):
    specs = _enqueue_specs(args)
    if specs is None:  # one job from a command or a JSON object
        duplicate = []
        job_id = queue.enqueue_many([_enqueue_spec(args)], duplicate)[0]
        if args.json:
            job = queue.get(job_id)
            if duplicate[0]:
                job["duplicate"] = True  # made by an earlier enqueue
            _print_json(job)
        else:
            _print(job_id)
        return 0
    ids = queue.enqueue_many(specs)
    if args.json:
        _print_json(ids)
    else:
        _print("\n".join(ids))
    return 0


def _enqueue_arguments(p):
    p.add_argument("command_or_json", nargs="?", metavar="COMMAND|JSON",
                   help="a shell command; a JSON object ({...}) or array of"
                   " them ([...]); or an existing .json/.jsonl file, read"
                   " like -f")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="JSON object, array or JSON Lines ('-' for stdin);"
                   " all or nothing")
    p.add_argument("--id")
    p.add_argument("--max-retries", type=_number_flag(int, "--max-retries"),
                   metavar="N")
    p.add_argument("--priority", type=_number_flag(int, "--priority"),
                   metavar="P", help="higher runs first (default 0)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--run-at", metavar="TIME",
                      help="ISO 8601, e.g. 2026-12-01T09:00:00Z")
    when.add_argument("--delay", type=_number_flag(float, "--delay"),
                      metavar="SECONDS")
    p.add_argument("--timeout", type=_number_flag(float, "--timeout"),
                   metavar="SECONDS")
    p.add_argument("--cwd", metavar="DIR", help="run there (default: here)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="add to the job's environment (repeatable)")
    p.add_argument("--after", metavar="ID[,ID...]",
                   help="start only after these jobs completed")
    p.add_argument("--queue", metavar="NAME",
                   help="the job's queue (default: default)")
    p.add_argument("--unique", metavar="KEY",
                   help="add nothing, and print that job's id, while a job"
                   " with this key is pending, failed or processing")
    _add_json(p)


def _enqueue_specs(args):
    """The jobs of `-f FILE`, a job file named as the argument, or a JSON
    array argument; None when the argument is one command or one object."""
    text = args.command_or_json
    if args.file is not None:
        if text is not None or _field_flags(args):
            raise InvalidInput("give -f FILE or a command, not both")
        return _as_list(parse_jobs_text(_read_input(args.file)))
    if text is None:
        return None
    if _is_job_file(text):
        if _field_flags(args):
            raise InvalidInput("give job fields in %s or as flags, not both"
                               % text)
        return _as_list(parse_jobs_text(_read_input(text)))
    if not text.lstrip().startswith("["):
        return None
    if _field_flags(args):
        raise InvalidInput("give job fields in the JSON array or as flags,"
                           " not both")
    jobs = _json_argument(text)
    for number, job in enumerate(jobs, 1):
        if isinstance(job, str):  # '["echo a", "echo b"]'
            raise InvalidInput("job %d: a JSON array holds job objects, not"
                               " strings: [{\"command\": %s}, ...]"
                               % (number, _short_repr(job)))
    return jobs


def _as_list(specs):
    return [specs] if isinstance(specs, dict) else specs


#: A positional enqueue argument ending so names a job file (SPEC 4).
_JOB_FILE_SUFFIXES = (".json", ".jsonl")


def _is_job_file(text):
    """Is `text` an existing .json/.jsonl file?  A word that looks like one
    but names nothing is refused: running it as a command never works."""
    if not text.lower().endswith(_JOB_FILE_SUFFIXES) or text != text.strip():
        return False
    if os.path.isfile(_native(text)):
        return True
    if re.search(r"\s", text):
        return False  # a command line, e.g. 'jq . in.json > out.json'
    raise InvalidInput("%s: %s (an argument ending in .json or .jsonl is"
                       " read as a job file); to run a command named so, %s"
                       % (text, "not a file" if os.path.exists(_native(text))
                          else "no such file", _command_hint(text)))


def _json_argument(text):
    """Parse an argument that starts with { or [ (it must be JSON)."""
    try:
        return parse_json(text)
    except json.JSONDecodeError as exc:  # not JSON: maybe a shell command
        raise InvalidInput("invalid JSON: %s; to enqueue a shell command"
                           " that starts with %s, %s" % (
                               exc, text.lstrip()[0], _command_hint(text)))
    except ValueError as exc:  # JSON, but a duplicate key or too deep
        raise InvalidInput("invalid JSON: %s" % exc)


def _command_hint(command):
    """How to enqueue a command that looks like JSON: as a JSON object."""
    wrapped = json.dumps({"command": command})
    if "'" in wrapped or len(wrapped) > 72:
        return "give it as a JSON object: {\"command\": \"...\"}"
    return "give it as a JSON object: %s enqueue '%s'" % (_PROG, wrapped)


def _read_input(name):
    try:
        if name == "-":
            if sys.stdin is None:  # started with <&-
                raise OSError(9, "stdin is closed")
            return sys.stdin.buffer.read().decode("utf-8")
        with open(_native(name), "rb") as handle:
            return handle.read().decode("utf-8")
    except OSError as exc:
        raise InvalidInput("cannot read %s: %s" % (name, _reason(exc)))
    except UnicodeDecodeError as exc:
        raise InvalidInput("%s is not UTF-8 text: %s" % (name, exc))


_FLAG_FIELDS = (("id", "id"), ("max_retries", "max_retries"),
                ("priority", "priority"), ("run_at", "run_at"),
                ("delay", "delay"), ("timeout", "timeout"), ("cwd", "cwd"),
                ("after", "after"), ("queue", "queue"),
                ("unique", "unique_key"))


def _field_flags(args):
    flags = dict((field, getattr(args, attr)) for attr, field in _FLAG_FIELDS
                 if getattr(args, attr) is not None)
    if args.env:
        flags["env"] = {}
        for key, value in (_env_pair(pair) for pair in args.env):
            if key in flags["env"]:  # as JSON refuses a key given twice
                raise InvalidInput("--env %s is given twice" % key)
            flags["env"][key] = value
    return flags


def _env_pair(pair):
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise InvalidInput("--env takes KEY=VALUE, got %r" % pair)
    return key, value


def _enqueue_spec(args):
    text = args.command_or_json
    if text is None:
        raise InvalidInput("enqueue needs a command, a JSON object or -f FILE")
    flags = _field_flags(args)
    if text.lstrip().startswith("{"):
        if flags:
            raise InvalidInput("give job fields in the JSON object or as flags,"
                               " not both")
        spec = _json_argument(text)
        if not isinstance(spec, dict):
            raise InvalidInput("a job must be a JSON object")
        return spec
    flags["command"] = text
    return flags


def _number_flag(kind, name):
    def parse(text):
        try:
            value = _parse_number(text, kind)
        except ValueError:
            raise argparse.ArgumentTypeError("%s must be %s, got %r" % (
                name, "an integer" if kind is int else "a number",
                _clipped(text)))
        if not _finite(value):
            raise argparse.ArgumentTypeError("%s must be finite" % name)
        return value
    return parse


def cmd_worker_start(args, queue):
    import signal
    queue.close()
    pool = WorkerPool(queue.address, count=args.count,
                      poll_interval=args.poll_interval,
                      exit_when_idle=args.exit_when_idle,
                      idle_timeout=args.idle_timeout, max_jobs=args.max_jobs,
                      queues=args.queue)
    pool.spawn_folder = _direct_spawn_folder()
    # Started with SIGCHLD ignored, the kernel would reap every job itself
    # and its exit status would be lost (recorded as 0).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signals = []

    def on_signal(signum, frame):
        # Only sets flags: the main thread never holds those events' locks.
        signals.append(signum)
        if len(signals) == 1:
            pool.stop()
        else:
            pool.force()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    pool.log("-", "-", "pool", "started %d worker(s) on %s%s"
             % (args.count, queue.path, " for queue(s) %s"
                % ",".join(pool.queues) if pool.queues else ""))
    code = pool.run()
    reason = "forced" if pool.forced.is_set() else pool.exit_reason
    pool.log("-", "-", "pool", "stopped" + (" (%s)" % reason if reason
                                           else ""))
    return code


def _worker_start_arguments(p):
    p.add_argument("--count", default=1,
                   type=_bounded_int("--count", 1, MAX_WORKER_THREADS),
                   metavar="N", help="worker threads (default 1)")
    p.add_argument("--poll-interval", metavar="S",
                   type=_number_flag(float, "--poll-interval"),
                   help="seconds between polls when idle (default:"
                   " config poll-interval)")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="exit once no job is due that this process could"
                   " run")
    p.add_argument("--idle-timeout", metavar="S",
                   type=_positive_number("--idle-timeout"),
                   help="exit after S seconds with nothing to run (a job"
                   " that falls due meanwhile is run, and the S seconds"
                   " start again)")
    p.add_argument("--max-jobs", metavar="N",
                   type=_positive_int("--max-jobs"),
                   help="run at most N jobs (each run counts), then exit")
    p.add_argument("--queue", metavar="NAME[,NAME...]",
                   help="claim only jobs of these queues (default: all)")


def cmd_worker_stop(args, queue):
    asked = set(w["id"] for w in queue.workers())
    queue.request_stop()
    if not args.wait:
        _print("stop requested; %d worker(s) running" % len(asked))
        return 0
    # Wait for the workers that were asked; one started since keeps going.
    while asked & set(w["id"] for w in queue.workers()):
        time.sleep(0.1)
    _print("all workers stopped")
    return 0


def _worker_stop_arguments(p):
    p.add_argument("--wait", action="store_true",
                   help="return when no worker is left")


#: `worker ACTION`: (name, handler, summary, example, add_arguments).
_WORKER_ACTIONS = (
    ("start", cmd_worker_start, "Run N worker threads in the foreground"
     " until stopped.", "queuectl worker start --count 4 --exit-when-idle",
     _worker_start_arguments),
    ("stop", cmd_worker_stop, "Ask running workers to finish their jobs and"
     " exit.", "queuectl worker stop --wait", _worker_stop_arguments),
)


def _worker_arguments(p):
    _add_commands(p, "action", _WORKER_ACTIONS)


def cmd_status(args, queue):
    return _emit(args, queue.status(), lambda s: _status_text(
        s, _use_colour(sys.stdout)))


def cmd_list(args, queue):
    return _print_jobs(args, queue.list(args.state, args.limit, args.offset,
                                        args.queue))


def _list_arguments(p):
    p.add_argument("--state", choices=STATES, metavar="STATE",
                   help="only jobs in this state: " + ", ".join(STATES))
    p.add_argument("--queue", metavar="NAME", help="only jobs of this queue")
    _add_paging(p)
    _add_json(p)


def cmd_dlq_list(args, queue):
    return _emit(args, queue.list("dead", args.limit, args.offset),
                 _dlq_table)


def _dlq_list_arguments(p):
    _add_paging(p)
    _add_json(p)


def _print_jobs(args, jobs):
    return _emit(args, jobs, lambda j: _job_table(j, _use_colour(sys.stdout)))


def cmd_show(args, queue):
    return _emit(args, queue.get(args.id, runs=True), _show_text)


def _show_arguments(p):
    p.add_argument("id", help="job id or unambiguous prefix")
    _add_json(p)


def cmd_logs(args, queue):
    if args.follow:
        return _follow_logs(args, queue)
    if args.json:
        raise InvalidInput("--json goes with --follow (JSON lines)")
    text, dropped, number = queue.output(args.id, args.attempt)
    if dropped:
        sys.stderr.write("queuectl: attempt %d: output truncated, first %d"
                         " bytes dropped\n" % (number, dropped))
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        out.write(text.encode("utf-8", "replace"))
        out.flush()
    else:
        sys.stdout.write(text)
    return 0


def _logs_arguments(p):
    p.add_argument("id", help="job id or unambiguous prefix")
    p.add_argument("--attempt", type=_positive_int("--attempt"), metavar="K")
    p.add_argument("-f", "--follow", action="store_true",
                   help="print the running attempt's output as it comes (from"
                   " any host, within about a second), a separator line per"
                   " attempt; exit 0 when the job completes, 1 when it is"
                   " dead")
    p.add_argument("--json", action="store_true",
                   help="with --follow: one JSON object per line")


def _follow_logs(args, queue):
    """logs --follow: stream until the job is completed (0) or dead (1);
    Ctrl-C ends it quietly with 130."""
    if args.attempt is not None:
        raise InvalidInput("--follow shows the running attempt; it takes no"
                           " --attempt")
    queue.resolve(args.id)
    out = getattr(sys.stdout, "buffer", None)
    try:
        for event in queue.follow(args.id):
            _print_follow_event(event, args.json, out)
            if event[0] == "end":
                return 0 if event[1] == "completed" else 1
    except KeyboardInterrupt:
        return 130
    return 1


def _print_follow_event(event, as_json, out):
    kind = event[0]
    if as_json:
        names = {"attempt": ("attempt", "worker", "host"),
                 "output": ("text",), "skipped": ("characters",),
                 "end": ("state",)}[kind]
        record = {"event": kind}
        record.update(zip(names, event[1:]))
        text = json.dumps(record) + "\n"
    elif kind == "attempt":
        text = "--- attempt %d (worker %s on %s) ---\n" % event[1:]
    elif kind == "skipped":
        text = "[... %d characters not shown: the saved tail moved on ...]\n" % (
            event[1])
    elif kind == "output":
        text = event[1]
    else:
        text = ""
    if out is not None:
        out.write(text.encode("utf-8", "replace"))
        out.flush()
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def cmd_dlq_retry(args, queue):
    if args.all == bool(args.ids):
        raise InvalidInput("give job ids or --all")
    ids = queue.retry_all() if args.all else queue.retry(args.ids)
    _print("\n".join(ids) if ids else "(no dead jobs)")
    return 0


def _dlq_retry_arguments(p):
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every dead job")


#: `dlq ACTION`: (name, handler, summary, example, add_arguments).
_DLQ_ACTIONS = (
    ("list", cmd_dlq_list, "List dead jobs.", "queuectl dlq list --json",
     _dlq_list_arguments),
    ("retry", cmd_dlq_retry, "Move dead jobs back to pending with attempts"
     " reset to 0.", "queuectl dlq retry 3f9a", _dlq_retry_arguments),
)


def _dlq_arguments(p):
    _add_commands(p, "action", _DLQ_ACTIONS)


def cmd_cancel(args, queue):
    result = queue.cancel(args.ids)
    if args.json:
        _print_json(result)
        return 0
    lines = ["%s cancelled" % i for i in result["cancelled"]]
    lines += ["%s stopping: its worker kills it within about a second" % i
              for i in result["stopping"]]
    _print("\n".join(lines))
    return 0


def _cancel_arguments(p):
    p.add_argument("ids", nargs="+", metavar="ID")
    _add_json(p)


def cmd_retry(args, queue):
    ids = queue.retry_finished(args.ids)
    if args.json:
        _print_json({"retried": ids})
    else:
        _print("\n".join(ids))
    return 0


def _retry_arguments(p):
    p.add_argument("ids", nargs="+", metavar="ID")
    _add_json(p)


def cmd_queue_list(args, queue):
    return _emit(args, queue.queues(), _queues_table)


def _queue_list_arguments(p):
    _add_json(p)


def cmd_queue_set(args, queue):
    queue.set_queue_concurrency(args.name, args.concurrency)
    _print("queue '%s': %s" % (args.name, "at most %d job(s) at once"
                               % args.concurrency if args.concurrency
                               else "no concurrency cap"))
    return 0


def _queue_set_arguments(p):
    p.add_argument("name", metavar="NAME")
    p.add_argument("--concurrency", metavar="N|none", required=True,
                   type=_concurrency_flag,
                   help="at most N jobs of this queue processing at once,"
                   " across all workers and hosts (0 or none: no cap)")


def _concurrency_flag(text):
    if text.strip().lower() == "none":
        return None
    return _non_negative_int("--concurrency")(text)


def cmd_queue_pause(args, queue):
    queue.set_queue_paused(args.name, True)
    _print("queue '%s' paused: workers finish its running jobs and claim no"
           " new ones" % args.name)
    return 0


def cmd_queue_resume(args, queue):
    queue.set_queue_paused(args.name, False)
    _print("queue '%s' resumed" % args.name)
    return 0


def _queue_name_argument(p):
    p.add_argument("name", metavar="NAME")


#: `queue ACTION`: (name, handler, summary, example, add_arguments).
_QUEUE_ACTIONS = (
    ("list", cmd_queue_list, "Per queue: jobs per state, concurrency cap,"
     " paused.", "queuectl queue list --json", _queue_list_arguments),
    ("set", cmd_queue_set, "Cap how many jobs of a queue run at once (0 or"
     " none: no cap).", "queuectl queue set emails --concurrency 2",
     _queue_set_arguments),
    ("pause", cmd_queue_pause, "Claim no new jobs of a queue until it is"
     " resumed.", "queuectl queue pause emails", _queue_name_argument),
    ("resume", cmd_queue_resume, "Let workers claim a paused queue's jobs"
     " again.", "queuectl queue resume emails", _queue_name_argument),
)


def _queue_arguments(p):
    _add_commands(p, "action", _QUEUE_ACTIONS)


def cmd_delete(args, queue):
    _print("\n".join(queue.delete(args.ids)))
    return 0


def _delete_arguments(p):
    p.add_argument("ids", nargs="+", metavar="ID")


def cmd_purge(args, queue):
    older = _parse_duration_arg(args.older_than, "--older-than")
    count = queue.purge(args.state, older, args.vacuum)
    _print("purged %d %s job(s)" % (count, args.state))
    return 0


def _purge_arguments(p):
    p.add_argument("--state", required=True, choices=("completed", "dead"),
                   metavar="STATE", help="completed or dead")
    p.add_argument("--older-than", metavar="AGE",
                   help="only jobs last updated this long ago (30m, 12h, 7d)")
    p.add_argument("--vacuum", action="store_true",
                   help="then give the freed space back to the disk")


def _parse_duration_arg(text, name):
    if text is None:
        return 0.0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidInput("%s: %s" % (name, exc))


def cmd_wait(args, queue):
    if args.timeout is not None and not 0 <= args.timeout <= MAX_SECONDS_CONFIG:
        raise InvalidInput("--timeout must be >= 0 and <= 1e9, got %s"
                           % args.timeout)
    try:
        for job_id in args.ids:
            queue.resolve(job_id)
    except NotFound as exc:
        raise InvalidInput(str(exc))
    try:
        states = queue.wait(args.ids, args.timeout)
    except TimeoutError as exc:
        return _error_exit(str(exc), 124)
    for job_id, state in states.items():
        _print("%s %s" % (job_id, state))
    dead = [job_id for job_id, state in states.items() if state == "dead"]
    if dead:
        return _error_exit("%d job(s) dead: %s" % (len(dead), ", ".join(dead)),
                          1)
    return 0


def _wait_arguments(p):
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=_number_flag(float, "--timeout"),
                   metavar="S", help="give up after S seconds (exit 124)")


def cmd_pause(args, queue):
    queue.set_paused(True)
    _print("paused: workers finish running jobs and claim no new ones")
    return 0


def cmd_resume(args, queue):
    queue.set_paused(False)
    _print("resumed")
    return 0


def cmd_demo(args, queue):
    """A classroom walkthrough; uses a temporary database, never the user's."""
    import tempfile
    import threading
    with tempfile.TemporaryDirectory(prefix="queuectl-demo-") as folder:
        folder = _utf8_text(folder, "$TMPDIR")
        path = os.path.join(folder, "demo.db")
        demo = Queue(path)
        pool = WorkerPool(path, count=2, poll_interval=0.05, log=_DemoLog())
        worker = threading.Thread(target=pool.run)
        try:
            _demo_script(demo, pool, worker, folder)
        finally:
            pool.stop()
            if worker.is_alive():
                worker.join()
            demo.close()
    return 0


class _DemoLog(object):
    """Shows the worker's log lines indented under the narration."""

    def write(self, text):
        if text.strip():
            sys.stdout.write("      worker log | %s\n" % text.strip()[11:])

    def flush(self):
        sys.stdout.flush()


def _demo_step(title, command=None):
    _print()
    _print(title)
    if command:
        _print("    $ %s %s" % (_PROG, command))
    sys.stdout.flush()


def _demo_script(demo, pool, worker, folder):
    _print("queuectl demo: a job queue in one SQLite file.")
    _print("This demo uses a temporary database: %s" % demo.path)
    _demo_step("1. Queue a job that succeeds. enqueue prints the new job's id.",
               "enqueue 'echo hello from a job' --id hello")
    demo.enqueue({"command": "echo hello from a job", "id": "hello",
                  "cwd": folder})
    _demo_step("2. Queue a job that fails until a file exists. With"
               " max_retries 2 it runs\n   at most 3 times. Backoff base 2:"
               " it waits 2**1 = 2 s after the first failure,\n   2**2 = 4 s"
               " after the second, then goes to the dead letter queue (DLQ).",
               "enqueue 'test -f ready.flag' --max-retries 2 --id needs-flag")
    demo.enqueue({"command": "test -f ready.flag", "id": "needs-flag",
                  "max_retries": 2, "cwd": folder})
    _demo_step("3. Start a worker with 2 threads. Each line of its log is one"
               " event:", "worker start --count 2")
    worker.start()
    demo.wait(["hello", "needs-flag"])
    _demo_step("4. Status: one job completed, one dead after 3 attempts.",
               "status")
    _print(_indent(_status_text(demo.status(), False)))
    _demo_step("5. The dead job and its attempts:", "show needs-flag")
    _print(_indent(_show_text(demo.get("needs-flag", runs=True))))
    _demo_step("6. Fix the cause (create ready.flag) and retry the job from"
               " the DLQ:\n   attempts start again from 0.",
               "dlq retry needs-flag")
    open(_native(os.path.join(folder, "ready.flag")), "w").close()
    demo.retry(["needs-flag"])
    demo.wait(["needs-flag"])
    _demo_step("7. Final status: both jobs completed.", "status")
    _print(_indent(_status_text(demo.status(), False)))
    _demo_step("Try it on your own queue: %s enqueue 'echo hi', then"
               " %s worker start." % (_PROG, _PROG))


def _indent(text):
    return "\n".join("    " + line if line else "" for line in text.splitlines())


def cmd_smoke_test(args, queue):
    """A self-check on a temporary database; exit 0 and `ok`, or exit 1
    naming the step that failed."""
    import platform
    import tempfile
    _print("queuectl %s smoke test: Python %s, %s" % (
        __version__, platform.python_version(), _SQLiteStore.describe()))
    with tempfile.TemporaryDirectory(prefix="queuectl-smoke-") as folder:
        folder = _utf8_text(folder, "$TMPDIR")
        check = _SmokeTest(folder)
        try:
            for number, (title, step) in enumerate(check.steps(), 1):
                check.run_step(number, title, step)
        finally:
            check.close()
    _print("ok")
    return 0


class _SmokeTest(object):
    """The steps of `smoke-test`; each raises an exception when it fails."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, "smoke.db")
        self.queue = self.pool = self.thread = None
        self.ended = []  # the pool's exit status, or what ended it
        self.log = _LogLines()
        self.ok_id = self.failing_id = None

    def steps(self):
        return [
            ("create a queue in a temporary database", self.create),
            ("enqueue a job", self.enqueue),
            ("start a worker pool with 2 threads", self.start),
            ("a worker runs the job", self.run),
            ("a failing job is retried after a short backoff", self.retry),
            ("after its last retry it is in the DLQ", self.dlq),
            ("dlq retry runs it again, and now it succeeds", self.dlq_retry),
            ("status counts 2 completed jobs", self.status),
            ("the workers stop when asked", self.stop),
        ]

    def run_step(self, number, title, step):
        sys.stdout.write("%d. %s ... " % (number, title))
        sys.stdout.flush()
        try:
            step()
        except Exception as exc:
            _print("FAILED")
            for line in self.log.lines[-5:]:
                _print("   worker log: " + line)
            detail = str(exc) if isinstance(exc, QueueError) else \
                "%s: %s" % (type(exc).__name__, exc)
            raise QueueError("smoke test failed at step %d (%s): %s"
                             % (number, title, detail))
        _print("ok")

    def create(self):
        self.queue = Queue(self.path)
        self.queue.config_set("backoff-max", "0.05")  # retries come fast
        if any(self.queue.counts().values()):
            raise QueueError("a new queue is not empty")

    def enqueue(self):
        self.ok_id = self.queue.enqueue({"command": "echo smoke-test",
                                         "cwd": self.folder})
        if self.queue.get(self.ok_id)["state"] != "pending":
            raise QueueError("the new job is not pending")

    def start(self):
        import threading
        self.pool = WorkerPool(self.path, count=2, poll_interval=0.02,
                               log=self.log)
        self.thread = threading.Thread(target=self._run_pool)
        self.thread.daemon = True
        self.thread.start()
        self._until("registered worker", self.queue.workers)

    def _run_pool(self):
        try:
            self.ended.append(self.pool.run())
        except Exception as exc:
            self.ended.append("%s: %s" % (type(exc).__name__, exc))

    def run(self):
        job = self._finished(self.ok_id)
        if job["state"] != "completed":
            raise QueueError("the job ended %s: %s" % (job["state"],
                                                       job["last_error"]))
        output = self.queue.output(self.ok_id)[0]
        if output != "smoke-test\n":
            raise QueueError("the job printed %r, not 'smoke-test'" % output)

    def retry(self):
        self.failing_id = self.queue.enqueue({
            "command": "test -f ready", "max_retries": 1, "cwd": self.folder})

        def retried():
            runs = self.queue.get(self.failing_id, runs=True)["runs"]
            return runs if len(runs) >= 2 else None
        runs = self._until("second attempt", retried)
        if runs[0]["error"] != "exit code 1":
            raise QueueError("attempt 1 ended %r, not 'exit code 1'"
                             % runs[0]["error"])

    def dlq(self):
        job = self._finished(self.failing_id)
        dead = [j["id"] for j in self.queue.list("dead")]
        if job["state"] != "dead" or dead != [self.failing_id]:
            raise QueueError("the job is %s; the DLQ holds %s"
                             % (job["state"], dead or "nothing"))
        if (job["attempts"], job["last_error"]) != (2, "exit code 1"):
            raise QueueError("%d attempts, last error %r" % (
                job["attempts"], job["last_error"]))

    def dlq_retry(self):
        open(_native(os.path.join(self.folder, "ready")), "w").close()
        self.queue.retry([self.failing_id])
        job = self._finished(self.failing_id)
        if job["state"] != "completed":
            raise QueueError("the job ended %s: %s" % (job["state"],
                                                       job["last_error"]))

    def status(self):
        counts = self.queue.status()["counts"]
        if counts != dict(dict.fromkeys(STATES, 0), completed=2):
            raise QueueError("counts are %s" % json.dumps(counts,
                                                         sort_keys=True))

    def stop(self):
        self.pool.stop()
        self.thread.join(SMOKE_STEP_TIMEOUT)
        if self.ended != [0]:
            raise QueueError("the pool ended with %s" % (
                self.ended[0] if self.ended else "nothing: still running"))

    def _finished(self, job_id):
        self._until("finished job", lambda: self.queue.get(job_id)["state"]
                    in ("completed", "dead"))
        return self.queue.get(job_id)

    def _until(self, what, predicate):
        deadline = time.monotonic() + SMOKE_STEP_TIMEOUT
        while True:
            value = predicate()
            if value:
                return value
            if self.ended:
                raise QueueError("the worker pool ended: %s" % self.ended[0])
            if time.monotonic() > deadline:
                raise QueueError("no %s after %s" % (
                    what, _seconds_text(SMOKE_STEP_TIMEOUT)))
            time.sleep(0.02)

    def close(self):
        if self.pool is not None:
            self.pool.stop()
            self.thread.join(SMOKE_STEP_TIMEOUT)
            if self.thread.is_alive():
                self.pool.force()
                self.thread.join(SMOKE_STEP_TIMEOUT)
        if self.queue is not None:
            self.queue.close()


class _LogLines(object):
    """A worker log kept in memory (the smoke test shows it on failure)."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        self.lines.extend(line for line in text.splitlines() if line)

    def flush(self):
        pass


def cmd_bench(args, queue):
    def progress(text):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    results = run_bench(args.quick, progress, args.db)
    if args.json:
        _print_json(results)
        return 0
    engine = _SQLiteStore.describe()
    if args.db:
        store = open_store(args.db)
        try:
            engine = store.describe()
        finally:
            store.close()
    _print("queuectl %s bench on Python %s, %s, %d CPUs%s" % (
        __version__, sys.version.split()[0], engine,
        os.cpu_count() or 0, " (--quick)" if args.quick else ""))
    rows = []
    for r in results:
        rows.append((r["name"], "%.1f %s" % (r["value"], r["unit"])
                     if r["value"] is not None else r["unit"],
                     "%.1f" % r["baseline"] if r["baseline"] else "-",
                     "%.2fx" % r["ratio"] if r["ratio"] else "-",
                     r["target"] or ""))
    _print(_table(rows, ("MEASURE", "VALUE", "BASELINE", "RATIO", "TARGET")))
    for r in results:
        if r["note"]:
            _print("  %s: %s" % (r["name"], r["note"]))
    return 0


def _bench_arguments(p):
    p.add_argument("--quick", action="store_true", help="small sizes, a few"
                   " seconds")
    _add_json(p)
    _no_database(p)


def cmd_copy(args, queue):
    copied = queue.copy_to(args.to)
    _print("copied %d job(s) to %s" % (copied, _redact(args.to)))
    return 0


def _copy_arguments(p):
    p.add_argument("--to", required=True, metavar="DEST", help="an empty"
                   " database: a file path or a postgresql:// URL")


def cmd_stats(args, queue):
    since = _parse_duration_arg(args.since, "--since") if args.since else 3600
    return _emit(args, queue.stats(since), _stats_text)


def _stats_arguments(p):
    p.add_argument("--since", metavar="DURATION", help="the window for ratios"
                   " and times (default 1h; e.g. 15m, 24h, 7d)")
    _add_json(p)


def cmd_dashboard(args, queue):
    queue.close()

    def ready(url):
        mode = " (read-only)" if args.read_only else ""
        _print("queuectl dashboard%s: %s  (Ctrl-C stops it)" % (mode, url))
        sys.stdout.flush()
    try:
        serve_dashboard(queue.address, args.host, args.port, args.read_only,
                        ready)
    except KeyboardInterrupt:
        pass
    return 0


def _dashboard_arguments(p):
    p.add_argument("--host", default="127.0.0.1", help="address to bind"
                   " (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_bounded_int("--port", 0, 65535),
                   default=8765,
                   help="port (default 8765; 0 picks a free one)")
    p.add_argument("--read-only", action="store_true",
                   help="serve no retry or delete")


def cmd_config(args, queue):
    _config_options(args)
    if args.action == "list":
        if args.key is not None or args.value is not None:
            raise InvalidInput("config list takes no arguments")
        values = queue.config()
        if args.json:
            _print_json(values)
        else:
            for key in sorted(values):
                _print("%-14s %s" % (key, _number_text(values[key])))
        return 0
    if args.key is None:
        raise InvalidInput("config %s needs a KEY" % args.action)
    if args.action == "get":
        if args.value is not None:
            raise InvalidInput("config get takes one KEY")
        _print(_number_text(queue.config_get(args.key)))
        return 0
    if args.value is None:
        raise InvalidInput("config set needs KEY and VALUE")
    _print(_number_text(queue.config_set(args.key, args.value)))
    return 0


def _config_arguments(p):
    p.add_argument("action", nargs="?", choices=("list", "get", "set"),
                   metavar="ACTION", help="list (the default), get KEY, or"
                   " set KEY VALUE")
    p.add_argument("key", nargs="?", metavar="KEY")
    p.add_argument("value", nargs="?", metavar="VALUE")
    p.add_argument("--key", dest="option_key", help=argparse.SUPPRESS)
    p.add_argument("--value", dest="option_value", help=argparse.SUPPRESS)
    _add_json(p)


def _config_options(args):
    """A bare `config` lists; `config --key K [--value V]` (hidden, a form
    other queues use) is `config get K` or `config set K V`."""
    if args.option_key is None and args.option_value is None:
        args.action = args.action or "list"
        return
    if args.key is not None or args.value is not None:
        raise InvalidInput("give KEY and VALUE as arguments or as --key and"
                           " --value, not both")
    if args.option_key is None:
        raise InvalidInput("--value needs --key (or: %s config set KEY VALUE)"
                           % _PROG)
    args.key, args.value = args.option_key, args.option_value
    args.action = args.action or ("get" if args.value is None else "set")


def cmd_schedule_add(args, queue):
    every = None
    if args.every is not None:
        try:
            every = parse_duration(args.every)
        except ValueError as exc:
            raise InvalidInput("--every: %s" % exc)
        cron, command = None, args.command_or_json
        if args.command is not None:
            raise InvalidInput("with --every, give NAME COMMAND (no cron"
                               " expression)")
    else:
        cron, command = args.command_or_json, args.command
    if command is None:
        raise InvalidInput("schedule add needs NAME 'CRON' COMMAND or NAME"
                           " --every DURATION COMMAND")
    if args.file is not None:
        raise InvalidInput("a schedule takes one job: give its command (or"
                           " JSON object), not -f")
    args.command_or_json = command
    schedule = queue.schedule_add(args.name, _enqueue_spec(args), cron=cron,
                                  every=every, overlap=args.overlap)
    return _emit(args, schedule, lambda s: "%s: next run %s" % (
        s["name"], _local_time(s["next_run"])))


def _schedule_add_arguments(p):
    p.__class__ = _OptionsFirstParser
    p.add_argument("name", metavar="NAME", help="the schedule's name (the"
                   " id alphabet)")
    _enqueue_arguments(p)  # the job flags, exactly as enqueue has them
    for action in p._actions:
        if action.dest == "command_or_json":
            action.metavar = "CRON|COMMAND"
            action.help = ("five cron fields in local time ('30 2 * * *',"
                           " '*/15 * * * 1-5'), or @hourly, @daily, @weekly,"
                           " @monthly, @yearly; with --every, the command")
        elif action.dest in ("file", "id", "run_at", "after"):
            action.help = argparse.SUPPRESS  # refused: a tick is a new job
    p.add_argument("command", nargs="?", metavar="COMMAND|JSON",
                   help="the job: a shell command or a JSON object")
    p.add_argument("--every", metavar="DURATION", help="instead of CRON:"
                   " every DURATION (30s, 10m, 12h, 1d) from now")
    p.add_argument("--overlap", action="store_true", help="enqueue a tick"
                   " even while the previous job has not finished (default:"
                   " skip it and log)")


class _OptionsFirstParser(_Parser):
    """Options may come between the positional arguments (`schedule add
    NAME --every 10m COMMAND`): argparse on Python 3.6 cannot mix them when
    positionals are optional, so options move to the front first."""

    def parse_known_args(self, args=None, namespace=None):
        front, back, index = [], [], 0
        args = list(args or [])
        while index < len(args):
            arg = args[index]
            if arg == "--":
                back.extend(args[index:])
                break
            action = self._option_string_actions.get(arg.split("=", 1)[0])
            if action is None:
                back.append(arg)
            else:
                front.append(arg)
                if action.nargs != 0 and "=" not in arg:
                    front.extend(args[index + 1:index + 2])
                    index += 1
            index += 1
        return _Parser.parse_known_args(self, front + back, namespace)


def _local_time(stamp):
    """An ISO time from _schedule_dict -> local 'YYYY-MM-DD HH:MM:SS ZONE'."""
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z",
                         time.localtime(parse_time(stamp)))


def cmd_schedule_list(args, queue):
    return _emit(args, queue.schedules(), _schedules_text)


def _schedule_list_arguments(p):
    _add_json(p)


def _schedules_text(schedules):
    if not schedules:
        return "no schedules (add one: %s schedule add NAME '30 2 * * *'" \
            " COMMAND)" % _PROG
    rows = [(s["name"], s["cron"] or "every " + _duration_text(s["every"]),
             _local_time(s["next_run"]), s["last_job"] or "-",
             s["last_job_state"] or "-", s["job"]["command"])
            for s in schedules]
    return _table(rows, ["NAME", "WHEN", "NEXT RUN", "LAST JOB", "STATE",
                         "COMMAND"])


def cmd_schedule_remove(args, queue):
    queue.schedule_remove(args.name)
    if args.json:
        _print_json({"removed": args.name})
    else:
        _print("removed schedule %s (its jobs stay)" % args.name)
    return 0


def cmd_schedule_run(args, queue):
    job_id = queue.schedule_run(args.name)
    if args.json:
        _print_json(queue.get(job_id))
    else:
        _print(job_id)
    return 0


def _schedule_name_argument(p):
    p.add_argument("name", metavar="NAME")
    _add_json(p)


#: `schedule ACTION`: (name, handler, summary, example, add_arguments).
_SCHEDULE_ACTIONS = (
    ("add", cmd_schedule_add, "Add a recurring job: a cron expression (local"
     " time) or --every DURATION, and the job.",
     "queuectl schedule add nightly '30 2 * * *' 'make backup' --timeout 3600"
     "\n  queuectl schedule add poll --every 10m 'curl -fsS example.org'",
     _schedule_add_arguments),
    ("list", cmd_schedule_list, "List schedules with their next run and last"
     " job.", "queuectl schedule list --json", _schedule_list_arguments),
    ("remove", cmd_schedule_remove, "Remove a schedule (its jobs stay).",
     "queuectl schedule remove nightly", _schedule_name_argument),
    ("run", cmd_schedule_run, "Enqueue a schedule's job now (its ticks go on"
     " as before).", "queuectl schedule run nightly", _schedule_name_argument),
)


def _schedule_arguments(p):
    _add_commands(p, "action", _SCHEDULE_ACTIONS)


###############################################################################
# The table of commands, the parser and main ##################################
###############################################################################

def _add_json(parser):
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of a table")


def _add_paging(parser):
    parser.add_argument("--limit", type=_positive_int("--limit"), default=100,
                        help="at most N jobs (default 100)")
    parser.add_argument("--offset", type=_non_negative_int("--offset"),
                        default=0, help="skip the first N jobs")


def _positive_int(name):
    return _bounded_int(name, 1)


def _positive_number(name):
    parse = _number_flag(float, name)

    def check(text):
        value = parse(text)
        if not 0 < value <= MAX_SECONDS_CONFIG:
            raise argparse.ArgumentTypeError("%s must be > 0 and <= 1e9,"
                                             " got %s" % (name, text))
        return value
    return check


def _non_negative_int(name):
    return _bounded_int(name, 0)


def _bounded_int(name, minimum, maximum=MAX_COUNT):
    parse = _number_flag(int, name)

    def check(text):
        value = parse(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                "%s must be >= %d and <= %d, got %s" % (name, minimum,
                                                        maximum, text))
        return value
    return check


def _no_database(p):
    p.set_defaults(no_database=True)


def _add_commands(parser, dest, table, only=None):
    """Give parser a subcommand per row of table, or only the one named
    only: building every command's parser costs each call a few ms."""
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper(),
                                parser_class=_Parser)
    sub.required = True
    for name, handler, summary, example, add_arguments in table:
        if only not in (None, name):
            continue
        p = sub.add_parser(
            name, help=summary, description=summary,
            epilog=_named("example:\n  " + example),
            formatter_class=_HelpFormatter)
        if handler is not None:
            p.set_defaults(func=handler, command_parser=p)
        if add_arguments is not None:
            add_arguments(p)


#: Every command, in --help order: (name, handler, summary, example,
#: add_arguments).  Each add_arguments sits right after its handler;
#: `worker` and `dlq` add their actions from _WORKER_ACTIONS and
#: _DLQ_ACTIONS.
_COMMANDS = (
    ("enqueue", cmd_enqueue, "Add a job: a shell command, a JSON object, or"
     " many from a file.", "queuectl enqueue 'make test' --max-retries 2\n"
     "  queuectl enqueue '{\"command\": \"sleep 1\", \"priority\": 5}'\n"
     "  queuectl enqueue -f jobs.jsonl", _enqueue_arguments),
    ("worker", None, "Start or stop workers.",
     "queuectl worker start --count 4", _worker_arguments),
    ("status", cmd_status, "Show job counts per state and live workers.",
     "queuectl status --json", _add_json),
    ("list", cmd_list, "List jobs in enqueue order.",
     "queuectl list --state failed --limit 20", _list_arguments),
    ("show", cmd_show, "Show one job and all its attempts.",
     "queuectl show 3f9a", _show_arguments),
    ("logs", cmd_logs, "Print the output of a job's last (or K-th) attempt,"
     " or follow it live (-f).",
     "queuectl logs 3f9a --attempt 1\n  queuectl logs 3f9a --follow",
     _logs_arguments),
    ("dlq", None, "The dead letter queue: list or retry dead jobs.",
     "queuectl dlq retry --all", _dlq_arguments),
    ("queue", None, "Named queues: list them, cap their concurrency, pause"
     " or resume one.", "queuectl queue set emails --concurrency 2",
     _queue_arguments),
    ("wait", cmd_wait, "Block until jobs are completed or dead (exit 0 all"
     " completed, 1 any dead, 124 timeout).",
     "queuectl wait 3f9a 77c0 --timeout 600", _wait_arguments),
    ("pause", cmd_pause, "Workers finish what runs and claim nothing new"
     " until resume.", "queuectl pause", None),
    ("resume", cmd_resume, "Let paused workers claim jobs again.",
     "queuectl resume", None),
    ("stats", cmd_stats, "Throughput, success ratio, run and wait times, the"
     " commands that fail most.", "queuectl stats --since 24h",
     _stats_arguments),
    ("dashboard", cmd_dashboard, "Serve a live web dashboard, its JSON API"
     " and /metrics.", "queuectl dashboard --port 8765",
     _dashboard_arguments),
    ("bench", cmd_bench, "Measure throughput, latency, memory and scale on a"
     " temporary database.", "queuectl bench --quick", _bench_arguments),
    ("demo", cmd_demo, "A narrated walkthrough on a temporary database"
     " (about 7 seconds).", "queuectl demo", _no_database),
    ("smoke-test", cmd_smoke_test, "A quick self-check on a temporary"
     " database: enqueue, run, retry, DLQ.", "queuectl smoke-test",
     _no_database),
    ("copy", cmd_copy, "Copy the whole queue into an empty database (SQLite"
     " or PostgreSQL).", "queuectl copy --to postgresql://jobs@db.internal/jobs",
     _copy_arguments),
    ("cancel", cmd_cancel, "Stop jobs: pending or failed ones become dead"
     " ('cancelled'); processing ones are killed by their worker.",
     "queuectl cancel 3f9a 77c0", _cancel_arguments),
    ("retry", cmd_retry, "Run completed or dead jobs again (attempts reset,"
     " due now, history kept).", "queuectl retry 3f9a", _retry_arguments),
    ("delete", cmd_delete, "Delete jobs that are not processing.",
     "queuectl delete 3f9a 77c0", _delete_arguments),
    ("purge", cmd_purge, "Delete old completed or dead jobs.",
     "queuectl purge --state completed --older-than 7d --vacuum",
     _purge_arguments),
    ("config", cmd_config, "List, get or set settings.",
     "queuectl config set max-retries 5", _config_arguments),
    ("schedule", None, "Recurring jobs: add, list, remove or run a"
     " schedule.", "queuectl schedule add nightly '30 2 * * *' 'make backup'",
     _schedule_arguments),
)


_COMMAND_GROUPS = """\
commands by what you need them for:
  add and run jobs   enqueue, worker start, worker stop
  see what happens   status, list, show, logs, wait, stats, dashboard
  when jobs fail     dlq list, dlq retry, retry, delete, purge
  control            pause, resume, cancel, queue, config, copy
  recurring jobs     schedule add, schedule list, schedule remove
  learn and check    demo, smoke-test, bench

start here:
  queuectl enqueue 'echo hello'
  queuectl worker start --exit-when-idle
  queuectl status"""


def _command_in(argv):
    """The command argv names, or None when it names none (or asks help)."""
    index = _command_index(argv)
    return None if index is None else argv[index]


def _command_index(argv):
    """Where the command is in argv (after --db PATH), or None."""
    index = 0
    while argv and index < len(argv):
        arg = argv[index]
        if arg == "--db":
            index += 2
        elif not arg.startswith("-"):
            return index
        elif arg.startswith("--db="):
            index += 1
        else:
            return None
    return None


#: Spellings users bring from other job queues, and the queuectl argv for
#: them; hidden from --help (SPEC 11).
_ALIASES = {("enqueue-file",): ["enqueue", "-f"],
            ("config", "show"): ["config", "list"]}

#: Commands that exist under another name: an error names the right form.
_MISPLACED = {"start": "worker start", "stop": "worker stop"}


def _other_spellings(argv):
    """Rewrite an alias into its queuectl form; refuse a misplaced command
    with a hint that names the right one."""
    index = _command_index(argv)
    if index is None:
        return argv
    head, rest = argv[:index], argv[index:]
    for alias, replacement in _ALIASES.items():
        if tuple(rest[:len(alias)]) == alias:
            return head + replacement + rest[len(alias):]
    if rest[0] in _MISPLACED:
        import shlex
        hint = " ".join(shlex.quote(arg) for arg in head + _MISPLACED[
            rest[0]].split() + rest[1:])
        raise InvalidInput("there is no '%s' command; did you mean: %s %s"
                           % (rest[0], _PROG, hint))
    return argv


def build_parser(argv=None):
    """The CLI's parser; given argv naming a command, only that one's."""
    only = _command_in(argv) if argv is not None else None
    if only not in [row[0] for row in _COMMANDS]:
        only = None  # none, or a typo: list every command
    parser = _Parser(
        prog=_PROG, description="A background job queue for shell"
        " commands, stored in one SQLite file or in PostgreSQL.",
        epilog=_named(_COMMAND_GROUPS),
        formatter_class=_HelpFormatter)
    parser.add_argument("--db", metavar="PATH|URL", help="database file or"
                        " postgresql:// URL (default: $QUEUECTL_DB, else"
                        " ~/.queuectl/queue.db)")
    parser.add_argument("--version", action="version",
                        version="queuectl " + __version__)
    _add_commands(parser, "command", _COMMANDS, only)
    return parser


def _safe_streams():
    """Under LANG=C, print unencodable text escaped instead of crashing."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        encoding = (getattr(stream, "encoding", None) or "").lower()
        if "utf" in encoding or not hasattr(stream, "buffer"):
            continue
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
        else:
            import io
            setattr(sys, name, io.TextIOWrapper(
                stream.buffer, encoding=stream.encoding,
                errors="backslashreplace", line_buffering=stream.line_buffering))


class _Output(object):
    """sys.stdout while main() runs.  Output is written after the change
    it reports, so a failure to write it (a full disk, stdout closed with
    `>&-`) must say that the change was made: a script that retried an
    `enqueue` would queue its job twice."""

    def __init__(self, stream):
        self.stream = stream

    @staticmethod
    def failed(why):
        return QueueError("cannot write the output (%s); the command itself"
                          " was carried out" % why)

    @contextlib.contextmanager
    def _saying_the_change_was_made(self):
        try:
            yield
        except BrokenPipeError:
            raise  # `queuectl list | head`: main() ends quietly
        except (OSError, ValueError) as exc:
            raise self.failed(_reason(exc))

    def write(self, text):
        if self.stream is None:
            raise self.failed("stdout is closed")
        with self._saying_the_change_was_made():
            return self.stream.write(text)

    def flush(self):
        if self.stream is not None:
            with self._saying_the_change_was_made():
                self.stream.flush()

    def isatty(self):
        return self.stream is not None and self.stream.isatty()

    def __getattr__(self, name):  # fileno, encoding, buffer, ...
        if self.stream is None:
            raise OSError(9, "stdout is closed")
        return getattr(self.stream, name)


def main(argv=None):
    """Run the CLI; return the exit status."""
    _safe_streams()
    real = sys.stdout
    sys.stdout = _Output(real)
    try:
        try:
            code = _run_cli(argv)
        except SystemExit as exc:  # --help, --version: flushed below too
            code = exc.code
        try:
            sys.stdout.flush()
        except QueueError as exc:
            code = _error_exit(str(exc), exc.exit_code)
        return code
    finally:
        sys.stdout = real


def _only_reads(args):
    """Does this command leave the queue as it was?"""
    if args.func is cmd_config:
        return args.action != "set"
    return args.func in (cmd_status, cmd_list, cmd_dlq_list, cmd_show,
                         cmd_logs, cmd_queue_list, cmd_wait, cmd_stats,
                         cmd_schedule_list, cmd_bench, cmd_demo,
                         cmd_smoke_test, cmd_dashboard)


def _run_cli(argv):
    global _PROG
    args = None
    try:
        _PROG = "queuectl" if argv is not None else _prog_name(sys.argv[0])
        if argv is None:
            argv = _decoded_argv(sys.argv[1:])
        argv = _other_spellings(argv)
        args, extra = build_parser(argv).parse_known_args(argv)
        if extra:  # argparse would point at the top --help, not the command's
            args.command_parser.error("unrecognized arguments: %s"
                                      % " ".join(extra))
        if getattr(args, "no_database", False):
            return args.func(args, None)
        queue = Queue(args.db)
        try:
            return args.func(args, queue)
        finally:
            queue.close()
    except QueueError as exc:
        return _error_exit(str(exc), exc.exit_code)
    except BrokenPipeError:
        # `queuectl list | head`: the reader left; end quietly, unless the
        # command changed the queue (`enqueue -f ... | head -1`): a script
        # must learn that it did, or it would enqueue the jobs again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args is not None and not _only_reads(args):
            return _error_exit(str(_Output.failed("the reader of stdout"
                                                  " has gone")), 1)
        return 1
    except KeyboardInterrupt:
        return _error_exit("interrupted", 130)
    except MemoryError:  # `enqueue -f` of more than fits: nothing written
        return _error_exit("out of memory", 1)
    except OSError as exc:
        return _error_exit("%s" % exc, 1)
    except Exception as exc:  # never a traceback; QUEUECTL_DEBUG=1 shows one
        if os.environ.get("QUEUECTL_DEBUG"):
            raise
        return _error_exit("internal error: %s: %s" % (type(exc).__name__, exc), 1)


def _decoded_argv(argv):
    """Python 3.6 under LANG=C decodes arguments as ASCII: redo it as UTF-8."""
    return [_utf8_text(arg, "an argument") for arg in argv]


def _error_exit(message, code):
    """Print `queuectl: error: MESSAGE` on stderr; return the exit code."""
    with contextlib.suppress(QueueError, OSError, ValueError):
        sys.stdout.flush()
    line = "queuectl: error: %s\n" % _printable(message)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line)
        sys.stderr.flush()
    return code


###############################################################################
# Dashboard page: the HTML, CSS and script served at / ########################
###############################################################################

# Everything the page needs is inline; nothing may load from elsewhere.
# Only the page's own script (by nonce) runs: even markup that slipped into
# the page could not execute.
_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src"
        " 'nonce-%s'; connect-src 'self'; img-src 'self' data:;"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _dashboard_page(server):
    import html
    settings = json.dumps({"token": "" if server.read_only else server.token,
                           "readOnly": server.read_only})
    return _PAGE.replace("{{SETTINGS}}", html.escape(settings, quote=True))


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>queuectl</title>
<style>
:root { --bg: #f6f7f9; --card: #fff; --ink: #1d2330; --muted: #6b7385;
  --line: #e3e6eb; --pending: #b7791f; --processing: #2b6cb0;
  --completed: #2f855a; --failed: #c05621; --dead: #c53030; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 16px;
  padding: 14px 24px; background: #1d2330; color: #fff; }
header h1 { margin: 0; font-size: 18px; letter-spacing: .3px; }
header .db { color: #aab2c5; font: 12px ui-monospace, Menlo, Consolas, monospace;
  overflow-wrap: anywhere; }
header .live { margin-left: auto; font-size: 12px; color: #9ae6b4; }
header .live.stale { color: #feb2b2; }
main { padding: 20px 24px; display: grid; gap: 18px;
  grid-template-columns: repeat(12, 1fr); max-width: 1400px; margin: 0 auto; }
section { background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; padding: 14px 16px; grid-column: span 12; min-width: 0; }
section h2 { margin: 0 0 10px; font-size: 13px; text-transform: uppercase;
  letter-spacing: .6px; color: var(--muted); }
#counts { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px;
  background: none; border: 0; padding: 0; }
.count { background: var(--card); border: 1px solid var(--line);
  border-top: 4px solid; border-radius: 8px; padding: 10px 14px; cursor: pointer; }
.count b { display: block; font-size: 28px; font-weight: 600; }
.count span { color: var(--muted); font-size: 12px; text-transform: uppercase; }
.pending { border-top-color: var(--pending); } .processing { border-top-color: var(--processing); }
.completed { border-top-color: var(--completed); } .failed { border-top-color: var(--failed); }
.dead { border-top-color: var(--dead); }
#chart-box { grid-column: span 8; } #workers-box { grid-column: span 4; }
#stats-line { color: var(--muted); font-size: 12px; margin-top: 6px; }
svg { width: 100%; height: 160px; display: block; background:
  repeating-linear-gradient(to top, #fff 0 39px, #eef0f4 39px 40px); }
.axis { display: flex; justify-content: space-between; color: var(--muted);
  font-size: 11px; margin: 2px 0; }
.key { display: inline-block; width: 9px; height: 9px; border-radius: 2px;
  margin: 0 4px 0 10px; } .key.ok { background: #2f855a; } .key.bad { background: #c53030; }
.count.active { box-shadow: 0 0 0 2px #1d2330 inset; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.cmd, td.mono, .mono { font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 12.5px; overflow-wrap: anywhere; }
tr.job { cursor: pointer; } tr.job:hover { background: #f0f4fa; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px;
  font-size: 12px; color: #fff; }
.badge.pending { background: var(--pending); } .badge.processing { background: var(--processing); }
.badge.completed { background: var(--completed); } .badge.failed { background: var(--failed); }
.badge.dead { background: var(--dead); }
.toolbar { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-bottom: 10px; }
button, select { font: inherit; padding: 4px 10px; border: 1px solid #c9ced8;
  border-radius: 6px; background: #fff; cursor: pointer; }
button.danger { color: var(--dead); border-color: #f0b4b4; }
button:disabled { opacity: .45; cursor: default; }
pre { background: #10141c; color: #e2e8f0; padding: 10px 12px; border-radius: 6px;
  max-height: 320px; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.muted { color: var(--muted); } .error { color: var(--dead); }
@media (max-width: 800px) {
  main { padding: 12px; gap: 12px; }
  #counts { grid-template-columns: repeat(3, 1fr); }
  #chart-box, #workers-box { grid-column: span 12; }
  .hide-narrow { display: none; }
}
</style></head>
<body data-settings="{{SETTINGS}}">
<header><h1>queuectl</h1><span class="db" id="db"></span>
<span class="live" id="live">connecting...</span></header>
<main>
<section id="counts"></section>
<section id="chart-box"><h2>Runs per minute, last hour</h2>
<div class="axis"><span id="chart-top"></span><span><i class="key ok"></i>ok
<i class="key bad"></i>failed</span></div>
<svg id="chart" viewBox="0 0 600 160" preserveAspectRatio="none" role="img"
 aria-label="runs finished per minute"></svg>
<div class="axis"><span>60 min ago</span><span>now</span></div>
<div id="stats-line"></div></section>
<section id="workers-box"><h2>Live workers</h2><div id="workers"></div></section>
<section id="jobs-box"><h2>Jobs</h2>
<div class="toolbar"><label>State <select id="state">
<option value="">all</option><option>pending</option><option>processing</option>
<option>completed</option><option>failed</option><option>dead</option></select></label>
<label>Queue <select id="queue"><option value="">all</option></select></label>
<button id="prev">&larr; Previous</button><button id="next">Next &rarr;</button>
<span class="muted" id="page"></span></div>
<table><thead><tr><th>ID</th><th>State</th><th class="hide-narrow">Tries</th>
<th class="hide-narrow">Updated</th><th>Command</th></tr></thead>
<tbody id="jobs"></tbody></table></section>
<section id="detail-box" hidden><h2>Job <span id="detail-id" class="mono"></span></h2>
<div id="detail"></div></section>
</main>
<script nonce="{{NONCE}}">
"use strict";
const SETTINGS = JSON.parse(document.body.dataset.settings);
const STATES = ["pending", "processing", "completed", "failed", "dead"];
const PAGE = 25;
let offset = 0;
let selected = new URLSearchParams(location.hash.slice(1)).get("job");  // #job=ID

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "cls") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children || []) node.appendChild(child);
  return node;
}
function replace(id, ...nodes) {
  const box = document.getElementById(id);
  box.replaceChildren ? box.replaceChildren(...nodes)
    : (box.textContent = "", nodes.forEach(n => box.appendChild(n)));
}
async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
function seconds(value) {
  if (value === null || value === undefined) return "-";
  return value < 1 ? (value * 1000).toFixed(0) + " ms" : value.toFixed(1) + " s";
}
function when(stamp) { return stamp ? stamp.slice(0, 19).replace("T", " ") : "-"; }

function renderCounts(status) {
  replace("db", document.createTextNode(status.db + (status.paused ? "  (paused)" : "")));
  replace("counts", ...STATES.map(state => el("div", {
    cls: "count " + state + (document.getElementById("state").value === state ? " active" : ""),
    id: "count-" + state,
    onclick: () => { document.getElementById("state").value = state; offset = 0; refresh(); }
  }, [el("b", {text: String(status.counts[state])}), el("span", {text: state})])));
  const rows = status.workers.map(w => el("tr", {}, [
    el("td", {cls: "mono", text: w.id}), el("td", {text: String(w.pid)}),
    el("td", {cls: "mono", text: w.job || "idle"})]));
  replace("workers", rows.length ? el("table", {}, [el("thead", {}, [el("tr", {}, [
    el("th", {text: "Worker"}), el("th", {text: "PID"}), el("th", {text: "Job"})])]),
    el("tbody", {}, rows)]) : el("p", {cls: "muted", text: "No live workers."}));
}

function renderStats(stats) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const series = stats.per_minute;
  const top = Math.max(1, ...series.map(p => p.ok + p.failed));
  replace("chart-top", document.createTextNode("max " + top + " runs/min"));
  const width = 600 / series.length;
  series.forEach((point, i) => {
    const ok = point.ok / top * 150, failed = point.failed / top * 150;
    for (const [height, y, colour] of [[ok, 160 - ok, "#2f855a"],
                                       [failed, 160 - ok - failed, "#c53030"]]) {
      if (!height) continue;
      const bar = document.createElementNS(ns, "rect");
      bar.setAttribute("x", (i * width + 1).toFixed(1));
      bar.setAttribute("width", Math.max(1, width - 2).toFixed(1));
      bar.setAttribute("y", y.toFixed(1));
      bar.setAttribute("height", height.toFixed(1));
      bar.setAttribute("fill", colour);
      const tip = document.createElementNS(ns, "title");
      tip.textContent = when(point.t) + ": " + point.ok + " ok, " + point.failed + " failed";
      bar.appendChild(tip);
      svg.appendChild(bar);
    }
  });
  const ratio = stats.success_ratio === null ? "-" : (stats.success_ratio * 100).toFixed(1) + "%";
  replace("stats-line", document.createTextNode(
    "last hour: " + stats.runs + " runs, success " + ratio +
    " | run p50 " + seconds(stats.run_seconds.p50) + ", p95 " + seconds(stats.run_seconds.p95) +
    " | wait p50 " + seconds(stats.wait_seconds.p50) + ", p95 " + seconds(stats.wait_seconds.p95) +
    " | " + stats.finished_per_minute["1m"].toFixed(1) + "/min now" +
    (stats.oldest_due_seconds === null ? "" : " | oldest due " + seconds(stats.oldest_due_seconds))));
}

function renderJobs(page) {
  replace("jobs", ...(page.jobs.length ? page.jobs.map(job => el("tr", {
    cls: "job", id: "job-" + job.id, onclick: () => {
      selected = job.id; history.replaceState(null, "", "#job=" + encodeURIComponent(job.id));
      showJob(); }
  }, [el("td", {cls: "mono", text: job.id}),
      el("td", {}, [el("span", {cls: "badge " + job.state, text: job.state})]),
      el("td", {cls: "hide-narrow", text: job.attempts + "/" + (job.max_retries + 1)}),
      el("td", {cls: "hide-narrow", text: when(job.updated_at)}),
      el("td", {cls: "cmd", text: job.command})])) :
    [el("tr", {}, [el("td", {colspan: "5", cls: "muted", text: "No jobs."})])]));
  const last = Math.min(page.offset + page.jobs.length, page.total);
  replace("page", document.createTextNode(
    page.total ? (page.offset + 1) + "-" + last + " of " + page.total : ""));
  document.getElementById("prev").disabled = page.offset === 0;
  document.getElementById("next").disabled = last >= page.total;
}

async function act(action) {
  try {
    await api("/api/jobs/" + encodeURIComponent(selected) + "/" + action,
              {method: "POST", headers: {"X-Queuectl-Token": SETTINGS.token}});
    if (action === "delete") selected = null;
  } catch (error) { alert(action + " failed: " + error.message); }
  refresh();
}

async function showJob() {
  const box = document.getElementById("detail-box");
  if (!selected) { box.hidden = true; return; }
  let job;
  try { job = await api("/api/jobs/" + encodeURIComponent(selected)); }
  catch (error) { box.hidden = true; selected = null; return; }
  box.hidden = false;
  replace("detail-id", document.createTextNode(job.id));
  const facts = [["state", job.state], ["queue", job.queue], ["command", job.command],
    ["attempts", job.attempts + " of " + (job.max_retries + 1)],
    ["priority", String(job.priority)], ["run at", when(job.run_at)],
    ["last error", job.last_error || "-"], ["cwd", job.cwd]];
  const buttons = [];
  if (job.state === "dead" && !SETTINGS.readOnly) {
    buttons.push(el("button", {id: "retry", text: "Retry", onclick: () => act("retry")}));
    buttons.push(el("button", {id: "delete", cls: "danger", text: "Delete",
                               onclick: () => act("delete")}));
  }
  if (["pending", "failed", "processing"].includes(job.state) && !SETTINGS.readOnly) {
    buttons.push(el("button", {id: "cancel", cls: "danger", text: "Cancel",
                               onclick: () => act("cancel")}));
  }
  const runs = job.runs.map(r => el("tr", {}, [
    el("td", {text: String(r.attempt)}), el("td", {text: when(r.started_at)}),
    el("td", {text: seconds(r.duration)}),
    el("td", {text: r.exit_code === null ? "-" : String(r.exit_code)}),
    el("td", {text: r.error || (r.ended_at ? "ok" : "running")})]));
  replace("detail",
    el("table", {}, [el("tbody", {}, facts.map(([k, v]) => el("tr", {}, [
      el("th", {text: k}), el("td", {cls: "mono", text: v})])))]),
    el("div", {cls: "toolbar"}, buttons),
    el("table", {}, [el("thead", {}, [el("tr", {}, ["#", "Started", "Took", "Exit",
      "Result"].map(h => el("th", {text: h})))]), el("tbody", {}, runs)]),
    el("h2", {text: "Output of the last attempt"}),
    el("pre", {id: "output", text: job.output === undefined ? "(not run yet)" :
      (job.output_dropped ? "[first " + job.output_dropped + " bytes dropped]\n" : "") + job.output}));
}

function renderQueues(status) {
  const pick = document.getElementById("queue");
  const names = status.queues.map(q => q.name);
  if (pick.value && names.indexOf(pick.value) < 0) names.push(pick.value);
  const have = Array.from(pick.options).slice(1).map(o => o.value);
  if (have.join("\n") === names.join("\n")) return;
  const chosen = pick.value;
  pick.replaceChildren(el("option", {text: "all", value: ""}),
    ...names.map(n => el("option", {text: n, value: n})));
  pick.value = chosen;
}

async function refresh() {
  const state = document.getElementById("state").value;
  const queue = document.getElementById("queue").value;
  const live = document.getElementById("live");
  try {
    const [status, stats, page] = await Promise.all([api("/api/status"), api("/api/stats"),
      api("/api/jobs?limit=" + PAGE + "&offset=" + offset + "&state=" + encodeURIComponent(state)
          + "&queue=" + encodeURIComponent(queue))]);
    renderCounts(status); renderQueues(status); renderStats(stats); renderJobs(page);
    if (selected) await showJob();
    live.textContent = "live, " + new Date().toLocaleTimeString();
    live.className = "live";
  } catch (error) {
    live.textContent = "not reachable: " + error.message;
    live.className = "live stale";
  }
}
document.getElementById("state").addEventListener("change", () => { offset = 0; refresh(); });
document.getElementById("queue").addEventListener("change", () => { offset = 0; refresh(); });
document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
document.getElementById("next").addEventListener("click", () => { offset += PAGE; refresh(); });
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""


###############################################################################
# Benchmark ###################################################################
###############################################################################

# `queuectl bench` measures on a temporary database, each figure beside the
# baseline it is compared with, measured in the same run: machines differ
# and are noisy, so ratios travel better than absolute times.


def _median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def _percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class _Bench(object):
    """Runs each measurement; results is a list of (name, figures dict)."""

    def __init__(self, folder, quick, progress, url=None):
        self.folder = folder
        self.quick = quick
        self.progress = progress
        self.url = url  # a PostgreSQL database to measure on, or None
        self.script = os.path.abspath(__file__)
        self.results = []

    def cli(self, db, *args, **kwargs):
        """Seconds one CLI run takes, started by path, or with
        as_module=True as `python -m queuectl` (bytecode cached)."""
        import subprocess
        start = [sys.executable, self.script]
        if kwargs.pop("as_module", False):
            start = [sys.executable, "-m", self.module()]
            kwargs.update(env=self.module_env(), cwd=self.folder)
        started = time.perf_counter()
        subprocess.check_call(start + ["--db", db] + list(args),
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, **kwargs)
        return time.perf_counter() - started

    def module(self):
        """The name `python -m` runs this file by."""
        return os.path.splitext(os.path.basename(self.script))[0]

    def module_env(self):
        """The environment for `python -m`: this file's folder on the path,
        and bytecode written (the first run caches it for the next)."""
        env = dict(os.environ, PYTHONPATH=os.path.dirname(self.script))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def db(self, name):
        """A new, empty queue: a file, or the PostgreSQL database emptied."""
        if self.url is None:
            path = os.path.join(self.folder, name + ".db")
            Queue(path).close()
            return path
        store = open_store(self.url)
        try:
            store.drop_queue()
        finally:
            store.close()
        Queue(self.url).close()
        return self.url

    def add(self, name, value, unit, baseline=None, target=None, note=""):
        ratio = value / baseline if baseline else None
        self.results.append({"name": name, "value": value, "unit": unit,
                             "baseline": baseline, "ratio": ratio,
                             "target": target, "note": note})

    def run(self):
        for step in (self.throughput, self.bulk_enqueue, self.enqueue_call,
                     self.start_up_instructions, self.pickup_and_idle,
                     self.memory, self.scale, self.beside_delayed):
            self.progress("bench: %s..." % step.__name__.replace("_", " "))
            step()
        return self.results

    def throughput(self):
        """Baseline and queue alternately, three rounds: the medians.

        On SQLite, also the CPU time and minor page faults per job of each
        side (the worker's and its jobs', less those of a worker run on an
        empty queue): steadier than the rates on a shared machine.  Where
        a side forks rather than vforks (the baseline before Python 3.10,
        the worker on 3.6 and 3.7: see _direct_spawn_folder), each fork
        makes every page that process then writes fault once more, so the
        faults show what its own work per job costs every spawn."""
        n = 200 if self.quick else 2000
        raws, rates, walls, costs = [], [], [], []
        for round_number in range(1 if self.quick else 3):
            before = _usage()
            raws.append(_spawn_rate(n, threads=2))
            base = _usage(before)
            start_up = None
            if self.url is None:
                before = _usage()
                self.cli(self.db("empty%d" % round_number), "worker", "start",
                         "--count", "2", "--exit-when-idle")
                start_up = _usage(before)
            db = self.db("e2e%d" % round_number)
            queue = Queue(db)
            queue.enqueue_many([{"command": "true"}] * n)
            before = _usage()
            walls.append(n / self.cli(db, "worker", "start", "--count", "2",
                                      "--exit-when-idle"))
            ours = _usage(before)
            first, last = queue.store.run_span()
            done = queue.counts()["completed"]
            queue.close()
            if done != n:
                raise QueueError("bench: %d of %d jobs completed" % (done, n))
            rates.append(n / (last - first))
            if start_up is not None:
                costs.append([(ours[i] - start_up[i]) / n for i in (0, 1)]
                             + [base[i] / n for i in (0, 1)])
        raw = _median(raws)
        self.add("raw spawn rate, 2 threads (sh -c true)", raw, "jobs/s")
        self.add("end-to-end, worker --count 2, %d jobs" % n, _median(rates),
                 "jobs/s", raw, ">= 0.8x", "first start to last result,"
                 " median of %d rounds alternating with the baseline; %.0f"
                 " jobs/s counting worker start-up" % (len(rates),
                                                       _median(walls)))
        if costs:
            cpu, faults, base_cpu, base_faults = [
                _median([c[i] for c in costs]) for i in range(4)]
            self.add("end-to-end CPU per job, worker and its jobs",
                     cpu * 1e6, "us", base_cpu * 1e6, None, "vs the"
                     " baseline's process and its children; a worker's"
                     " start-up (an empty queue's run) is left out")
            self.add("end-to-end minor page faults per job", faults,
                     "faults", base_faults, None, "the same processes")

    def bulk_enqueue(self):
        n = 5000 if self.quick else 100000
        path = os.path.join(self.folder, "bulk.jsonl")
        with open(path, "w") as handle:
            for i in range(n):
                handle.write('{"command": "echo %d", "priority": %d}\n'
                             % (i, i % 5))
        took, base = [], []
        for round_number in range(1 if self.quick else 3):
            base.append(_bulk_baseline(path, os.path.join(
                self.folder, "plain%d.db" % round_number)))
            took.append(self.cli(self.db("bulk%d" % round_number), "enqueue",
                                 "-f", path))
        self.add("bulk enqueue -f, %d JSON lines" % n, n / _median(took),
                 "jobs/s", n / _median(base), ">= 0.67x",
                 "one transaction, incl. start-up; baseline: a script that"
                 " parses the lines and executemany()s them into the same"
                 " columns and indexes (WAL, synchronous FULL); median of %d;"
                 " 0.67x = 1.5x the time" % len(took))

    def enqueue_call(self):
        import subprocess
        rounds = 3 if self.quick else 15
        db = self.db("calls")
        here = os.path.dirname(self.script)
        env = dict(os.environ, PYTHONPATH=here)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # -m should use its cache

        def timed(argv):
            started = time.perf_counter()
            subprocess.check_call(argv, stdout=subprocess.DEVNULL, env=env,
                                  cwd=here)
            return time.perf_counter() - started
        module = os.path.splitext(os.path.basename(self.script))[0]
        timed([sys.executable, "-m", module, "--db", db, "enqueue", "true"])
        base, script, cached = [], [], []
        for _ in range(rounds):
            base.append(timed([sys.executable, "-c",
                               "import sqlite3, json, argparse"]))
            script.append(timed([sys.executable, self.script, "--db", db,
                                 "enqueue", "true"]))
            cached.append(timed([sys.executable, "-m", module, "--db", db,
                                 "enqueue", "true"]))
        self.add("enqueue call, script by path", _median(script) * 1000, "ms",
                 _median(base) * 1000, "<= 1.8x",
                 "baseline: python -c 'import sqlite3, json, argparse'")
        self.add("enqueue call, python -m (bytecode cached)",
                 _median(cached) * 1000, "ms", _median(base) * 1000, "<= 1.3x")

    def pickup_and_idle(self):
        import random
        import subprocess
        db = self.db("pickup")
        queue = Queue(db)
        worker = subprocess.Popen(
            [sys.executable, self.script, "--db", db, "worker", "start",
             "--count", "4"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            while len(queue.workers()) < 4:
                time.sleep(0.02)
            if self.url:  # NOTIFY, not polling, must start the jobs
                queue.config_set("poll-interval", "5")
            time.sleep(0.1)
            latencies = []
            for _ in range(3 if self.quick else 30):
                time.sleep(random.uniform(0.05, 0.25))
                job_id = queue.enqueue({"command": "true"})
                queue.wait([job_id], timeout=10, interval=0.01)
                job = queue.get(job_id, runs=True)
                latencies.append(parse_time(job["runs"][0]["started_at"])
                                 - parse_time(job["created_at"]))
            self.add("pick-up latency, median", _median(latencies) * 1000,
                     "ms", None, "<= 100 ms", "idle workers, default config")
            self.add("pick-up latency, p95", _percentile(latencies, 0.95)
                     * 1000, "ms", None, "<= 250 ms")
            seconds = 0.5 if self.quick else 10.0
            before = _cpu_seconds(worker.pid)
            time.sleep(seconds)
            after = _cpu_seconds(worker.pid)
            if before is not None and after is not None:
                self.add("idle worker CPU (--count 4)", 100 * (after - before)
                         / seconds, "% of a core", None, "< 1%",
                         "over %gs idle" % seconds)
        finally:
            worker.terminate()
            worker.wait()
            queue.close()

    def memory(self):
        import subprocess
        db = self.db("memory")
        queue = Queue(db)
        n = 40 if self.quick else 400
        queue.enqueue_many([{"command": "sleep 0.02; echo %s" % ("x" * 200)}]
                           * n)
        worker = subprocess.Popen(
            [sys.executable, self.script, "--db", db, "worker", "start",
             "--count", "8"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            queue.wait([j["id"] for j in queue.list(limit=n)], timeout=120,
                       interval=0.05)
            peak = _peak_rss_kb(worker.pid)
        finally:
            worker.terminate()
            worker.wait()
            queue.close()
        if peak is not None:
            self.add("worker --count 8 peak memory", peak / 1024.0, "MB",
                     None, "< 40 MB", "resident, while running %d jobs" % n)

    def scale(self):
        big = 20000 if self.quick else 1000000
        rounds = 2 if self.quick else 9
        sizes = (("small", 1000), ("large", big))
        commands = {"status": ("status",), "stats": ("stats", "--json"),
                    "list": ("list", "--state", "pending", "--limit", "100",
                             "--offset", "500")}
        times = dict((key, {"small": [], "large": []})
                     for key in list(commands) + ["cached"])

        def time_commands(db, name):
            for key, args in commands.items():
                times[key][name].append(self.cli(db, *args))
            times["cached"][name].append(self.cli(db, "status",
                                                  as_module=True))
        # The first `python -m` run caches the bytecode: not timed.
        self.cli(os.path.join(self.folder, "unused.db"), "--version",
                 as_module=True)
        claims = {}
        if self.url:  # one database holds one queue: fill, measure, replace
            for name, total in sizes:
                db = self._scaled_db(name, total)
                for _ in range(rounds):
                    time_commands(db, name)
                claims[name] = _claim_costs(db)[0]
        else:  # both files side by side, measured alternately
            dbs = dict((name, self._scaled_db(name, total))
                       for name, total in sizes)
            for _ in range(rounds):
                for name, _ in sizes:
                    time_commands(dbs[name], name)
            claims["small"], claims["large"] = _claim_costs(dbs["small"],
                                                            dbs["large"])
        status, stats, listing, cached = [
            dict((name, _median(samples)) for name, samples in
                 times[key].items())
            for key in ("status", "stats", "list", "cached")]
        small_claim, large_claim = claims["small"], claims["large"]
        self.add("claim with %d jobs" % big, large_claim * 1e6, "us",
                 small_claim * 1e6, "<= 1.5x", "baseline: 1,000 jobs")
        self.add("status with %d jobs (CLI)" % big, status["large"] * 1000,
                 "ms", status["small"] * 1000, "<= +30 ms",
                 "incl. Python start-up; baseline: 1,000 jobs")
        # SPEC 9's 100 ms: by path, compiling this file alone takes most of
        # that, so the absolute figure is the one with bytecode cached.
        self.add("status with %d jobs, python -m" % big,
                 cached["large"] * 1000, "ms", cached["small"] * 1000,
                 "<= 100 ms", "bytecode cached; baseline: 1,000 jobs")
        self.add("stats --json with %d jobs (CLI)" % big,
                 stats["large"] * 1000, "ms", stats["small"] * 1000,
                 "<= +30 ms", "incl. Python start-up; baseline: 1,000 jobs")
        self.add("list page with %d jobs (CLI)" % big,
                 listing["large"] * 1000, "ms", listing["small"] * 1000,
                 "<= +30 ms", "--state pending --limit 100 --offset 500")

    def beside_delayed(self):
        """Draining due jobs, and the figures commands read, beside many
        jobs that are not due yet (a day away) vs beside 1,000."""
        big = 20000 if self.quick else 1000000
        n = 200 if self.quick else 2000
        rates, stats, idle = {}, {}, {}
        # Filled one after the other: one PostgreSQL database is one queue.
        for name, total in (("small", 1000), ("large", big)):
            db = self.db("delayed-" + name)
            store = open_store(db)
            try:
                store.fill_for_bench(total, total, time.time() + 86400)
            finally:
                store.close()
            stats[name] = _median([self.cli(db, "stats", "--json")
                                   for _ in range(1 if self.quick else 9)])
            samples = []
            for _ in range(1 if self.quick else 3):
                queue = Queue(db)
                queue.enqueue_many([{"command": "true"}] * n)
                started = time.time()
                self.cli(db, "worker", "start", "--count", "2",
                         "--exit-when-idle")
                with queue.store.read():
                    first, last = queue.store._one(
                        "SELECT MIN(started_at), MAX(ended_at) FROM attempts"
                        " WHERE started_at >= ?", (started - 60,))
                queue.close()
                samples.append(n / (last - first))
            rates[name] = _median(samples)
            queue = Queue(db)
            try:
                store, now = queue.store, queue.store.now()
                began = time.perf_counter()
                for _ in range(100):
                    store.anything_due(now)
                idle[name] = (time.perf_counter() - began) / 100
            finally:
                queue.close()
        self.add("drain %d jobs beside %d delayed ones" % (n, big),
                 rates["large"], "jobs/s", rates["small"], ">= 0.67x",
                 "worker --count 2; baseline: beside 1,000 delayed jobs")
        self.add("idle check beside %d delayed jobs" % big,
                 idle["large"] * 1e6, "us", idle["small"] * 1e6, "<= 1.5x",
                 "the read an idle worker makes every poll-interval")
        self.add("stats --json beside %d delayed jobs (CLI)" % big,
                 stats["large"] * 1000, "ms", stats["small"] * 1000,
                 "<= +30 ms", "incl. Python start-up; baseline: 1,000")

    def start_up_instructions(self):
        """CLI start-up by instruction count (callgrind): the same figure
        for the same input however busy the machine is."""
        import shutil
        import subprocess
        name = "enqueue call, instructions (callgrind)"
        if shutil.which("valgrind") is None:
            self.add(name, None, "not measured: valgrind missing")
            return
        db = self.db("instructions")
        here, env, module = (os.path.dirname(self.script), self.module_env(),
                             self.module())

        def count(argv):
            out = os.path.join(self.folder, "callgrind.out")
            subprocess.check_call(
                ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out]
                + argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=env, cwd=here)
            with open(out) as handle:
                for line in handle:
                    if line.startswith("summary:"):
                        return int(line.split()[1])
            raise QueueError("bench: callgrind wrote no summary")
        count([sys.executable, "-m", module, "--db", db, "enqueue", "true"])
        base = count([sys.executable, "-c", "import sqlite3, json, argparse"])
        script = count([sys.executable, self.script, "--db", db, "enqueue",
                        "true"])
        cached = count([sys.executable, "-m", module, "--db", db, "enqueue",
                        "true"])
        self.add(name + ", script by path", script / 1e6, "M instr.",
                 base / 1e6, "<= 1.8x",
                 "baseline: python -c 'import sqlite3, json, argparse'")
        self.add(name + ", python -m", cached / 1e6, "M instr.", base / 1e6,
                 "<= 1.3x")

    def _scaled_db(self, name, total):
        """`total` jobs, 1% pending and the rest completed, written raw."""
        db = self.db(name)
        store = open_store(db)
        try:
            store.fill_for_bench(total, max(total // 100, 600), time.time())
        finally:
            store.close()
        return db


def _usage(since=None):
    """[CPU seconds, minor page faults] of this process and its waited-for
    children, in all or since an earlier _usage()."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    now = [own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
           own.ru_minflt + kids.ru_minflt]
    return now if since is None else [a - b for a, b in zip(now, since)]


def _spawn_rate(n, threads):
    """The baseline: plain subprocess.run('true', shell=True) loops."""
    import subprocess
    import threading

    def loop():
        for _ in range(n // threads):
            subprocess.run("true", shell=True)
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (n // threads * threads) / (time.perf_counter() - started)


# The bulk-enqueue baseline: parse JSON lines, executemany() them into a
# table with the jobs table's columns and indexes, no triggers, one
# transaction, WAL, synchronous=FULL; start-up included.
_BULK_BASELINE = """
import json, os, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[2], isolation_level=None)
conn.execute("PRAGMA synchronous=FULL")
now, cwd, rows = time.time(), os.getcwd(), []
with open(sys.argv[1]) as lines:
    for line in lines:
        job = json.loads(line)
        rows.append((os.urandom(6).hex(), job["command"],
                     job.get("priority", 0), now, 3, None, cwd, "{}", now,
                     now))
conn.execute("BEGIN IMMEDIATE")
conn.executemany("INSERT INTO jobs (id, command, priority, run_at,"
                 " max_retries, timeout, cwd, env, created_at, updated_at,"
                 " state, ready) VALUES (?,?,?,?,?,?,?,?,?,?,'pending',1)",
                 rows)
conn.execute("COMMIT")
"""


def _bulk_baseline(lines, db):
    """Seconds the plain script takes, start-up included."""
    import subprocess
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for sql in _SCHEMA_V1:
            if sql.lstrip().startswith(("CREATE TABLE", "CREATE INDEX")):
                conn.execute(sql)
    finally:
        conn.close()
    started = time.perf_counter()
    subprocess.check_call([sys.executable, "-c", _BULK_BASELINE, lines, db])
    return time.perf_counter() - started


def _claim_costs(*dbs):
    """Seconds per claim transaction in each database, as the median of
    alternating rounds (claim, then roll back: the queue stays put)."""
    stores = [open_store(db) for db in dbs]
    host, now = _host(), time.time()
    samples = [[] for _ in dbs]
    for _ in range(15):
        for store, times in zip(stores, samples):
            started = time.perf_counter()
            for _ in range(50):
                store.claim_and_roll_back(host, now)
            times.append((time.perf_counter() - started) / 50)
    for store in stores:
        store.close()
    return [_median(times) for times in samples]


def _cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(
            os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return None


def _peak_rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None


def run_bench(quick=False, progress=lambda text: None, db=None):
    """Run every measurement on temporary databases, or on the PostgreSQL
    database `db` (a URL; it must hold no jobs: bench empties it for each
    measure and drops its schema at the end); return the figures."""
    import tempfile
    if db is not None:
        _check_bench_target(db)
    with tempfile.TemporaryDirectory(prefix="queuectl-bench-") as folder:
        if _utf8_text(folder, "$TMPDIR") != folder:
            # Python 3.6 under LANG=C: its sqlite3 cannot open such a path,
            # and the baseline scripts bench times are plain sqlite3.
            raise InvalidInput("bench needs an ASCII $TMPDIR under an ASCII"
                               " locale (%s); set TMPDIR or LANG=C.UTF-8"
                               % _short_repr(folder))
        try:
            return _Bench(folder, quick, progress, db).run()
        finally:
            if db is not None:
                store = open_store(db)
                try:
                    store.drop_queue()
                finally:
                    store.close()


def _check_bench_target(url):
    if not re.match(r"^postgres(ql)?://", url, re.IGNORECASE):
        raise InvalidInput("bench --db takes a postgresql:// URL (SQLite is"
                           " measured on temporary files)")
    store = open_store(url)
    try:
        if not store.is_empty():
            raise Conflict("%s holds a queue; bench empties the database it"
                           " measures on, so give it one of its own"
                           % store.display)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
