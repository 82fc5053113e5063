"""Tests for queuectl: mostly the real CLI in subprocesses on a temp database.

Run: python3 -m unittest -v test_queuectl   (pytest works too)
QUEUECTL_STRESS=N multiplies the sizes of the fault tests for long runs.
"""

import contextlib
import glob
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings

import queuectl

HERE = os.path.dirname(os.path.abspath(__file__))
#: A PostgreSQL database (URL) to run the backend-independent tests against
#: too; its schema `queuectl` is dropped before each test.  .ci/run sets it.
PG_URL = os.environ.get("QUEUECTL_TEST_PG") or None
SCRIPT = os.path.join(HERE, "queuectl.py")
STRESS = max(1, int(os.environ.get("QUEUECTL_STRESS", "1") or 1))


def _glibc_version():
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) \
            if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


# Runs queuectl.py (argv[2]) as its command line would, after writing the
# folder of every job started through Popen to the file argv[1] (the
# "subprocess.Popen" audit event, Python 3.8+).
_AUDITED_WORKER = """
import runpy, sys
log = open(sys.argv[1], "a")
def hook(event, args):
    if event == "subprocess.Popen":
        folder = args[2]
        log.write(folder.decode() if isinstance(folder, bytes) else folder)
        log.write("\\n")
        log.flush()
sys.addaudithook(hook)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@contextlib.contextmanager
def _mount_watch():
    """Yields a function: did the mount table change since (Linux: the
    mount table polls POLLPRI on change; elsewhere never)?"""
    import select
    try:
        handle = open("/proc/self/mountinfo")
    except OSError:
        yield lambda: False
        return
    with handle:
        handle.read()
        poller = select.poll()
        poller.register(handle, select.POLLPRI)
        yield lambda: bool(poller.poll(0))


#: Linux with a glibc whose posix_spawn `worker start` calls through ctypes
#: on every Python.
GLIBC = (_glibc_version() or (0,)) >= (2, 26)


def sqlite_only(why):
    """A test of something only the SQLite store has (files, WAL, locks):
    skipped, saying why, in the PostgreSQL run."""
    def wrap(test):
        def run(self, *args, **kwargs):
            if self.STORE != "sqlite":
                self.skipTest("SQLite only: " + why)
            return test(self, *args, **kwargs)
        run.__name__, run.__doc__ = test.__name__, test.__doc__
        return run
    return wrap


def _pg_connect(url):
    try:
        import psycopg
        return psycopg.connect(url, autocommit=True)
    except ImportError:
        import psycopg2
        conn = psycopg2.connect(url)
        conn.autocommit = True
        return conn


def _pg_sql(url, query, params=()):
    """Run SQL written for the tests (`?` placeholders) in schema queuectl."""
    conn = _pg_connect(url)
    try:
        cursor = conn.cursor()
        cursor.execute("SET search_path = queuectl")
        cursor.execute(query.replace("?", "%s"), params or None)
        return [tuple(r) for r in cursor.fetchall()] \
            if cursor.description else []
    finally:
        conn.close()


def _pg_dump(url, live=False):
    """Every row of schema queuectl as text (None when there is none);
    live=True leaves out what running workers rewrite (_LIVE_ROWS)."""
    tables = [r[0] for r in _pg_sql(
        url, "SELECT table_name FROM information_schema.tables WHERE"
        " table_schema = 'queuectl' ORDER BY table_name")]
    if not tables:
        return None
    rows = {t: _pg_sql(url, "SELECT * FROM %s ORDER BY 1" % t)
            for t in tables}
    if live:
        rows = {t: [r for r in found if not _rewritten_by_workers(t, r[0])]
                for t, found in rows.items()}
    return "\n".join("%s: %r" % (t, rows[t]) for t in tables)


def _dumped_row_key(line):
    """(table, first value) of an iterdump line INSERT INTO "t" VALUES('v',
    ...); ("", "") for any other line."""
    found = re.match(r'INSERT INTO "(\w+)" VALUES\(\'([^\']*)', line)
    return found.groups() if found else ("", "")


def _rewritten_by_workers(table, key):
    """Rows that running workers change by themselves: their own rows
    (heartbeats) and the figures of the last clean-up."""
    return table == "workers" or (table == "config"
                                  and key.startswith("_cleanup_"))


def wait_for(predicate, timeout=60.0, interval=0.02, what="condition"):
    """Poll until predicate() is truthy; fail the test after `timeout` s.

    The deadline only catches a hang: a loaded machine may be slow, so a
    test waits for the event it needs and never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %gs waiting for %s"
                                 % (timeout, what))
        time.sleep(interval)


def _thread_count(pid):
    """How many threads process `pid` has (Linux /proc)."""
    return len(os.listdir("/proc/%d/task" % pid))


def _remove_test_folder(path):
    """Remove a test's folder.  A job released at clean-up may still be
    ending in the background; a file that keeps appearing for seconds is
    a real leak, reported by name."""
    for _ in range(50):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("files keep appearing in the test folder: %s"
                         % sorted(os.listdir(path)))

class CLITestCase(unittest.TestCase):
    """Each test gets its own folder, HOME and database.

    STORE says which: "sqlite" (a file in the folder) or "postgresql" (the
    database PG_URL, its schema dropped first); the classes made at the end
    of this file run the backend-independent tests on PostgreSQL."""

    STORE = "sqlite"

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="queuectl-test-")
        self.addCleanup(_remove_test_folder, self.dir)
        self.db = os.path.join(self.dir, "q.db")
        if self.STORE == "postgresql":
            self.db = PG_URL
            _pg_sql(PG_URL, "DROP SCHEMA IF EXISTS queuectl CASCADE")
        self.env = dict(os.environ, HOME=self.dir)
        self.env.pop("QUEUECTL_DB", None)
        self.env.pop("NO_COLOR", None)
        self.procs = []
        self.addCleanup(self._kill_procs)

    def _kill_procs(self):
        # Job groups a killed worker left behind must not outlive the test.
        try:
            groups = [r[0] for r in self.sql(
                "SELECT pgid FROM attempts WHERE pgid IS NOT NULL")]
        except Exception:  # no database (yet), or no schema on PostgreSQL
            groups = []
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()

    # -- running the CLI ----------------------------------------------------

    def cli(self, *args, **kwargs):
        """Run queuectl; return (exit code, stdout, stderr) as text."""
        stdin = kwargs.pop("input", None)
        env = dict(self.env, **kwargs.pop("env", {}))
        db = kwargs.pop("db", self.db)
        argv = [sys.executable, SCRIPT] + (["--db", db] if db else []) + list(args)
        proc = subprocess.run(argv, input=(stdin or "").encode("utf-8"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, cwd=kwargs.pop("cwd", self.dir),
                              timeout=kwargs.pop("timeout", 60))
        return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
                proc.stderr.decode("utf-8", "replace"))

    def ok(self, *args, **kwargs):
        """Run a command that must succeed quietly on stderr; return stdout."""
        code, out, err = self.cli(*args, **kwargs)
        self.assertEqual((code, err), (0, ""), "queuectl %s: %s" % (args, err))
        return out

    def main(self, *args, **kwargs):
        """queuectl.main() in this process, as the CLI; (code, out, err).

        Much faster than a subprocess; for the many bad-input cases."""
        stdin = kwargs.pop("input", None)
        db = kwargs.pop("db", self.db)
        self.assertEqual(kwargs, {})
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()))
        try:
            with contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(err), \
                    warnings.catch_warnings():
                # A Popen of an earlier test, collected now, must not write
                # its ResourceWarning into this command's stderr.
                warnings.simplefilter("ignore", ResourceWarning)
                code = queuectl.main((["--db", db] if db else []) + list(args))
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def expect_failure(self, code, message, *args, **kwargs):
        """A command that must fail with one error line and no changes.

        Runs in-process unless it needs its own environment.  live=True:
        workers are running, so their heartbeats are not compared."""
        live = kwargs.pop("live", False)
        before = self.dump(live)
        run = self.cli if "env" in kwargs else self.main
        got, out, err = run(*args, **kwargs)
        self.assertEqual(got, code, "queuectl %s: %r" % (args, err))
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("queuectl: error: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(message, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.dump(live), before,
                         "data changed by failed command")
        return err

    def ok_json(self, *args, **kwargs):
        return json.loads(self.ok(*(args + ("--json",)), **kwargs))

    def enqueue(self, command_or_json, *flags):
        return self.ok("enqueue", command_or_json, *flags).strip()

    def dashboard_free_metrics(self):
        """/metrics' text, read in-process (no dashboard)."""
        queue = queuectl.Queue(self.db)
        try:
            return queue.metrics()
        finally:
            queue.close()

    def job(self, job_id):
        return self.ok_json("show", job_id)

    def drain(self, *flags):
        """Run one worker process until no job is due; return its stderr."""
        code, out, err = self.cli("worker", "start", "--exit-when-idle", *flags)
        self.assertEqual(code, 0, err)
        return err

    def start_worker(self, *flags, **kwargs):
        """A worker process in the background; its stderr goes to a file."""
        log = open(os.path.join(self.dir, "worker-%d.log" % len(self.procs)),
                   "w+")
        self.addCleanup(log.close)
        argv = [sys.executable, SCRIPT, "--db", self.db, "worker", "start"]
        proc = subprocess.Popen(argv + list(flags), stdout=subprocess.DEVNULL,
                                stderr=log, env=dict(self.env, **kwargs),
                                cwd=self.dir)
        proc.log = log
        self.procs.append(proc)
        return proc

    def wait_for(self, predicate, *args, **kwargs):
        """self.wait_for(), and on a timeout the end of every background
        worker's log: a hang seen only on CI must explain itself."""
        try:
            return wait_for(predicate, *args, **kwargs)
        except AssertionError as exc:
            logs = []
            for proc in self.procs:
                log = getattr(proc, "log", None)
                if log is not None:
                    lines = _read(log.name).splitlines()[-25:]
                    logs.append("--- %s (pid %d, exit %r), last lines:\n%s"
                                % (os.path.basename(log.name), proc.pid,
                                   proc.poll(), "\n".join(lines)))
            raise AssertionError("\n".join([str(exc)] + logs)) from None

    def spawn(self, *args):
        """queuectl in the background with stdout and stderr piped."""
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            cwd=self.dir)
        self.procs.append(proc)
        return proc

    def dump(self, live=False):
        """Every row of the database, to prove a failed command changed
        none; live=True: without what running workers rewrite."""
        if self.STORE == "postgresql":
            return _pg_dump(self.db, live)
        if not os.path.exists(self.db):
            return None
        conn = sqlite3.connect(self.db)
        try:
            lines = conn.iterdump()
            if live:
                lines = [line for line in lines if not _rewritten_by_workers(
                    *_dumped_row_key(line))]
            return "\n".join(lines)
        except sqlite3.DatabaseError:
            return open(self.db, "rb").read()
        finally:
            conn.close()

    def config(self, **values):
        for key, value in values.items():
            self.ok("config", "set", key.replace("_", "-"), str(value))

    def state(self, job_id):
        return self.job(job_id)["state"]

    def wait_state(self, job_id, state, timeout=60):
        self.wait_for(lambda: self.state(job_id) == state, timeout,
                 what="job %s to be %s" % (job_id, state))

    def sql(self, query, *params):
        if self.STORE == "postgresql":
            return _pg_sql(self.db, query, params)
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            rows = conn.execute(query, params).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()

    def pgid(self, job_id):
        """The process group of the job's current attempt, once recorded."""
        rows = self.sql("SELECT a.pgid FROM jobs j JOIN attempts a"
                        " ON a.id = j.attempt_id WHERE j.id = ?", job_id)
        return rows[0][0] if rows else None

    def beats(self, pid):
        """How often the worker process `pid` has beaten (-1: none there)."""
        return self.sql("SELECT COALESCE(MIN(beat), -1) FROM workers"
                        " WHERE pid = ?", pid)[0][0]

    # -- jobs that run until the test lets them end --------------------------

    def hold_path(self, name="job"):
        return os.path.join(self.dir, "hold-" + name)

    def hold(self, name="job"):
        """Shell code for a job: note that it started, then run until
        release(name).  Whatever the machine's load, the job is running
        for as long as the test needs; cleanup releases it."""
        path = self.hold_path(name)
        open(path, "w").close()
        self.addCleanup(self.release, name)
        return "touch %s; while [ -e %s ]; do sleep 0.05; done" % (
            shlex.quote(path + ".started"), shlex.quote(path))

    def release(self, name="job"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.hold_path(name))

    def wait_started(self, name="job"):
        self.wait_for(lambda: os.path.exists(self.hold_path(name) + ".started"),
                 what="held job %r to start" % name)

    def busy_worker(self, command):
        """A 2-thread worker process: one thread runs `command` (a held
        job), the other has run a job of its own and now waits for work.
        Returns (the process, the held job's id, the process's threads)."""
        worker = self.start_worker("--count", "2")
        job_id = self.enqueue(command)
        self.wait_started()
        self.wait_state(self.enqueue("true"), "completed")
        return worker, job_id, _thread_count(worker.pid)

    def first_signal(self, worker, threads, signum):
        """Send a busy_worker() its first stop signal; return once it acted
        on it, which ends its idle thread.  A second signal sent before
        Python has run the handler for the first merges with it."""
        worker.send_signal(signum)
        self.wait_for(lambda: _thread_count(worker.pid) < threads,
                 what="the worker to act on signal %d" % signum)


class TestEnqueue(CLITestCase):

    def test_enqueue_prints_only_the_id_and_stores_defaults(self):
        # enqueue prints the id alone; defaults come from config at enqueue.
        self.config(max_retries=5, job_timeout=7)
        out = self.ok("enqueue", "echo hi")
        job_id = out.strip()
        self.assertEqual(out, job_id + "\n")
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"], job["max_retries"],
                          job["timeout"], job["priority"], job["cwd"]),
                         ("pending", 0, 5, 7, 0, os.path.realpath(self.dir)))
        self.config(max_retries=1)
        self.assertEqual(self.job(job_id)["max_retries"], 5)

    def test_enqueue_json_with_every_field(self):
        # Every SPEC 2 field given as JSON is stored as given.
        spec = {"id": "build.1:a-b_c", "command": "make", "max_retries": 0,
                "priority": -3, "run_at": "2030-01-02T03:04:05Z",
                "timeout": 2.5, "cwd": "/tmp", "env": {"A": "1", "B": ""}}
        self.assertEqual(self.enqueue(json.dumps(spec)), "build.1:a-b_c")
        job = self.job("build.1:a-b_c")
        for key in ("command", "max_retries", "priority", "timeout", "cwd",
                    "env"):
            self.assertEqual(job[key], spec[key], key)
        self.assertEqual(job["run_at"], "2030-01-02T03:04:05.000Z")
        for key in ("created_at", "updated_at", "last_error", "attempts"):
            self.assertIn(key, job)

    def test_a_big_enqueue_stores_every_job_as_given(self):
        # More jobs than one multi-row INSERT (PostgreSQL) or the bulk count
        # (SQLite) take, fields varying from job to job, some all NULL
        # within a chunk: every job stored as given, the counts exact.
        count = max(queuectl.BULK_COUNT_FROM, queuectl._PG_INSERT_ROWS) + 234
        specs = []
        for i in range(count):
            spec = {"command": "echo %d" % i, "id": "big%05d" % i}
            if i >= count // 2:  # the first chunks have no timeout at all
                spec.update(timeout=0.5 + i % 3, priority=i % 7 - 3,
                            max_retries=i % 4, env={"N": str(i)},
                            cwd="/tmp", run_at="2030-01-02T03:04:05Z")
            specs.append(spec)
        path = os.path.join(self.dir, "big.jsonl")
        with open(path, "w") as handle:
            handle.write("".join(json.dumps(s) + "\n" for s in specs))
        out = self.ok("enqueue", "-f", path)
        self.assertEqual(out.split(), [s["id"] for s in specs])
        self.assertEqual(self.ok_json("status")["counts"]["pending"], count)
        for i in (0, count // 2 - 1, count // 2, count - 1):
            job, spec = self.job("big%05d" % i), specs[i]
            for key in ("command", "timeout", "priority", "max_retries",
                        "env", "cwd"):
                if key in spec:
                    self.assertEqual(job[key], spec[key], (i, key))
            if "timeout" not in spec:
                self.assertEqual((job["timeout"], job["priority"],
                                  job["env"]), (None, 0, {}), i)
        self.assertEqual(self.job("big%05d" % (count - 1))["run_at"],
                         "2030-01-02T03:04:05.000Z")

    def test_enqueue_flags(self):
        # The flag form sets the same fields as JSON; --delay counts from
        # the enqueue.
        before = time.time()
        job_id = self.enqueue("true", "--id", "f1", "--max-retries", "2",
                              "--priority", "9", "--delay", "60",
                              "--timeout", "3", "--env", "X=y=z",
                              "--cwd", "/tmp")
        after = time.time()
        job = self.job(job_id)
        self.assertEqual((job["max_retries"], job["priority"], job["timeout"],
                          job["env"], job["cwd"]),
                         (2, 9, 3, {"X": "y=z"}, "/tmp"))
        run_at = queuectl.parse_time(job["run_at"])  # to the millisecond
        self.assertGreaterEqual(run_at, before + 60 - 0.001)
        self.assertLessEqual(run_at, after + 60 + 0.001)

    def test_run_at_offsets_and_naive_local_time(self):
        # run_at honours Z and offsets; a naive time is local time.
        a = self.enqueue(json.dumps({"command": "true",
                                     "run_at": "2030-01-01T12:00:00+02:00"}))
        self.assertEqual(self.job(a)["run_at"], "2030-01-01T10:00:00.000Z")
        b = self.enqueue(json.dumps({"command": "true",
                                     "run_at": "2030-01-01T12:00:00"}))
        expected = time.mktime((2030, 1, 1, 12, 0, 0, 0, 0, -1))
        self.assertEqual(self.job(b)["run_at"], queuectl.iso(expected))

    def test_enqueue_file_array_jsonl_and_stdin(self):
        # -f takes a JSON array, JSON Lines or stdin and prints every id.
        path = os.path.join(self.dir, "jobs.json")
        with open(path, "w") as handle:
            json.dump([{"command": "true", "id": "a1"},
                       {"command": "true", "id": "a2"}], handle)
        self.assertEqual(self.ok("enqueue", "-f", path), "a1\na2\n")
        lines = '{"command": "true", "id": "b1"}\n\n{"command": "false"}\n'
        out = self.ok("enqueue", "-f", "-", input=lines).split()
        self.assertEqual(len(out), 2)
        self.assertEqual(out[0], "b1")
        self.assertEqual(self.ok_json("status")["counts"]["pending"], 4)
        # A byte order mark (Windows Notepad saves one) is not content.
        with open(path, "w", encoding="utf-8-sig") as handle:
            handle.write('{"command": "true", "id": "c1"}\n')
        self.assertEqual(self.ok("enqueue", "-f", path), "c1\n")

    def test_enqueue_file_is_all_or_nothing(self):
        # One bad line in a file: an error naming it, and no job is added.
        self.enqueue("true")
        lines = '{"command": "true"}\n{"command": "true", "priority": "x"}\n'
        self.expect_failure(2, "job 2: priority must be an integer", "enqueue", "-f", "-",
                  input=lines)

    def test_json_lines_are_read_alike_however_they_are_laid_out(self):
        # Most lines are read by the decoder's scanner alone; padded, blank,
        # CRLF and bad lines must read (or fail) as json.loads would.
        lines = ('{"command": "true", "id": "c1"}\r\n'
                 '   {"command": "true", "id": "c2"}   \n'
                 '\t\n'
                 '{"command": "true", "id": "c3", "env": {"A": "\\u20ac"}}\n')
        self.assertEqual(self.ok("enqueue", "-f", "-", input=lines),
                         "c1\nc2\nc3\n")
        self.assertEqual(self.job("c3")["env"], {"A": "\u20ac"})
        for bad, message in (
                ('{"command": "true", "command": "false"}',
                 'line 4: invalid JSON: duplicate key "command"'),
                ('{"command": "true"} x', "line 4: invalid JSON: Extra data"),
                ('{"command": "true"', "line 4: invalid JSON: Expecting"),
                ("[" * 100000, "line 4: invalid JSON: nested too deeply"),
                ('"true"', "job 3: a job must be a JSON object")):
            self.expect_failure(2, message, "enqueue", "-f", "-", input=(
                '{"command": "true"}\n\n{"command": "true"}\n' + bad + "\n"))
        self.assertEqual(len(self.ok_json("list")), 3)

    def test_generated_ids_are_unique_and_durable(self):
        # Ids survive the process; many enqueues never clash.
        ids = set(self.ok("enqueue", "-f", "-", input="\n".join(
            ['{"command": "true"}'] * 300)).split())
        self.assertEqual(len(ids), 300)
        listed = self.ok_json("list", "--limit", "1000")
        self.assertEqual(set(j["id"] for j in listed), ids)


class TestBadInput(CLITestCase):
    """Every bad input: exit 2 (or 1), one error line, nothing changed."""

    def setUp(self):
        super(TestBadInput, self).setUp()
        self.existing = self.enqueue("true", "--id", "abc123")
        self.enqueue("true", "--id", "abd456")

    def test_numbers_dates_and_flags_a_shell_user_would_not_mean(self):
        # int() and float() take other scripts' digits and '3_0'; numbers
        # here are ASCII decimals.  A date east of UTC on 1970-01-01 is
        # before 1970; a repeated --env is refused as a repeated JSON key;
        # an empty --host would listen everywhere.
        cases = [
            ("max-retries must be", ("config", "set", "max-retries", "\uff13")),
            ("max-retries must be", ("config", "set", "max-retries", "3_0")),
            ("--timeout must be a number", ("enqueue", "--timeout",
                                            "\u0663", "true")),
            ("--max-retries must be an integer", ("enqueue", "--max-retries",
                                                  "3_0", "true")),
            ("is not a number", ("schedule", "add", "n", "\u0663 * * * *",
                                 "true")),
            ("before 1970", ("enqueue", "--run-at",
                             "1970-01-01T00:00:00+23:59", "true")),
            ("--env X is given twice", ("enqueue", "--env", "X=1", "--env",
                                        "X=2", "true")),
            ("<= 65535", ("dashboard", "--port", "70000")),
            ("--host is empty", ("dashboard", "--host", "")),
            ("<= 256", ("worker", "start", "--count", "257")),
            # Numbers past the 4,300 digits Python 3.7+'s int() refuses,
            # and dates past 9999 through an offset; quoted in 40 characters.
            ("cron: minute: 9999", ("schedule", "add", "n", "9" * 5000 +
                                    " * * * *", "true")),
            ("priority must be an integer from -9223372036854775807 to"
             " 9223372036854775807, got 9999", (
                 "enqueue", "--priority", "9" * 5000, "true")),
            ("priority must be an integer from -9223372036854775807 to"
             " 9223372036854775807, got -9223372036854775808", (
                 "enqueue", "--priority=-9223372036854775808", "true")),
            ("--priority must be an integer, got 'x999", (
                "enqueue", "--priority", "x" + "9" * 5000, "true")),
            ("max-retries must be", ("config", "set", "max-retries",
                                     "9" * 5000)),
            ("invalid JSON: a number of more than 4300 digits"
             if hasattr(sys, "set_int_max_str_digits") else
             "priority must be an integer", (
                 "enqueue", '{"command": "true", "priority": %s}' % ("9" * 5000))),
            ("after 9999-12-31T23:59:59Z", ("enqueue", "--run-at",
                                            "9999-12-31T23:59:59-23:59",
                                            "true")),
        ]
        for message, args in cases:
            with self.subTest(args=args):
                self.expect_failure(2, message, *args)
                code, out, err = self.main(*args)
                self.assertLess(len(err), 200, err)

    def test_input_larger_than_memory_is_one_line_and_changes_nothing(self):
        # `enqueue -f /dev/zero` under a memory limit: MemoryError is
        # "out of memory", not an internal error; the queue is as it was.
        import resource
        self.enqueue("true")
        before = self.dump()
        limit = 400 << 20

        def small():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--db", self.db, "enqueue", "-f",
             "/dev/zero"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, preexec_fn=small, timeout=120)
        self.assertEqual((proc.returncode, proc.stdout, proc.stderr),
                         (1, b"", b"queuectl: error: out of memory\n"))
        self.assertEqual(self.dump(), before)

    def test_a_pool_too_big_for_the_open_file_limit_is_refused(self):
        # Not hundreds of 'unable to open database' lines, thread by
        # thread: one line up front.  Under a soft limit only, the pool
        # raises it and runs.
        import resource

        def run(soft, hard):
            return subprocess.run(
                [sys.executable, SCRIPT, "--db", self.db, "worker", "start",
                 "--count", "100", "--exit-when-idle"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                preexec_fn=lambda: resource.setrlimit(
                    resource.RLIMIT_NOFILE, (soft, hard)))
        job_id = self.enqueue("true")
        refused = run(100, 100)
        self.assertEqual(refused.returncode, 2)
        self.assertEqual(refused.stderr.decode(), "queuectl: error: --count"
                         " 100 needs about 664 open files; this process may"
                         " open 100 (ulimit -n)\n")
        self.assertEqual(self.state(job_id), "pending")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY or hard >= 664:
            ran = run(100, hard)
            self.assertEqual(ran.returncode, 0, ran.stderr)
            self.assertEqual(self.state(job_id), "completed")

    def test_bad_json_and_fields(self):
        cases = [
            ('{"command": "x"', "invalid JSON"),
            ('{"comand": "x"}', "unknown field 'comand'"),
            ('{"command": "x", "state": "completed"}', "field 'state' is managed"),
            ('{"command": "x", "attempts": 3}', "field 'attempts' is managed"),
            ('{"command": ""}', "command must be a non-empty string"),
            ('{"command": 5}', "command must be a non-empty string"),
            ('{}', "command must be a non-empty string"),
            ('{"command": "x", "max_retries": -1}', "max_retries must be an integer >= 0"),
            ('{"command": "x", "max_retries": 1.5}', "max_retries must be an integer"),
            ('{"command": "x", "max_retries": true}', "max_retries must be an integer"),
            ('{"command": "x", "priority": "high"}', "priority must be an integer"),
            ('{"command": "x", "timeout": 0}', "timeout must be a number > 0"),
            ('{"command": "x", "timeout": -5}', "timeout must be a number > 0"),
            ('{"command": "x", "delay": -1}', "delay must be a number >= 0"),
            ('{"command": "x", "run_at": "tomorrow"}', "run_at: not an ISO 8601"),
            ('{"command": "x", "run_at": "2026-13-01T00:00:00Z"}', "not a valid date"),
            ('{"command": "x", "run_at": "2030-01-01T00:00:00Z", "delay": 1}',
             "run_at or delay, not both"),
            ('{"command": "x", "env": {"A": 1}}', "env: value of A must be a string"),
            ('{"command": "x", "env": ["A"]}', "env must be an object"),
            ('{"command": "x", "env": {"A=B": "1"}}', "env: bad variable name"),
            ('{"command": "x", "id": "has space"}', "id must be 1-128 characters"),
            ('{"command": "x", "id": ""}', "id must be 1-128 characters"),
            ('{"command": "x", "id": "%s"}' % ("a" * 129), "id must be 1-128"),
            ('{"command": "x", "cwd": 7}', "cwd must be a non-empty path"),
            ('{"command": "a\\u0000b"}', "must not contain NUL"),
        ]
        for text, message in cases:
            with self.subTest(text=text):
                self.expect_failure(2, message, "enqueue", text)

    def test_duplicate_ids(self):
        self.expect_failure(1, "a job with id 'abc123' already exists",
                  "enqueue", "true", "--id", "abc123")
        self.expect_failure(1, "duplicate id 'z' in input", "enqueue", "-f", "-",
                  input='{"command": "true", "id": "z"}\n'
                        '{"command": "true", "id": "z"}\n')

    def test_bad_flags(self):
        cases = [
            (("enqueue", "true", "--max-retries", "x"), "--max-retries must be an integer"),
            (("enqueue", "true", "--max-retries", "-2"), "max_retries must be an integer >= 0"),
            (("enqueue", "true", "--timeout", "nan"), "--timeout must be a number, got 'nan'"),
            (("enqueue", "true", "--run-at", "soon"), "run_at: not an ISO 8601"),
            (("enqueue", "true", "--run-at", "2030-01-01", "--delay", "1"), "not allowed with"),
            (("enqueue", "true", "--env", "NOEQUALS"), "--env takes KEY=VALUE"),
            (("enqueue", '{"command": "x"}', "--priority", "1"), "not both"),
            (("enqueue",), "enqueue needs a command"),
            (("enqueue", "-f", "/nonexistent/jobs.json"), "cannot read /nonexistent"),
            (("enqueue", "-f", "-"), "no jobs in input"),
            (("worker", "start", "--count", "0"), "--count must be >= 1"),
            (("worker", "start", "--count", "two"), "--count must be an integer"),
            (("list", "--state", "done"), "invalid choice"),
            (("list", "--limit", "0"), "--limit must be >= 1"),
            (("purge", "--state", "completed", "--older-than", "soon"), "not a duration"),
            (("purge", "--state", "pending"), "invalid choice"),
            (("logs", "abc123", "--attempt", "0"), "--attempt must be >= 1"),
            (("frobnicate",), "invalid choice"),
            (("dlq", "retry"), "give job ids or --all"),
            (("dashboard", "--port", "70000"), "--port must be >= 0 and <= 65535"),
            (("wait", "abc123", "--timeout", "-1"), "--timeout must be >= 0"),
            (("wait", "abc123", "--timeout", "1e10"),
             "--timeout must be >= 0 and <= 1e9, got 10000000000.0"),
            (("stats", "--since", "0"), "--since must be > 0"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                self.expect_failure(2, message, *args)

    def test_bad_config(self):
        cases = [
            (("config", "set", "max-retry", "3"), "unknown config key 'max-retry'"),
            (("config", "get", "nope"), "keys: backoff-base"),
            (("config", "set", "max-retries", "-1"), "max-retries must be an integer >= 0"),
            (("config", "set", "max-retries", "1.5"), "max-retries must be an integer"),
            (("config", "set", "backoff-base", "0.5"), "backoff-base must be a number >= 1"),
            (("config", "set", "lease-timeout", "0.001"),
             "lease-timeout must be a number of seconds >= 0.5"),
            (("config", "set", "poll-interval", "0"), "poll-interval must be a number of seconds > 0"),
            (("config", "set", "lease-timeout", "inf"), "lease-timeout must be"),
            (("config", "set", "output-limit", "lots"), "output-limit must be"),
            (("config", "set", "max-retries"), "needs KEY and VALUE"),
            (("config", "frob"), "invalid choice"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                self.expect_failure(2, message, *args)

    def test_bad_ids(self):
        self.expect_failure(2, "id prefix 'ab' is ambiguous: abc123, abd456", "show", "ab")
        self.expect_failure(1, "no job with id 'zzz'", "show", "zzz")
        self.expect_failure(2, "not a valid job id", "show", "a b")
        self.expect_failure(1, "no job with id 'nope'", "delete", "abc123", "nope")
        self.expect_failure(1, "is pending, not dead", "dlq", "retry", "abc")
        self.expect_failure(1, "has no attempt yet", "logs", "abc123")
        self.expect_failure(1, "after: no job with id 'ghost'", "enqueue", "true",
                  "--after", "ghost")
        # An empty id (`--after "$BUILD"` with BUILD unset) is refused, not
        # read as "no dependency", which would run the job at once.
        for after in ("", ",", "abc123,", ",abc123", "abc123,,abd456"):
            self.expect_failure(2, "after must be 1-128 characters", "enqueue",
                                "true", "--after", after)
            self.expect_failure(2, "after must be 1-128 characters", "enqueue",
                                json.dumps({"command": "true", "after": after}))

    def test_exact_id_beats_prefix(self):
        # An id that is also a prefix of another id resolves to itself.
        self.enqueue("true", "--id", "abc")
        self.assertEqual(self.job("abc")["id"], "abc")
        self.assertEqual(self.job("abc1")["id"], "abc123")


class TestDatabaseFiles(CLITestCase):

    def test_default_path_and_permissions(self):
        # ~/.queuectl/queue.db is made 0700/0600; $QUEUECTL_DB beats it,
        # and --db beats both.
        self.ok("enqueue", "true", db=None)
        folder = os.path.join(self.dir, ".queuectl")
        self.assertEqual(os.stat(folder).st_mode & 0o777, 0o700)
        path = os.path.join(folder, "queue.db")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        other = os.path.join(self.dir, "sub", "env.db")
        self.ok("enqueue", "true", db=None, env={"QUEUECTL_DB": other})
        self.assertEqual(os.stat(other).st_mode & 0o777, 0o600)
        self.ok("enqueue", "true", env={"QUEUECTL_DB": other})
        status = self.ok_json("status", db=None, env={"QUEUECTL_DB": other})
        self.assertEqual(status["counts"]["pending"], 1)
        self.assertEqual(status["db"], other)

    def test_wal_files_are_private(self):
        # The -wal and -shm files a live connection makes are 0600 too.
        self.enqueue("true")
        conn = sqlite3.connect(self.db)
        conn.execute("SELECT 1 FROM jobs").fetchall()
        try:
            for suffix in ("-wal", "-shm"):
                mode = os.stat(self.db + suffix).st_mode & 0o777
                self.assertEqual(mode, 0o600, suffix)
        finally:
            conn.close()

    def assert_refused(self, content, message):
        with open(self.db, "wb") as handle:
            handle.write(content)
        for args in (("status",), ("enqueue", "true"), ("list",)):
            code, out, err = self.cli(*args)
            self.assertEqual(code, 1, err)
            self.assertIn(message, err)
            self.assertEqual(err.count("\n"), 1)
            with open(self.db, "rb") as handle:
                self.assertEqual(handle.read(), content)

    def test_garbage_and_empty_files_are_refused_untouched(self):
        self.assert_refused(os.urandom(5000), "not a usable queuectl database")
        self.assert_refused(b"", "not a queuectl database")

    def test_foreign_sqlite_database_is_refused_untouched(self):
        path = os.path.join(self.dir, "other.db")
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE jobs (x)")
        conn.commit()
        conn.close()
        with open(path, "rb") as handle:
            self.assert_refused(handle.read(), "not a queuectl database")

    def test_newer_and_truncated_databases_are_refused_untouched(self):
        self.ok("enqueue", "-f", "-", input="\n".join(
            json.dumps({"command": "echo " + "x" * 400}) for _ in range(200)))
        conn = sqlite3.connect(self.db)
        conn.execute("PRAGMA user_version=99")
        conn.commit()
        conn.close()
        with open(self.db, "rb") as handle:
            content = handle.read()
        self.assert_refused(content, "written by a newer queuectl")
        content = content[:len(content) // 2]
        self.assert_refused(content, "malformed")

    def test_tampered_schema_versions_are_refused_untouched(self):
        # A queuectl mark without a schema version, or a version older than
        # the tables: one line naming the problem, and the file unchanged.
        for version, message in ((-1, "has no schema version"),
                                 (0, "has no schema version"),
                                 (1, "cannot migrate %s from schema 1" % self.db)):
            with self.subTest(version=version):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.db)
                self.ok("enqueue", "true")
                conn = sqlite3.connect(self.db)
                conn.execute("PRAGMA user_version=%d" % version)
                conn.commit()
                conn.close()
                with open(self.db, "rb") as handle:
                    self.assert_refused(handle.read(), message)

    def test_non_ascii_paths_under_a_c_locale(self):
        # Python 3.6 under LANG=C encodes paths as ASCII: a database, a job
        # file, $QUEUECTL_DB and $TMPDIR named in UTF-8 still work (3.7+
        # switch to UTF-8 by themselves), and a path that is not UTF-8 is
        # one line of error.
        env = {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}
        folder = os.path.join(self.dir, "caf\u00e9")
        os.mkdir(folder)
        db = os.path.join(folder, "\u00fc.db")
        jobs = os.path.join(folder, "j\u00f6bs.jsonl")
        with open(jobs, "w") as handle:
            handle.write('{"command": "pwd", "max_retries": 0}\n')
        job_id = self.ok("enqueue", "-f", jobs, db=db, env=env).strip()
        here_id = self.ok("enqueue", "--max-retries", "0", "pwd", db=db,
                          env=env, cwd=folder).strip()
        counts = self.ok_json("status", db=None,
                              env=dict(env, QUEUECTL_DB=db))["counts"]
        self.assertEqual(counts["pending"], 2)
        code, out, err = self.cli("worker", "start", "--exit-when-idle",
                                  db=db, env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.ok("logs", job_id, db=db), self.dir + "\n")
        self.assertEqual(self.ok("logs", here_id, db=db), folder + "\n")
        self.assertEqual(self.ok_json("status", db=db)["counts"]["completed"],
                         2)
        link = os.path.join(folder, "l\u00efnk.db")
        os.symlink(os.path.join(folder, "n\u00f6ne"), link)
        self.expect_failure(1, "ne, which does not exist", "status", db=link,
                            env=env)
        self.ok("smoke-test", db=None, env=dict(env, TMPDIR=folder))
        code, out, err = self.cli("status", db=None, env=dict(
            env, QUEUECTL_DB=os.fsdecode(b"/tmp/\xff.db")))
        self.assertEqual((code, err), (2, "queuectl: error: $QUEUECTL_DB is"
                                          " not UTF-8: \"/tmp/\\udcff.db\"\n"))

    def test_missing_folder_is_created_and_file_as_folder_refused(self):
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        code, out, err = self.cli("status", db=os.path.join(blocker, "q.db"))
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("queuectl: error: cannot open database"))


class TestLifecycle(CLITestCase):

    def test_success_records_output_and_attempt(self):
        # A completed job has one attempt with exit code, duration, output.
        job_id = self.enqueue("echo out; echo err >&2; printf 'caf\\303\\251'")
        log = self.drain()
        self.assertIn(job_id + " completed", log)
        job = self.ok_json("show", job_id)
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))
        (run,) = job["runs"]
        self.assertEqual((run["attempt"], run["exit_code"], run["error"]),
                         (1, 0, None))
        self.assertGreaterEqual(run["duration"], 0)
        self.assertTrue(run["worker"])
        self.assertEqual(self.ok("logs", job_id), "out\nerr\ncaf\u00e9")

    def test_failures_retry_then_dead_then_dlq_retry(self):
        # max_retries=2: three runs, then dead; dlq retry resets attempts.
        self.config(backoff_max=0)
        job_id = self.enqueue("echo run $QUEUECTL_ATTEMPT; exit 3",
                              "--max-retries", "2")
        log = self.drain()
        self.assertEqual(log.count(job_id + " failed exit code 3"), 2)
        self.assertIn(job_id + " dead exit code 3", log)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"], job["last_error"]),
                         ("dead", 3, "exit code 3"))
        dead = self.ok_json("dlq", "list")
        self.assertEqual([j["id"] for j in dead], [job_id])
        self.assertEqual(self.ok("logs", job_id, "--attempt", "2"), "run 2\n")
        self.assertEqual(self.ok("dlq", "retry", job_id[:6]), job_id + "\n")
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.drain()
        runs = self.ok_json("show", job_id)["runs"]
        self.assertEqual([r["attempt"] for r in runs], [1, 2, 3, 4, 5, 6])
        self.assertEqual(self.ok("logs", job_id), "run 3\n")
        self.ok("dlq", "retry", "--all")
        self.assertEqual(self.state(job_id), "pending")

    def test_backoff_is_scheduled_and_capped(self):
        # After failure k the job waits min(base ** k, backoff-max) seconds.
        # (Waits of half a minute: a busy machine cannot make them due.)
        self.config(backoff_base=30, backoff_max=3600)
        plain = self.enqueue("false")
        self.drain()
        self.config(backoff_base=100, backoff_max=40)
        capped = self.enqueue("false")
        self.drain()
        for job_id, wait in ((plain, 30), (capped, 40)):
            job = self.job(job_id)
            self.assertEqual((job["state"], job["attempts"]), ("failed", 1))
            scheduled = (queuectl.parse_time(job["run_at"])
                         - queuectl.parse_time(job["updated_at"]))
            self.assertAlmostEqual(scheduled, wait, places=2)
        self.drain()  # not due yet: nothing runs
        self.assertEqual([self.job(j)["attempts"] for j in (plain, capped)],
                         [1, 1])

    def test_timeout_kills_and_counts_as_failure(self):
        # A job past its timeout is killed, fails with 'timed out', and
        # keeps its output.  The timeout leaves the shell ample time to echo
        # on a busy machine; the bound on the wait only catches a hang.
        job_id = self.enqueue("echo started; sleep 600", "--timeout", "2",
                              "--max-retries", "0")
        started = time.monotonic()
        self.drain()
        self.assertLess(time.monotonic() - started, 45)
        job = self.ok_json("show", job_id)
        self.assertEqual((job["state"], job["last_error"]),
                         ("dead", "timed out after 2s"))
        self.assertEqual(self.ok("logs", job_id), "started\n")

    def test_environment_cwd_and_start_errors(self):
        # Jobs see their env, QUEUECTL_JOB_ID/ATTEMPT and cwd; a missing cwd
        # is a failed attempt 'cannot start'.
        out = os.path.join(self.dir, "out.txt")
        job_id = self.enqueue(json.dumps({
            "command": 'echo "$QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $GREETING $(pwd)"'
                       " > %s; read x || echo eof >> %s" % (out, out),
            "env": {"GREETING": "hi there"}, "cwd": "/tmp"}))
        bad = self.enqueue("true", "--cwd", "/nonexistent/dir",
                           "--max-retries", "0")
        self.drain()
        with open(out) as handle:
            self.assertEqual(handle.read(),
                             "%s 1 hi there /tmp\neof\n" % job_id)
        job = self.job(bad)
        self.assertEqual(job["state"], "dead")
        self.assertEqual(job["last_error"], "cannot start: cwd"
                         " /nonexistent/dir: no such file or directory")

    def test_a_command_may_start_with_a_dash_or_a_plus(self):
        # sh takes options after -c: queuectl ends them, so the command is
        # the user's, as typed, whatever its first character.
        folder = os.path.join(self.dir, "bin")
        os.mkdir(folder)
        for name in ("-greet", "+greet"):
            with open(os.path.join(folder, name), "w") as handle:
                handle.write("#!/bin/sh\necho \"$0 $1\"\n")
            os.chmod(os.path.join(folder, name), 0o755)
        path = folder + os.pathsep + os.environ["PATH"]
        ids = [self.enqueue(json.dumps({"command": "%sgreet %s" % (c, c),
                                        "env": {"PATH": path}}))
               for c in "-+"]
        self.drain()
        for job_id, first in zip(ids, "-+"):
            self.assertEqual(self.ok("logs", job_id), "%s/%sgreet %s\n"
                             % (folder, first, first))

    def test_signal_death_is_recorded(self):
        job_id = self.enqueue("kill -9 $$", "--max-retries", "0")
        self.drain()
        run = self.ok_json("show", job_id)["runs"][0]
        self.assertEqual((run["error"], run["signal"], run["exit_code"]),
                         ("killed by SIGKILL", 9, None))

    def test_output_keeps_only_the_tail(self):
        # Only the last output-limit bytes are kept, and truncation is said.
        self.config(output_limit=10)
        job_id = self.enqueue("seq 1 1000")
        self.drain()
        code, out, err = self.cli("logs", job_id)
        self.assertEqual(out, "\n999\n1000\n")
        self.assertIn("output truncated", err)
        # The limit and the dropped count are of the job's bytes: ten bad
        # bytes are kept whole (each shown as U+FFFD, three bytes of text),
        # and a character the cut splits is dropped whole.
        bad = self.enqueue("printf '\\377%.0s' 1 2 3 4 5 6 7 8 9 10")
        split = self.enqueue("printf 'a\u00e9012345678'")
        self.drain()
        self.assertEqual(self.cli("logs", bad)[1:], ("\ufffd" * 10, ""))
        self.assertEqual(self.job(bad)["runs"][0]["output_dropped"], 0)
        self.assertEqual(self.cli("logs", split)[1:], (
            "012345678", "queuectl: attempt 1: output truncated, first 3"
            " bytes dropped\n"))

    def test_claim_order_priority_then_run_at_then_enqueue_order(self):
        out = os.path.join(self.dir, "order.txt")
        cmd = "echo $QUEUECTL_JOB_ID >> " + out
        past = "2020-01-01T00:00:0%dZ"
        self.enqueue(json.dumps({"command": cmd, "id": "p0-late",
                                 "run_at": past % 5}))
        self.enqueue(json.dumps({"command": cmd, "id": "p0-early",
                                 "run_at": past % 1}))
        self.enqueue(cmd, "--id", "p0-now-a")
        self.enqueue(cmd, "--id", "p5", "--priority", "5")
        self.enqueue(cmd, "--id", "p0-now-b")
        self.enqueue(cmd, "--id", "future", "--priority", "9", "--delay", "3600")
        self.enqueue(cmd, "--id", "neg", "--priority", "-1")
        self.drain()
        with open(out) as handle:
            order = handle.read().split()
        self.assertEqual(order, ["p5", "p0-early", "p0-late", "p0-now-a",
                                 "p0-now-b", "neg"])
        self.assertEqual(self.state("future"), "pending")

    def test_claim_order_holds_across_many_priorities(self):
        # More distinct priorities than the claim visits one by one
        # (_PRIORITY_STEPS), each with a delayed job beside a due one: due
        # jobs run highest priority first, delayed ones never.
        out = os.path.join(self.dir, "order.txt")
        cmd = "echo $QUEUECTL_JOB_ID >> " + out
        count = queuectl._PRIORITY_STEPS + 6
        lines = []
        for p in range(count):
            lines.append(json.dumps({"command": cmd, "id": "due%02d" % p,
                                     "priority": p * 7 - 50}))
            lines.append(json.dumps({"command": cmd, "id": "later%02d" % p,
                                     "priority": p * 7 - 50, "delay": 3600}))
        path = os.path.join(self.dir, "jobs.jsonl")
        with open(path, "w") as handle:
            handle.write("\n".join(reversed(lines)) + "\n")
        self.ok("enqueue", "-f", path)
        self.drain()
        with open(out) as handle:
            order = handle.read().split()
        self.assertEqual(order, ["due%02d" % p for p in reversed(range(count))])
        self.assertEqual(self.ok_json("status")["counts"]["pending"], count)

    @sqlite_only("PostgreSQL corrects a host's clock by the server's")
    def test_retry_arithmetic_with_a_fake_clock(self):
        # max_retries=3, base 2: four runs, waiting 2, 4 and 8 s between.
        clock = [1000000.0]
        queue = queuectl.Queue(self.db, now=lambda: clock[0])
        self.addCleanup(queue.close)
        queue.config_set("backoff-base", "2")
        job_id = queue.enqueue({"command": "exit 1", "max_retries": 3})
        pool = lambda: queuectl.WorkerPool(self.db, exit_when_idle=True,
                                           log=False, now=lambda: clock[0])
        expected_waits = [2, 4, 8]
        for failures, wait in enumerate(expected_waits, 1):
            self.assertEqual(pool().run(), 0)
            job = queue.get(job_id)
            self.assertEqual((job["state"], job["attempts"]), ("failed", failures))
            due = queuectl.parse_time(job["run_at"])
            self.assertAlmostEqual(due - clock[0], wait, places=2)
            clock[0] = due - 0.01
            pool().run()
            self.assertEqual(queue.get(job_id)["attempts"], failures)
            clock[0] = due
        pool().run()
        job = queue.get(job_id, runs=True)
        self.assertEqual((job["state"], job["attempts"], len(job["runs"])),
                         ("dead", 4, 4))

    def test_output_with_a_nul_byte_is_kept_and_the_pool_goes_on(self):
        # PostgreSQL text cannot hold NUL: there it becomes U+FFFD, in the
        # saved result and in the tail saved while the job runs; the pool
        # runs on.  SQLite keeps the byte.  A SQLite queue holding such
        # output copies into PostgreSQL.
        shown = "a\ufffdb" if self.STORE == "postgresql" else "a\x00b"
        held = os.path.join(self.dir, "held")
        open(held, "w").close()
        running = self.enqueue("printf 'a\\000b'; while [ -e %s ]; do sleep"
                               " 0.05; done" % held)
        done = self.enqueue("printf 'a\\000b'")
        after = self.enqueue("echo after")
        worker = self.start_worker("--count", "2")
        self.wait_for(lambda: self.state(done) == "completed" and
                      self.ok("logs", running) == shown,
                      what="the running job's tail to be saved")
        os.remove(held)
        self.wait_for(lambda: self.state(running) == "completed",
                      what="the held job to end")
        self.assertEqual(self.ok("logs", done), shown)
        self.assertEqual(self.state(after), "completed")
        worker.terminate()
        self.assertEqual(worker.wait(timeout=60), 0)
        if self.STORE == "postgresql":
            source = os.path.join(self.dir, "nul.db")
            job_id = self.ok("enqueue", "printf 'a\\000b'",
                             db=source).strip()
            code, _, err = self.cli("worker", "start", "--exit-when-idle",
                                    db=source)
            self.assertEqual(code, 0, err)
            _pg_sql(PG_URL, "DROP SCHEMA IF EXISTS queuectl CASCADE")
            self.ok("copy", "--to", PG_URL, db=source)
            self.assertEqual(self.ok("logs", job_id), "a\ufffdb")

    def test_copy_moves_the_whole_queue_into_an_empty_database(self):
        # copy --to: every job with its attempts, output, dependencies and
        # counters, and the config, into an empty SQLite file (from SQLite,
        # or from PostgreSQL in that run); never into a used one, never
        # while workers run.
        self.config(backoff_max=0, max_retries=1)
        first = self.enqueue("echo one")
        self.enqueue("echo two", "--after", first)
        self.enqueue("echo bad; exit 3")
        self.drain()
        self.enqueue("true", "--delay", "3600", "--priority", "7")
        dest = os.path.join(self.dir, "copy.db")
        self.assertEqual(self.ok("copy", "--to", dest),
                         "copied 4 job(s) to %s\n" % dest)
        original = [self.ok_json("show", j["id"]) for j in
                    self.ok_json("list")]
        copied = [self.ok_json("show", j["id"], db=dest) for j in
                  self.ok_json("list", db=dest)]
        self.assertEqual(copied, original)
        self.assertEqual(self.ok("logs", first, db=dest), "one\n")
        self.assertEqual(self.ok_json("config", "list", db=dest),
                         self.ok_json("config", "list"))
        stats, copied_stats = (self.ok_json("stats"),
                               self.ok_json("stats", db=dest))
        for key in ("counts", "runs", "success_ratio", "failing_commands"):
            self.assertEqual(copied_stats[key], stats[key], key)
        counters = [_counter_lines(queuectl.Queue(db)) for db in
                    (self.db, dest)]
        self.assertEqual(counters[1], counters[0])
        self.assertIn('queuectl_attempts_total{result="failure"} 2',
                      counters[0])
        self.expect_failure(1, "copy only into an empty database", "copy",
                            "--to", dest)
        paused_only = os.path.join(self.dir, "paused.db")
        self.ok("queue", "pause", "mail", db=paused_only)
        self.expect_failure(1, "copy only into an empty database", "copy",
                            "--to", paused_only)
        worker = self.start_worker()
        self.wait_for(lambda: self.ok_json("status")["workers"],
                 what="the worker to register")
        self.expect_failure(1, "workers are running", "copy", "--to",
                            os.path.join(self.dir, "other.db"), live=True)
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(timeout=30), 0)

    def test_copy_reads_the_queue_as_it_writes_it(self):
        # copy --to holds a few rows at a time, not the queue: 2,000 small
        # attempts, then 160 with 1 MiB of output each, copy in far less
        # memory than those 160 MiB (before: all of it; and a first
        # streaming version sized each fetch by the rows before it, so it
        # fetched the big ones a thousand at a time).  Measured against
        # `status` on the same database, whose driver and interpreter take
        # their own share.
        self.ok("enqueue", "-f", "-", input="\n".join(
            '{"command": "true"}' for _ in range(2160)))
        self.drain()
        self.sql("UPDATE attempts SET output = ? WHERE id > (SELECT MAX(id)"
                 " - 160 FROM attempts)", "x" * (1 << 20))
        dest = os.path.join(self.dir, "copy.db")
        _, before = self.peak_memory("status")
        out, peak = self.peak_memory("copy", "--to", dest)
        self.assertEqual(out, "copied 2160 job(s) to %s\n" % dest)
        self.assertLess(peak - before, 48 << 20,
                        "copy: %d bytes at peak, status: %d" % (peak, before))
        conn = sqlite3.connect(dest)
        try:
            self.assertEqual(conn.execute(
                "SELECT COUNT(*), MIN(LENGTH(output)), MAX(LENGTH(output))"
                " FROM attempts WHERE LENGTH(output) > 0").fetchall(),
                [(160, 1 << 20, 1 << 20)])
        finally:
            conn.close()

    def peak_memory(self, *args):
        """Run the CLI; (its output, its own peak RSS in bytes)."""
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db] + list(args),
            cwd=self.dir, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # its own, not all children
        proc.returncode = os.WEXITSTATUS(status)
        self.assertEqual(proc.returncode, 0, out)
        return out, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def test_delete_and_purge(self):
        self.config(backoff_max=0)
        done = self.enqueue("true")
        dead = self.enqueue("false", "--max-retries", "0")
        waiting = self.enqueue("true", "--delay", "3600")
        self.drain()
        self.assertEqual(self.ok("delete", waiting), waiting + "\n")
        self.expect_failure(1, "no job with id", "show", waiting)
        self.assertEqual(self.ok("purge", "--state", "completed",
                                 "--older-than", "1h"),
                         "purged 0 completed job(s)\n")
        self.assertEqual(self.ok("purge", "--state", "completed", "--vacuum"),
                         "purged 1 completed job(s)\n")
        self.assertEqual(self.ok("purge", "--state", "dead"),
                         "purged 1 dead job(s)\n")
        counts = self.ok_json("status")["counts"]
        self.assertEqual(sum(counts.values()), 0)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(0,)])
        del done, dead
        # A job that an unfinished one waits on is kept, as `delete` and
        # retention keep it, and purged once that one has finished.
        first = self.enqueue("true")
        self.drain()
        second = self.enqueue("true", "--after", first, "--delay", "3600")
        self.assertEqual(self.ok("purge", "--state", "completed"),
                         "purged 0 completed job(s)\n")
        self.assertEqual(self.job(second)["after"], [first])
        self.ok("cancel", second)
        self.assertEqual(self.ok("purge", "--state", "completed"),
                         "purged 1 completed job(s)\n")

    def test_config_list_get_set(self):
        values = self.ok_json("config", "list")
        self.assertEqual(values, queuectl.CONFIG_DEFAULTS)
        self.assertEqual(self.ok("config", "set", "backoff_base", "1.5"), "1.5\n")
        self.assertEqual(self.ok("config", "get", "backoff-base"), "1.5\n")
        self.assertIn("backoff-base   1.5", self.ok("config", "list"))

    def test_list_paging_and_states(self):
        ids = self.ok("enqueue", "-f", "-", input="\n".join(
            '{"command": "true", "id": "j%02d"}' % n for n in range(12))).split()
        page = self.ok_json("list", "--limit", "5", "--offset", "5")
        self.assertEqual([j["id"] for j in page], ids[5:10])
        self.assertEqual(self.ok_json("list", "--state", "dead"), [])
        table = self.ok("list", "--state", "pending", "--limit", "3")
        lines = table.splitlines()
        self.assertEqual(len(lines), 4)
        self.assertTrue(lines[0].startswith("ID"))
        self.assertTrue(all(len(line) <= 80 for line in lines))
        self.assertNotIn("\x1b[", table)  # no colour when not a terminal


class TestOutput(CLITestCase):

    def test_status_shape(self):
        status = self.ok_json("status")
        self.assertEqual(set(status), {"counts", "workers", "paused", "db",
                                       "cleanup", "queues"})
        self.assertEqual(set(status["cleanup"]), {
            "last", "deleted", "took_seconds", "keep_completed", "keep_dead"})
        self.assertEqual(set(status["counts"]), set(queuectl.STATES))
        self.assertEqual(status["db"], self.db)
        self.assertIn("pending", self.ok("status"))

    def test_c_locale_and_control_characters(self):
        # Unicode and control characters print safely under LANG=C: C0
        # (ESC), C1 (U+009B, the 8-bit CSI) and bidirectional overrides
        # (U+202E) are escaped in the tables and in show.
        job_id = self.enqueue(json.dumps({
            "command": "echo 'caf\u00e9 \u2603' # \x1b[31m red \x9b2J"
                       " \u202eevil"}))
        for env in ({"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""},
                    {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}):
            for args in (("list",), ("show", job_id), ("status",)):
                out = self.ok(*args, env=env)
                for raw in ("\x1b", "\x9b", "\u202e"):
                    self.assertNotIn(raw, out)
            self.assertIn("# \\x1b[31m red \\x9b2J \\u202eevil",
                          self.ok("show", job_id, env=env))

    def test_non_ascii_jobs_run_under_a_c_locale(self):
        # Python 3.6 under LANG=C encodes arguments and paths as ASCII; a
        # job's command, env and cwd still reach its shell as UTF-8, from
        # the command line and from a JSON file alike.
        folder = os.path.join(self.dir, "caf\u00e9")
        os.mkdir(folder)
        env = {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}
        flags = self.ok("enqueue", "--env", "GREETING=h\u00e9llo", "--cwd",
                        folder, "--max-retries", "0",
                        'echo "\u2603 $GREETING $(pwd)"', env=env).strip()
        path = os.path.join(self.dir, "jobs.jsonl")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"command": "echo \u00fcber", "cwd": "caf"
                                     "\u00e9", "max_retries": 0}) + "\n")
        from_file = self.ok("enqueue", "-f", path, env=env).strip()
        code, out, err = self.cli("worker", "start", "--exit-when-idle",
                                  env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.ok("logs", flags),
                         "\u2603 h\u00e9llo %s\n" % folder)
        self.assertEqual(self.ok("logs", from_file), "\u00fcber\n")
        self.assertEqual(self.job(from_file)["cwd"], folder)

    def on_tty(self, *args, **kwargs):
        """What the CLI prints to a terminal (a pty) of `columns` width."""
        import fcntl
        import pty
        import struct
        import termios
        master, slave = pty.openpty()
        columns = kwargs.pop("columns", 80)
        fcntl.ioctl(slave, termios.TIOCSWINSZ,
                    struct.pack("HHHH", 24, columns, 0, 0))
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db] + list(args),
            stdout=slave, stderr=subprocess.PIPE,
            env=kwargs.pop("env", self.env))
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=30)
        proc.stderr.close()
        os.close(master)
        return b"".join(chunks).decode().replace("\r\n", "\n")

    def test_colour_only_on_a_terminal_without_no_color(self):
        # State names are coloured on a TTY; NO_COLOR or a pipe turns it off.
        self.enqueue("true")
        self.assertIn("\x1b[33mpending", self.on_tty("list"))
        self.assertNotIn("\x1b[", self.on_tty(
            "list", env=dict(self.env, NO_COLOR="1")))
        self.assertNotIn("\x1b[", self.ok("list"))

    def test_help_is_laid_out_to_the_terminal_width(self):
        # As argparse's own: $COLUMNS, else the terminal's width, else 80
        # (on every Python; 3.6 and 3.7's argparse never asked the
        # terminal).  Found without importing shutil: see the import test.
        self.env.pop("COLUMNS", None)
        narrow = self.on_tty("enqueue", "--help", columns=60)
        wide = self.on_tty("enqueue", "--help", columns=160)
        self.assertNotEqual(narrow, wide)
        self.assertIn("--max-retries", narrow)
        self.assertEqual(narrow, self.ok("enqueue", "--help",
                                         env={"COLUMNS": "60"}))
        self.assertEqual(wide, self.ok("enqueue", "--help",
                                       env={"COLUMNS": "160"}))
        # Not a terminal, no $COLUMNS (or not a positive number): 80.
        eighty = self.ok("enqueue", "--help", env={"COLUMNS": "80"})
        self.assertEqual(self.ok("enqueue", "--help"), eighty)
        self.assertEqual(self.ok("enqueue", "--help",
                                 env={"COLUMNS": "-3"}), eighty)

    def test_version_and_help(self):
        self.assertEqual(self.ok("--version"), "queuectl %s\n"
                         % queuectl.__version__)
        for args in (("--help",), ("enqueue", "--help"),
                     ("worker", "start", "--help"), ("dlq", "retry", "--help")):
            self.assertIn("example", self.ok(*args) if args[0] != "--help"
                          else self.ok(*args).replace("start here", "example"))

    def test_broken_pipe_is_quiet(self):
        self.ok("enqueue", "-f", "-", input="\n".join(
            ['{"command": "true"}'] * 2000))
        proc = subprocess.Popen(
            "%s %s --db %s list --limit 2000 | head -1" % (
                sys.executable, SCRIPT, self.db), shell=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(err, b"")
        self.assertTrue(out.startswith(b"ID"))

    def test_output_that_cannot_be_written_says_the_change_was_made(self):
        # Output comes after the change it reports: into a full disk or a
        # closed stdout, one line says the command was carried out (a
        # script must not enqueue again), on every Python alike (3.11's
        # argparse swallows the error of --help); a closed stdin is one
        # line too.  Never a traceback.
        def run(redirect, *args):
            proc = subprocess.run(
                ["sh", "-c", 'exec "$@" ' + redirect, "sh", sys.executable,
                 SCRIPT, "--db", self.db] + list(args),
                input=b'{"command": "true"}', stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=self.env, timeout=60)
            return proc.returncode, proc.stderr.decode()
        done = ("queuectl: error: cannot write the output (%s); the command"
                " itself was carried out\n")
        for redirect, why in ((">/dev/full", "no space left on device"),
                              (">&-", "stdout is closed")):
            self.assertEqual(run(redirect, "enqueue", "true"),
                             (1, done % why))
            self.assertEqual(run(redirect, "status"), (1, done % why))
            self.assertEqual(run(redirect, "--help"), (1, done % why))
        self.assertEqual(run("<&-", "enqueue", "-f", "-"), (
            2, "queuectl: error: cannot read -: stdin is closed\n"))
        self.assertEqual(self.ok_json("status")["counts"]["pending"], 2)
        # A reader that has gone (`enqueue -f big | head -1`): a command
        # that only reads ends quietly, one that changed the queue says so.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            for args, err in ((["enqueue", "true"], done % "the reader of"
                               " stdout has gone"), (["status"], "")):
                proc = subprocess.run(
                    [sys.executable, SCRIPT, "--db", self.db] + args,
                    stdout=write_end, stderr=subprocess.PIPE, env=self.env,
                    timeout=60)
                self.assertEqual((proc.returncode, proc.stderr.decode()),
                                 (1, err), args)
        finally:
            os.close(write_end)
        self.assertEqual(self.ok_json("status")["counts"]["pending"], 3)


class TestWorkers(CLITestCase):

    def test_max_jobs_keeps_every_thread_working(self):
        # A thread that found --max-jobs' slots reserved by another's claim
        # in flight took them for spent and ended: --count 3 ran on two
        # threads.  Three jobs that each wait until three have started
        # (or 60 s) show how many threads ran at once (the old code: two,
        # in two runs of three on PostgreSQL).
        started = os.path.join(self.dir, "started")
        for _ in range(6):
            self.enqueue("echo x >> %s; n=0; while [ $(wc -l < %s) -lt 3 ]"
                         " && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done;"
                         " wc -l < %s" % (started, started, started))
        code, out, err = self.cli("worker", "start", "--max-jobs", "6",
                                  "--count", "3", timeout=180)
        self.assertEqual(code, 0, err)
        self.assertIn("stopped (ran --max-jobs 6)", err)
        firsts = sorted(int(self.ok("logs", job["id"])) for job in
                        self.ok_json("list"))
        self.assertGreaterEqual(firsts[0], 3, "jobs at once: %s" % firsts)

    def test_worker_stop_request_and_status(self):
        # A running worker shows in status with its job; `worker stop
        # --wait` lets the running job finish and returns once it has ended.
        job_id = self.enqueue(self.hold())
        worker = self.start_worker("--count", "2")
        self.wait_started()
        self.wait_for(lambda: len(self.ok_json("status")["workers"]) == 2,
                 what="workers to register")
        workers = self.ok_json("status")["workers"]
        self.assertEqual(sorted(w["job"] or "" for w in workers), ["", job_id])
        self.assertEqual(workers[0]["pid"], worker.pid)
        stopper = self.spawn("worker", "stop", "--wait")
        self.wait_for(lambda: self.sql("SELECT 1 FROM config"
                                  " WHERE key = '_stop_seq'"),
                 what="the stop request")
        self.assertEqual(self.state(job_id), "processing")
        self.assertIsNone(stopper.poll(), "stop --wait ended before the job")
        self.release()
        out, err = stopper.communicate(timeout=60)
        self.assertEqual((stopper.returncode, err), (0, b""))
        self.assertIn("all workers stopped", out.decode())
        self.assertEqual(self.ok_json("status")["workers"], [])
        job = self.job(job_id)
        self.assertEqual((job["state"], [r["error"] for r in job["runs"]]),
                         ("completed", [None]))
        self.assertEqual(worker.wait(timeout=60), 0)

    @unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc (Linux)")
    def test_sigterm_finishes_the_job_and_exits_zero(self):
        # SIGTERM: the running job finishes, nothing new is claimed, and the
        # worker exits 0.
        worker, job_id, threads = self.busy_worker(self.hold() + "; echo done")
        self.first_signal(worker, threads, signal.SIGTERM)
        later = self.enqueue("true")
        self.assertIsNone(worker.poll(), "worker left its job running")
        self.assertEqual(self.state(job_id), "processing")
        self.release()
        self.assertEqual(worker.wait(timeout=60), 0)
        self.assertEqual(self.state(job_id), "completed")
        self.assertEqual(self.ok("logs", job_id), "done\n")
        self.assertEqual(self.state(later), "pending")

    @unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc (Linux)")
    def test_second_signal_forces_and_requeues_uncounted(self):
        # Second SIGINT: the job's whole group dies, the job is pending with
        # its attempt not counted, and the worker exits non-zero.  (The
        # grandchild sleeps longer than any deadline here.)
        worker, job_id, threads = self.busy_worker(
            "(sleep 3600) & " + self.hold())
        pgid = self.wait_for(lambda: self.pgid(job_id),
                        what="the job's process group to be recorded")
        self.first_signal(worker, threads, signal.SIGINT)
        worker.send_signal(signal.SIGINT)
        self.assertNotEqual(worker.wait(timeout=60), 0)
        job = self.ok_json("show", job_id)
        self.assertEqual((job["state"], job["attempts"], job["runs"]),
                         ("pending", 0, []))
        self.wait_for(lambda: not queuectl.group_alive(pgid), what="group to die")

    def test_two_worker_processes_share_the_queue(self):
        # Two processes drain one database: every job runs exactly once.
        out = os.path.join(self.dir, "ran.txt")
        n = 150
        self.ok("enqueue", "-f", "-", input="\n".join(
            json.dumps({"command": "echo $QUEUECTL_JOB_ID >> " + out})
            for _ in range(n)))
        workers = [self.start_worker("--count", "2", "--exit-when-idle")
                   for _ in range(2)]
        for worker in workers:
            self.assertEqual(worker.wait(timeout=60), 0)
        with open(out) as handle:
            ran = handle.read().split()
        self.assertEqual(len(ran), n)
        self.assertEqual(len(set(ran)), n)
        self.assertEqual(self.ok_json("status")["counts"]["completed"], n)


class TestScripting(CLITestCase):

    def test_a_job_named_twice_is_acted_on_and_reported_once(self):
        # By the same id or by an id and its prefix.
        job_id = self.enqueue("true", "--id", "twice")
        self.assertEqual(self.ok("cancel", job_id, job_id, "twi"),
                         "twice cancelled\n")
        self.assertEqual(self.ok("dlq", "retry", job_id, job_id), "twice\n")
        self.drain()
        self.assertEqual(self.ok("retry", job_id, "twic"), "twice\n")
        self.ok("cancel", job_id)
        self.assertEqual(self.ok("delete", job_id, job_id, "tw"), "twice\n")

    def test_wait_exit_codes(self):
        # wait: 0 all completed, 1 any dead, 124 timeout, 2 unknown id.
        self.config(backoff_max=0)
        good = self.enqueue("true")
        bad = self.enqueue("false", "--max-retries", "0")
        waiter = self.spawn("wait", good, bad)
        # No worker runs yet: a wait can only time out, and `waiter` waits.
        code, out, err = self.cli("wait", good, bad, "--timeout", "0.3")
        self.assertEqual((code, out), (124, ""))
        self.assertIsNone(waiter.poll(), "wait returned before the jobs ran")
        self.drain()
        out, err = waiter.communicate(timeout=60)
        self.assertEqual(waiter.returncode, 1)
        self.assertEqual(sorted(out.decode().split("\n")[:2]),
                         sorted(["%s completed" % good, "%s dead" % bad]))
        self.assertIn("1 job(s) dead: " + bad, err.decode())
        self.assertEqual(self.cli("wait", good)[0], 0)
        later = self.enqueue("true", "--delay", "3600")
        code, out, err = self.cli("wait", good, later, bad, "--timeout", "0.2")
        self.assertEqual((code, err), (124, "queuectl: error: timed out after"
                                       " 0.2s; 1 job(s) not finished: %s\n"
                                       % later))
        self.expect_failure(2, "no job with id 'ghost'", "wait", good, "ghost")

    def test_pause_and_resume(self):
        # Paused workers finish what runs, claim nothing, even after restart.
        first = self.enqueue(self.hold())
        worker = self.start_worker("--poll-interval", "0.02")
        self.wait_started()
        self.assertIn("paused", self.ok("pause"))
        second = self.enqueue("true")
        self.release()
        self.wait_state(first, "completed")
        # The transaction that saved `first` saw the pause: no claim in it.
        self.assertEqual(self.state(second), "pending")
        self.assertTrue(self.ok_json("status")["paused"])
        self.assertIn("paused: workers claim no new jobs", self.ok("status"))
        self.drain()  # a fresh worker exits at once: nothing it may claim
        # The running worker lives on for two more beats (a second or two
        # of its own time, however busy the machine), polling all along.
        beat = self.beats(worker.pid)
        self.wait_for(lambda: self.beats(worker.pid) >= beat + 2,
                 what="the paused worker to beat twice")
        self.assertEqual(self.state(second), "pending")
        self.ok("resume")
        self.wait_state(second, "completed")
        self.assertFalse(self.ok_json("status")["paused"])
        worker.terminate()
        self.assertEqual(worker.wait(timeout=60), 0)

    def test_after_runs_in_dependency_order(self):
        # --after holds a job, whatever its priority, until its deps complete.
        out = os.path.join(self.dir, "order.txt")
        cmd = "echo $QUEUECTL_JOB_ID >> " + out
        self.enqueue(cmd, "--id", "a", "--priority", "1")
        self.enqueue(cmd, "--id", "b")
        self.enqueue(json.dumps({"command": cmd, "id": "c", "priority": 99,
                                 "after": ["a", "b"]}))
        self.enqueue(cmd, "--id", "d", "--priority", "50", "--after", "c")
        self.assertEqual(self.job("c")["after"], ["a", "b"])
        self.drain()
        with open(out) as handle:
            self.assertEqual(handle.read().split(), ["a", "b", "c", "d"])
        self.enqueue(cmd, "--id", "e", "--after", "a")  # already completed
        self.drain()
        self.assertEqual(self.state("e"), "completed")

    def test_a_retried_dependency_is_waited_for_again(self):
        # `retry` of a completed job makes the pending jobs that wait on it
        # wait again: they run after its new run, and die with it.
        self.enqueue("true", "--id", "a")
        self.drain()
        self.enqueue("true", "--id", "b", "--after", "a")
        self.ok("retry", "a")
        self.assertEqual(self.job("b")["waiting_for"], 1)
        self.ok("cancel", "a")
        self.assertEqual((self.state("b"), self.job("b")["last_error"]),
                         ("dead", "dependency a failed"))
        # Retried together with a job that waits on it, it runs first.
        out = os.path.join(self.dir, "order.txt")
        cmd = "echo $QUEUECTL_JOB_ID >> " + out
        self.enqueue(cmd, "--id", "c")
        self.enqueue(cmd, "--id", "d", "--after", "c", "--priority", "9")
        self.drain()
        self.ok("retry", "d", "c")
        self.assertEqual(self.job("d")["waiting_for"], 1)
        self.drain()
        with open(out) as handle:
            self.assertEqual(handle.read().split(), ["c", "d", "c", "d"])

    def test_dead_dependency_buries_the_chain(self):
        self.config(backoff_max=0)
        flag = os.path.join(self.dir, "flag")
        self.enqueue("test -f " + flag, "--id", "root", "--max-retries", "0")
        self.enqueue("true", "--id", "mid", "--after", "root")
        self.enqueue("true", "--id", "leaf", "--after", "mid")
        self.expect_failure(1, "is waited on by 'mid'", "delete", "root")
        self.drain()
        self.assertEqual([(self.job(i)["state"], self.job(i)["last_error"])
                          for i in ("root", "mid", "leaf")],
                         [("dead", "exit code 1"),
                          ("dead", "dependency root failed"),
                          ("dead", "dependency mid failed")])
        self.expect_failure(1, "job 'root' is dead", "enqueue", "true",
                            "--after", "root")
        open(flag, "w").close()
        self.ok("dlq", "retry", "root")
        self.drain()
        self.assertEqual(self.state("mid"), "dead")  # not revived silently
        self.expect_failure(1, "waits on dead job", "dlq", "retry", "leaf")
        self.ok("dlq", "retry", "mid", "leaf")
        self.drain()
        self.assertEqual([self.state(i) for i in ("mid", "leaf")],
                         ["completed", "completed"])

    def test_demo_runs_on_a_temporary_database(self):
        started = time.monotonic()
        out = self.ok("demo", db=None)
        self.assertLess(time.monotonic() - started, 30)
        for text in ("dead letter queue", "dlq retry needs-flag",
                     "needs-flag dead exit code 1", "completed          2"):
            self.assertIn(text, out)
        self.assertFalse(os.path.exists(os.path.join(self.dir, ".queuectl")))
        self.assertNotIn("\x1b[", out)

    def test_every_command_has_help_with_an_example(self):
        def parsers(parser):
            for action in parser._actions:
                if isinstance(action, queuectl.argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        yield name, sub
                        for item in parsers(sub):
                            yield item
        names = []
        for name, sub in parsers(queuectl.build_parser()):
            names.append(name)
            self.assertIn("example:\n  queuectl ", sub.format_help(), name)
            self.assertTrue(sub.description, name)
        for name in ("enqueue", "start", "stop", "wait", "pause", "resume",
                     "demo", "retry"):
            self.assertIn(name, names)
        self.assertIn("commands by what you need them for", self.ok("--help"))


class TestNewcomer(CLITestCase):
    """SPEC 11 and issue 10: what people coming from other queues type."""

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def commands(self):
        return [j["command"] for j in self.ok_json("list")]

    def log_of(self, worker):
        with open(worker.log.name) as handle:
            return handle.read()

    def test_enqueue_reads_a_json_or_jsonl_file_named_as_the_argument(self):
        # `enqueue job.json` / `enqueue-file` read the file like -f FILE.
        self.write("job.json", '{"command": "echo one", "priority": 3}')
        self.write("jobs.JSONL", '{"command": "echo two"}\n'
                   '{"command": "echo three"}\n')
        self.assertEqual(len(self.ok("enqueue", "job.json").split()), 1)
        self.assertEqual(len(self.ok("enqueue", "jobs.JSONL").split()), 2)
        ids = self.ok("enqueue-file", "job.json", "--json")
        self.assertEqual(len(json.loads(ids)), 1)
        self.ok("enqueue-file", "-", input='{"command": "echo four"}')
        self.assertEqual(self.commands(), ["echo one", "echo two", "echo three",
                                           "echo one", "echo four"])
        self.assertEqual(self.ok_json("list")[0]["priority"], 3)
        # A command line that merely mentions a .json file stays a command.
        self.enqueue("jq . job.json > copy.json")
        self.assertEqual(self.commands()[-1], "jq . job.json > copy.json")

    def test_a_json_file_argument_that_is_missing_or_mixed_is_refused(self):
        # Nothing is enqueued for a missing job file or file plus flags.
        self.write("job.json", '{"command": "true"}')
        os.mkdir(os.path.join(self.dir, "folder.json"))
        self.ok("status")  # the database exists: a failure must not change it
        err = self.expect_failure(2, "missing.json: no such file", "enqueue",
                                  os.path.join(self.dir, "missing.json"))
        self.assertIn('enqueue \'{"command": ', err)
        self.expect_failure(2, "not a file", "enqueue",
                            os.path.join(self.dir, "folder.json"))
        self.expect_failure(2, "or as flags, not both", "enqueue",
                            os.path.join(self.dir, "job.json"),
                            "--priority", "1")
        self.expect_failure(2, "invalid JSON", "enqueue", self.write(
            "bad.json", '{"command": "true"'))

    def test_enqueue_json_array_argument_is_a_batch_all_or_nothing(self):
        # `enqueue '[{...}, {...}]'`: one id per line, in order, or nothing.
        out = self.ok("enqueue", '[{"command": "echo a"},'
                      ' {"command": "echo b", "id": "b"}]')
        self.assertEqual(out.split()[1], "b")
        self.assertEqual(self.commands(), ["echo a", "echo b"])
        self.expect_failure(2, "job 2: unknown field 'comand'", "enqueue",
                            '[{"command": "true"}, {"comand": "x"}]')
        self.expect_failure(2, "a JSON array holds job objects", "enqueue",
                            '["echo x"]')
        self.expect_failure(2, "no jobs in input", "enqueue", "[]")
        self.expect_failure(2, 'duplicate key "command"', "enqueue",
                            '[{"command": "a", "command": "b"}]')
        self.expect_failure(2, "nested too deeply", "enqueue", "[" * 100000)
        self.expect_failure(2, "not both", "enqueue", '[{"command": "x"}]',
                            "--priority", "2")
        # A shell test `[ ... ]` is not JSON: the error says how to queue it.
        err = self.expect_failure(2, "invalid JSON", "enqueue", "[ -f x ]")
        self.assertIn('enqueue \'{"command": "[ -f x ]"}\'', err)

    def test_brace_group_error_says_how_to_enqueue_it(self):
        # Issue 9 item 6: `{ ...; }` is refused, naming the JSON form, which
        # then works as printed.
        group = "{ echo a; echo b; } > out"
        self.ok("status")
        err = self.expect_failure(2, "invalid JSON", "enqueue", group)
        hint = '{"command": "{ echo a; echo b; } > out"}'
        self.assertIn("queuectl enqueue '%s'" % hint, err)
        self.enqueue(hint)
        self.assertEqual(self.commands(), [group])
        self.drain()
        with open(os.path.join(self.dir, "out")) as handle:
            self.assertEqual(handle.read(), "a\nb\n")
        # Too long or quoted to print ready to paste: the general form.
        self.expect_failure(2, '{"command": "..."}', "enqueue",
                            "{ echo 'it''s'; }")

    def test_config_spellings(self):
        # config show and a bare config list; --key/--value get and set.
        listing = self.ok("config", "list")
        self.assertIn("max-retries", listing)
        self.assertEqual(self.ok("config"), listing)
        self.assertEqual(self.ok("config", "show"), listing)
        self.assertEqual(self.ok_json("config", "show"),
                         self.ok_json("config"))
        self.assertEqual(self.ok("config", "--key", "max_retries",
                                 "--value", "5"), "5\n")
        self.assertEqual(self.ok("config", "--key", "max-retries"), "5\n")
        self.assertEqual(self.ok("config", "get", "max-retries"), "5\n")
        self.expect_failure(2, "--value needs --key", "config", "--value", "3")
        self.expect_failure(2, "not both", "config", "set", "max-retries",
                            "4", "--key", "max-retries")
        self.expect_failure(2, "backoff-base must be a number >= 1", "config",
                            "--key", "backoff-base", "--value", "0")

    def test_start_and_stop_name_the_worker_commands(self):
        # `start --count 2` is refused with the queuectl form, exit 2.
        err = self.expect_failure(2, "there is no 'start' command", "start",
                                  "--count", "2")
        self.assertIn("did you mean: queuectl --db %s worker start --count 2"
                      % self.db, err)
        self.expect_failure(2, "did you mean: queuectl worker stop --wait",
                            "stop", "--wait", db=None)

    def test_hidden_spellings_stay_out_of_help(self):
        # The aliases work but --help and usage errors do not list them.
        top = self.ok("--help")
        self.assertIn("smoke-test", top)  # a command, not an alias
        config = self.ok("config", "--help").split("-h, --help")[0]
        unknown = self.expect_failure(2, "invalid choice", "frobnicate")
        for text in (top, config, unknown):
            for alias in ("enqueue-file", "--key", "--value"):
                self.assertNotIn(alias, text)
        self.assertNotIn("show", config)  # `show ID` is a command of its own

    def test_smoke_test_passes_on_a_temporary_database(self):
        # smoke-test prints each step and ok, exit 0, touching no queue.
        out = self.ok("smoke-test", db=None)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("queuectl %s smoke test"
                                            % queuectl.__version__), out)
        steps = lines[1:-1]
        self.assertGreaterEqual(len(steps), 7)
        for number, line in enumerate(steps, 1):
            self.assertTrue(line.startswith("%d. " % number), line)
            self.assertTrue(line.endswith(" ... ok"), line)
        for word in ("enqueue", "retried", "DLQ", "dlq retry"):
            self.assertIn(word, out)
        self.assertEqual(lines[-1], "ok")
        self.assertFalse(os.path.exists(os.path.join(self.dir, ".queuectl")))

    def test_smoke_test_names_the_step_that_failed(self):
        # A broken step: exit 1, FAILED on that step, one error line.
        def broken(queue, job_ids):
            raise queuectl.Conflict("retry is broken")
        saved = queuectl.Queue.retry
        queuectl.Queue.retry = broken
        try:
            code, out, err = self.main("smoke-test", db=None)
        finally:
            queuectl.Queue.retry = saved
        self.assertEqual(code, 1, err)
        failed = [line for line in out.splitlines() if "FAILED" in line]
        self.assertEqual(len(failed), 1, out)
        self.assertIn("dlq retry", failed[0])
        self.assertNotIn("\nok\n", out)
        self.assertRegex(err, r"^queuectl: error: smoke test failed at step"
                         r" \d+ \(dlq retry[^)]*\): retry is broken\n$")

    def test_dlq_list_shows_the_last_error_within_80_columns(self):
        # dlq list: ID, tries, when, command and the error that killed it.
        self.assertEqual(self.ok("dlq", "list"), "(no dead jobs)\n")
        self.config(max_retries=0)
        self.enqueue("exit 3", "--id", "three")
        self.enqueue("echo %s; exit 4" % ("long " * 30), "--id", "long")
        self.enqueue(json.dumps({"command": "true", "id": "nocwd", "cwd": (
            os.path.join(self.dir, "missing", "x" * 60))}))
        self.enqueue("true", "--id", "fine")
        self.drain()
        out = self.ok("dlq", "list")
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[-2:], ["LAST", "ERROR"])
        self.assertEqual(len(lines), 4, out)
        for line in lines:
            self.assertLessEqual(len(line), 80, line)
        rows = dict((line.split()[0], line) for line in lines[1:])
        self.assertTrue(rows["three"].endswith("exit code 3"), out)
        self.assertTrue(rows["long"].endswith("exit code 4"), out)
        self.assertIn("cannot start", rows["nocwd"])
        self.assertNotIn("fine", rows)

    def test_status_shows_a_total(self):
        # status: the five counts and their total.
        for command in ("true", "true", "false"):
            self.enqueue(command, "--delay", "3600")
        self.assertRegex(self.ok("status"), r"\n  total +3\n")

    def test_max_jobs_runs_exactly_that_many(self):
        # --max-jobs N: N runs, never a claim beyond them, then exit 0.
        for n in range(5):
            self.enqueue("true", "--id", "shallow%d" % n)
        err = self.drain_with("--max-jobs", "2", "--count", "2")
        self.assertIn("stopped (ran --max-jobs 2)", err)
        self.assertEqual(self.ok_json("status")["counts"]["completed"], 2)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(2,)])
        # A deep queue is claimed CLAIM_BATCH at a time; the budget caps
        # the second batch at 3.
        deep, budget = 5 * queuectl.CLAIM_BATCH, queuectl.CLAIM_BATCH + 3
        self.ok("enqueue", "-f", "-", input="\n".join(
            ['{"command": "true"}'] * deep))
        self.drain_with("--max-jobs", str(budget))
        self.assertEqual(self.ok_json("status")["counts"]["completed"],
                         2 + budget)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"),
                         [(2 + budget,)])
        self.assertEqual(self.sql(
            "SELECT COUNT(*) FROM jobs WHERE attempts = 0"),
            [(5 + deep - 2 - budget,)])

    def test_idle_timeout_exits_and_leaves_later_jobs(self):
        # --idle-timeout S: exit 0 after S idle seconds; a job due after that
        # is not run.
        later = self.enqueue("true", "--delay", "3600")
        err = self.drain_with("--idle-timeout", "0.3")
        self.assertIn("stopped (idle for --idle-timeout 0.3s)", err)
        self.assertEqual(self.job(later)["attempts"], 0)

    def test_idle_timeout_runs_a_job_that_falls_due_meanwhile(self):
        # A job due within the idle time keeps the worker: it runs, then the
        # worker exits by itself (S = 6 s leaves seconds of slack).
        worker = self.start_worker("--idle-timeout", "6",
                                   "--poll-interval", "0.05")
        self.wait_for(lambda: "pool started" in self.log_of(worker),
                 what="the worker to start")
        soon = self.enqueue("true", "--delay", "0.5")
        self.assertEqual(worker.wait(timeout=120), 0)
        self.assertEqual(self.state(soon), "completed")
        self.assertIn("stopped (idle for", self.log_of(worker))

    def drain_with(self, *flags):
        code, out, err = self.cli("worker", "start", *flags)
        self.assertEqual(code, 0, err)
        return err

    def test_worker_limits_are_validated(self):
        # Bad --idle-timeout / --max-jobs: exit 2 from the CLI and the API.
        self.enqueue("true")
        for flag, value, message in (
                ("--idle-timeout", "0", "--idle-timeout must be > 0"),
                ("--idle-timeout", "-1", "--idle-timeout must be > 0"),
                ("--idle-timeout", "1e300",
                 "--idle-timeout must be > 0 and <= 1e9, got 1e300"),
                ("--idle-timeout", "1e999", "--idle-timeout must be finite"),
                ("--idle-timeout", "nan", "--idle-timeout must be a number"),
                ("--idle-timeout", "soon", "must be a number"),
                ("--max-jobs", "0", "--max-jobs must be >= 1"),
                ("--max-jobs", "1.5", "--max-jobs must be an integer")):
            with self.subTest(flag=flag, value=value):
                self.expect_failure(2, message, "worker", "start", flag, value)
        for kwargs in ({"idle_timeout": 0}, {"idle_timeout": float("inf")},
                       {"max_jobs": 0}, {"max_jobs": True}):
            with self.assertRaises(queuectl.InvalidInput):
                queuectl.WorkerPool(self.db, **kwargs)

    def test_help_and_hints_use_the_name_that_was_run(self):
        # ./queuectl.py, python3 queuectl.py, python3 -m queuectl, and a copy
        # named queuectl on PATH: usage and hints name what was typed; errors
        # still start `queuectl: error:`.
        env = dict(self.env, QUEUECTL_DB=self.db)
        env.pop("LD_LIBRARY_PATH", None)  # for /usr/bin/env python3 below
        bin_dir = os.path.join(self.dir, "bin")
        os.mkdir(bin_dir)
        shutil.copy(SCRIPT, os.path.join(bin_dir, "queuectl"))
        on_path = dict(self.env, QUEUECTL_DB=self.db,
                       PATH=bin_dir + os.pathsep + os.environ["PATH"])
        cases = [
            (["./queuectl.py"], env, "./queuectl.py"),
            ([sys.executable, "queuectl.py"], self.env, "python3 queuectl.py"),
            ([sys.executable, "-m", "queuectl"], self.env,
             "python3 -m queuectl"),
            ([sys.executable, os.path.join(bin_dir, "queuectl")], on_path,
             "queuectl"),
            ([sys.executable, SCRIPT], self.env, SCRIPT),
        ]
        for argv, run_env, name in cases:
            with self.subTest(name=name):
                def run(*args):
                    proc = subprocess.run(
                        argv + ["--db", self.db] + list(args), cwd=HERE,
                        env=run_env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, timeout=60)
                    return (proc.returncode, proc.stdout.decode(),
                            proc.stderr.decode())
                code, out, err = run("--help")
                self.assertEqual(code, 0, err)
                self.assertTrue(out.startswith("usage: %s [-h]" % name), out)
                self.assertIn("\n  %s worker start --exit-when-idle" % name,
                              out)
                code, out, err = run("start")
                self.assertEqual(code, 2)
                self.assertEqual(err, "queuectl: error: there is no 'start'"
                                 " command; did you mean: %s --db %s worker"
                                 " start\n" % (name, self.db))
                code, out, err = run("frob")
                self.assertTrue(err.startswith("queuectl: error: "), err)
                self.assertIn("(see '%s --help')" % name, err)
                # An unknown argument points at its command's own --help.
                code, out, err = run("worker", "start", "--frob")
                self.assertEqual((code, err), (2, "queuectl: error:"
                                 " unrecognized arguments: --frob (see '%s"
                                 " worker start --help')\n" % name))

    def test_executable_script_runs_through_its_shebang(self):
        # `./queuectl.py --version` works: the file is executable. The
        # shebang's python3 may refuse an old SQLite on LD_LIBRARY_PATH,
        # which CI sets for other interpreters: not ours to pass on.
        self.assertTrue(os.access(SCRIPT, os.X_OK))
        env = dict(self.env)
        env.pop("LD_LIBRARY_PATH", None)
        proc = subprocess.run(["./queuectl.py", "--version"], cwd=HERE,
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((proc.returncode, proc.stdout.decode(),
                          proc.stderr), (0, "queuectl %s\n"
                                         % queuectl.__version__, b""))

    def test_console_script_exit_status_is_mains_return_value(self):
        # pyproject's console script runs sys.exit(main()): main returns the
        # status. The metadata names one module, no dependencies, the
        # postgres extra and the queuectl command.
        code = ("import sys, queuectl; sys.argv = ['queuectl'] + sys.argv[1:];"
                " sys.exit(queuectl.main())")
        for args, status in ((["--version"], 0), (["frob"], 2),
                             (["--db", self.db, "show", "nope"], 1)):
            proc = subprocess.run([sys.executable, "-c", code] + args,
                                  cwd=HERE, env=self.env,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=60)
            self.assertEqual(proc.returncode, status, proc.stderr)
        with open(os.path.join(HERE, "pyproject.toml")) as handle:
            meta = handle.read()
        for line in ('name = "queuectl"', 'dependencies = []',
                     'queuectl = "queuectl:main"',
                     'postgres = ["psycopg[binary]"]',
                     'requires-python = ">=3.6"'):
            self.assertIn(line, meta)

    def test_every_json_field_is_documented(self):
        # Each key of each --json shape appears in README's JSON section.
        with open(os.path.join(HERE, "README.md")) as handle:
            readme = handle.read()
        section = readme.split("### JSON output", 1)[1].split("\n#", 1)[0]
        documented = set(re.findall(r"`([a-z_0-9]+)`", section))
        self.config(max_retries=0)
        done = self.enqueue("true")
        job_id = self.enqueue("false")
        worker = self.start_worker("--idle-timeout", "30")
        self.wait_state(job_id, "dead")
        shapes = {
            "enqueue": self.ok_json("enqueue", "true", "--after", done,
                                    "--delay", "3600"),
            "show": self.ok_json("show", job_id),
            "list": self.ok_json("list")[0],
            "dlq list": self.ok_json("dlq", "list")[0],
            "status": self.ok_json("status"),
            "stats": self.ok_json("stats"),
            "queue list": self.ok_json("queue", "list")[0],
            "duplicate": [self.ok_json("enqueue", "true", "--unique", "u",
                                       "--delay", "3600")
                          for _ in range(2)][1],
        }
        shapes["runs"] = shapes["show"]["runs"][0]
        shapes["workers"] = shapes["status"]["workers"][0]
        shapes["failing_commands"] = shapes["stats"]["failing_commands"][0]
        shapes["per_minute"] = shapes["stats"]["per_minute"][0]
        for nested in ("counts", "finished_per_minute", "run_seconds",
                       "wait_seconds"):
            shapes[nested] = shapes["stats"][nested]
        worker.terminate()
        self.assertEqual(worker.wait(timeout=60), 0)
        for shape, value in shapes.items():
            missing = sorted(set(value) - documented)
            self.assertEqual(missing, [], "README does not document %s of %s"
                             % (missing, shape))

    def test_demo_help_and_readme_promise_the_same_time(self):
        # The demo takes about 7 s (2 s + 4 s of backoff); help and README
        # say the same (test_demo_runs_on_a_temporary_database: under 30 s).
        help_text = self.ok("demo", "--help", db=None)
        with open(os.path.join(HERE, "README.md")) as handle:
            readme = handle.read()
        claims = [re.findall(r"about (\d+) seconds", text)
                  for text in (help_text, readme)]
        self.assertEqual(claims, [["7"], ["7"]])


def _counter_lines(queue):
    """The Prometheus counters and histogram of a queue (then closed)."""
    try:
        return [line for line in queue.metrics().splitlines()
                if line.startswith(("queuectl_attempts_total",
                                    "queuectl_run_duration"))]
    finally:
        queue.close()

def _sleep_marker(seconds):
    """A sleep's length that no other test process uses: `.ci/run` runs
    two suites at once, and _processes_with sees the other one's jobs."""
    return "%d.%d" % (seconds, os.getpid())


def _processes_with(marker):
    """Pids of live (non-zombie) processes whose command line has `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as handle:
                cmdline = handle.read()
            with open("/proc/%s/stat" % name, "rb") as handle:
                zombie = handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and not zombie:
            found.append(int(name))
    return found


@unittest.skipUnless(os.path.isdir("/proc/self"), "needs /proc (Linux)")
class TestFaults(CLITestCase):
    """Real processes, real kills: no job lost, none run twice at once."""

    def test_exactly_once_with_many_worker_processes(self):
        # 3 processes x 4 threads drain 1,000+ jobs: each id runs once.
        out = os.path.join(self.dir, "ran.txt")
        n = 1000 * STRESS
        self.ok("enqueue", "-f", "-", input="\n".join(
            json.dumps({"command": 'echo "$QUEUECTL_JOB_ID" >> ' + out})
            for _ in range(n)))
        workers = [self.start_worker("--count", "4", "--exit-when-idle")
                   for _ in range(3)]
        for worker in workers:
            self.assertEqual(worker.wait(timeout=300), 0)
        with open(out) as handle:
            ran = handle.read().split()
        self.assertEqual(len(ran), n)
        self.assertEqual(len(set(ran)), n)
        status = self.ok_json("status")
        self.assertEqual(status["counts"]["completed"], n)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs WHERE state"
                                  " = 'processing'"), [(0,)])
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(n,)])

    def _job_killed_with_its_worker(self, before_kill=lambda: None):
        """Start a worker, kill -9 it mid-job; return (job id, job pgid).

        Attempt 1 runs until the test ends (or recovery kills it); its
        command line is the only one holding self.hold_path()."""
        self.config(lease_timeout=0.5, backoff_max=0)
        job_id = self.enqueue(
            'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then %s; fi; echo done'
            % self.hold())
        victim = self.start_worker()
        self.wait_started()
        pgid = self.wait_for(lambda: self.pgid(job_id),
                        what="the job's group to be recorded")
        before_kill()
        victim.kill()
        victim.wait()
        self.assertTrue(_processes_with(self.hold_path()),
                        "job died with its worker")
        return job_id, pgid

    def _assert_recovered(self, job_id):
        self.wait_state(job_id, "completed")
        runs = self.ok_json("show", job_id)["runs"]
        self.assertEqual([r["error"] for r in runs], ["worker lost", None])
        self.assertEqual(self.ok("logs", job_id), "done\n")
        self.assertEqual(_processes_with(self.hold_path()), [])

    def test_kill_9_another_live_worker_recovers(self):
        # A live worker recovers a killed worker's job: 'worker lost', the
        # orphaned job group is killed, and the retry completes.  (The
        # survivor is frozen while the victim dies, so the job is seen to
        # outlive its worker before anyone may recover it.)
        survivors = []

        def start_survivor():
            survivors.append(self.start_worker())
            self.wait_for(lambda: len(self.ok_json("status")["workers"]) == 2,
                     what="the survivor to register")
            survivors[0].send_signal(signal.SIGSTOP)
        job_id, pgid = self._job_killed_with_its_worker(start_survivor)
        (survivor,) = survivors
        survivor.send_signal(signal.SIGCONT)
        self._assert_recovered(job_id)
        survivor.terminate()
        self.assertEqual(survivor.wait(timeout=60), 0)

    def test_kill_9_a_later_worker_recovers(self):
        job_id, pgid = self._job_killed_with_its_worker()
        self.assertEqual(self.state(job_id), "processing")
        self.drain()
        self._assert_recovered(job_id)

    def test_kill_9_lease_expiry_without_pid_check(self):
        # A worker that looks like another host's is judged by its lease:
        # its beat stopped, so it is dead after lease-timeout.  (That is at
        # least lease-timeout of the new worker's time after it started: a
        # lower bound that load cannot break.)
        job_id, pgid = self._job_killed_with_its_worker()
        self.sql("UPDATE workers SET host = 'elsewhere'")
        started = time.monotonic()
        worker = self.start_worker()
        self.wait_state(job_id, "completed")
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        worker.terminate()
        self.assertEqual(worker.wait(timeout=60), 0)
        self._assert_recovered(job_id)

    def test_a_claim_whose_answer_was_lost_is_handed_back(self):
        # The server commits a claim, then the connection dies before it
        # says so: the worker holds in the database a job it does not know
        # of, which nobody would run or recover while it lives.  It hands
        # the job back (uncounted) once the database answers again, and
        # runs it then.  (The lost answer is made in-process: the claim's
        # transaction commits, then its write() raises as a lost
        # connection does.)
        job_id = self.enqueue("true")
        log = io.StringIO()
        pool = queuectl.WorkerPool(self.db, exit_when_idle=True, log=log)
        lost = {"raised": False}

        def open_store():
            # Each thread has its store: only the claiming one's write (not
            # the pool's beat, in another thread) loses its answer.
            store = queuectl.open_store(self.db, pool.now)
            claim, write = store.claim, store.write
            claimed = []

            def claim_noted(*args, **kwargs):
                claims = claim(*args, **kwargs)
                claimed.extend(claims)
                return claims

            @contextlib.contextmanager
            def write_losing_an_answer(*args, **kwargs):
                with write(*args, **kwargs) as handle:
                    yield handle
                if claimed and not lost["raised"]:
                    lost["raised"] = True
                    raise queuectl.StoreError("connection lost",
                                              transient=True)
            store.claim, store.write = claim_noted, write_losing_an_answer
            return store
        pool._open_store = open_store
        self.assertEqual(pool.run(), 0)
        self.assertTrue(lost["raised"])
        self.assertIn("%s requeued claimed by a commit whose answer was lost"
                      % job_id, log.getvalue())
        job = self.job(job_id)
        self.assertEqual((job["state"], len(job["runs"])), ("completed", 1))

    @sqlite_only("a copy of a database file")
    def test_a_copy_of_the_database_leaves_the_originals_jobs_alone(self):
        # A copy made while a worker runs (a backup, `cp`) carries that
        # worker's row and its running job.  A worker on the copy takes
        # that worker for dead once its beat (in the copy) stops, and
        # recovers the job there; but the job's processes are the original
        # queue's, whose live worker must see its job end as it would have.
        self.config(lease_timeout=1)
        job_id = self.enqueue(self.hold(), "--max-retries", "0")
        original = self.start_worker()
        self.wait_started()
        self.wait_for(lambda: self.pgid(job_id), what="its group recorded")
        copy = os.path.join(self.dir, "copy.db")
        source = sqlite3.connect(self.db, isolation_level=None, timeout=60)
        source.execute("BEGIN IMMEDIATE")  # no write while the files copy
        for suffix in ("", "-wal"):
            shutil.copyfile(self.db + suffix, copy + suffix)
        source.execute("ROLLBACK")
        source.close()
        self.db, main_db = copy, self.db
        on_copy = self.start_worker()
        self.wait_for(lambda: "worker lost" in _read(on_copy.log.name),
                      what="the copy's worker to recover the job")
        self.assertEqual(self.state(job_id), "dead")  # in the copy
        on_copy.terminate()
        self.assertEqual(on_copy.wait(timeout=60), 0)
        self.db = main_db
        self.release()
        self.wait_state(job_id, "completed")
        self.assertEqual(self.job(job_id)["runs"][0]["error"], None)
        original.terminate()
        self.assertEqual(original.wait(timeout=60), 0)

    def test_kill_9_during_bulk_enqueue_is_all_or_nothing(self):
        # kill -9 of `enqueue -f` mid-file: the file is all in or all out.
        path = os.path.join(self.dir, "big.jsonl")
        with open(path, "w") as handle:
            for n in range(100000):
                handle.write('{"command": "echo %d"}\n' % n)
        self.ok("status")  # the database exists before the first kill

        def wal_over(size):
            def past():
                with contextlib.suppress(OSError):
                    return os.path.getsize(self.db + "-wal") > size
            return past
        # Kill points: two moments, likely before the write, and two stages
        # of the write itself (its first pages in the WAL, then megabytes
        # of them), which no load can make the kill miss.
        points = (0.05, 0.3, wal_over(32), wal_over(4 << 20))
        if self.STORE != "sqlite":  # no WAL file to watch: moments only
            points = (0.05, 0.3, 1.0, 3.0)
        for point in points:
            proc = subprocess.Popen(
                [sys.executable, SCRIPT, "--db", self.db, "enqueue", "-f",
                 path], stdout=subprocess.DEVNULL, env=self.env)
            if callable(point):
                self.wait_for(lambda: point() or proc.poll() is not None,
                         interval=0.001, what="the enqueue to write")
            else:
                time.sleep(point)
            proc.kill()
            proc.wait()
            if self.STORE == "sqlite":
                self.assertEqual(self.sql("PRAGMA integrity_check"), [("ok",)])
            count = self.sql("SELECT COUNT(*) FROM jobs")[0][0]
            self.assertIn(count % 100000, (0,), "partial enqueue: %d" % count)

    def test_timeout_kills_background_grandchildren(self):
        # Timeout kills the job's whole group, double-forked children too.
        # (They would sleep past every deadline here.)
        marker = _sleep_marker(2718)
        job_id = self.enqueue("(sleep %s &); sleep %s & sleep %s; wait"
                              % (marker, marker, marker),
                              "--timeout", "0.5", "--max-retries", "0")
        self.drain()
        self.assertEqual(self.job(job_id)["last_error"], "timed out after 0.5s")
        self.wait_for(lambda: not _processes_with(marker),
                 what="grandchildren to die")

    def test_a_job_ends_with_its_shell_though_a_child_writes_on(self):
        # The shell exits; a child it left behind holds the output open and
        # writes without end.  The job is over with its shell (the README:
        # its lifetime is the shell's), not at its timeout, and its output
        # is what the pipe held then.  The child, whose pipe the worker
        # then closes, ends at its next write (SIGPIPE).  The shell exits
        # only once the child has written (a file says so): a `sleep`
        # could end before a busy machine started the child at all.
        marker = "writes-on-%d" % os.getpid()
        flag = os.path.join(self.dir, "child-wrote")
        job_id = self.enqueue(
            "yes %s | { IFS= read -r line; echo \"$line\"; : > %s; exec cat;"
            " } & while [ ! -e %s ]; do sleep 0.01; done; exit 0"
            % (marker, shlex.quote(flag), shlex.quote(flag)),
            "--timeout", "30", "--max-retries", "0")
        self.drain()
        job = self.job(job_id)
        self.assertEqual(job["state"], "completed", job["last_error"])
        code, out, err = self.cli("logs", job_id)
        self.assertIn(marker + "\n", out)
        self.wait_for(lambda: not _processes_with(marker),
                      what="the child to end")

    @sqlite_only("it measures the database file")
    def test_huge_output_keeps_memory_and_disk_bounded(self):
        # 300 MB of output: worker RSS stays small, the tail is kept.
        job_id = self.enqueue("head -c 300000000 /dev/zero | tr '\\0' x;"
                              " echo; echo THE-END")
        worker = self.start_worker()
        self.wait_state(job_id, "completed", timeout=120)
        with open("/proc/%d/status" % worker.pid) as handle:
            peak = [int(line.split()[1]) for line in handle
                    if line.startswith("VmHWM")][0]
        worker.terminate()
        worker.wait(timeout=60)
        self.assertLess(peak, 100 * 1024, "peak RSS %d kB" % peak)
        code, out, err = self.cli("logs", job_id)
        self.assertIn("output truncated", err)
        self.assertLessEqual(len(out.encode()), 65536)
        self.assertTrue(out.endswith("x\nTHE-END\n"))
        self.assertLess(os.path.getsize(self.db), 5 << 20)

    def test_many_concurrent_enqueues_while_workers_run(self):
        # 60 enqueue processes at once beside busy workers: none fails.
        self.ok("enqueue", "-f", "-", input="\n".join(
            ['{"command": "sleep 0.01"}'] * 200))
        workers = [self.start_worker("--count", "2") for _ in range(2)]
        procs = [subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db, "enqueue",
             "echo %d" % n], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env) for n in range(60 * STRESS)]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            self.assertEqual((proc.returncode, err), (0, b""))
            self.assertRegex(out.decode(), r"^[0-9a-f]{12}\n$")
        total = 200 + 60 * STRESS
        self.wait_for(lambda: self.ok_json("status")["counts"]["completed"]
                 == total, 120, what="all jobs to complete")
        self.ok("worker", "stop", "--wait")
        for worker in workers:
            self.assertEqual(worker.wait(timeout=60), 0)
            worker.log.seek(0)
            # Neither a lock (SQLite) nor a deadlock (PostgreSQL) held
            # anyone up: no error line at all.
            errors = [line for line in worker.log.read().splitlines()
                      if " error " in line or "locked" in line]
            self.assertEqual(errors, [])

    def test_future_jobs_do_not_start_early(self):
        job_id = self.enqueue("true", "--delay", "0.7")
        worker = self.start_worker("--poll-interval", "0.02")
        self.wait_state(job_id, "completed")
        worker.terminate()
        worker.wait(timeout=60)
        job = self.ok_json("show", job_id)
        started = queuectl.parse_time(job["runs"][0]["started_at"])
        self.assertGreaterEqual(started, queuectl.parse_time(job["run_at"]))

    def test_wall_clock_jumps_do_not_steal_a_running_job(self):
        # A worker whose clock jumped back an hour keeps its job, and beats
        # while it runs: others, one right and one an hour ahead, judge it
        # by its beat, not by timestamps.  (lease-timeout stays at its
        # default: a short one would let a busy machine starve a live
        # worker's beat past it, while timestamps an hour off exceed it.)
        import threading
        job_id = self.enqueue(
            'if [ "$QUEUECTL_ATTEMPT" = 1 ]; then %s; fi' % self.hold(),
            "--run-at", "2020-01-01T00:00:00Z")
        skewed = queuectl.WorkerPool(self.db, exit_when_idle=True, log=False,
                                     now=lambda: time.time() - 3600)
        thread = threading.Thread(target=skewed.run)
        thread.start()

        def end_skewed():
            self.release()
            thread.join(timeout=60)
        self.addCleanup(end_skewed)
        self.wait_started()
        other = self.start_worker()
        self.wait_for(lambda: self.beats(other.pid) >= 2,
                 what="the other worker to look for dead workers twice")
        beat = self.beats(os.getpid())
        self.wait_for(lambda: self.beats(os.getpid()) >= beat + 2,
                 what="the skewed worker to beat during its job")
        ahead = queuectl.WorkerPool(self.db, exit_when_idle=True, log=False,
                                    now=lambda: time.time() + 3600)
        self.assertEqual(ahead.run(), 0)
        self.assertEqual(self.state(job_id), "processing")
        self.release()
        thread.join(timeout=60)
        self.assertFalse(thread.is_alive(), "the skewed worker did not end")
        other.terminate()
        self.assertEqual(other.wait(timeout=60), 0)
        runs = self.ok_json("show", job_id)["runs"]
        self.assertEqual([r["error"] for r in runs], [None])
        self.assertEqual(self.state(job_id), "completed")

    @sqlite_only("file and folder modes")
    def test_read_only_database_and_folder(self):
        # Unwritable file or folder: one error line, exit 1, file unchanged.
        prefix = []
        if os.geteuid() == 0:  # root ignores file modes unless it drops caps
            if not shutil.which("setpriv"):
                self.skipTest("root without setpriv cannot test file modes")
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        self.enqueue("true")
        with open(self.db, "rb") as handle:
            content = handle.read()
        for file_mode, dir_mode in [(0o444, 0o755), (0o644, 0o555)]:
            os.chmod(self.db, file_mode)
            os.chmod(self.dir, dir_mode)
            try:
                for args in (("enqueue", "true"), ("status",)):
                    proc = subprocess.run(
                        prefix + [sys.executable, SCRIPT, "--db", self.db]
                        + list(args), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, env=self.env, cwd="/")
                    err = proc.stderr.decode()
                    self.assertEqual(proc.returncode, 1, err)
                    self.assertTrue(err.startswith("queuectl: error: "), err)
                    self.assertEqual(err.count("\n"), 1, err)
            finally:
                os.chmod(self.dir, 0o755)
                os.chmod(self.db, 0o600)
            with open(self.db, "rb") as handle:
                self.assertEqual(handle.read(), content)

    def test_hostile_input_round_trips(self):
        # Quotes, newlines, unicode, SQL, a 1 MB command: stored and run
        # exactly; NUL bytes and non-string env values are refused.
        nasty = ["echo \"it's\" '\"quoted\"'", "echo 'line1\nline2'",
                 "echo '\u65e5\u672c \U0001f600 caf\u00e9'",
                 "echo \"'); DROP TABLE jobs; --\"", "echo %s%%s ${HOME+x}",
                 "printf '\\377\\376 bad utf8\\n'"]
        ids = [self.enqueue(json.dumps({"command": c, "id": "n%d" % i}))
               for i, c in enumerate(nasty)]
        big = "echo " + "y" * (1 << 20) + " | wc -c"
        path = os.path.join(self.dir, "big.json")
        with open(path, "w") as handle:
            json.dump({"command": big, "id": "big"}, handle)
        self.ok("enqueue", "-f", path)
        self.expect_failure(2, "must not contain NUL", "enqueue",
                            '{"command": "a\\u0000"}')
        self.expect_failure(2, "env: value of A must be a string", "enqueue",
                            '{"command": "true", "env": {"A": null}}')
        self.expect_failure(2, "not valid Unicode", "enqueue",
                            '{"command": "echo \\ud800"}')
        self.expect_failure(2, "id must be", "enqueue", "true", "--id",
                            "x'; DROP TABLE jobs; --")
        self.drain()
        for job_id, command in zip(ids, nasty):
            job = self.job(job_id)
            self.assertEqual((job["command"], job["state"]),
                             (command, "completed"))
        self.assertEqual(self.ok("logs", "n1"), "line1\nline2\n")
        self.assertEqual(self.ok("logs", "n2"),
                         "\u65e5\u672c \U0001f600 caf\u00e9\n")
        self.assertEqual(self.ok("logs", "n3"), "'); DROP TABLE jobs; --\n")
        self.assertEqual(self.ok("logs", "n5"), "\ufffd\ufffd bad utf8\n")
        self.assertEqual(self.ok("logs", "big").strip(), str((1 << 20) + 1))
        self.assertEqual(self.job("big")["command"], big)


# stopper.py DB PID: SIGSTOP process PID while holding DB's write lock.
# kill() returns before the stop takes hold: the kernel wakes one thread,
# which then stops the others.  Released at once, the lock could be taken
# by a thread not yet stopped, which would then freeze holding it (CI saw
# the rescuer wait for good), so the lock is kept until every thread of
# PID is seen stopped.
_STOP_HOLDING_THE_WRITE_LOCK = """\
import os, signal, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
pid = int(sys.argv[2])
os.kill(pid, signal.SIGSTOP)
def running_threads():
    tasks = "/proc/%d/task" % pid
    states = []
    for task in os.listdir(tasks):
        try:
            with open("%s/%s/stat" % (tasks, task), "rb") as stat:
                states.append(stat.read().rsplit(b")", 1)[1].split()[0])
        except (OSError, IndexError):
            pass  # the thread ended
    return [state for state in states if state not in (b"T", b"t")]
deadline = time.monotonic() + 60
while running_threads() and time.monotonic() < deadline:
    time.sleep(0.001)
conn.execute("ROLLBACK")
"""


class TestHeldPromises(CLITestCase):
    """Issue 9: promises that hostile jobs, numbers and machines broke."""

    def hold(self, name="hold"):
        """A file whose existence keeps a job running: the test releases it."""
        path = os.path.join(self.dir, name)
        open(path, "w").close()
        self.addCleanup(_remove_quietly, path)
        return path

    def test_job_that_closes_its_output_still_times_out(self):
        # A job's lifetime is its process, not its pipe: redirecting its
        # own output must not let it escape the timeout.
        marker = _sleep_marker(30)
        job_id = self.enqueue("exec >/dev/null 2>&1; sleep %s" % marker,
                              "--timeout", "1", "--max-retries", "0")
        self.drain()
        job = self.job(job_id)
        self.assertEqual((job["state"], job["last_error"]),
                         ("dead", "timed out after 1s"))
        self.assertEqual(_processes_with(marker), [])

    def test_forced_stop_kills_a_job_that_closed_its_output(self):
        # Its group is recorded (for recovery) and a second SIGTERM kills
        # it and requeues it uncounted.
        marker = _sleep_marker(31)
        job_id = self.enqueue("exec >/dev/null 2>&1; sleep %s" % marker)
        worker = self.start_worker()
        self.wait_state(job_id, "processing")
        self.wait_for(lambda: self.sql("SELECT pgid FROM attempts")[0][0],
                 what="the job's group to be recorded")
        worker.send_signal(signal.SIGTERM)
        self.wait_for(lambda: "stopping:" in _read(worker.log.name),
                 what="the first signal to be taken")
        worker.send_signal(signal.SIGTERM)
        self.assertNotEqual(worker.wait(timeout=30), 0)
        self.assertEqual(self.state(job_id), "pending")
        self.assertEqual(self.job(job_id)["attempts"], 0)
        self.wait_for(lambda: not _processes_with(marker),
                 what="the job's group to be killed")

    def test_long_job_without_output_hands_back_its_batch(self):
        # A worker claims a batch (CLAIM_BATCH jobs) at once from a deep
        # queue; when the first runs long (and has closed its output) the
        # others go back at once for other workers instead of waiting
        # behind it.
        hold = self.hold()
        first = self.enqueue("exec >/dev/null 2>&1; while [ -e %s ]; do"
                             " sleep 0.05; done" % hold, "--priority", "9")
        rest = [self.enqueue("true")
                for _ in range(queuectl.CLAIM_BATCH - 1)]
        holder = self.start_worker("--count", "1")
        self.wait_state(first, "processing")
        self.wait_for(lambda: self.sql("SELECT pgid FROM attempts a JOIN jobs j"
                                  " ON j.attempt_id = a.id WHERE j.id = ?",
                                  first)[0][0],
                 what="the long job's group to be recorded")
        self.drain()  # a second worker runs the rest while the first holds
        self.assertEqual([self.state(j) for j in rest],
                         ["completed"] * len(rest))
        self.assertEqual(self.state(first), "processing")
        os.unlink(hold)
        self.wait_state(first, "completed")
        holder.send_signal(signal.SIGTERM)
        self.assertEqual(holder.wait(timeout=30), 0)

    def test_thawed_worker_starts_no_recovered_claim(self):
        # A worker stopped (SIGSTOP) longer than the lease, holding claimed
        # jobs, has them recovered and run elsewhere; thawed, it must start
        # none of them.  (A job it started just before the stop took hold
        # is run again by the rescuer: at least once, never at once.)
        self.config(lease_timeout=1, backoff_max=0)
        ran = os.path.join(self.dir, "ran")
        stop = "kill -STOP $PPID"
        if self.STORE == "sqlite":
            # Frozen inside a transaction (a heartbeat's), the worker would
            # hold SQLite's one write lock and block the rescuer as well:
            # the job takes that lock itself, so the worker freezes
            # outside any transaction.
            stop = "%s %s %s $PPID" % (
                shlex.quote(sys.executable), shlex.quote(os.path.join(
                    self.dir, "stopper.py")), shlex.quote(self.db))
            with open(os.path.join(self.dir, "stopper.py"), "w") as handle:
                handle.write(_STOP_HOLDING_THE_WRITE_LOCK)
        self.enqueue('if [ "$QUEUECTL_ATTEMPT" = 1 ]; then %s; fi' % stop,
                     "--priority", "9")
        ids = [self.enqueue('echo "$QUEUECTL_JOB_ID" >> %s' % ran)
               for _ in range(queuectl.CLAIM_BATCH - 1)]
        frozen = self.start_worker("--count", "1", "--exit-when-idle")
        self.wait_for(lambda: _process_state(frozen.pid) == "T",
                 what="the worker to stop itself")
        rescuer = self.start_worker()
        # The rescuer runs the batch one job at a time: 8 s a job bounds
        # the wait on a loaded machine (64 s when the batch was 8).
        self.wait_for(lambda: self.ok_json("status")["counts"]["completed"]
                 == queuectl.CLAIM_BATCH, timeout=8 * queuectl.CLAIM_BATCH,
                 what="the rescuer to run every job")
        before_thaw = len(_read(frozen.log.name))
        os.kill(frozen.pid, signal.SIGCONT)
        # --exit-when-idle: it exits once every claim it held was dealt with.
        self.assertEqual(frozen.wait(timeout=60), 0)
        after_thaw = _read(frozen.log.name)[before_thaw:]
        self.assertNotIn(" started attempt", after_thaw, after_thaw)
        rescuer.send_signal(signal.SIGTERM)
        self.assertEqual(rescuer.wait(timeout=30), 0)
        with open(ran) as handle:
            self.assertEqual(set(handle.read().split()), set(ids))

    def test_unencodable_env_is_refused_at_enqueue(self):
        # One bad env value must not reach (and kill) the workers.
        self.enqueue("true")
        for env in ('{"X": "\\ud800"}', '{"\\udfff": "1"}'):
            self.expect_failure(2, "env:", "enqueue",
                                '{"command": "true", "env": %s}' % env)
        # Nor one too big for exec: the kernel's 128 KiB for one string,
        # or more than 256 KiB in all.
        big = "V=" + "b" * (queuectl.MAX_ENV_ENTRY - 1)
        self.expect_failure(2, "env: V=... is 131072 bytes", "enqueue",
                            "--env", big, "true")
        self.expect_failure(2, "bytes in all", "enqueue", json.dumps({
            "command": "true",
            "env": dict(("V%d" % i, "b" * 100000) for i in range(3))}))
        job_id = self.enqueue("--env", big[:-1], "echo ${#V}",
                              "--max-retries", "0")
        self.drain()
        self.assertEqual(self.ok("logs", job_id), "131069\n")

    def test_jobs_start_alike_in_and_out_of_the_workers_folder(self):
        # `worker start` spawns jobs that run in its own folder with
        # posix_spawn, others with Popen: either way a job gets its folder,
        # a session of its own, stdin from /dev/null, SIGPIPE at its
        # default (Python ignores it) and no descriptor but 0-2: none the
        # worker inherited, none of its database's.
        elsewhere = os.path.join(self.dir, "elsewhere")
        os.mkdir(elsewhere)
        inherited = os.open(os.path.join(self.dir, "inherited"),
                            os.O_CREAT | os.O_RDONLY)
        self.addCleanup(os.close, inherited)
        look = ("import os, sys; print(os.getcwd(), os.getsid(0) == os.getpid(),"
                " os.getpgid(0) == os.getpid(),"
                " os.path.samestat(os.fstat(0), os.stat(os.devnull)),"
                " *sorted(os.listdir('/dev/fd')))")
        # Which path each job took: glibc's posix_spawn leaves its signal
        # 32 ignored in the child (see the README), Popen and CPython's
        # vfork do not; and from 3.8 on, Popen says so to audit hooks.
        by_glibc = isinstance(queuectl._direct_spawner(), queuectl._LibcSpawn)
        if by_glibc:
            look += ("; print([int(line.split()[1], 16) >> 31 & 1 for line"
                     " in open('/proc/self/status')"
                     " if line.startswith('SigIgn:')])")
        popens = os.path.join(self.dir, "popens")
        audited = [sys.executable, "-c", _AUDITED_WORKER, popens, SCRIPT]
        command = "yes | head -n 1; exec %s -c %s" % (
            shlex.quote(sys.executable), shlex.quote(look))
        # A mount or unmount anywhere on the machine while the worker runs
        # (CI runs two suites at once; one mounts a tmpfs) rightly sends
        # every later job through Popen: such a run is done again.
        for _ in range(20):
            with _mount_watch() as mounts_changed:
                open(popens, "w").close()
                here = self.enqueue(command)
                code, out, err = self.cli("enqueue", command, cwd=elsewhere)
                self.assertEqual((code, err), (0, ""))
                argv = ([sys.executable, SCRIPT] if sys.version_info < (3, 8)
                        else audited) + ["--db", self.db, "worker", "start",
                                         "--exit-when-idle"]
                # Its stdin a pipe, so a job's /dev/null must be its own.
                worker = subprocess.run(
                    argv, pass_fds=[inherited], cwd=self.dir, env=self.env,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, timeout=120)
                self.assertEqual(worker.returncode, 0, worker.stderr)
                changed = mounts_changed()
            if not changed:
                break
        else:
            self.fail("the mount table changed during each of 20 runs")
        for job_id, folder in ((here, self.dir), (out.strip(), elsewhere)):
            # The fourth descriptor is the one that lists them.
            expected = ["y", os.path.realpath(folder), "True", "True",
                        "True", "0", "1", "2", "3"]
            if by_glibc:
                expected.append("[1]" if folder == self.dir else "[0]")
            self.assertEqual(self.ok("logs", job_id).split(), expected,
                             job_id)
        if sys.version_info >= (3, 8):
            with open(popens) as handle:
                self.assertEqual([os.path.realpath(folder) for folder
                                  in handle.read().splitlines()],
                                 [os.path.realpath(elsewhere)])

    def test_a_shell_that_cannot_start_is_told_from_one_that_exits_255(self):
        # An exec that fails (here the job's environment is over the
        # limit that a 768 KiB stack gives exec: 192 KiB) fails the attempt
        # as `cannot start`, in and out of the worker's folder, though the
        # child that tried exits 255 (CPython's vfork); a shell that exits
        # 255 itself is an exit code; and the pool goes on.
        elsewhere = os.path.join(self.dir, "elsewhere")
        os.mkdir(elsewhere)
        wide = ["--env", "A=%s" % ("x" * 100000), "--env",
                "B=%s" % ("x" * 100000), "--max-retries", "0"]
        jobs = [self.enqueue("echo never", *wide),
                self.ok("enqueue", "echo never", *wide, cwd=elsewhere).strip(),
                self.enqueue("exit 255", "--max-retries", "0"),
                self.enqueue("echo ran")]

        def small_stack():
            import resource
            hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
            resource.setrlimit(resource.RLIMIT_STACK, (768 * 1024, hard))
        worker = subprocess.run(
            [sys.executable, SCRIPT, "--db", self.db, "worker", "start",
             "--exit-when-idle"], cwd=self.dir, env=self.env,
            preexec_fn=small_stack, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(worker.returncode, 0, worker.stderr)
        errors = [(self.job(job_id)["state"], self.job(job_id)["last_error"])
                  for job_id in jobs]
        for state, error in errors[:2]:
            self.assertEqual(state, "dead")
            self.assertRegex(error, "^cannot start: .*(?i:argument list too"
                             " long)")
        self.assertEqual(errors[2:], [("dead", "exit code 255"),
                                      ("completed", None)])
        self.assertEqual(self.ok("logs", jobs[3]), "ran\n")

    def test_a_jobs_variables_replace_the_workers_own(self):
        # A job's env and QUEUECTL_JOB_ID take the place of the worker's
        # (a worker started inside another job has one): the shell gets one
        # entry of each, in and out of the worker's folder alike.
        elsewhere = os.path.join(self.dir, "elsewhere")
        os.mkdir(elsewhere)
        command = ("echo $HOME $QUEUECTL_JOB_ID; tr '\\0' '\\n'"
                   " </proc/$$/environ | grep -c '^HOME=\\|^QUEUECTL_JOB_ID='")
        here = self.enqueue(command, "--env", "HOME=/job-home")
        code, out, err = self.cli("enqueue", command, "--env",
                                  "HOME=/job-home", cwd=elsewhere)
        self.assertEqual((code, err), (0, ""))
        argv = [sys.executable, SCRIPT, "--db", self.db, "worker", "start",
                "--exit-when-idle"]
        worker = subprocess.run(argv, cwd=self.dir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=120, env=dict(
                                    self.env, QUEUECTL_JOB_ID="outer",
                                    HOME=self.dir))
        self.assertEqual(worker.returncode, 0, worker.stderr)
        for job_id in (here, out.strip()):
            self.assertEqual(self.ok("logs", job_id),
                             "/job-home %s\n2\n" % job_id)

    def test_a_worker_started_oddly_still_runs_and_records_its_jobs(self):
        # Found by a red-team pass: started with SIGCHLD ignored, a worker
        # recorded every job as completed (the kernel reaped them first);
        # with stderr closed (2>&-) it stopped at its first log line; an
        # environment entry with an empty name (`env '=x=1'`) made
        # posix_spawn refuse every job; and a command under 65,536
        # characters but over 128 KiB in UTF-8 could not start.
        failing = self.enqueue("exit 3", "--max-retries", "0")
        wide = self.ok("enqueue", "-f", "-", input=json.dumps(
            {"command": "echo %s | wc -c" % ("\u20ac" * 50000)})).strip()

        def start_oddly():
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            os.close(2)
        argv = [sys.executable, SCRIPT, "--db", self.db, "worker", "start",
                "--exit-when-idle"]
        worker = subprocess.run(argv, preexec_fn=start_oddly, cwd=self.dir,
                                env=dict(self.env, **{"": "x=1"}),
                                stdout=subprocess.PIPE, timeout=120)
        self.assertEqual(worker.returncode, 0)
        job = self.job(failing)
        self.assertEqual((job["state"], job["last_error"]),
                         ("dead", "exit code 3"))
        self.assertEqual(self.ok("logs", wide).strip(), "150001")

    @unittest.skipUnless(sys.platform.startswith("linux"),
                         "reads a job's signal mask from /proc")
    def test_a_signal_the_worker_ignores_stays_ignored_in_its_jobs(self):
        # posix_spawn resets every signal not ignored in the worker to its
        # default in one system call each (_signals_to_default): one the
        # worker was started ignoring (nohup) must stay ignored, SIGPIPE
        # and SIGXFSZ (Python ignores them) must not, in and out of the
        # worker's folder alike.  Signals from 32 are libc's own.
        elsewhere = os.path.join(self.dir, "elsewhere")
        os.mkdir(elsewhere)
        command = "exec grep ^SigIgn: /proc/self/status"
        here = self.enqueue(command)
        code, out, err = self.cli("enqueue", command, cwd=elsewhere)
        self.assertEqual((code, err), (0, ""))

        def start_ignoring():
            for number in (signal.SIGHUP, signal.SIGUSR2):
                signal.signal(number, signal.SIG_IGN)
        argv = [sys.executable, SCRIPT, "--db", self.db, "worker", "start",
                "--exit-when-idle"]
        worker = subprocess.run(argv, preexec_fn=start_ignoring, cwd=self.dir,
                                env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(worker.returncode, 0, worker.stderr)
        for job_id in (here, out.strip()):
            mask = int(self.ok("logs", job_id).split()[1], 16)
            ignored = [number for number in range(1, 32)
                       if mask >> (number - 1) & 1]
            self.assertEqual(ignored, sorted([signal.SIGHUP, signal.SIGUSR2]),
                             job_id)

    @unittest.skipUnless(sys.platform.startswith("linux")
                         and os.geteuid() == 0,
                         "needs root on Linux to bind-mount a folder")
    def test_a_job_runs_in_its_own_view_of_a_bind_mounted_folder(self):
        # Two bind mounts of one folder share its device and inode, but one
        # may be read-only: a job enqueued in the writable one must not run
        # in the worker's read-only one (found by a red-team pass).
        real, view = (os.path.join(self.dir, name) for name in ("real", "view"))
        os.mkdir(real)
        os.mkdir(view)
        subprocess.check_call(["mount", "--bind", real, view])
        self.addCleanup(subprocess.check_call, ["umount", view])
        subprocess.check_call(["mount", "-o", "remount,bind,ro", view])
        code, out, err = self.cli("enqueue", "touch written && pwd -P",
                                  "--max-retries", "0", cwd=real)
        self.assertEqual((code, err), (0, ""))
        code, _, err = self.cli("worker", "start", "--exit-when-idle",
                                cwd=view)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.ok("logs", out.strip()), real + "\n")
        self.assertTrue(os.path.exists(os.path.join(real, "written")))

    @unittest.skipUnless(sys.platform.startswith("linux")
                         and os.geteuid() == 0,
                         "needs root on Linux to bind-mount a folder")
    def test_a_job_sees_a_mount_made_over_the_workers_folder(self):
        # Found by a red-team pass: a folder bind-mounted read-only onto
        # itself keeps its path and inode, so a worker started before the
        # mount took a job enqueued there for one in its own folder, and
        # ran it in the writable view the worker still had.
        folder = os.path.join(self.dir, "folder")
        os.mkdir(folder)
        self.enqueue(CLITestCase.hold(self, "first"))
        worker = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db, "worker", "start",
             "--exit-when-idle"], cwd=folder, env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(worker)
        self.wait_started("first")
        subprocess.check_call(["mount", "--bind", folder, folder])
        self.addCleanup(subprocess.check_call, ["umount", folder])
        subprocess.check_call(["mount", "-o", "remount,bind,ro", folder])
        code, out, err = self.cli("enqueue", "touch written", "--max-retries",
                                  "0", cwd=folder)
        self.assertEqual((code, err), (0, ""))
        self.release("first")
        _, err = worker.communicate(timeout=120)
        self.assertEqual(worker.returncode, 0, err)
        self.assertEqual(self.job(out.strip())["state"], "dead")
        self.assertIn("Read-only file system", self.ok("logs", out.strip()))

    def test_anything_failing_at_start_fails_only_that_attempt(self):
        # A job that cannot even be started (here an env written by an
        # older queuectl) fails as 'cannot start', and the pool goes on.
        bad = self.enqueue("true", "--max-retries", "0")
        good = self.enqueue("true")
        self.sql("UPDATE jobs SET env = ? WHERE id = ?", '{"X": "\\ud800"}',
                 bad)
        self.drain()
        self.assertEqual(self.state(good), "completed")
        job = self.job(bad)
        self.assertEqual(job["state"], "dead")
        self.assertTrue(job["last_error"].startswith("cannot start:"),
                        job["last_error"])

    def test_numbers_beyond_what_storage_and_clock_hold(self):
        # Every number has a range checked before anything is written.
        self.enqueue("true", "--id", "there")
        huge = "99999999999999999999999"
        cases = [
            (("enqueue", "true", "--delay", "1e17"), "delay must be"),
            (("enqueue", "true", "--delay", "1e20"), "delay must be"),
            (("enqueue", '{"command": "x", "timeout": 1e27}'),
             "timeout must be"),
            (("enqueue", '{"command": "x", "max_retries": 9223372036854775808}'),
             "max_retries must be"),
            (("enqueue", '{"command": "x", "delay": 1%s}' % ("0" * 400)),
             "delay must be"),
            (("enqueue", '{"command": "x", "run_at": "2026-02-31T10:00:00Z"}'),
             "not a valid date"),
            (("enqueue", '{"command": "x", "run_at": "2026-02-01T10:00+99:99"}'),
             "not a valid UTC offset"),
            (("enqueue", '{"command": "x", "run_at": "0000-01-01T00:00:00Z"}'),
             "not a valid date"),
            (("enqueue", '{"command": "x", "run_at":'
              ' "\\uff12\\uff10\\uff12\\uff16-01-01"}'), "not an ISO 8601"),
            (("enqueue", '{"command": "true", "command": "false"}'),
             'duplicate key "command"'),
            (("config", "set", "backoff-base", "1e17"), "backoff-base must be"),
            (("config", "set", "max-retries", huge), "max-retries must be"),
            (("config", "set", "output-limit", huge), "output-limit must be"),
            (("list", "--offset", huge), "--offset must be"),
            (("list", "--limit", huge), "--limit must be"),
            (("logs", "there", "--attempt", huge), "--attempt must be"),
            (("enqueue", "-f", "-"), "nested too deeply"),
        ]
        for args, message in cases:
            with self.subTest(args=args[:3]):
                stdin = "[" * 200000 if args[-1] == "-" else None
                self.expect_failure(2, message, *args, input=stdin)

    @sqlite_only("SQLite's file lock")
    def test_worker_survives_a_database_locked_for_longer_than_it_waits(self):
        # Another process holds the write lock past the lock wait: the
        # worker keeps the finished result, logs once, retries, and saves
        # it when the lock is released; no attempt is charged.
        hold = self.hold()
        job_id = self.enqueue("while [ -e %s ]; do sleep 0.05; done" % hold)
        log = _LockedLog()
        saved = queuectl.LOCK_WAIT
        queuectl.LOCK_WAIT = 0.5
        self.addCleanup(setattr, queuectl, "LOCK_WAIT", saved)
        pool = queuectl.WorkerPool(self.db, exit_when_idle=True, log=log)
        import threading
        runner = threading.Thread(target=lambda: log.done(pool.run()))
        runner.start()
        self.addCleanup(runner.join, 60)
        self.wait_state(job_id, "processing")
        blocker = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(blocker.close)
        blocker.execute("BEGIN IMMEDIATE")
        os.unlink(hold)
        self.wait_for(lambda: "database locked by another process" in log.text(),
                 timeout=30, what="the worker to report the lock")
        blocker.execute("ROLLBACK")
        runner.join(60)
        self.assertEqual(log.status, 0, log.text())
        self.assertEqual(log.text().count("database unavailable"), 1,
                         log.text())
        job = self.job(job_id)
        self.assertEqual((job["state"], job["attempts"]), ("completed", 1))

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                         "mounting a small tmpfs to fill needs root")
    @sqlite_only("the database file's disk")
    def test_worker_survives_a_full_disk(self):
        # The disk fills while jobs run: nothing is charged, nothing lost,
        # and the CLI names the cause; when space returns all complete.
        small = os.path.join(self.dir, "small")
        os.mkdir(small)
        subprocess.check_call(["mount", "-t", "tmpfs", "-o", "size=4m",
                               "tmpfs", small])
        self.addCleanup(subprocess.call, ["umount", "-l", small])
        self.db = os.path.join(small, "q.db")
        hold = self.hold()
        held = self.enqueue("while [ -e %s ]; do sleep 0.05; done" % hold)
        later = [self.enqueue("true") for _ in range(10)]
        worker = self.start_worker("--count", "2")
        self.wait_state(held, "processing")
        filler = os.path.join(small, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 65536)
        finally:
            os.close(fd)
        os.unlink(hold)
        self.wait_for(lambda: "database unavailable: disk full" in
                 _read(worker.log.name), timeout=30,
                 what="the worker to report the full disk")
        # A small write may fit where the WAL restarted after a
        # checkpoint (space it owns already): this one must grow it.
        wal = os.path.getsize(self.db + "-wal")
        big = json.dumps({"command": "true " + "x" * (wal + 262144)})
        code, out, err = self.cli("enqueue", "-f", "-", input=big)
        self.assertEqual(code, 1, out)
        self.assertIn("disk full", err)
        os.unlink(filler)
        for job_id in [held] + later:
            self.wait_state(job_id, "completed", timeout=60)
        self.assertEqual(worker.poll(), None, _read(worker.log.name))
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(11,)])
        self.assertEqual(_read(worker.log.name).count("database unavailable"),
                         1, _read(worker.log.name))
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(timeout=30), 0)

    @sqlite_only("the database file's folders")
    def test_private_folders_under_any_umask(self):
        # Every folder queuectl creates is 0700, even under umask 000.
        db = os.path.join(self.dir, "a", "b", "q.db")
        old = os.umask(0)
        try:
            code, out, err = self.main("status", db=db)
        finally:
            os.umask(old)
        self.assertEqual(code, 0, err)
        for folder in ("a", os.path.join("a", "b")):
            mode = os.stat(os.path.join(self.dir, folder)).st_mode & 0o777
            self.assertEqual(mode, 0o700, folder)

    @sqlite_only("a database file path")
    def test_dangling_symlink_says_what_is_wrong(self):
        link = os.path.join(self.dir, "link.db")
        os.symlink(os.path.join(self.dir, "missing", "q.db"), link)
        self.expect_failure(1, "is a symbolic link to", "status", db=link)
        loop = os.path.join(self.dir, "loop.db")
        os.symlink(loop + "2", loop)
        os.symlink(loop, loop + "2")
        self.expect_failure(1, "it is a loop of symbolic links", "status",
                            db=loop)


class _LockedLog(object):
    """A worker log to read from a test while the pool runs in a thread."""

    def __init__(self):
        import threading
        self.lock, self.parts, self.status = threading.Lock(), [], None

    def write(self, text):
        with self.lock:
            self.parts.append(text)

    def flush(self):
        pass

    def text(self):
        with self.lock:
            return "".join(self.parts)

    def done(self, status):
        self.status = status


def _read(path):
    with open(path) as handle:
        return handle.read()


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.unlink(path)


def _process_state(pid):
    """'R', 'S', 'T' (stopped)... of a process, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


class TestLibrary(unittest.TestCase):

    def test_python_api(self):
        # import queuectl: enqueue, get, list, counts, retry, delete, config.
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "q.db")
            queue = queuectl.Queue(path)
            try:
                queue.config_set("backoff_max", "0")
                ok = queue.enqueue({"command": "true"})
                bad = queue.enqueue({"command": "false", "max_retries": 0})
                pool = queuectl.WorkerPool(path, count=2, exit_when_idle=True,
                                           log=False)
                self.assertEqual(pool.run(), 0)
                self.assertEqual(queue.get(ok)["state"], "completed")
                self.assertEqual(queue.counts()["dead"], 1)
                self.assertEqual(queue.retry([bad]), [bad])
                self.assertEqual([j["id"] for j in queue.list("pending")], [bad])
                self.assertEqual(queue.delete([bad]), [bad])
                self.assertEqual(queue.config()["backoff-max"], 0)
                with self.assertRaises(queuectl.InvalidInput):
                    queue.enqueue({"command": "x", "bogus": 1})
                with self.assertRaises(queuectl.NotFound):
                    queue.get("missing")
            finally:
                queue.close()

    def test_misuse_of_the_library_is_refused_and_harmless(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "q.db")
            queue = queuectl.Queue(path)
            self.addCleanup(queue.close)
            job = queue.enqueue({"command": "true"})
            pool = queuectl.WorkerPool(path, exit_when_idle=True, log=False)
            self.assertEqual(pool.run(), 0)
            # run() closed its wake-up pipe: stop() must not write into
            # whatever file took its numbers since (it wrote b"x" there,
            # even into the -wal file of a database).
            files = [open(os.path.join(folder, "f%d" % n), "w+b")
                     for n in range(2)]
            for handle in files:
                self.addCleanup(handle.close)
            pool.stop()
            pool.force()
            self.assertEqual([h.read() for h in files], [b"", b""])
            with self.assertRaises(queuectl.Conflict):
                pool.run()
            # An empty path is not the default queue; a relative one is
            # resolved at once (a program may chdir before run()).
            for bad in ("", " "):
                with self.assertRaises(queuectl.InvalidInput):
                    queuectl.WorkerPool(bad)
            self.assertEqual(queuectl.WorkerPool("q.db").address,
                             os.path.abspath("q.db"))
            with self.assertRaises(queuectl.InvalidInput):
                queue.copy_to(None)
            with self.assertRaises(queuectl.InvalidInput):
                queuectl.serve_dashboard(path, host="")
            # A lone id is not a list of one-letter prefixes.
            for call in (queue.delete, queue.retry, queue.cancel,
                         queue.retry_finished, queue.wait):
                with self.assertRaises(queuectl.InvalidInput):
                    call(job)
            with self.assertRaises(queuectl.InvalidInput):
                queue.wait([job], timeout=float("nan"))
            self.assertEqual(queue.get(job)["state"], "completed")
            # /metrics keeps every digit of a growing sum.
            with queue.store.write():
                queue.store._run("UPDATE totals SET value = 1234567.891"
                                 " WHERE name = 'duration_sum'")
            self.assertIn("queuectl_run_duration_seconds_sum 1234567.891\n",
                          queue.metrics())

    def test_ctrl_c_in_an_embedding_program_stops_the_pool(self):
        # KeyboardInterrupt out of run() (Python's own SIGINT handler) left
        # the worker threads claiming and running jobs, unwatched.
        with tempfile.TemporaryDirectory() as folder:
            started = os.path.join(folder, "started")
            script = (
                "import os, signal, sys, threading, time\n"
                "sys.path.insert(0, %r)\n"
                "import queuectl\n"
                "path = os.path.join(%r, 'q.db')\n"
                "queuectl.Queue(path).enqueue({'command': 'touch %s; sleep"
                " 600'})\n"
                "def interrupt():\n"
                "    while not os.path.exists(%r):\n"
                "        time.sleep(0.02)\n"
                "    os.kill(os.getpid(), signal.SIGINT)\n"
                "threading.Thread(target=interrupt, daemon=True).start()\n"
                "pool = queuectl.WorkerPool(path, log=False)\n"
                "try:\n"
                "    pool.run()\n"
                "except KeyboardInterrupt:\n"
                "    print(sorted(t.name for t in threading.enumerate()\n"
                "                 if t.name != 'MainThread' and\n"
                "                 not t.name.startswith('Thread-')))\n"
                "    print(queuectl.Queue(path).list()[0]['state'])\n"
                % (os.path.dirname(SCRIPT), folder, started, started))
            out = subprocess.run([sys.executable, "-c", script],
                                 stdout=subprocess.PIPE, timeout=120)
            self.assertEqual(out.stdout.decode().split("\n"),
                             ["[]", "pending", ""])



class TestStats(CLITestCase):

    def test_stats_on_an_empty_database(self):
        stats = self.ok_json("stats")
        self.assertEqual(stats["runs"], 0)
        self.assertIsNone(stats["success_ratio"])
        self.assertEqual(stats["run_seconds"], {"p50": None, "p95": None,
                                                "max": None})
        self.assertIsNone(stats["oldest_due_seconds"])
        self.assertEqual(len(stats["per_minute"]), 60)
        self.assertIn("runs/minute:", self.ok("stats"))

    def test_stats_figures(self):
        # Ratios, percentiles, failing commands and the per-minute series.
        self.config(backoff_max=0)
        for _ in range(3):
            self.enqueue("true")
        self.enqueue("exit 4", "--max-retries", "1")
        self.enqueue("sleep 1")
        self.drain("--count", "2")
        self.enqueue("true", "--run-at", "2020-01-01T00:00:00Z")
        stats = self.ok_json("stats", "--since", "10m")
        self.assertEqual(stats["since_seconds"], 600)
        self.assertEqual(stats["runs"], 6)
        self.assertAlmostEqual(stats["success_ratio"], 4 / 6.0)
        self.assertGreaterEqual(stats["run_seconds"]["max"], 1)
        self.assertLess(stats["run_seconds"]["p50"], 1)
        self.assertGreaterEqual(stats["wait_seconds"]["p50"], 0)
        self.assertGreater(stats["oldest_due_seconds"], 3600)
        self.assertEqual(stats["failing_commands"],
                         [{"command": "exit 4", "failures": 2}])
        self.assertEqual(stats["finished_per_minute"]["1m"], 6)
        self.assertEqual(sum(p["ok"] + p["failed"]
                             for p in stats["per_minute"]), 6)
        self.expect_failure(2, "--since: not a duration", "stats",
                            "--since", "yesterday")

    @sqlite_only("SQLite schema versions")
    def test_old_schema_is_migrated_in_place(self):
        # A version-1 database gains the version-2 tables and keeps its data.
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in queuectl.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version=1")
        conn.execute("PRAGMA application_id=%d" % queuectl.APPLICATION_ID)
        conn.execute("INSERT INTO jobs (id, command, state, run_at,"
                     " max_retries, cwd, created_at, updated_at) VALUES"
                     " ('old1', 'true', 'completed', 0, 3, '/', 0, 0)")
        conn.execute("UPDATE counts SET n = 1 WHERE state = 'completed'")
        conn.execute("INSERT INTO attempts (job_seq, n, started_at, ended_at,"
                     " duration) VALUES (1, 1, 0, 2, 2)")
        conn.close()
        self.assertEqual(self.job("old1")["state"], "completed")
        self.assertEqual(self.sql("PRAGMA user_version"),
                         [(queuectl.SCHEMA_VERSION,)])
        metrics = self.dashboard_free_metrics()
        self.assertIn('queuectl_attempts_total{result="success"} 1', metrics)
        self.assertIn('queuectl_run_duration_seconds_bucket{le="1"} 0', metrics)
        self.assertIn('queuectl_run_duration_seconds_bucket{le="5"} 1', metrics)


class TestDashboard(CLITestCase):
    """A live dashboard on a free loopback port, driven with urllib."""

    def setUp(self):
        super(TestDashboard, self).setUp()
        self.config(backoff_max=0)
        self.done = self.enqueue("echo '<b>bold</b>'")
        self.dead = self.enqueue(
            "echo '<script>alert(1)</script><img src=x onerror=alert(2)>';"
            " exit 3", "--max-retries", "0", "--id", "evil")
        self.drain()
        self.waiting = self.enqueue("true", "--delay", "3600")

    def start(self, *flags):
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db, "dashboard", "--port",
             "0"] + list(flags), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env)
        self.procs.append(proc)
        line = proc.stdout.readline().decode()
        self.assertIn("http://127.0.0.1:", line)
        self.url = line.split()[-4] if "(read-only)" in line else \
            line.split()[2]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])
        return proc

    def request(self, path, method="GET", headers=None, host=None):
        """(status, headers, body) without urllib's error handling."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=True)
            conn.putheader("Host", host or "127.0.0.1:%d" % self.port)
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            conn.putheader("Content-Length", "0")
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response, response.read().decode()
        finally:
            conn.close()

    def get_json(self, path, status=200):
        code, response, body = self.request(path)
        self.assertEqual(code, status, body)
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        return json.loads(body)

    def token(self):
        import html
        code, response, page = self.request("/")
        start = page.index('data-settings="') + len('data-settings="')
        settings = json.loads(html.unescape(page[start:page.index('"', start)]))
        return settings["token"]

    @sqlite_only("a database file to spoil")
    def test_the_page_is_served_while_the_database_is_unusable(self):
        # The page needs no database: it loads, and says what the API
        # answers, while the database cannot be opened (a server down).
        self.start()
        os.rename(self.db, self.db + ".away")
        self.addCleanup(os.rename, self.db + ".away", self.db)
        with open(self.db, "wb") as handle:
            handle.write(b"not a database" * 100)
        self.addCleanup(os.remove, self.db)
        code, response, page = self.request("/")
        self.assertEqual(code, 200, page)
        self.assertIn("<html", page)
        self.assertIn("is not a usable queuectl database",
                      self.get_json("/api/status", 500)["error"])

    def test_endpoints(self):
        self.start()
        status = self.get_json("/api/status")
        self.assertEqual((status["counts"]["completed"], status["counts"]["dead"],
                          status["counts"]["pending"]), (1, 1, 1))
        stats = self.get_json("/api/stats")
        self.assertEqual(stats["runs"], 2)
        page = self.get_json("/api/jobs?state=dead&limit=1&offset=0")
        self.assertEqual(([j["id"] for j in page["jobs"]], page["total"]),
                         (["evil"], 1))
        page = self.get_json("/api/jobs?limit=2&offset=1")
        self.assertEqual([j["id"] for j in page["jobs"]],
                         [self.dead, self.waiting])
        job = self.get_json("/api/jobs/evi")
        self.assertEqual(job["runs"][0]["error"], "exit code 3")
        self.assertIn("<script>alert(1)</script>", job["output"])
        self.assertEqual(self.get_json("/api/jobs/nope", 404)["error"],
                         "no job with id 'nope'")
        self.assertIn("limit", self.get_json("/api/jobs?limit=x", 400)["error"])
        self.assertIn("limit", self.get_json("/api/jobs?limit=%EF%BC%93", 400)
                      ["error"])
        self.assertIn("unknown state", self.get_json("/api/jobs?state=x", 400)
                      ["error"])
        self.assertIn("no such page", self.get_json("/nope", 404)["error"])

    def test_jobs_filter_by_queue(self):
        mail = self.enqueue("true", "--queue", "mail")
        self.start()
        page = self.get_json("/api/jobs?queue=mail")
        self.assertEqual(([j["id"] for j in page["jobs"]], page["total"]),
                         ([mail], 1))
        page = self.get_json("/api/jobs?queue=default&state=pending")
        self.assertEqual(([j["id"] for j in page["jobs"]], page["total"]),
                         ([self.waiting], 1))
        page = self.get_json("/api/jobs?queue=nowhere")
        self.assertEqual((page["jobs"], page["total"]), ([], 0))
        self.assertIn("queue must be", self.get_json("/api/jobs?queue=a%20b",
                                                     400)["error"])
        names = [q["name"] for q in self.get_json("/api/status")["queues"]]
        self.assertEqual(names, ["default", "mail"])
        self.assertIn('id="queue"', self.request("/")[2])
        metrics = self.request("/metrics")[2]
        self.assertIn('queuectl_jobs{queue="mail",state="pending"} 1',
                      metrics)
        self.assertIn('queuectl_jobs{queue="default",state="pending"} 1',
                      metrics)

    def test_page_is_self_contained_and_carries_no_job_data(self):
        # Job text reaches the page only as JSON rendered with textContent;
        # only the page's own script may run (CSP nonce).
        self.start()
        code, response, page = self.request("/")
        self.assertEqual(code, 200)
        self.assertFalse("alert(1)" in page or "onerror" in page or "evil" in
                         page, "job data in the page's HTML")
        self.assertNotRegex(page, r"(src|href)=\"?(https?:)?//")
        self.assertNotIn("innerHTML", page)
        csp = response.getheader("Content-Security-Policy")
        nonce = re.search(r"'nonce-([0-9a-f]+)'", csp).group(1)
        self.assertIn('<script nonce="%s">' % nonce, page)
        self.assertIn("default-src 'none'", csp)
        self.assertEqual(response.getheader("X-Content-Type-Options"), "nosniff")

    def test_writes_need_token_host_and_origin(self):
        self.start()
        token = self.token()
        path = "/api/jobs/evil/retry"
        cases = [({}, None, "X-Queuectl-Token"),
                 ({"X-Queuectl-Token": "wrong"}, None, "X-Queuectl-Token"),
                 ({"X-Queuectl-Token": token, "Origin": "http://evil.example"},
                  None, "cross-origin"),
                 ({"X-Queuectl-Token": token}, "evil.example:%d" % self.port,
                  "unexpected Host")]
        for headers, host, message in cases:
            code, _, body = self.request(path, "POST", headers, host)
            self.assertEqual(code, 403, body)
            self.assertIn(message, json.loads(body)["error"])
            self.assertEqual(self.state("evil"), "dead")
        code, _, body = self.request("/api/status", host="rebind.example")
        self.assertEqual(code, 403)
        origin = "http://127.0.0.1:%d" % self.port
        code, _, body = self.request(path, "POST", {
            "X-Queuectl-Token": token, "Origin": origin})
        self.assertEqual((code, json.loads(body)), (200, {"retried": ["evil"]}))
        self.assertEqual(self.state("evil"), "pending")
        code, _, body = self.request("/api/jobs/%s/delete" % self.done, "POST",
                                     {"X-Queuectl-Token": token})
        self.assertEqual(code, 200, body)
        code, _, body = self.request("/api/jobs/%s/delete" % self.done, "POST",
                                     {"X-Queuectl-Token": token})
        self.assertEqual(code, 404, body)

    def test_every_loopback_spelling_is_guarded_against_rebinding(self):
        # The Host check follows the socket's address, not --host's text:
        # 127.0.0.2 and 127.1 are loopback too, and a page of another site
        # must not read them.  Host names compare without case.
        import http.client
        for host, bound in (("127.0.0.2", "127.0.0.2"), ("127.1", "127.0.0.1")):
            proc = subprocess.Popen(
                [sys.executable, SCRIPT, "--db", self.db, "dashboard",
                 "--host", host, "--port", "0"], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=self.env)
            self.procs.append(proc)
            port = int(proc.stdout.readline().decode().split()[2]
                       .rstrip("/").rsplit(":", 1)[1])
            for name, status in (("evil.example", 403), (host, 200),
                                 (bound, 200), ("LocalHost", 200)):
                conn = http.client.HTTPConnection(bound, port, timeout=10)
                try:
                    conn.putrequest("GET", "/api/status", skip_host=True)
                    conn.putheader("Host", "%s:%d" % (name, port))
                    conn.endheaders()
                    response = conn.getresponse()
                    self.assertEqual(response.status, status, (host, name))
                    response.read()
                finally:
                    conn.close()
            proc.kill()
        # A browser sends no port for port 80 (binding it needs root).
        self.assertEqual(queuectl._allowed_hosts("127.0.0.1", "127.0.0.1", 80),
                         {"127.0.0.1", "localhost", "[::1]", "127.0.0.1:80",
                          "localhost:80", "[::1]:80"})
        self.assertIsNone(queuectl._allowed_hosts("0.0.0.0", "0.0.0.0", 80))
        self.assertIn("[::1]:8", queuectl._allowed_hosts(
            "::ffff:127.0.0.1", "::ffff:127.0.0.1", 8))

    def test_ids_with_a_colon_as_the_page_encodes_them(self):
        # The page sends ids through encodeURIComponent: a schedule's job
        # 'nightly:...' arrives as nightly%3A...; view and buttons work.
        job_id = self.enqueue("exit 3", "--id", "nightly:x1",
                              "--max-retries", "0")
        self.drain()
        self.start()
        token = self.token()
        self.assertEqual(self.get_json("/api/jobs/nightly%3Ax1")["id"], job_id)
        code, _, body = self.request("/api/jobs/nightly%3Ax1/retry", "POST",
                                     {"X-Queuectl-Token": token})
        self.assertEqual((code, json.loads(body)), (200, {"retried": [job_id]}))
        self.assertIn("UTF-8", self.get_json("/api/jobs/%FF", 400)["error"])

    def test_cancel_button_action(self):
        # POST /api/jobs/ID/cancel: the same token, Host and Origin rules as
        # retry and delete; a pending job becomes dead 'cancelled'; a dead
        # one is refused (409) and stays as it was.
        self.start()
        token = self.token()
        path = "/api/jobs/%s/cancel" % self.waiting
        code, _, body = self.request(path, "POST", {
            "X-Queuectl-Token": token, "Origin": "http://evil.example"})
        self.assertEqual(code, 403, body)
        code, _, body = self.request(path, "POST")
        self.assertEqual(code, 403, body)
        self.assertEqual(self.state(self.waiting), "pending")
        code, _, body = self.request(path, "POST", {"X-Queuectl-Token": token})
        self.assertEqual((code, json.loads(body)),
                         (200, {"cancelled": [self.waiting], "stopping": []}))
        self.assertEqual(self.job(self.waiting)["last_error"], "cancelled")
        code, _, body = self.request("/api/jobs/evil/cancel", "POST",
                                     {"X-Queuectl-Token": token})
        self.assertEqual(code, 409, body)
        self.assertIn("is dead", json.loads(body)["error"])
        self.assertIn('"cancel"', self.request("/")[2])

    def test_read_only_serves_no_writes(self):
        self.start("--read-only")
        self.assertEqual(self.token(), "")
        for action in ("retry", "cancel"):
            code, _, body = self.request("/api/jobs/evil/" + action, "POST",
                                         {"X-Queuectl-Token": ""})
            self.assertEqual(code, 403)
            self.assertIn("read-only", body)
        self.assertEqual(self.state("evil"), "dead")

    def test_metrics_format(self):
        # Prometheus text: HELP and TYPE before samples, valid sample lines,
        # cumulative histogram buckets ending in +Inf = count.
        self.start()
        code, response, text = self.request("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(response.getheader("Content-Type").startswith(
            "text/plain; version=0.0.4"))
        sample = re.compile(r'^([a-z_]+)(\{[a-z]+="[^"\\]*"'
                            r'(?:,[a-z]+="[^"\\]*")*\})? '
                            r'(-?[0-9.]+(e[+-]?[0-9]+)?)$')
        typed, buckets, values = {}, [], {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                continue
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                typed[name] = kind
                continue
            match = sample.match(line)
            self.assertTrue(match, line)
            name = match.group(1)
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            self.assertIn(base if base in typed else name, typed, line)
            values[name + (match.group(2) or "")] = float(match.group(3))
            if name.endswith("_bucket"):
                buckets.append(float(match.group(3)))
        self.assertEqual(typed["queuectl_attempts_total"], "counter")
        self.assertEqual(typed["queuectl_run_duration_seconds"], "histogram")
        self.assertEqual(
            values['queuectl_jobs{queue="default",state="dead"}'], 1)
        self.assertEqual(values['queuectl_attempts_total{result="success"}'], 1)
        self.assertEqual(values['queuectl_attempts_total{result="failure"}'], 1)
        self.assertEqual(buckets, sorted(buckets))
        self.assertEqual(buckets[-1],
                         values["queuectl_run_duration_seconds_count"])

    def test_a_stalled_client_does_not_block_others(self):
        import socket
        self.start()
        stalled = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(stalled.close)
        stalled.sendall(b"GET /api/status HTTP/1.1\r\n")  # never finishes
        started = time.monotonic()
        self.get_json("/api/status")
        self.assertLess(time.monotonic() - started, 5)

    def test_port_in_use_is_one_error_line(self):
        import socket
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.expect_failure(1, "cannot listen on 127.0.0.1:%d"
                            % busy.getsockname()[1], "dashboard", "--port",
                            str(busy.getsockname()[1]))

    def raw(self, request, timeout=10):
        """Send raw request bytes; (status, headers text, body text)."""
        import socket
        with contextlib.closing(socket.create_connection(
                ("127.0.0.1", self.port), timeout=timeout)) as sock:
            sock.sendall(request.encode("latin-1"))
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.decode("latin-1").partition("\r\n\r\n")
        return int(head.split()[1]), head, body

    def test_malformed_requests_get_json_errors_with_every_header(self):
        # Bad Content-Length, two Host headers and methods it does not
        # serve: a JSON error at once, with the CSP like every response.
        self.start()
        host = "Host: 127.0.0.1:%d\r\n" % self.port
        post = ("POST /api/jobs/evil/retry HTTP/1.1\r\n" + host +
                "X-Queuectl-Token: %s\r\nContent-Length: %%s\r\n"
                "Connection: close\r\n\r\n" % self.token())
        cases = [
            (post % "abc", 400, "bad Content-Length"),
            (post % "-1", 400, "bad Content-Length"),
            ("GET /api/status HTTP/1.1\r\n" + host + host +
             "Connection: close\r\n\r\n", 400, "more than one Host"),
            # A request line http.server cannot read, or one without a
            # version (HTTP/0.9), still gets a status line and headers.
            ("GET / HTTP/1.x\r\n" + host + "\r\n", 400, "Bad request version"),
            ("GET / HTTP/2.0\r\n" + host + "\r\n", 505, "Invalid HTTP version"),
            ("GARBAGE\r\n\r\n", 400, "Bad request syntax"),
            ("GET /api/status\r\n\r\n", 403, "unexpected Host header"),
        ] + [("%s /api/status HTTP/1.1\r\n%sConnection: close\r\n\r\n"
              % (method, host), 405, "method not allowed")
             for method in ("PUT", "DELETE", "OPTIONS", "TRACE", "PATCH",
                            "BREW")]
        for request, status, message in cases:
            with self.subTest(request=request.split("\r\n")[0]):
                code, head, body = self.raw(request)
                self.assertEqual(code, status, body)
                self.assertIn("Content-Security-Policy:", head)
                self.assertIn("application/json", head)
                self.assertIn(message, json.loads(body)["error"])
        code, head, body = self.raw("HEAD / HTTP/1.1\r\n%sConnection:"
                                    " close\r\n\r\n" % host)
        self.assertEqual((code, body), (405, ""))
        self.assertEqual(self.get_json("/api/jobs?offset=%s" % ("9" * 23),
                                       status=400)["error"],
                         "offset must be from 0 to 2147483647")
        # A body promised and never sent: 408 once the read times out
        # (HTTP_TIMEOUT), not an internal error.
        code, head, body = self.raw(post % "999999999999", timeout=120)
        self.assertEqual((code, json.loads(body)["error"]),
                         (408, "the request body did not arrive"))
        self.assertEqual(self.state("evil"), "dead")  # nothing retried


class TestControl(CLITestCase):
    """SPEC 10's control of a running queue: cancel, retry, logs --follow,
    retention."""

    def attempts(self, job_id):
        return self.job(job_id)["runs"]

    def test_a_copy_keeps_a_cancel_its_dead_worker_never_saw(self):
        # Found by a red-team pass: copy left the cancel requests behind, so
        # a job cancelled while its worker was dead ran again on the copy.
        self.config(lease_timeout=1)
        job_id = self.enqueue(self.hold())
        worker = self.start_worker()
        self.wait_started()
        worker.kill()
        worker.wait(timeout=30)
        self.ok("cancel", job_id)
        dest = os.path.join(self.dir, "copy.db")
        self.wait_for(lambda: self.cli("copy", "--to", dest)[0] == 0,
                      what="copy, once the dead worker's lease has ended")
        code, out, err = self.cli("worker", "start", "--exit-when-idle",
                                  db=dest)
        self.assertEqual(code, 0, err)
        job = self.ok_json("show", job_id, db=dest)
        self.assertEqual((job["state"], job["last_error"], job["attempts"]),
                         ("dead", "cancelled", 1), err)

    def test_cancel_pending_and_failed_buries_dependents(self):
        # A pending or failed job becomes dead 'cancelled' at once, is not
        # retried, takes its dependents with it, and dlq retry revives it.
        self.config(backoff_base=1000)
        later = self.enqueue("true", "--delay", "3600")
        child = self.enqueue("true", "--after", later)
        failing = self.enqueue("exit 1", "--max-retries", "3")
        self.drain()
        self.assertEqual(self.state(failing), "failed")
        out = self.ok("cancel", later, failing)
        self.assertEqual(out, "%s cancelled\n%s cancelled\n" % (later, failing))
        for job_id in (later, failing):
            job = self.job(job_id)
            self.assertEqual((job["state"], job["last_error"]),
                             ("dead", "cancelled"))
        self.assertEqual(self.job(child)["state"], "dead")
        self.assertIn("dependency %s failed" % later,
                      self.job(child)["last_error"])
        self.assertEqual(len(self.attempts(failing)), 1)
        self.ok("dlq", "retry", later)
        self.assertEqual(self.state(later), "pending")

    def test_cancel_refuses_finished_all_or_nothing(self):
        # completed or dead: exit 1 and nothing changes, for any of the ids.
        done = self.enqueue("true")
        self.drain()
        waiting = self.enqueue("true", "--delay", "3600")
        self.expect_failure(1, "job '%s' is completed" % done, "cancel",
                            waiting, done)
        self.assertEqual(self.state(waiting), "pending")
        self.expect_failure(1, "no job with id 'nope'", "cancel", waiting,
                            "nope")
        self.expect_failure(2, "not a valid job id", "cancel", "a b")
        self.expect_failure(2, "the following arguments are required",
                            "cancel")
        self.ok("cancel", waiting)
        self.expect_failure(1, "is dead", "cancel", waiting)

    def test_cancel_kills_a_running_job_and_does_not_retry_it(self):
        # A processing job: its worker kills the whole process group (a
        # child that ignores TERM too), records the attempt 'cancelled', and
        # the job is dead, not retried.
        self.start_worker("--count", "2")
        job_id = self.enqueue("sh -c 'trap \"\" TERM; sleep 3600' & "
                              + self.hold(), "--max-retries", "5")
        self.wait_started()
        pgid = self.wait_for(lambda: self.pgid(job_id), what="the job's group")
        data = self.ok_json("cancel", job_id)
        self.assertEqual(data, {"cancelled": [], "stopping": [job_id]})
        self.wait_state(job_id, "dead")
        job = self.job(job_id)
        self.assertEqual(job["last_error"], "cancelled")
        self.assertEqual([r["error"] for r in job["runs"]], ["cancelled"])
        self.wait_for(lambda: not queuectl.group_alive(pgid),
                 what="the job's process group to be gone")
        # The worker goes on with other jobs.
        self.wait_state(self.enqueue("true"), "completed")
        self.assertEqual(len(self.attempts(job_id)), 1)

    def test_cancel_racing_completion_is_one_or_the_other(self):
        # cancel at the moment the job ends: it is either completed (the
        # attempt succeeded) or dead 'cancelled', never both.
        self.start_worker("--count", "4")
        jobs = []
        for n in range(4):
            jobs.append(self.enqueue(self.hold("r%d" % n), "--max-retries",
                                     "3"))
        for n in range(4):
            self.wait_started("r%d" % n)
        for n, job_id in enumerate(jobs):
            if n % 2:
                self.release("r%d" % n)
            cancel = self.spawn("cancel", job_id)
            self.release("r%d" % n)
            code, err = cancel.wait(timeout=60), cancel.stderr.read().decode()
            self.assertIn(code, (0, 1), err)
            if code == 1:
                self.assertIn("is completed", err)
        seen = set()
        for job_id in jobs:
            self.wait_for(lambda: self.state(job_id) in ("completed", "dead"),
                     what="job %s to end" % job_id)
            job = self.job(job_id)
            errors = [r["error"] for r in job["runs"]]
            self.assertEqual(len(errors), 1, job)
            if job["state"] == "completed":
                self.assertEqual((job["last_error"], errors), (None, [None]))
            else:
                self.assertEqual((job["last_error"], errors),
                                 ("cancelled", ["cancelled"]))
            seen.add(job["state"])

    def test_retry_runs_finished_jobs_again_keeping_history(self):
        # retry: completed or dead -> pending, attempts 0, due now, the
        # attempt history kept and numbered on; pending or processing: exit 1.
        self.config(backoff_max=0)
        done = self.enqueue("echo run $QUEUECTL_ATTEMPT")
        dead = self.enqueue("exit 4", "--max-retries", "0")
        self.drain()
        self.assertEqual(self.ok_json("retry", done, dead),
                         {"retried": [done, dead]})
        for job_id in (done, dead):
            job = self.job(job_id)
            self.assertEqual((job["state"], job["attempts"]), ("pending", 0))
        self.drain()
        self.assertEqual([r["attempt"] for r in self.attempts(done)], [1, 2])
        self.assertEqual(self.ok("logs", done), "run 1\n")
        self.assertEqual(self.ok("logs", done, "--attempt", "1"), "run 1\n")
        self.assertEqual(self.state(done), "completed")
        self.assertEqual(len(self.attempts(dead)), 2)
        waiting = self.enqueue("true", "--delay", "3600")
        self.expect_failure(1, "job '%s' is pending" % waiting, "retry", done,
                            waiting)
        self.start_worker()
        running = self.enqueue(self.hold())
        self.wait_started()
        # (A running worker beats: the data changes, so no expect_failure.)
        code, out, err = self.cli("retry", running)
        self.assertEqual((code, out), (1, ""))
        self.assertRegex(err, r"^queuectl: error: .*is processing[^\n]*\n$")
        self.assertEqual(self.job(running)["attempts"], 1)

    def follow(self, *flags):
        """logs --follow in the background; its stdout lines gather in a
        list as they come."""
        import threading
        # SIGINT as in a terminal, even when the tests run in the background
        # (a background shell job starts with SIGINT ignored).
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db, "logs"] + list(flags),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            cwd=self.dir, preexec_fn=lambda: signal.signal(
                signal.SIGINT, signal.SIG_DFL))
        self.procs.append(proc)
        lines = []

        def read():
            for line in iter(proc.stdout.readline, b""):
                lines.append(line.decode("utf-8", "replace"))
        reader = threading.Thread(target=read)
        reader.daemon = True
        reader.start()
        proc.lines, proc.reader = lines, reader
        return proc

    def test_logs_follow_prints_live_output_and_each_attempt(self):
        # Output appears while the job runs (it is held), a separator per
        # attempt, and follow exits 0 once the job completes.
        self.config(backoff_max=0)
        self.start_worker()
        job_id = self.enqueue(
            'echo "start $QUEUECTL_ATTEMPT"; if [ "$QUEUECTL_ATTEMPT" = 1 ];'
            ' then %s; exit 1; fi; %s; echo end' % (self.hold("a"),
                                                    self.hold("b")),
            "--max-retries", "1")
        self.wait_started("a")
        proc = self.follow(job_id, "-f")
        self.wait_for(lambda: "start 1\n" in proc.lines,
                 what="live output of the held first attempt")
        self.release("a")
        self.wait_started("b")
        self.wait_for(lambda: "start 2\n" in proc.lines,
                 what="live output of the held second attempt")
        self.assertIsNone(proc.poll())
        self.release("b")
        self.assertEqual(proc.wait(timeout=60), 0)
        proc.reader.join(10)
        text = "".join(proc.lines)
        self.assertRegex(text, r"^--- attempt 1 \(worker \S+ on \S+\) ---\n"
                         r"start 1\n--- attempt 2 \(worker \S+ on \S+\) ---\n"
                         r"start 2\nend\n$")
        self.assertEqual(proc.stderr.read(), b"")

    def test_logs_follow_json_dead_and_ctrl_c(self):
        # --json: one object per line; exit 1 when the job ends dead; Ctrl-C
        # ends a follow with 130 and nothing on stderr.
        dead = self.enqueue("echo bye; exit 2", "--max-retries", "0")
        self.drain()
        proc = self.follow(dead, "--follow", "--json")
        self.assertEqual(proc.wait(timeout=60), 1)
        proc.reader.join(10)
        events = [json.loads(line) for line in proc.lines]
        self.assertEqual([e["event"] for e in events],
                         ["attempt", "output", "end"])
        self.assertEqual((events[1]["text"], events[2]["state"]),
                         ("bye\n", "dead"))
        waiting = self.enqueue("true", "--delay", "3600")
        self.expect_failure(2, "takes no --attempt", "logs", waiting, "-f",
                            "--attempt", "1")
        self.expect_failure(2, "--json goes with --follow", "logs", dead,
                            "--json")
        self.expect_failure(1, "no job with id", "logs", "nope", "-f")
        self.start_worker()
        running = self.enqueue(self.hold())
        self.wait_started()
        proc = self.follow(running, "-f")
        self.wait_for(lambda: proc.lines, what="the attempt's separator line")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=60), 130)
        self.assertEqual(proc.stderr.read(), b"")

    def test_running_tail_is_saved_bounded(self):
        # The saved tail of a running job stays within output-limit, and is
        # one row updated in place.
        self.config(output_limit=1000)
        self.start_worker()
        job_id = self.enqueue("head -c 300000 /dev/zero | tr '\\0' x; echo;"
                              " echo last-line; " + self.hold())
        self.wait_started()
        out = self.wait_for(lambda: (lambda o: o if "last-line" in o else None)(
            self.cli("logs", job_id)[1]), what="the saved tail")
        self.assertLessEqual(len(out.encode()), 1000)
        rows = self.sql("SELECT output_dropped, ended_at FROM attempts")
        self.assertEqual(len(rows), 1)
        self.assertGreater(rows[0][0], 298000)
        self.assertIsNone(rows[0][1])

    def test_retention_config_is_validated(self):
        # keep-completed / keep-dead take durations; bad ones are exit 2
        # naming the key.
        self.assertEqual(self.ok("config", "set", "keep-completed", "2h"),
                         "7200\n")
        self.assertEqual(self.ok("config", "get", "keep-dead"), "0\n")
        for value in ("soon", "-1", "", "1e10"):
            self.expect_failure(2, "keep-completed", "config", "set",
                                "keep-completed", value)
        self.expect_failure(2, "keep-dead", "config", "set", "keep-dead", "x")

    def test_retention_deletes_old_finished_jobs_but_not_awaited_ones(self):
        # A starting worker deletes finished jobs older than keep-completed
        # / keep-dead, with their attempts, but never one an unfinished job
        # still waits on; counters stay; status says when it ran.
        self.config(keep_completed="1s", keep_dead="1s")
        blocker = self.enqueue("true", "--delay", "3600")
        awaited = self.enqueue("true")
        waiter = self.enqueue("true", "--after", "%s,%s" % (awaited, blocker))
        self.enqueue("echo old")  # both deleted: old and awaited by none
        self.enqueue("exit 3", "--max-retries", "0")
        self.drain()
        before = self.dashboard_free_metrics()
        self.sql("UPDATE jobs SET updated_at = updated_at - 100")
        status = self.ok_json("status")
        self.drain()
        ids = [r[0] for r in self.sql("SELECT id FROM jobs ORDER BY seq")]
        self.assertEqual(ids, [blocker, awaited, waiter])
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(1,)])
        status = self.ok_json("status")
        self.assertEqual(status["cleanup"]["deleted"], 2)
        self.assertIsNotNone(status["cleanup"]["last"])
        self.assertEqual(status["counts"]["completed"], 1)
        self.assertIn("clean-up: ", self.ok("status"))
        after = self.dashboard_free_metrics()
        for line in before.splitlines():
            if line.startswith("queuectl_attempts_total"):
                self.assertIn(line, after)
        self.assertEqual(self.job(awaited)["state"], "completed")

    @sqlite_only("file size and WAL checkpoints")
    def test_retention_keeps_a_busy_queue_bounded(self):
        # 50,000 jobs through a queue with keep-completed 1s: after each
        # round the rows are gone and the file (after a WAL checkpoint)
        # does not grow; claims go on while a clean-up runs.
        self.config(keep_completed="1s")
        rounds, per_round, sizes = 5, 10000, []
        path = os.path.join(self.dir, "jobs.jsonl")
        for n in range(rounds):
            with open(path, "w") as handle:
                for k in range(per_round):
                    handle.write('{"command": "true", "id": "r%d-%d"}\n'
                                 % (n, k))
            self.ok("enqueue", "-f", path)
            # They ran long ago (running 50,000 shells would take minutes);
            # each left an attempt with some output.
            self.sql("INSERT INTO attempts (job_seq, n, started_at, ended_at,"
                     " duration, output) SELECT seq, 1, 1, 2, 1, 'some output'"
                     " FROM jobs WHERE state = 'pending' AND id LIKE ?",
                     "r%d-%%" % n)
            self.sql("UPDATE jobs SET state = 'completed', ready = NULL,"
                     " runs = 1, attempts = 1, updated_at = 2 WHERE state ="
                     " 'pending' AND id LIKE ?", "r%d-%%" % n)
            for _ in range(4):
                self.enqueue("true")
            self.drain("--count", "2")
            self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs"), [(4,)])
            self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(4,)])
            status = self.ok_json("status")["cleanup"]
            self.assertGreaterEqual(status["deleted"], per_round)
            # Claims were not held up until the clean-up ended: the first
            # quick job started while it ran.
            end = queuectl.parse_time(status["last"]) + status["took_seconds"]
            started = self.sql("SELECT MIN(started_at) FROM attempts"
                               " WHERE ended_at > 100")[0][0]
            self.assertLess(started, end, status)
            self.sql("DELETE FROM jobs")  # the quick jobs: clean for next round
            self.sql("DELETE FROM attempts")
            self.sql("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes.append(os.path.getsize(self.db) + os.path.getsize(
                self.db + "-wal") if os.path.exists(self.db + "-wal")
                else os.path.getsize(self.db))
        self.assertLessEqual(max(sizes[1:]), sizes[0] * 1.3, sizes)


class TestQueues(CLITestCase):
    """SPEC 10: named queues (caps, pauses, --queue) and unique jobs."""

    def queue_counts(self, name):
        for entry in self.ok_json("queue", "list"):
            if entry["name"] == name:
                return entry
        return None

    # -- named queues -------------------------------------------------------

    def test_a_thousand_paused_capped_and_served_queues(self):
        # Each list of queue names a claim uses goes into its SQL: 1,000 of
        # them must not meet SQLite 3.7.17's 999 parameters a statement
        # (CI runs this suite against 3.7.17 too).
        queue = queuectl.Queue(self.db)
        try:
            for number in range(1000):
                queue.set_queue_paused("paused%d" % number, True)
                queue.set_queue_concurrency("capped%d" % number, 1)
        finally:
            queue.close()
        ids = {name: self.enqueue("true", "--queue", name) for name in
               ("default", "open", "capped7", "paused7", "served")}
        self.drain()
        states = dict((name, self.state(job_id))
                      for name, job_id in ids.items())
        self.assertEqual(states, {"default": "completed", "open": "completed",
                                  "capped7": "completed", "paused7": "pending",
                                  "served": "completed"})
        served = self.enqueue("true", "--queue", "served")
        names = ["capped%d" % n for n in range(999)] + ["served"]
        self.drain("--queue", ",".join(names))
        self.assertEqual(self.state(served), "completed")

    def test_queue_field_list_and_status(self):
        a = self.enqueue("true", "--queue", "mail")
        b = self.enqueue("true")
        c = self.enqueue('{"command": "true", "queue": "mail"}')
        self.assertEqual(self.job(a)["queue"], "mail")
        self.assertEqual(self.job(b)["queue"], "default")
        self.assertEqual([j["id"] for j in self.ok_json(
            "list", "--queue", "mail")], [a, c])
        self.assertEqual([j["id"] for j in self.ok_json(
            "list", "--queue", "default")], [b])
        self.assertEqual(self.ok_json("list", "--queue", "nowhere"), [])
        queues = self.ok_json("status")["queues"]
        self.assertEqual([(q["name"], q["counts"]["pending"]) for q in queues],
                         [("default", 1), ("mail", 2)])
        self.drain()
        mail = self.queue_counts("mail")
        self.assertEqual(mail["counts"]["completed"], 2)
        self.assertEqual((mail["concurrency"], mail["paused"]), (None, False))
        self.assertIn("mail", self.ok("status"))
        self.assertIn("QUEUE", self.ok("queue", "list"))

    def test_worker_queue_option_claims_only_those_queues(self):
        a = self.enqueue("true", "--queue", "a")
        b = self.enqueue("true", "--queue", "b")
        c = self.enqueue("true", "--queue", "c")
        d = self.enqueue("true")
        self.drain("--queue", "a,b")
        self.assertEqual([self.state(j) for j in (a, b, c, d)],
                         ["completed", "completed", "pending", "pending"])
        self.drain("--queue", "default")
        self.assertEqual([self.state(j) for j in (c, d)],
                         ["pending", "completed"])
        self.drain()
        self.assertEqual(self.state(c), "completed")

    def test_paused_queue_is_skipped_and_others_run(self):
        self.ok("queue", "pause", "slow")
        held = self.enqueue("true", "--queue", "slow", "--priority", "9")
        other = self.enqueue("true")
        self.drain()
        self.assertEqual((self.state(held), self.state(other)),
                         ("pending", "completed"))
        self.assertTrue(self.queue_counts("slow")["paused"])
        self.assertIn("yes", self.ok("queue", "list"))
        self.ok("queue", "resume", "slow")
        self.drain()
        self.assertEqual(self.state(held), "completed")
        self.assertFalse(self.queue_counts("slow")["paused"])

    def test_cap_holds_exactly_across_two_worker_processes(self):
        # Two worker processes of three threads; queue `capped` may run 2
        # jobs at once.  Each capped job counts itself in and out of a
        # file under flock and records the highest count; it runs until the
        # test releases it.  Meanwhile jobs of another queue keep running.
        self.ok("queue", "set", "capped", "--concurrency", "2")
        self.assertEqual(self.queue_counts("capped")["concurrency"], 2)
        counter = os.path.join(self.dir, "n")
        peak = os.path.join(self.dir, "peak")
        lock = os.path.join(self.dir, "lock")
        with open(counter, "w") as handle:
            handle.write("0")
        count = ("flock %s sh -c 'n=$(( $(cat %s) %%s 1 )); echo $n > %s;"
                 " echo $n >> %s'" % (lock, counter, counter, peak))
        capped = []
        for n in range(5):
            name = "c%d" % n
            capped.append(self.enqueue(
                "%s; %s; %s" % (count % "+", self.hold(name), count % "-"),
                "--queue", "capped", "--priority", "5"))
        others = [self.enqueue(self.hold("o%d" % n), "--queue", "other")
                  for n in range(2)]
        self.start_worker("--count", "3")
        self.start_worker("--count", "3")
        self.wait_started("o0")
        self.wait_started("o1")

        def started():
            return [n for n in range(5)
                    if os.path.exists(self.hold_path("c%d" % n) + ".started")]
        self.wait_for(lambda: len(started()) == 2, what="two capped jobs")
        # Quick jobs of the default queue all run meanwhile: the workers
        # went round their claims many times and never took a third.
        quick = [self.enqueue("true") for _ in range(10)]
        for job_id in quick:
            self.wait_state(job_id, "completed")
        self.assertEqual(len(started()), 2)
        self.assertEqual(self.queue_counts("capped")["counts"]["processing"],
                         2)
        released = 0
        while released < 5:
            running = [n for n in started()
                       if os.path.exists(self.hold_path("c%d" % n))]
            self.assertLessEqual(len(running), 2)
            self.release("c%d" % running[0])
            released += 1
            self.wait_for(lambda: len(started()) == min(5, released + 2)
                     and self.queue_counts("capped")["counts"]["completed"]
                     == released, what="the next capped job")
        for job_id in capped:
            self.wait_state(job_id, "completed")
        with open(peak) as handle:
            self.assertEqual(max(int(n) for n in handle.read().split()), 2)
        for job_id in others:
            self.assertEqual(self.state(job_id), "processing")
        self.ok("queue", "set", "capped", "--concurrency", "none")
        self.assertIsNone(self.queue_counts("capped")["concurrency"])
        self.ok("queue", "set", "capped", "--concurrency", "3")
        self.ok("queue", "set", "capped", "--concurrency", "0")
        self.assertIsNone(self.queue_counts("capped")["concurrency"])

    def test_full_queue_does_not_block_others_and_order_holds(self):
        self.ok("queue", "set", "one", "--concurrency", "1")
        first = self.enqueue(self.hold("first"), "--queue", "one",
                             "--priority", "9")
        self.start_worker("--count", "2")
        self.wait_started("first")
        # One transaction: the free thread sees all three at once, and
        # takes the highest priority of an open queue first.
        waiting, low, high = self.ok_json(
            "enqueue", '[{"command": "true", "queue": "one", "priority": 9},'
            ' {"command": "true", "priority": 1},'
            ' {"command": "true", "priority": 2}]')
        self.wait_state(low, "completed")
        self.wait_state(high, "completed")
        self.assertEqual(self.state(waiting), "pending")
        started = dict(self.sql(
            "SELECT j.id, a.id FROM attempts a JOIN jobs j ON j.seq ="
            " a.job_seq WHERE j.id IN (?, ?)", low, high))
        self.assertLess(started[high], started[low])
        self.release("first")
        self.wait_state(waiting, "completed")
        self.assertEqual(self.state(first), "completed")

    @sqlite_only("EXPLAIN QUERY PLAN is SQLite's")
    def test_capped_claim_stays_indexed(self):
        self.ok("queue", "set", "capped", "--concurrency", "1")
        self.ok("queue", "pause", "paused")
        self.ok("enqueue", json.dumps([
            {"command": "true", "queue": ("capped", "paused", "x")[n % 3]}
            for n in range(60)]))
        store = queuectl.open_store(self.db)
        self.addCleanup(store.close)
        seen = []

        def recorder(real):
            def record(sql, params=()):
                seen.append((sql, tuple(params)))
                return real(sql, params)
            return record
        store._run = recorder(store._run)
        store._one = recorder(store._one)
        for queues in (None, ["capped", "x"]):
            store.anything_due(store.now(), queues)
            with store.write():
                claims = store.claim("w", "h", store.now(), 8, 1, queues)
                self.assertEqual(len(claims), 1)  # one at a time: a cap
                store._run("ROLLBACK")
                store._run("BEGIN IMMEDIATE")
        selects = [(s, p) for s, p in seen if s.startswith("SELECT")
                   and "FROM jobs" in s]
        # The idle check skips paused and full queues in every statement of
        # its walk (one priority at a time, see _SQLStore._due).
        self.assertTrue(any(queuectl._OPEN_QUEUES in s for s, _ in selects))
        self.assertTrue(any("queue NOT IN" in s for s, _ in selects))
        self.assertTrue(any("queue IN" in s for s, _ in selects))
        for sql, params in selects:
            plan = " | ".join(str(row[-1]) for row in store.conn.execute(
                "EXPLAIN QUERY PLAN " + sql, params))
            self.assertIn("INDEX", plan, sql)
            self.assertNotRegex(plan, r"SCAN (TABLE )?jobs(?! USING)", sql)
            if "ORDER BY priority" in sql or "ready = 1" in sql:
                self.assertIn("jobs_claim", plan)
                self.assertNotIn("TEMP B-TREE", plan.upper())

    @sqlite_only("SQLite query plans")
    def test_a_dead_job_finds_its_dependents_by_index(self):
        # Burying a dead job's dependents walks deps by deps_dep, not every
        # pending job by state (40 ms a dead job beside 300,000 delayed
        # ones; `cancel` of many ids went quadratic).
        self.ok("enqueue", "-f", "-", input="\n".join(
            ['{"command": "true", "delay": 3600}'] * 300))
        root = self.enqueue("exit 1", "--max-retries", "0")
        self.enqueue("true", "--after", root)
        store = queuectl.open_store(self.db)
        self.addCleanup(store.close)
        seen = []
        real = store._run
        store._run = lambda sql, params=(): seen.append(
            (sql, tuple(params))) or real(sql, params)
        seq = self.sql("SELECT seq FROM jobs WHERE id = ?", root)[0][0]
        with store.write():
            store._bury_dependents(seq, store.now())
            store._run("ROLLBACK")
            store._run("BEGIN IMMEDIATE")
        walks = [(s, p) for s, p in seen if "FROM deps" in s]
        self.assertTrue(walks)
        for sql, params in walks:
            plan = " | ".join(str(row[-1]) for row in store.conn.execute(
                "EXPLAIN QUERY PLAN " + sql, params))
            self.assertIn("deps_dep", plan, sql)
            self.assertNotIn("jobs_state", plan, sql)

    @sqlite_only("SQLite schema versions")
    def test_version_2_database_gains_queues(self):
        # Jobs of a database made before named queues are in `default`.
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in queuectl.MIGRATIONS[0] + queuectl.MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version=2")
        conn.execute("PRAGMA application_id=%d" % queuectl.APPLICATION_ID)
        conn.execute("INSERT INTO jobs (id, command, state, ready, run_at,"
                     " max_retries, cwd, created_at, updated_at) VALUES"
                     " ('old1', 'true', 'pending', 1, 0, 3, '/', 0, 0)")
        conn.execute("UPDATE counts SET n = 1 WHERE state = 'pending'")
        conn.close()
        self.assertEqual(self.job("old1")["queue"], "default")
        self.assertEqual(self.queue_counts("default")["counts"]["pending"], 1)
        self.ok("queue", "set", "default", "--concurrency", "1")
        key = self.enqueue("true", "--unique", "k", "--queue", "new")
        self.assertEqual(self.enqueue("true", "--unique", "k"), key)
        self.drain()
        self.assertEqual((self.state("old1"), self.state(key)),
                         ("completed", "completed"))

    # -- unique jobs --------------------------------------------------------

    def test_unique_key_makes_one_job_until_it_finishes(self):
        first = self.enqueue("true", "--unique", "report")
        again = self.ok_json("enqueue", "true", "--unique", "report")
        self.assertEqual((again["id"], again["duplicate"]), (first, True))
        self.assertEqual(again["unique_key"], "report")
        fresh = self.ok_json("enqueue", "true", "--unique", "other")
        self.assertNotIn("duplicate", fresh)
        self.assertEqual(self.enqueue('{"command": "echo x",'
                                      ' "unique_key": "report"}'), first)
        self.assertEqual(len(self.ok_json("list")), 2)
        self.drain()
        self.assertEqual(self.state(first), "completed")
        second = self.enqueue("true", "--unique", "report")
        self.assertNotEqual(second, first)
        # A failed job (waiting for its retry) still holds its key; a dead
        # one frees it.
        self.config(backoff_max=0)
        doomed = self.enqueue("false", "--unique", "d", "--max-retries", "0")
        self.drain()
        self.assertEqual(self.state(doomed), "dead")
        self.assertNotEqual(self.enqueue("true", "--unique", "d"), doomed)

    def test_failed_job_keeps_its_key(self):
        self.config(backoff_base=1000, backoff_max=3600)
        job_id = self.enqueue("false", "--unique", "k")
        self.drain()
        self.assertEqual(self.state(job_id), "failed")
        self.assertEqual(self.enqueue("true", "--unique", "k"), job_id)

    def test_unique_in_a_batch_and_against_the_queue(self):
        held = self.enqueue("true", "--unique", "a")
        path = os.path.join(self.dir, "jobs.jsonl")
        with open(path, "w") as handle:
            for line in ({"command": "echo 1", "unique_key": "a"},
                         {"command": "echo 2", "unique_key": "b"},
                         {"command": "echo 3", "unique_key": "b"},
                         {"command": "echo 4"}):
                handle.write(json.dumps(line) + "\n")
        ids = self.ok_json("enqueue", "-f", path)
        self.assertEqual(ids[0], held)
        self.assertEqual(ids[1], ids[2])
        self.assertEqual(len(set(ids)), 3)
        self.assertEqual(len(self.ok_json("list")), 3)
        self.assertEqual(self.job(ids[1])["command"], "echo 2")

    def test_concurrent_enqueues_make_one_job(self):
        procs = [self.spawn("enqueue", "echo once", "--unique", "once")
                 for _ in range(20)]
        printed = set()
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            self.assertEqual((proc.returncode, err), (0, b""))
            printed.add(out.decode().strip())
        self.assertEqual(len(printed), 1)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs")[0][0], 1)
        self.assertEqual(self.sql("SELECT id FROM jobs")[0][0], printed.pop())

    def test_unique_with_after_and_queue(self):
        dep = self.enqueue("true")
        first = self.enqueue("true", "--after", dep, "--unique", "u",
                             "--queue", "q")
        self.assertEqual(self.enqueue("true", "--after", dep, "--unique", "u"),
                         first)
        self.drain()
        self.assertEqual(self.state(first), "completed")

    def test_retry_of_a_dead_job_whose_key_is_taken_is_refused(self):
        self.config(backoff_max=0)
        dead = self.enqueue("false", "--unique", "k", "--max-retries", "0")
        self.drain()
        newer = self.enqueue("true", "--unique", "k", "--delay", "3600")
        self.assertNotEqual(newer, dead)
        err = self.expect_failure(1, "holds", "dlq", "retry", dead)
        self.assertIn(newer, err)
        self.ok("delete", newer)
        self.ok("dlq", "retry", dead)
        self.assertEqual(self.enqueue("true", "--unique", "k"), dead)

    # -- bad input ----------------------------------------------------------

    def test_bad_input(self):
        self.enqueue("true", "--queue", "q")
        for code, message, args in (
                (2, "queue must be", ("enqueue", "true", "--queue", "a b")),
                (2, "queue must be", ("enqueue", '{"command": "x",'
                                      ' "queue": 3}')),
                (2, "unique_key must be", ("enqueue", '{"command": "x",'
                                           ' "unique_key": 7}')),
                (2, "unique_key must be", ("enqueue", "x", "--unique", "")),
                (2, "queue must be", ("worker", "start", "--queue", "a,,b")),
                (2, "queue must be", ("list", "--queue", "no way")),
                (2, "--concurrency", ("queue", "set", "q", "--concurrency",
                                      "-1")),
                (2, "--concurrency", ("queue", "set", "q", "--concurrency",
                                      "lots")),
                (2, "--concurrency", ("queue", "set", "q")),
                (2, "queue must be", ("queue", "set", "q!", "--concurrency",
                                      "1")),
                (2, "queue must be", ("queue", "pause", "")),
                (2, "queue must be", ("queue", "resume", "x" * 200)),
                (2, "ACTION", ("queue",)),
                (2, "invalid choice", ("queue", "drop", "q"))):
            self.expect_failure(code, message, *args)

    def test_help_has_examples(self):
        for action in ("list", "set", "pause", "resume"):
            out = self.ok("queue", action, "--help")
            self.assertIn("example:", out)
            self.assertIn(" queue %s " % action, out.split("example:")[1])
        self.assertIn("--unique", self.ok("enqueue", "--help"))
        self.assertIn("--queue", self.ok("worker", "start", "--help"))


class TestPerformanceStructure(CLITestCase):
    """What keeps queuectl fast, checked by structure, never by timing."""

    def test_a_job_exit_is_awaited_without_a_millisecond_sleep(self):
        # When a job's pipe ends, its shell is still exiting; Popen.wait's
        # polling would sleep 1 ms first (most of a short job's time). The
        # worker waits on a pidfd where Linux and Python (3.9+) have one,
        # sleeping not at all, else sleeps 50 us first.  The job here ends
        # its output at once, then runs until the test lets it go.
        import threading
        hold = os.path.join(self.dir, "hold")
        started = hold + ".started"
        open(hold, "w").close()
        command = ("touch %s; exec >/dev/null 2>&1; while [ -e %s ]; do"
                   " sleep 0.05; done" % (shlex.quote(started),
                                          shlex.quote(hold)))
        # A timeout and a daemon thread: a worker that misses the exit
        # fails the test, and cannot keep the suite from ending.
        job = queuectl._Claim(1, "j", command, 30, self.dir, "{}", 1, 1,
                              time.time())
        execution = queuectl._Execution(job, 65536, lambda proc: None)
        results, sleeps = [], []
        runner = threading.Thread(target=lambda: results.append(
            execution.run()))
        runner.daemon = True
        real = queuectl.time.sleep

        def counted(seconds):
            if threading.current_thread() is runner:
                sleeps.append(seconds)
            real(seconds)
        queuectl.time.sleep = counted
        self.addCleanup(setattr, queuectl.time, "sleep", real)
        runner.start()
        try:
            self.wait_for(lambda: os.path.exists(started),
                          what="the job to start")
        finally:
            os.remove(hold)  # before anything waits for the job
            runner.join(60)
        self.assertEqual([run[:3] for run in results], [(0, None, None)])
        pidfd = queuectl._pidfd(os.getpid())
        if pidfd is not None:
            os.close(pidfd)
            self.assertEqual(sleeps, [])
        elif sleeps:  # (none if the shell was gone by the first look)
            self.assertEqual(sleeps[0], 0.00005)
            self.assertLessEqual(max(sleeps), 0.05)

    def test_one_idle_thread_polls_for_the_pool(self):
        # An idle --count 4 reads the database from one thread only; the
        # others wait for it (and look when it sees work).
        import threading
        callers = []
        original = queuectl._SQLStore.anything_due

        def counted(store, now, queues=None):
            callers.append(threading.current_thread().name)
            return original(store, now, queues)
        queuectl._SQLStore.anything_due = counted
        self.addCleanup(setattr, queuectl._SQLStore, "anything_due",
                        original)
        # The waiting threads never take the turn by waiting: whoever is
        # idle next takes it at once.
        self.addCleanup(setattr, queuectl, "FOLLOWER_WAIT",
                        queuectl.FOLLOWER_WAIT)
        queuectl.FOLLOWER_WAIT = 3600
        self.ok("status")
        pool = queuectl.WorkerPool(self.db, count=4, poll_interval=0.02,
                                   log=False)
        thread = threading.Thread(target=pool.run)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(pool.stop)
        self.wait_for(lambda: len(callers) >= 20, what="20 idle polls")
        self.assertEqual(len(set(callers)), 1, callers)
        for round_number in range(3):
            # Seeing work, the others look once too; then polling goes on.
            job_id = self.enqueue("true")
            self.wait_state(job_id, "completed")
            seen = len(callers)
            self.wait_for(lambda: len(callers) >= seen + 20,
                     what="20 more idle polls after a job")
        pool.stop()
        thread.join()

    def test_enqueue_path_imports_no_worker_modules(self):
        # `enqueue` must not pay for subprocess, threading, sockets...,
        # nor for shutil (and bz2, lzma, threading through it), which
        # argparse imports for every option added from 3.8 on, to ask the
        # terminal's width (see _HelpFormatter).
        code = ("import sys, sqlite3, json, argparse;"
                " base = set(sys.modules);"
                " sys.path.insert(0, %r); import queuectl;"
                " queuectl.main(['--db', %r, 'enqueue', 'true']);"
                " print(sorted(m for m in ('subprocess', 'threading', 'socket',"
                " 'http.server', 'select', 'signal', 'tempfile', 'shutil')"
                " if m in sys.modules and m not in base))" % (HERE, self.db))
        out = subprocess.check_output([sys.executable, "-S", "-c", code],
                                      env=self.env).decode()
        self.assertEqual(out.splitlines()[-1], "[]")

    def test_bulk_enqueue_is_one_transaction(self):
        # enqueue_many: one BEGIN IMMEDIATE, one COMMIT, whatever the size.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        statements = []
        queue.store.conn.set_trace_callback(lambda sql: statements.append(sql))
        queue.enqueue_many([{"command": "true"}] * 2000)
        begins = [s for s in statements if s.startswith("BEGIN")]
        commits = [s for s in statements if s == "COMMIT"]
        self.assertEqual((begins, len(commits)), (["BEGIN IMMEDIATE"], 1))
        self.assertEqual(queue.counts()["pending"], 2000)

    def test_hot_queries_use_indexes(self):
        # Claim, list by state, the status counts, a prefix lookup
        # and the reaper's look at running jobs never scan the jobs table
        # or sort it in a temporary B-tree.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        queries = [
            (queuectl._NEXT_PRIORITY_SQL, (2 ** 63 - 1,)),
            (queuectl._CLAIM_AT_SQL, (0, 0, 8)),
            (queuectl._CLAIM_BELOW_SQL, (0, 0, 8)),
            ("SELECT seq FROM jobs WHERE state = 'dead' ORDER BY seq"
             " LIMIT 5 OFFSET 5", ()),
            (queuectl._SQLiteStore._PROCESSING_SQL, ()),
            ("SELECT state, n FROM counts", ()),
            ("SELECT seq, id FROM jobs WHERE id > ? AND id < ? ORDER BY id"
             " LIMIT 6", ("ab", "ac")),
            ("SELECT j.seq FROM jobs j JOIN attempts a ON a.id = j.attempt_id"
             " WHERE j.state = 'processing'", ()),
        ]
        for sql, args in queries:
            plan = " ".join(str(r[-1]) for r in queue.store.conn.execute(
                "EXPLAIN QUERY PLAN " + sql, args)).upper()
            self.assertNotIn("TEMP B-TREE", plan, sql)
            self.assertNotRegex(plan, r"SCAN (TABLE )?JOBS(?! USING)", sql)

    def test_jobs_not_due_cost_the_claim_and_the_idle_check_nothing(self):
        # Beside 3,000 delayed jobs (over three priorities) the claim, the
        # idle check and stats' oldest due job run the same number of SQLite
        # VM steps, give or take, as beside 3: they read index ranges that
        # end at the first job not due, never the delayed jobs themselves.
        def steps(store, fn):
            count = [0]

            def tick():
                count[0] += 1
            store.conn.set_progress_handler(tick, 10)
            try:
                fn()
            finally:
                store.conn.set_progress_handler(None, 10)
            return count[0]

        costs = []
        for delayed in (3, 3000):
            db = os.path.join(self.dir, "delayed%d.db" % delayed)
            queue = queuectl.Queue(db)
            self.addCleanup(queue.close)
            queue.enqueue_many([{"command": "true", "delay": 3600,
                                 "priority": i % 3} for i in range(delayed)]
                               + [{"command": "true", "priority": 1}] * 2)
            store, now = queue.store, time.time()

            def claim():
                with store.write():
                    self.assertEqual(len(store.claim("w", "h", now, 8, 16)), 1)
                    self.assertEqual(len(store.claim("w", "h", now, 8, 16)), 1)
                    self.assertEqual(store.claim("w", "h", now, 8, 16), [])
            costs.append((steps(store, claim),
                          steps(store, lambda: store.anything_due(now)),
                          steps(store, lambda: store._oldest_due(now))))
        small, large = costs
        for name, few, many in zip(("claim", "idle check", "oldest due"),
                                   small, large):
            self.assertLess(many, few * 2 + 20, "%s: %d VM steps x10 beside"
                            " 3,000 delayed jobs, %d beside 3" % (name, many,
                                                                 few))

    def test_a_big_enqueue_counts_its_jobs_in_one_statement(self):
        # From BULK_COUNT_FROM jobs on, the INSERT triggers (counts per
        # state and per named queue) are dropped and made again inside the
        # enqueue's transaction: the counts stay exact, the triggers are
        # back as they were (also after a savepoint rollback, forced here
        # by a generated id that clashes), and later single enqueues are
        # counted by them.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        conn = queue.store.conn
        trigger_sql = ("SELECT name, sql FROM sqlite_master WHERE type ="
                       " 'trigger' ORDER BY name")
        before = conn.execute(trigger_sql).fetchall()
        queue.enqueue({"command": "true", "id": "aaaaaaaaaaaa"})
        queue.enqueue({"command": "true", "queue": "mail"})
        real = os.urandom
        draws = []

        def fake(n):
            draws.append(n)
            return b"\xaa" * 6 + real(n - 6) if len(draws) == 1 else real(n)
        statements = []
        conn.set_trace_callback(lambda sql: statements.append(sql))
        queuectl.os.urandom = fake
        n = queuectl.BULK_COUNT_FROM
        try:
            ids = queue.enqueue_many(
                [{"command": "true"}] * (n - 300)
                + [{"command": "true", "queue": "mail"}] * 200
                + [{"command": "true", "queue": "sms"}] * 100)
        finally:
            queuectl.os.urandom = real
            conn.set_trace_callback(None)
        self.assertEqual(len(draws), 2)
        self.assertEqual(statements.count("ROLLBACK TO insert_jobs"), 1)
        for name in ("jobs_count_insert", "jobs_queue_insert"):
            self.assertEqual(statements.count("DROP TRIGGER " + name), 2)
        self.assertEqual(len(set(ids)), n)
        self.assertEqual(conn.execute(trigger_sql).fetchall(), before)
        queue.enqueue({"command": "true"})
        queue.enqueue({"command": "true", "queue": "sms"})
        expected = n + 4
        self.assertEqual(queue.counts()["pending"], expected)
        status = self.ok_json("status")
        self.assertEqual(status["counts"]["pending"], expected)
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM jobs").fetchone(),
                         (expected,))
        self.assertEqual(
            {q["name"]: q["counts"]["pending"] for q in status["queues"]},
            {"default": n - 300 + 2, "mail": 201, "sms": 101})

    def test_a_generated_id_clash_is_drawn_again(self):
        # A random id that already exists is replaced, not an error.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        queue.enqueue({"command": "true", "id": "aaaaaaaaaaaa"})
        real = os.urandom
        draws = []

        def fake(n):
            draws.append(n)
            return b"\xaa" * n if len(draws) == 1 else real(n)
        queuectl.os.urandom = fake
        try:
            job_id = queue.enqueue({"command": "true"})
        finally:
            queuectl.os.urandom = real
        self.assertNotEqual(job_id, "aaaaaaaaaaaa")
        self.assertEqual(len(draws), 2)
        self.assertEqual(queue.counts()["pending"], 2)

    def test_bench_quick_reports_every_figure(self):
        # The benchmark runs and reports each figure with its baseline.
        if os.environ.get("QUEUECTL_SKIP_BENCH"):
            self.skipTest("QUEUECTL_SKIP_BENCH is set")
        results = queuectl.run_bench(quick=True)
        names = " ".join(r["name"] for r in results)
        for word in ("raw spawn", "end-to-end", "bulk enqueue", "enqueue call",
                     "pick-up", "claim", "status"):
            self.assertIn(word, names)
        ratios = [r for r in results if r["baseline"]]
        self.assertTrue(all(r["ratio"] > 0 for r in ratios))
        # Issue 14's rows: each with its baseline from the same run, or
        # said to be unmeasured (callgrind needs valgrind).
        for word in ("stats --json with", "list page", "drain",
                     "idle check beside", "stats --json beside",
                     "instructions (callgrind)", "idle worker CPU (--count 4)",
                     "CPU per job", "page faults per job", "jobs, python -m"):
            self.assertIn(word, names)
        for r in results:
            if r["value"] is None:
                self.assertTrue(r["unit"].startswith("not measured: "), r)
            elif any(w in r["name"] for w in ("beside", "bulk", "with")):
                self.assertGreater(r["ratio"], 0, r)

class TestDatabaseURLs(CLITestCase):
    """What any postgresql:// or other URL does, with or without a driver."""

    def test_other_schemes_are_refused_and_make_no_folder(self):
        # A URL is never a path: no folder named 'postgresql:' or 'mysql:'.
        for url in ("mysql://u:p@h/db", "http://example.invalid/x"):
            with self.subTest(url=url):
                code, out, err = self.cli("status", db=url)
                self.assertEqual(code, 2, err)
                self.assertIn("unsupported database URL scheme", err)
        self.assertEqual(sorted(os.listdir(self.dir)), [])

    def test_an_empty_database_path_is_refused(self):
        # `--db "$UNSET"` or `copy --to "$UNSET"` must not fall back to the
        # default queue (~/.queuectl, HOME being the test's folder).
        self.enqueue("true")
        for args, db in ((("--db", "", "status"), None),
                         (("--db", " ", "enqueue", "true"), None),
                         (("copy", "--to", ""), self.db)):
            with self.subTest(args=args):
                code, out, err = self.cli(*args, db=db)
                self.assertEqual((code, out), (2, ""), err)
                self.assertRegex(err, "^queuectl: error: the database path is"
                                 " empty[^\n]*\n$")
        self.assertFalse(os.path.exists(os.path.join(self.dir, ".queuectl")))
        self.assertEqual(self.ok_json("status")["counts"]["pending"], 1)

    def test_missing_driver_names_both_installs(self):
        # No psycopg and no psycopg2: exit 1, one line naming both installs,
        # and nothing created where the command ran.
        fake = os.path.join(self.dir, "nodrivers")
        os.mkdir(fake)
        for name in ("psycopg", "psycopg2"):
            with open(os.path.join(fake, name + ".py"), "w") as handle:
                handle.write("raise ImportError('hidden by the test')\n")
        code, out, err = self.cli(
            "status", db="postgresql://jobs:s3cret@127.0.0.1:1/jobs",
            env={"PYTHONPATH": fake})
        self.assertEqual(code, 1, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn('pip install "psycopg[binary]"', err)
        self.assertIn("python3-psycopg2", err)
        self.assertNotIn("s3cret", err)
        self.assertEqual(sorted(os.listdir(self.dir)), ["nodrivers"])


@unittest.skipUnless(PG_URL, "set QUEUECTL_TEST_PG to a PostgreSQL URL"
                     " (.ci/run does) to run the PostgreSQL-only tests")
class TestPostgres(CLITestCase):
    """What only the PostgreSQL store does: server clock, NOTIFY, schema."""

    STORE = "postgresql"

    def test_password_is_never_printed(self):
        # status (text and JSON), the worker's log and errors show the URL
        # without its password (trust auth here accepts any password).
        url = re.sub(r"^(postgres(?:ql)?://[^:/@]+)(?::[^@/]*)?@",
                     r"\1:p%40ss:w0rd@", self.db)
        self.assertIn("p%40ss:w0rd", url)
        self.enqueue("true")
        for args in (("status",), ("status", "--json"), ("stats",)):
            out = self.ok(*args, db=url)
            self.assertNotIn("w0rd", out)
        self.assertNotIn("p%40ss", self.ok_json("status", db=url)["db"])
        err = self.cli("worker", "start", "--exit-when-idle", db=url)[2]
        self.assertIn("pool started", err)
        self.assertNotIn("w0rd", err)
        bad = url.rsplit(":", 1)[0] + ":1/nothing"  # nothing listens there
        code, out, err = self.cli("status", db=bad)
        self.assertEqual(code, 1, err)
        self.assertNotIn("w0rd", err)
        # Other spellings: a password parameter, an upper-case scheme, and
        # passwords libpq cannot read (unencoded % or @ and /), which its
        # errors quote; a URL misplaced among the arguments too.
        bare = re.sub(r"^postgres(?:ql)?://[^@/]*@", "", self.db)
        user = re.match(r"^postgres(?:ql)?://([^:@/]*)", self.db).group(1)
        spellings = [self.db + ("&" if "?" in self.db else "?") +
                     "password=Sekr3tA", "POSTGRESQL://%s:Sekr3tB@%s"
                     % (user, bare)]
        for spelling in spellings:
            out = self.ok("status", "--json", db=spelling)
            self.assertNotIn("Sekr3t", out)
        for password in ("Top%Sekr3tC", "p@ss:w/Sekr3tD?#x", "a/Sekr3tE"):
            code, out, err = self.cli("status", db="postgresql://%s:%s@%s"
                                      % (user, password, bare))
            self.assertNotIn("Sekr3t", out + err)
            self.assertTrue(err.startswith("queuectl: error: ") or code == 0,
                            err)
        code, out, err = self.cli("status", spellings[0], db=None)
        self.assertEqual(code, 2)
        self.assertNotIn("Sekr3t", err)

    def test_sessions_never_compile_statements(self):
        # jit off: with statistics not yet refreshed after a big enqueue, an
        # idle check's cost estimate passed jit_above_cost and compiling
        # took 600 ms of a 0.04 ms read (bench: idle check beside 1M).
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        self.assertEqual(queue.store._one("SHOW jit"), ("off",))

    def test_no_two_live_sessions_share_a_counter_row(self):
        # Each session adds to counter rows of its own stripe.  Striped by
        # backend pid modulo 16, two sessions shared rows, and two syncs
        # taking two rows in opposite orders deadlocked (CI, under load).
        # 20 sessions at once: 20 stripes, one pending job counted in each.
        queues = [queuectl.Queue(self.db) for _ in range(20)]
        for queue in queues:
            self.addCleanup(queue.close)
            queue.enqueue({"command": "true"})
        self.assertEqual(self.sql(
            "SELECT COUNT(DISTINCT stripe), MAX(n), SUM(n) FROM"
            " queuectl.counts WHERE state = 'pending'"), [(20, 1, 20)])
        self.assertEqual(self.ok_json("status")["counts"]["pending"], 20)

    def test_jobs_not_due_cost_the_claim_nothing(self):
        # The claim walks the priorities: beside 30,000 jobs due in an hour
        # (three priorities) it reads about as many buffers as beside 3.
        # Read in one go, it read every delayed job's index entry.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        store = queue.store

        def claim_buffers():
            store.conn.execute("BEGIN")
            try:
                plan = store.conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
                    + store._sql(queuectl._PG_CLAIM_ANY_SQL),
                    (store.now(), 16, 16, 16, 8, "w", "h", "w")).fetchone()[0]
            finally:
                store.conn.execute("ROLLBACK")
            plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]
            self.assertEqual(plan["Plan"]["Actual Rows"], 1)  # 2 < 16 due
            return (plan["Plan"]["Shared Hit Blocks"]
                    + plan["Plan"]["Shared Read Blocks"])

        def delayed(n):
            queue.enqueue_many([{"command": "true", "delay": 3600,
                                 "priority": i % 3} for i in range(n)])
        delayed(3)
        queue.enqueue_many([{"command": "true", "priority": 1}] * 2)
        few = claim_buffers()
        delayed(30000)
        many = claim_buffers()
        self.assertLess(many, few * 2 + 10, "%d buffers beside 30,000"
                        " delayed jobs, %d beside 3" % (many, few))

    def test_unreachable_server_is_one_line_exit_1(self):
        code, out, err = self.cli(
            "status", db="postgresql://nobody:pw@127.0.0.1:1/none")
        self.assertEqual(code, 1, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("cannot connect to postgresql://nobody@127.0.0.1:1/none",
                      err)

    def test_wrong_password_is_one_line_exit_1(self):
        # A role that must log in with its password (pg_hba: scram for all
        # but the superuser in CI): the wrong one is refused, one line,
        # and the password is not in it.
        from urllib.parse import urlsplit
        role = "qc_pw_%d" % os.getpid()
        self.sql("DROP ROLE IF EXISTS %s" % role)
        self.sql("CREATE ROLE %s LOGIN PASSWORD 'right-one'" % role)
        self.addCleanup(self.sql, "DROP ROLE IF EXISTS %s" % role)
        where = urlsplit(self.db)
        url = "postgresql://%s:wr0ng-one@%s%s" % (role, where.netloc.rsplit(
            "@", 1)[-1], where.path)
        code, out, err = self.cli("status", db=url)
        if code == 0 or "permission denied" in err:
            self.skipTest("this server trusts %s without a password (CI's"
                          " pg_hba asks for one)" % role)
        self.assertEqual(code, 1, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("password authentication failed", err)
        self.assertNotIn("wr0ng-one", err)

    def test_a_connection_limit_is_waited_for_not_fatal(self):
        # A role allowed 2 connections runs `worker start --count 4`: the
        # threads that cannot connect wait for a connection (one log line),
        # the others run the jobs, and --exit-when-idle ends the pool, 0.
        from urllib.parse import urlsplit
        role = "qc_lim_%d" % os.getpid()
        where = urlsplit(self.db)
        database = where.path.lstrip("/")
        self.sql("DROP ROLE IF EXISTS %s" % role)
        self.sql("CREATE ROLE %s LOGIN PASSWORD 'pw' CONNECTION LIMIT 2"
                 % role)
        self.addCleanup(self.sql, "DROP ROLE IF EXISTS %s" % role)
        self.sql('GRANT CREATE ON DATABASE "%s" TO %s' % (database, role))
        self.addCleanup(self.sql, 'REVOKE CREATE ON DATABASE "%s" FROM %s'
                        % (database, role))
        self.addCleanup(self.sql, "DROP SCHEMA IF EXISTS queuectl CASCADE")
        url = "postgresql://%s:pw@%s%s" % (
            role, where.netloc.rsplit("@", 1)[-1], where.path)
        ids = [self.ok("enqueue", "echo %d" % n, db=url).strip()
               for n in range(3)]
        code, out, err = self.cli("worker", "start", "--count", "4",
                                  "--exit-when-idle", db=url)
        self.assertEqual(code, 0, err)
        self.assertIn("too many connections", err)
        self.assertEqual([self.state(job_id) for job_id in ids],
                         ["completed"] * 3)

    def start_copy(self, dest):
        """`copy --to dest` in the background (text output)."""
        copy = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db, "copy", "--to", dest],
            cwd=self.dir, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True)
        self.procs.append(copy)
        return copy

    def test_a_copy_cut_off_by_the_server_is_one_line_and_keeps_nothing(self):
        # copy --to reads its source as it writes the target, in one
        # snapshot: a server that goes away meanwhile is one line and exit
        # 1 (it was a traceback: the snapshot's end read a connection
        # already dropped), and the target keeps none of what came before.
        # The copy is held at its last table by a lock the test holds.
        self.enqueue("true")
        self.drain()
        blocker = _pg_connect(self.db)
        self.addCleanup(blocker.close)
        held = blocker.cursor()
        held.execute("BEGIN")
        held.execute("LOCK TABLE queuectl.schedules IN ACCESS EXCLUSIVE MODE")
        dest = os.path.join(self.dir, "copy.db")
        copy = self.start_copy(dest)
        waiting = ("SELECT pid FROM pg_stat_activity WHERE wait_event_type ="
                   " 'Lock' AND query LIKE 'DECLARE%FROM schedules%'")
        self.wait_for(lambda: _pg_sql(self.db, waiting),
                      what="the copy to reach the locked table")
        _pg_sql(self.db, "SELECT pg_terminate_backend(pid) FROM"
                " pg_stat_activity WHERE pid = ?", _pg_sql(self.db, waiting)[0])
        out, err = copy.communicate(timeout=60)
        held.execute("ROLLBACK")
        self.assertEqual((copy.returncode, out), (1, ""), err)
        self.assertRegex(err, r"\Aqueuectl: error: database [^\n]*\n\Z")
        conn = sqlite3.connect(dest)
        try:
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM jobs")
                             .fetchall(), [(0,)])
        finally:
            conn.close()
        self.assertEqual(self.ok_json("status")["counts"]["completed"], 1)

    def test_a_copy_outlasts_the_sessions_idle_limit(self):
        # The source's snapshot idles while the target waits for its write
        # lock, here past the 10 s idle-in-transaction limit of every
        # queuectl session: the copy goes on (the server ended it, a
        # red-team pass).  The test holds the lock until the source has
        # idled 11 s.
        self.enqueue("true")
        dest = os.path.join(self.dir, "copy.db")
        self.ok("status", db=dest)  # an empty queue there
        locker = sqlite3.connect(dest, isolation_level=None)
        self.addCleanup(locker.close)
        locker.execute("BEGIN IMMEDIATE")
        copy = self.start_copy(dest)
        idle = ("SELECT 1 FROM pg_stat_activity WHERE state = 'idle in"
                " transaction' AND query LIKE '%duration_buckets%' AND now()"
                " - state_change > interval '11 seconds'")
        self.wait_for(lambda: copy.poll() is not None
                      or _pg_sql(self.db, idle), timeout=120,
                      what="the copy's snapshot to idle 11 s")
        if copy.poll() is not None:
            self.fail("the copy ended: %s" % (copy.communicate(),))
        locker.execute("ROLLBACK")
        out, err = copy.communicate(timeout=120)
        self.assertEqual((copy.returncode, err), (0, ""))
        self.assertEqual(out, "copied 1 job(s) to %s\n" % dest)

    def test_foreign_schema_is_refused_untouched(self):
        # A schema named queuectl that is someone else's: exit 1, unchanged.
        self.sql("CREATE SCHEMA queuectl")
        self.sql("CREATE TABLE queuectl.jobs (x INTEGER)")
        self.sql("INSERT INTO queuectl.jobs VALUES (42)")
        before = self.dump()
        self.expect_failure(1, "not queuectl's; left untouched", "status")
        self.assertEqual(self.dump(), before)

    def test_old_schema_is_migrated_in_place(self):
        # A version-1 schema gains what later versions add and keeps its jobs.
        conn = _pg_connect(PG_URL)
        try:
            cursor = conn.cursor()
            cursor.execute("SET search_path = queuectl")
            for statement in queuectl._PG_SCHEMA:
                cursor.execute(statement)
            cursor.execute("INSERT INTO jobs (id, command, state, ready,"
                           " run_at, max_retries, cwd, created_at,"
                           " updated_at) VALUES ('old1', 'true', 'pending',"
                           " 1, 0, 3, '/', 0, 0)")
        finally:
            conn.close()
        self.assertEqual(self.sql("SELECT value FROM queuectl.meta WHERE key"
                                  " = 'schema_version'"), [("1",)])
        self.drain()
        self.assertEqual(self.job("old1")["state"], "completed")
        self.assertEqual(self.sql("SELECT value FROM queuectl.meta WHERE key"
                                  " = 'schema_version'"),
                         [(str(queuectl.PG_SCHEMA_VERSION),)])

    def test_newer_schema_is_refused_untouched(self):
        self.ok("status")
        self.sql("UPDATE queuectl.meta SET value = '99' WHERE key ="
                 " 'schema_version'")
        self.expect_failure(1, "written by a newer queuectl", "status")
        # A version that is no version (tampered, or its row gone).
        for value in ("abc", "", "3.0", "-1", " 3", "0"):
            self.sql("UPDATE queuectl.meta SET value = ? WHERE key ="
                     " 'schema_version'", value)
            self.expect_failure(1, "but no schema version", "status")
        self.sql("DELETE FROM queuectl.meta WHERE key = 'schema_version'")
        self.expect_failure(1, "but no schema version", "status")

    def test_any_database_or_client_encoding_keeps_text_as_it_is(self):
        # A SQL_ASCII database (old clusters; psycopg 3 reads its text as
        # bytes) and $PGCLIENTENCODING=LATIN1 (which cannot hold a check
        # mark): queuectl's text is UTF-8 whatever they say.
        from urllib.parse import urlsplit, urlunsplit
        name = "queuectl_ascii_%d" % os.getpid()
        self.sql("DROP DATABASE IF EXISTS %s" % name)
        self.sql("CREATE DATABASE %s ENCODING 'SQL_ASCII' TEMPLATE template0"
                 " LC_COLLATE 'C' LC_CTYPE 'C'" % name)
        self.addCleanup(self.sql, "DROP DATABASE IF EXISTS %s" % name)
        ascii_db = urlunsplit(urlsplit(self.db)._replace(path="/" + name))
        for db in (ascii_db, self.db):
            env = {"PGCLIENTENCODING": "LATIN1"}
            job_id = self.ok("enqueue", "echo 'h\u00e9llo \u2713'", db=db,
                             env=env).strip()
            code, _, err = self.cli("worker", "start", "--exit-when-idle",
                                    db=db, env=env)
            self.assertEqual(code, 0, err)
            job = json.loads(self.ok("show", job_id, "--json", db=db, env=env))
            self.assertEqual((job["state"], job["command"]),
                             ("completed", "echo 'h\u00e9llo \u2713'"))
            self.assertEqual(self.ok("logs", job_id, db=db, env=env),
                             "h\u00e9llo \u2713\n")
        # copy into it too: its JSON rows carry the text as it is (an
        # \\u escape above U+007F is refused where the database is not UTF8).
        _pg_sql(ascii_db, "DROP SCHEMA queuectl CASCADE", ())
        source = os.path.join(self.dir, "source.db")
        job_id = self.ok("enqueue", "echo 'h\u00e9llo \u2713'",
                         db=source).strip()
        self.ok("copy", "--to", ascii_db, db=source)
        self.assertEqual(self.ok_json("show", job_id, db=ascii_db)["command"],
                         "echo 'h\u00e9llo \u2713'")

    def test_dependencies_change_one_writer_at_a_time(self):
        # PostgreSQL runs writes side by side, and row locks did not order
        # these: a job enqueued --after A while a worker completed A waited
        # for ever (neither transaction saw the other's rows), and `delete
        # A` beside such an enqueue left it waiting on no job.  The
        # enqueue's transaction is held open (in-process) until the other
        # writer either waits for it (the dependency lock) or is done.
        def waiting_for_a_lock():
            return self.sql("SELECT COUNT(*) FROM pg_locks WHERE locktype ="
                            " 'advisory' AND NOT granted")[0][0]

        def enqueue_held_open(after, until):
            queue = queuectl.Queue(self.db)
            insert_deps = queue.store._insert_deps

            def held_open(pairs):
                insert_deps(pairs)
                self.wait_for(lambda: waiting_for_a_lock() or until(),
                              what="the other writer to wait or be done")
            queue.store._insert_deps = held_open
            try:
                return queue.enqueue({"command": "true", "after": [after]})
            finally:
                queue.close()
        self.start_worker()
        done = os.path.join(self.dir, "done")
        first = self.enqueue(self.hold() + "; touch " + done)
        self.wait_started()
        self.release()
        dependent = enqueue_held_open(first, lambda: os.path.exists(done) and
                                      self.state(first) == "completed")
        self.wait_state(dependent, "completed")
        later = self.enqueue("true", "--delay", "3600")
        delete = self.spawn("delete", later)
        waiter = enqueue_held_open(later, lambda: delete.poll() is not None)
        _, err = delete.communicate(timeout=60)
        self.assertEqual((delete.returncode, err.decode()), (
            1, "queuectl: error: job '%s' is waited on by '%s'\n"
            % (later, waiter)))

    def test_the_dependency_lock_holds_up_no_beat_and_no_claim(self):
        # An enqueue --after waits for the writes in flight that may
        # complete jobs (here a stand-in holds the lock shared), and the
        # writes after it wait for it; but a write that takes no part (an
        # enqueue without --after, a beat, a claim) goes past at once, and
        # a wait for the lock that is cut short (Ctrl-C) rolls back: the
        # session stays usable.
        first = self.enqueue("true", "--delay", "3600")
        holder = _pg_connect(self.db)
        self.addCleanup(holder.close)
        cursor = holder.cursor()
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%d, -1)"
                       % queuectl._PG_STRIPE_LOCK)
        waiter = self.spawn("enqueue", "true", "--after", first)
        self.wait_for(lambda: self.sql(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND"
            " NOT granted")[0][0], what="the --after enqueue to wait")
        self.enqueue("true")  # would wait behind the --after one
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)

        def interrupt(signum, frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGALRM, interrupt)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        releaser = threading.Timer(3.0, lambda: cursor.execute("COMMIT"))
        releaser.start()
        self.addCleanup(releaser.join)
        with self.assertRaises(KeyboardInterrupt):
            queue.enqueue({"command": "true", "after": [first]})
        releaser.join()
        self.assertEqual(waiter.wait(timeout=60), 0)
        queue.enqueue({"command": "true", "after": [first]})
        self.assertEqual(self.ok_json("status")["counts"]["pending"], 4)

    def test_acknowledged_writes_survive_a_server_crash(self):
        # A server that crashes (kill -9: the OOM killer) while its clients
        # live on must not forget what it acknowledged to them: a claim a
        # worker went on to run (else another worker runs the job beside
        # it), a cancel, a delete, a setting.  Its WAL writer is stopped
        # first, so that at the crash only commits that waited for their
        # own WAL flush are on disk.
        server = _PrivateServer(self)
        self.db = server.url
        later = self.enqueue("true", "--delay", "3600")
        gone = self.enqueue("true", "--delay", "3600")
        writer = [pid for pid, what in server.processes()[1].items()
                  if "walwriter" in what]
        self.assertEqual(len(writer), 1, server.processes())
        os.kill(writer[0], signal.SIGSTOP)
        held = self.enqueue(self.hold())
        self.start_worker()
        self.wait_started()
        self.ok("cancel", later)
        self.ok("delete", gone)
        self.ok("config", "set", "max-retries", "9")
        server.crash()
        self.assertEqual(self.state(held), "processing")
        self.assertEqual((self.state(later), self.job(later)["last_error"]),
                         ("dead", "cancelled"))
        self.expect_failure(1, "no job with id", "show", gone, live=True)
        self.assertEqual(self.ok("config", "get", "max-retries").strip(), "9")
        # The worker that ran on through the crash records its result.
        self.release()
        self.wait_state(held, "completed", 120)

    def test_server_clock_decides_not_the_workers(self):
        # Workers whose clocks are an hour off neither start a job early
        # nor miss one that is due: due means due by the server's clock.
        later = self.enqueue("true", "--delay", "1800")
        due = self.enqueue("true")
        for skew in (3600, -3600):
            pool = queuectl.WorkerPool(self.db, exit_when_idle=True,
                                       log=False,
                                       now=lambda s=skew: time.time() + s)
            self.assertEqual(pool.run(), 0)
        self.assertEqual(self.state(later), "pending")
        self.assertEqual(self.state(due), "completed")
        started = queuectl.parse_time(
            self.ok_json("show", due)["runs"][0]["started_at"])
        self.assertLess(abs(started - time.time()), 600)

    def test_notify_wakes_an_idle_worker_at_once(self):
        # poll-interval 3600: only NOTIFY can start the job within the
        # test's deadline.
        self.config(poll_interval=3600)
        worker = self.start_worker("--count", "2")
        self.wait_for(lambda: len(self.ok_json("status")["workers"]) == 2,
                 what="the workers to register")
        job_id = self.enqueue("true")
        self.wait_state(job_id, "completed", timeout=60)
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(timeout=30), 0)


class _PrivateServer(object):
    """A PostgreSQL cluster of a test's own, which the test may crash:
    Debian's server binaries, run by the postgres user (so root is needed),
    in a folder of its own, on a free port; fsync off (the crashes here are
    the server's, not the machine's)."""

    def __init__(self, testcase):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found or os.geteuid() != 0:
            why = "a private PostgreSQL server needs root and " \
                "/usr/lib/postgresql/*/bin/initdb"
            if os.environ.get("QUEUECTL_TEST_HOSTS") == "required":
                testcase.fail(why)  # CI (root, Debian's PostgreSQL)
            testcase.skipTest(why)
        self.bin = os.path.dirname(found[-1])
        self.folder = tempfile.mkdtemp(prefix="queuectl-pg-")  # not in
        testcase.addCleanup(shutil.rmtree, self.folder, True)  # a 0700 one
        shutil.chown(self.folder, "postgres")
        self.as_postgres("initdb", "-D", self.data, "-U", "postgres", "-A",
                         "trust", "-E", "UTF8", "--no-locale")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write("listen_addresses = '127.0.0.1'\nfsync = off\n"
                       "unix_socket_directories = '%s'\n" % self.folder)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.url = "postgresql://postgres@127.0.0.1:%d/postgres" % self.port
        self.start()
        testcase.addCleanup(self.stop)

    @property
    def data(self):
        return os.path.join(self.folder, "data")

    def as_postgres(self, program, *args):
        proc = subprocess.run(["runuser", "-u", "postgres", "--",
                               os.path.join(self.bin, program)] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=self.folder, timeout=120)
        if proc.returncode:
            raise AssertionError("%s failed: %s" % (program, proc.stdout[
                -2000:].decode("utf-8", "replace")))

    def start(self):
        log = os.path.join(self.folder, "log")
        try:
            self.as_postgres("pg_ctl", "-D", self.data, "-o", "-p %d"
                             % self.port, "-l", log, "-w", "-t", "60", "start")
        except AssertionError as exc:
            raise AssertionError("%s\nserver log: %s" % (exc, _read(log)[-2000:]))

    def stop(self):
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            self.as_postgres("pg_ctl", "-D", self.data, "-m", "immediate",
                             "-w", "stop")

    def processes(self):
        """The postmaster's pid and {pid: what it is} of its children."""
        with open(os.path.join(self.data, "postmaster.pid")) as handle:
            postmaster = int(handle.readline())
        children = {}
        for name in os.listdir("/proc"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open("/proc/%s/stat" % name) as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                if ppid == postmaster:
                    with open("/proc/%s/cmdline" % name, "rb") as handle:
                        children[int(name)] = handle.read().decode(
                            "utf-8", "replace")
        return postmaster, children

    def crash(self):
        """kill -9 of the server and every process of it (the OOM killer's
        way), then a start: what was only in its memory is gone."""
        postmaster, children = self.processes()
        for pid in [postmaster] + list(children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(_alive(pid) for pid in
                                 [postmaster] + list(children)),
                 what="the server's processes to end")
        # Their lock files name the dead postmaster, which a container's
        # init may leave unreaped (a zombie that kill(pid, 0) still finds).
        os.remove(os.path.join(self.data, "postmaster.pid"))
        os.remove(os.path.join(self.folder, ".s.PGSQL.%d.lock" % self.port))
        self.start()


@unittest.skipUnless(PG_URL, "set QUEUECTL_TEST_PG to a PostgreSQL URL"
                     " (.ci/run does) to run the multi-host test")
class TestManyHosts(CLITestCase):
    """Three hosts (network namespaces with their own hostnames), one
    PostgreSQL server, real workers, a kill -9 and a cut network."""

    STORE = "postgresql"

    def start_on(self, host, *flags):
        log = open(os.path.join(self.dir, "%s.log" % host.hostname), "a")
        self.addCleanup(log.close)
        proc = host.popen([sys.executable, SCRIPT, "--db",
                           host.pg_url(self.db), "worker", "start"]
                          + list(flags), stdout=subprocess.DEVNULL,
                          stderr=log, env=self.env, cwd=self.dir)
        proc.log = log
        self.procs.append(proc)
        return proc

    def test_exactly_once_across_hosts(self):
        # 3,000 jobs, a worker process of 2 threads on each of 3 hosts:
        # every job runs exactly once, and every host took part.
        hosts = _start_hosts(self, 3)
        ran = os.path.join(self.dir, "ran.txt")
        n = 3000
        self.ok("enqueue", "-f", "-", input="\n".join(
            json.dumps({"command": 'echo "$QUEUECTL_JOB_ID $(hostname)"'
                        ' >> ' + ran}) for _ in range(n)))
        workers = [self.start_on(h, "--count", "2", "--exit-when-idle")
                   for h in hosts]
        for worker in workers:
            self.assertEqual(worker.wait(timeout=600), 0, _read(
                worker.log.name))
        with open(ran) as handle:
            lines = [line.split() for line in handle]
        self.assertEqual(len(lines), n)
        self.assertEqual(len(set(job for job, _ in lines)), n)
        self.assertEqual(set(h for _, h in lines),
                         set(h.hostname for h in hosts))
        self.assertEqual(self.ok_json("status")["counts"]["completed"], n)
        self.assertEqual(self.sql("SELECT COUNT(*) FROM attempts"), [(n,)])

    def test_queue_cap_holds_across_hosts(self):
        # SPEC 10: a queue capped at 2, workers of 3 threads on 3 hosts.
        # Each capped job counts itself in and out under flock and records
        # the highest count and its host; it runs until the test lets it
        # end.  At no moment do more than 2 run, and the other queue's jobs
        # keep running meanwhile.
        hosts = _start_hosts(self, 3)
        self.ok("queue", "set", "capped", "--concurrency", "2")
        counter, peak, lock = (os.path.join(self.dir, name)
                               for name in ("n", "peak", "lock"))
        with open(counter, "w") as handle:
            handle.write("0")
        count = ("flock %s sh -c 'n=$(( $(cat %s) %%s 1 )); echo $n > %s;"
                 " echo $n $(hostname) >> %s'" % (lock, counter, counter,
                                                   peak))
        for host in hosts:
            self.start_on(host, "--count", "3")
        self.wait_for(lambda: len(set(w["host"] for w in self.ok_json("status")[
            "workers"])) == 3, 120, what="workers on every host")
        capped = [self.enqueue("%s; %s; %s" % (
            count % "+", self.hold("c%d" % n), count % "-"),
            "--queue", "capped") for n in range(6)]

        def started():
            return [n for n in range(6) if os.path.exists(
                self.hold_path("c%d" % n) + ".started")]
        for released in range(6):
            self.wait_for(lambda: len(started()) == min(6, released + 2), 120,
                     what="the next capped job")
            quick = self.enqueue("true")  # runs beside the capped ones
            self.wait_state(quick, "completed", 120)
            self.assertEqual(len(started()), min(6, released + 2))
            self.release("c%d" % sorted(
                n for n in started()
                if os.path.exists(self.hold_path("c%d" % n)))[0])
        for job_id in capped:
            self.wait_state(job_id, "completed", 120)
        with open(peak) as handle:
            lines = [line.split() for line in handle]
        self.assertEqual(max(int(n) for n, _ in lines), 2)

    def test_kill_9_and_a_cut_network_lose_nothing_and_never_overlap(self):
        # Jobs longer than the lease run on three hosts; one host's worker
        # is killed with -9 (and restarted there), another host is cut off.
        # Nothing is lost, the lost runs are retried as 'worker lost', no
        # job ever runs beside its own retry, and the cut-off worker fences
        # itself, survives, and works again once its link is back.
        hosts = _start_hosts(self, 3)
        self.config(lease_timeout=4, backoff_max=0)
        events = os.path.join(self.dir, "events.txt")
        marker = _sleep_marker(6)
        script = (
            'log() { echo "$1 $QUEUECTL_JOB_ID $QUEUECTL_ATTEMPT $(hostname)'
            ' $(date +%%s.%%N)" >> %s; }; trap \'log term; exit 143\' TERM;'
            ' log start; sleep %s & wait; log end' % (events, marker))
        ids = [self.enqueue(script) for _ in range(12)]
        killed_host, cut_host, _ = hosts
        workers = {h.hostname: self.start_on(h, "--count", "2")
                   for h in hosts}

        def running_on(host):
            return self.sql("SELECT COUNT(*) FROM jobs j JOIN attempts a ON"
                            " a.id = j.attempt_id WHERE j.state ="
                            " 'processing' AND a.host = ?",
                            host.hostname)[0][0]
        self.wait_for(lambda: all(running_on(h) for h in hosts), 60,
                 what="every host to run jobs")
        victim = workers[killed_host.hostname]
        victim.kill()
        victim.wait()
        # The next worker on that host kills the orphaned job groups at
        # once (same host, dead pid) and recovers their jobs.
        workers[killed_host.hostname] = self.start_on(killed_host, "--count",
                                                      "2")
        cut_host.cut()
        cut_log = workers[cut_host.hostname].log.name
        self.wait_for(lambda: "fenced" in _read(cut_log), 60,
                 what="the cut-off worker to fence itself")
        lost = lambda host: self.sql(
            "SELECT COUNT(*) FROM attempts WHERE error = 'worker lost' AND"
            " host = ?", host.hostname)[0][0]
        self.wait_for(lambda: lost(cut_host) and lost(killed_host), 90,
                 what="the lost runs to be recovered elsewhere")
        cut_host.restore()
        for job_id in ids:
            self.wait_state(job_id, "completed", timeout=180)
        # Only the cut-off worker is left: it must run what comes next.
        for host in (killed_host, hosts[2]):
            workers[host.hostname].send_signal(signal.SIGTERM)
            self.assertEqual(workers[host.hostname].wait(timeout=60), 0)
        after = self.enqueue("true")
        self.wait_state(after, "completed", timeout=60)
        self.assertEqual(self.ok_json("show", after)["runs"][0]["host"],
                         cut_host.hostname)
        survivor = workers[cut_host.hostname]
        self.assertIsNone(survivor.poll(), _read(cut_log))
        survivor.send_signal(signal.SIGTERM)
        self.assertEqual(survivor.wait(timeout=60), 0, _read(cut_log))
        self.assertEqual(_overlaps(events), [], "%s\n%s" % (
            [h.hostname for h in hosts], _read(events)) + "".join(
                "\n== %s\n%s" % (h.hostname, _read(os.path.join(
                    self.dir, "%s.log" % h.hostname))) for h in hosts))
        self.assertEqual(_processes_with("sleep " + marker), [])

    def test_a_graceful_stop_during_an_outage_ends_an_idle_worker(self):
        # `systemctl stop` of an idle worker cut off from its server: it
        # holds no result and no claim, so it ends (exit 0) instead of
        # waiting for a server that may not come back.
        host = _start_hosts(self, 1)[0]
        worker = self.start_on(host, "--count", "2")
        self.wait_for(lambda: self.ok_json("status")["workers"], 60,
                      what="the worker to register")
        host.cut()
        self.wait_for(lambda: "database unavailable" in _read(
            worker.log.name), 120, what="the worker to see the outage")
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(timeout=180), 0, _read(worker.log.name))
        host.restore()

    def test_cancel_and_follow_across_hosts(self):
        # logs --follow on one host prints the output of a job running on
        # another as it comes; cancel from that host makes the worker on
        # the other kill the job; the follow ends with exit 1 (dead).
        hosts = _start_hosts(self, 2)
        runner, controller = hosts
        self.start_on(runner, "--count", "1")
        job_id = self.enqueue("echo from-$(hostname); " + self.hold(),
                              "--max-retries", "3")
        self.wait_started()
        follow = controller.popen(
            [sys.executable, SCRIPT, "--db", controller.pg_url(self.db),
             "logs", job_id, "--follow"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env, cwd=self.dir)
        self.procs.append(follow)
        first = follow.stdout.readline().decode()
        self.assertIn("--- attempt 1 (worker ", first)
        self.assertIn(" on %s) ---" % runner.hostname, first)
        self.assertEqual(follow.stdout.readline().decode(),
                         "from-%s\n" % runner.hostname)
        code, out = controller.run([sys.executable, SCRIPT, "--db",
                                    controller.pg_url(self.db), "cancel",
                                    job_id], env=self.env, cwd=self.dir)
        self.assertEqual((code, out.split()[:2]), (0, [job_id, "stopping:"]),
                         out)
        self.assertEqual(follow.wait(timeout=60), 1)
        job = self.job(job_id)
        self.assertEqual((job["state"], job["last_error"]),
                         ("dead", "cancelled"))
        self.assertEqual([(r["host"], r["error"]) for r in job["runs"]],
                         [(runner.hostname, "cancelled")])


def _overlaps(path):
    """Pairs of runs of one job that were alive at the same time, from a log
    of 'start|term|end JOB ATTEMPT HOST TIME' lines."""
    runs = {}
    with open(path) as handle:
        for line in handle:
            event, job, attempt, host, stamp = line.split()
            span = runs.setdefault((job, attempt), [None, None, host])
            if event == "start":
                span[0] = float(stamp)
            else:
                span[1] = float(stamp)
    found = []
    by_job = {}
    for (job, attempt), (start, end, host) in runs.items():
        by_job.setdefault(job, []).append((start, end or float("inf"),
                                           attempt, host))
    for job, spans in by_job.items():
        spans.sort()
        for (s1, e1, a1, h1), (s2, e2, a2, h2) in zip(spans, spans[1:]):
            if s2 < e1:
                found.append((job, a1, h1, a2, h2))
    return found


class TestCron(unittest.TestCase):
    """next_tick in-process, in a fixed time zone set through the
    environment (time.tzset), never by changing the machine's clock."""

    def setUp(self):
        saved = os.environ.get("TZ")

        def restore():
            if saved is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = saved
            time.tzset()
        self.addCleanup(restore)
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()

    def local(self, *fields):
        return time.mktime(fields + (0,) * (6 - len(fields)) + (0, 0, -1))

    def ticks(self, expr, start, count):
        found, t = [], start
        for _ in range(count):
            t = queuectl.next_tick(expr, t)
            found.append(time.strftime("%m-%d %H:%M %Z", time.localtime(t)))
        return found

    def test_daily_job_runs_once_on_both_daylight_saving_days(self):
        # 02:30 does not exist on 2026-03-29 (runs once at 03:00 CEST) and
        # happens twice on 2026-10-25 (runs once, the first time).
        self.assertEqual(self.ticks("30 2 * * *", self.local(2026, 3, 28, 12),
                                    3),
                         ["03-29 03:00 CEST", "03-30 02:30 CEST",
                          "03-31 02:30 CEST"])
        self.assertEqual(self.ticks("30 2 * * *", self.local(2026, 10, 24, 12),
                                    3),
                         ["10-25 02:30 CEST", "10-26 02:30 CET",
                          "10-27 02:30 CET"])
        # Ticks 24 h of wall clock apart are 23 h and 25 h apart in real time.
        spring = [queuectl.next_tick("0 12 * * *", self.local(2026, 3, d))
                  for d in (28, 29)]
        self.assertEqual(spring[1] - spring[0], 23 * 3600)
        # Computing from inside the repeated hour does not run it again.
        after_first = queuectl.next_tick("30 2 * * *",
                                         self.local(2026, 10, 24, 12))
        for later in (1, 1800, 3600 + 60):
            again = queuectl.next_tick("30 2 * * *", after_first + later)
            self.assertEqual(again - after_first, 24 * 3600 + 3600)

    def test_a_day_the_zone_skipped_runs_its_ticks_once_after_it(self):
        # Samoa skipped 2011-12-30 whole (UTC-10 to UTC+14), where mktime
        # has no answer: that day's ticks run once, at the first minute of
        # the next day, like a time skipped by daylight saving.
        os.environ["TZ"] = "Pacific/Apia"
        time.tzset()
        start = self.local(2011, 12, 29, 12)
        self.assertEqual(time.strftime("%Z", time.localtime(start)), "-10",
                         "no tzdata for Pacific/Apia")
        self.assertEqual(self.ticks("0 12 * * *", start, 3),
                         ["12-31 00:00 +14", "12-31 12:00 +14",
                          "01-01 12:00 +14"])
        self.assertEqual(self.ticks("59 23 * * *", start, 3),
                         ["12-29 23:59 -10", "12-31 00:00 +14",
                          "12-31 23:59 +14"])

    def test_fields_lists_ranges_steps_names_and_shortcuts(self):
        # Every standard form of a field, and the @ shortcuts.
        start = self.local(2026, 11, 26, 10, 7)  # a Thursday
        self.assertEqual(self.ticks("*/15 * * * *", start, 3),
                         ["11-26 10:15 CET", "11-26 10:30 CET",
                          "11-26 10:45 CET"])
        self.assertEqual(self.ticks("0 9-10,17 * * mon-fri", start, 4),
                         ["11-26 17:00 CET", "11-27 09:00 CET",
                          "11-27 10:00 CET", "11-27 17:00 CET"])
        self.assertEqual(self.ticks("0 0 1 jan,JUL *", start, 2),
                         ["01-01 00:00 CET", "07-01 00:00 CEST"])
        self.assertEqual(self.ticks("5 4 * * 7", start, 1),
                         ["11-29 04:05 CET"])  # 7 is Sunday too
        for shortcut, expected in (
                ("@hourly", "11-26 11:00 CET"), ("@daily", "11-27 00:00 CET"),
                ("@midnight", "11-27 00:00 CET"),
                ("@weekly", "11-29 00:00 CET"),
                ("@monthly", "12-01 00:00 CET"),
                ("@yearly", "01-01 00:00 CET"),
                ("@annually", "01-01 00:00 CET")):
            self.assertEqual(self.ticks(shortcut, start, 1), [expected])
        # Strictly after: a tick at `after` itself is not the next one.
        self.assertEqual(self.ticks("0 11 * * *", self.local(2026, 11, 26, 11),
                                    1), ["11-27 11:00 CET"])

    def test_day_of_month_or_day_of_week_when_both_are_restricted(self):
        # Cron's rule: both restricted -> either matches; one a `*` -> both.
        start = self.local(2026, 11, 26, 12)
        self.assertEqual(self.ticks("0 0 1 * fri", start, 3),
                         ["11-27 00:00 CET", "12-01 00:00 CET",
                          "12-04 00:00 CET"])
        self.assertEqual(self.ticks("0 0 */1 * fri", start, 2),
                         ["11-27 00:00 CET", "12-04 00:00 CET"])
        self.assertIsNone(queuectl.next_tick("0 0 31 2 *", start))

    def test_bad_expressions_name_the_field(self):
        # Each wrong field is named; nothing else is accepted silently.
        for expr, message in (
                ("61 * * * *", "minute: 61 is out of range 0-59"),
                ("* 24 * * *", "hour: 24 is out of range 0-23"),
                ("* * 0 * *", "day of month: 0 is out of range 1-31"),
                ("* * * 13 *", "month: 13 is out of range 1-12"),
                ("* * * * 8", "day of week: 8 is out of range 0-7"),
                ("*/0 * * * *", "minute: step \"0\" must be"),
                ("* * * * mon/x", "day of week: step \"x\" must be"),
                ("5-1 * * * *", "minute: range \"5-1\" runs backwards"),
                ("* * * foo *", "month: \"foo\" is not a number or a name"),
                ("1,,2 * * * *", "minute: \"\" is not a number"),
                ("* * *", "has 3 field(s); give five"),
                ("* * * * * *", "has 6 field(s)"),
                ("@often", "unknown shortcut"),
                # Past Python 3.7+'s 4,300 digits int() would refuse.
                ("9" * 5000 + " * * * *", "minute: %s... is out of range"
                                          % ("9" * 37)),
                ("1-%s * * * *" % ("9" * 5000), "is out of range 0-59"),
                ("0060 * * * *", "minute: 0060 is out of range 0-59")):
            with self.assertRaises(queuectl.InvalidInput) as caught:
                queuectl.next_tick(expr, 0)
            self.assertIn(message, str(caught.exception), expr)

    def test_every_skips_missed_ticks_instead_of_bursting(self):
        # An interval schedule stays on its grid; missed ticks become one.
        self.assertEqual(queuectl._every_next(60, 1000, 1000), 1060)
        self.assertEqual(queuectl._every_next(60, 1000, 1000 + 60 * 10 + 5),
                         1000 + 60 * 11)
        self.assertEqual(queuectl._every_next(60, 1000, 900), 1000)


class TestSchedules(CLITestCase):

    def schedule(self, name):
        return [s for s in self.ok_json("schedule", "list")
                if s["name"] == name][0]

    def log(self, worker):
        with open(worker.log.name) as handle:
            return handle.read()

    def make_due(self, name, when):
        self.sql("UPDATE schedules SET next_run = ? WHERE name = ?",
                 when, name)

    def test_add_list_run_remove(self):
        # The four commands, their --json, and job flags that flow into jobs.
        # Tabs and runs of spaces are stored as one space (the table).
        out = self.ok("schedule", "add", "nightly", " 30\t2  * * *\n",
                      "echo hi", "--timeout", "60", "--max-retries", "1",
                      "--env", "A=b", env={"TZ": "Europe/Berlin"})
        self.assertRegex(out, r"^nightly: next run \d{4}-\d\d-\d\d 02:30:00"
                         r" CES?T\n$")
        added = self.ok_json("schedule", "add", "poll", "--every", "10m",
                             "--overlap",
                             '{"command": "echo poll", "priority": 3}')
        self.assertEqual((added["cron"], added["every"], added["overlap"]),
                         (None, 600.0, True))
        self.assertEqual(added["job"], {"command": "echo poll", "priority": 3,
                                        "cwd": os.path.realpath(self.dir)})
        listed = self.ok_json("schedule", "list")
        self.assertEqual([s["name"] for s in listed], ["nightly", "poll"])
        nightly = listed[0]
        self.assertEqual(nightly["job"]["env"], {"A": "b"})
        self.assertEqual((nightly["cron"], nightly["last_job"]),
                         ("30 2 * * *", None))
        self.assertGreater(queuectl.parse_time(nightly["next_run"]),
                           time.time())
        table = self.ok("schedule", "list")
        self.assertIn("every 10m", table)
        self.assertIn("30 2 * * *", table)
        job_id = self.ok("schedule", "run", "nightly").strip()
        self.assertTrue(job_id.startswith("nightly:run-"), job_id)
        job = self.job(job_id)
        self.assertEqual((job["command"], job["timeout"], job["max_retries"],
                          job["state"]), ("echo hi", 60.0, 1, "pending"))
        after = self.schedule("nightly")
        self.assertEqual((after["last_job"], after["last_job_state"],
                          after["next_run"]),
                         (job_id, "pending", nightly["next_run"]))
        ran = self.ok_json("schedule", "run", "poll")
        self.assertEqual((ran["command"], ran["priority"]), ("echo poll", 3))
        self.assertEqual(self.ok("schedule", "remove", "poll"),
                         "removed schedule poll (its jobs stay)\n")
        self.assertEqual(self.state(ran["id"]), "pending")
        self.assertEqual([s["name"] for s in self.ok_json("schedule", "list")],
                         ["nightly"])
        self.ok("schedule", "remove", "nightly")
        self.assertIn("no schedules", self.ok("schedule", "list"))
        self.assertEqual(self.sql("SELECT value FROM config WHERE key ="
                                  " '_schedules'"), [("0",)])

    def test_bad_input_changes_nothing(self):
        # Exit 2 naming what is wrong, exit 1 for a refused change; no
        # change to the data either way.
        self.ok("schedule", "add", "taken", "@daily", "true")
        for code, message, args in (
                (2, "cron: minute: 61 is out of range 0-59",
                 ("61 * * * *", "true")),
                (2, "cron: \"* * *\" has 3 field(s)", ("* * *", "true")),
                (2, "cron: minute: step \"0\" must be", ("*/0 * * * *",
                                                         "true")),
                (2, "cron: day of week: 8 is out of range",
                 ("0 0 * * 8", "true")),
                (2, "never happens", ("0 0 30 feb *", "true")),
                (2, "needs NAME 'CRON' COMMAND", ("@daily",)),
                (2, "with --every, give NAME COMMAND", ("--every", "1h",
                                                        "@daily", "true")),
                (2, "--every: not a duration", ("--every", "soon", "true")),
                (2, "--every must be at least 1s", ("--every", "0", "true")),
                (2, "cannot set id", ("@daily", "true", "--id", "x")),
                (2, "cannot set run-at", ("@daily", "true", "--run-at",
                                          "2030-01-01T00:00:00Z")),
                (2, "cannot set after", ("@daily", "true", "--after", "x")),
                (2, "cannot set id", ("@daily", '{"command": "x", "id": "y"}')),
                (2, "unknown field 'bogus'", ("@daily",
                                              '{"command": "x", "bogus": 1}')),
                (2, "max_retries must be", ("@daily", "true",
                                            "--max-retries", "-1")),
                (2, "not -f", ("@daily", "true", "-f", "jobs.json"))):
            self.expect_failure(code, message, "schedule", "add", "new", *args)
        self.expect_failure(2, "a schedule name is 1 to 100", "schedule",
                            "add", "bad name", "@daily", "true")
        self.expect_failure(2, "a schedule name is 1 to 100", "schedule",
                            "add", "x" * 101, "@daily", "true")
        self.expect_failure(1, "a schedule named 'taken' already exists",
                            "schedule", "add", "taken", "@hourly", "true")
        for action in ("remove", "run"):
            self.expect_failure(1, "no schedule named 'nope'", "schedule",
                                action, "nope")
            self.expect_failure(2, "a schedule name is", "schedule", action,
                                "no/pe")
        self.expect_failure(2, "invalid choice", "schedule", "edit", "taken")

    def test_each_tick_is_enqueued_once_by_many_worker_processes(self):
        # Three worker processes of three threads race for every tick; each
        # tick makes exactly one job, and ticks missed while no worker ran
        # make one job, not a burst.
        self.ok("schedule", "add", "tick", "--every", "1h", "true")
        workers = [self.start_worker("--count", "3") for _ in range(3)]
        base = int(time.time()) - 10 * 3600
        expected = []
        for round_ in range(6):
            tick = base + round_ * 60
            expected.append("tick:" + time.strftime(
                "%Y%m%dT%H%M%SZ", time.gmtime(tick)))
            self.make_due("tick", tick)
            try:
                self.wait_for(lambda: self.sql(
                    "SELECT j.state FROM schedules s JOIN jobs j ON j.id ="
                    " s.last_job WHERE s.last_job = ?", expected[-1])
                    == [("completed",)], timeout=120,
                    what="tick %d to run" % round_)
            except AssertionError as exc:
                raise AssertionError("%s; schedule %s; worker logs:\n%s" % (
                    exc, self.schedule("tick"),
                    "".join(self.log(w) for w in workers)))
        made = [r[0] for r in self.sql("SELECT id FROM jobs ORDER BY seq")]
        self.assertEqual(made, expected)
        # Back on its grid (10 h missed: one job), the next tick is ahead.
        next_run = queuectl.parse_time(self.schedule("tick")["next_run"])
        self.assertGreater(next_run, time.time())
        self.assertEqual((next_run - (base + 5 * 60)) % 3600, 0)
        for worker in workers:
            worker.terminate()
            self.assertEqual(worker.wait(60), 0)
        logs = "".join(self.log(w) for w in workers)
        self.assertEqual(logs.count(" enqueued"), 6, logs)

    def test_exit_when_idle_runs_the_ticks_due_when_it_starts(self):
        # A cron line of `worker start --exit-when-idle` runs what is due,
        # ticks included, every time: none is left pending or unfired.
        self.ok("schedule", "add", "tick", "--every", "1h", "echo ran")
        base = int(time.time()) - 10 * 3600
        for round_ in range(3):
            self.make_due("tick", base + round_ * 60)
            code, out, err = self.cli("worker", "start", "--exit-when-idle")
            self.assertEqual(code, 0, err)
            self.assertIn(" enqueued", err)
            self.assertEqual(
                self.sql("SELECT state, COUNT(*) FROM jobs GROUP BY state"),
                [("completed", round_ + 1)], err)

    def test_a_tick_is_skipped_while_the_previous_job_runs(self):
        # Without --overlap a due tick is skipped and logged while the last
        # job is unfinished; with --overlap it is enqueued anyway.
        self.ok("schedule", "add", "slow", "--every", "1h", self.hold("slow"))
        self.ok("schedule", "add", "both", "--every", "1h", "--overlap",
                self.hold("both"))
        worker = self.start_worker("--count", "4")
        now = int(time.time())
        self.make_due("slow", now - 100)
        self.make_due("both", now - 100)
        self.wait_started("slow")
        self.wait_started("both")
        self.make_due("slow", now - 50)
        self.make_due("both", now - 50)
        self.wait_for(lambda: re.search(r"slow: tick \S+ skipped: the previous"
                                   r" job is still processing",
                                   self.log(worker)),
                 what="the skip in the log")
        self.wait_for(lambda: len(self.sql("SELECT id FROM jobs WHERE id LIKE"
                                      " 'both:%'")) == 2,
                 what="the overlapping tick")
        self.assertEqual(len(self.sql("SELECT id FROM jobs WHERE id LIKE"
                                      " 'slow:%'")), 1)
        self.assertGreater(queuectl.parse_time(
            self.schedule("slow")["next_run"]), time.time())
        self.release("slow")
        self.release("both")
        worker.terminate()
        self.assertEqual(worker.wait(60), 0)

    def test_a_stale_attempt_at_a_tick_is_a_no_op(self):
        # The database decides: a worker that saw the tick due but comes
        # second (its compare-and-set fails) enqueues nothing.
        self.ok("schedule", "add", "once", "--every", "1h", "true")
        self.make_due("once", int(time.time()) - 5)
        first, second = queuectl.Queue(self.db), queuectl.Queue(self.db)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        stale = second.store.schedules("once")[0]
        events = first.store.fire_schedules(first.now())
        self.assertEqual(len(events), 1)
        self.assertIn("enqueued", events[0][3])
        with second.store.write():
            self.assertIsNone(second.store._fire(stale, second.now()))
        self.assertEqual(len(self.sql("SELECT id FROM jobs")), 1)
        self.assertEqual(first.store.fire_schedules(first.now()), [])

    def test_a_schedule_keeps_its_jobs_unique_key_and_queue(self):
        # A schedule's template may name a queue and a unique key: while
        # its job waits, running the schedule again makes no job and
        # prints the waiting one's id, as `enqueue --unique` does.
        self.ok("schedule", "add", "s", "--every", "1h", "true", "--queue",
                "q", "--unique", "k")
        first = self.ok("schedule", "run", "s").strip()
        self.assertEqual(self.ok("schedule", "run", "s").strip(), first)
        self.assertEqual(self.job(first)["queue"], "q")
        self.assertEqual(self.sql("SELECT COUNT(*) FROM jobs"), [(1,)])
        self.assertEqual(self.ok_json("schedule", "list")[0]["last_job"],
                         first)
        self.drain()
        self.assertNotEqual(self.ok("schedule", "run", "s").strip(), first)

    def test_copy_carries_schedules(self):
        # `copy --to` moves schedules with the jobs (here into SQLite).
        self.ok("schedule", "add", "nightly", "30 2 * * *", "echo hi")
        job_id = self.ok("schedule", "run", "nightly").strip()
        target = os.path.join(self.dir, "copy.db")
        self.ok("copy", "--to", target)
        copied = self.ok_json("schedule", "list", db=target)
        self.assertEqual(copied, self.ok_json("schedule", "list"))
        self.assertEqual(copied[0]["last_job"], job_id)

    def test_an_idle_pool_without_schedules_reads_nothing_more(self):
        # Due ticks are looked for only while schedules exist (the pool's
        # config read says how many), at most once a second.
        calls = []
        original = queuectl._SQLStore.schedules_due

        def counted(store, now):
            calls.append(now)
            return original(store, now)
        queuectl._SQLStore.schedules_due = counted
        self.addCleanup(setattr, queuectl._SQLStore, "schedules_due",
                        original)
        import threading
        self.ok("status")  # the database exists before the pool starts
        pool = queuectl.WorkerPool(self.db, log=False)
        thread = threading.Thread(target=pool.run)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(pool.stop)
        self.wait_for(lambda: self.beats(os.getpid()) >= 3,
                 what="three beats of the pool")
        self.assertEqual(calls, [])
        self.ok("schedule", "add", "later", "@yearly", "true")
        self.wait_for(lambda: len(calls) >= 2, what="the pool to look for ticks")
        seen = self.beats(os.getpid())
        self.wait_for(lambda: self.beats(os.getpid()) >= seen + 4,
                 what="four more beats")
        pool.stop()
        thread.join()
        span = calls[-1] - calls[0]
        self.assertLessEqual(len(calls) - 1, span / 0.9 + 1, calls)


# The backend-independent tests, again on PostgreSQL (QUEUECTL_TEST_PG).
if PG_URL:
    for _base in (TestEnqueue, TestBadInput, TestLifecycle, TestOutput,
                  TestWorkers, TestScripting, TestFaults, TestHeldPromises,
                  TestStats, TestDashboard, TestControl, TestQueues,
                  TestSchedules):
        _name = _base.__name__ + "OnPostgres"
        globals()[_name] = type(_name, (_base,), {"STORE": "postgresql"})
    del _base, _name



# ---------------------------------------------------------------------------
# Many hosts on one machine, for SPEC 9's multi-host test.
#
# _Hosts(n) makes n "hosts": network namespaces, each joined to this machine
# by its own veth pair. Host i gets a /30 of 10.213.X.0/24 (X drawn at
# random): this machine's end of the pair is host.gateway = 10.213.X.(4i+1),
# the namespace's end (named eth0 inside) is host.address = 10.213.X.(4i+2).
# These addresses exist only inside this machine, only while the hosts live.
# A host reaches this machine, and so a PostgreSQL server listening on '*',
# through its own gateway only: give each host host.pg_url(url). .ci/run's
# pg_hba.conf admits 10.213.0.0/16 (keep _HOSTS_NET in step with it).
# host.popen() runs a command inside the namespace under its own hostname
# (host.hostname, through `unshare --uts`); host.cut() takes the link down
# (packets are dropped, as on a partitioned network: no reset is sent) and
# host.restore() brings it back. Closing kills every process in the
# namespaces and deletes links and namespaces, even after a failure; a crash
# that skips that is swept by the next _Hosts that draws the same X.
# Needs root; _start_hosts() turns "cannot" into a skip with the reason, or a
# failure where $QUEUECTL_TEST_HOSTS=required (CI, which runs as root).

_HOSTS_NET = "10.213"


class _HostsUnavailable(Exception):
    """Network namespaces cannot be made here; the message says why."""


def _ip(*args):
    """Run `ip ARGS...`; its output, or _HostsUnavailable with its error."""
    try:
        proc = subprocess.Popen(("ip",) + args, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                universal_newlines=True)
    except OSError as exc:
        raise _HostsUnavailable("cannot run ip (iproute2): %s" % exc)
    out, err = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise _HostsUnavailable("`ip %s` failed: %s"
                                % (" ".join(args), err.strip()))
    return out


def _pg_url_via(url, address):
    """url (postgresql://user[:pw]@host[:port]/db?...) with its host replaced
    by address: how a host in a namespace reaches the same server."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    netloc = address if parts.port is None else "%s:%d" % (address, parts.port)
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query,
                       parts.fragment))


class _Host(object):
    """One host made by _Hosts (see the comment above _HOSTS_NET)."""

    def __init__(self, netns, link, address, gateway):
        self.name = netns           # the network namespace
        self.hostname = netns       # what `hostname` says inside
        self.link = link            # this machine's end of the veth pair
        self.address = address      # the namespace's end (source of its TCP)
        self.gateway = gateway      # this machine, as this host reaches it
        self._procs = []

    def __repr__(self):
        return "<host %s %s>" % (self.name, self.address)

    def pg_url(self, url):
        """The PostgreSQL URL url as seen from this host."""
        return _pg_url_via(url, self.gateway)

    def popen(self, argv, **kw):
        """subprocess.Popen(argv) inside this host, with its own hostname, in
        a new session (so os.killpg(p.pid, ...) reaches its children).
        `ip netns exec`, `unshare` and `sh` each exec the next, so p.pid is
        argv's own process."""
        kw.setdefault("start_new_session", True)
        wrapper = ["ip", "netns", "exec", self.name, "unshare", "--uts",
                   "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname]
        proc = subprocess.Popen(wrapper + list(argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv, timeout=60, **kw):
        """Run argv inside this host; (exit code, stdout + stderr as text)."""
        proc = self.popen(argv, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          **kw)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, _ = proc.communicate()
            return None, out
        return proc.returncode, out

    def cut(self):
        """Partition this host: this machine's end of its link goes down."""
        _ip("link", "set", self.link, "down")

    def restore(self):
        """Bring this host's link back up (its addresses stay as they were)."""
        _ip("link", "set", self.link, "up")


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _alive(pid):
    """pid runs (a zombie, which nobody may reap in a container, does not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (IOError, OSError, IndexError):
        return False


class _Hosts(object):
    """n hosts on this machine (see the comment above _HOSTS_NET); iterable
    and indexable. `with _Hosts(3) as hosts:` or open() and close()."""

    def __init__(self, n):
        assert 1 <= n <= 63, "one /30 per host in a /24"
        self.n = n
        self.hosts = []
        self.subnet = None
        self._lock = None

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i):
        return self.hosts[i]

    def __len__(self):
        return len(self.hosts)

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise _HostsUnavailable("network namespaces need root")
        try:
            x = self._claim_subnet()
            token = os.urandom(2).hex()
            for i in range(self.n):
                netns = "qc-%d-%s-%d" % (x, token, i + 1)
                link = "qh-%d-%s-%d" % (x, token, i + 1)     # <= 15 chars
                host = _Host(netns, link, "%s.%d.%d" % (_HOSTS_NET, x, 4 * i + 2),
                             "%s.%d.%d" % (_HOSTS_NET, x, 4 * i + 1))
                _ip("netns", "add", netns)
                self.hosts.append(host)
                _ip("link", "add", link, "type", "veth",
                    "peer", "name", "eth0", "netns", netns)
                _ip("addr", "add", host.gateway + "/30", "dev", link)
                _ip("link", "set", link, "up")
                for args in (("addr", "add", host.address + "/30", "dev", "eth0"),
                             ("link", "set", "lo", "up"),
                             ("link", "set", "eth0", "up")):
                    _ip("-n", netns, *args)
            # unshare --uts and hostname work in there (seen once, not per host).
            rc, out = self.hosts[0].run(["hostname"], timeout=30)
            if rc != 0 or out.strip() != self.hosts[0].hostname:
                raise _HostsUnavailable("`unshare --uts` in a namespace gave "
                                        "exit %s: %s" % (rc, out.strip()))
        except BaseException:
            self.close()
            raise
        return self

    def _claim_subnet(self):
        """Draw X for 10.213.X.0/24 that no other live _Hosts holds (a lock
        file held with flock for our lifetime; released if we crash) and that
        no address of this machine is in; sweep what a crashed holder of the
        same X left behind."""
        import fcntl
        import random
        folder = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
        for x in random.sample(range(1, 255), 254):
            fd = os.open(os.path.join(folder, "queuectl-hosts-%s.%d.lock"
                                      % (_HOSTS_NET, x)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lock = fd
            self._sweep("qc-%d-" % x, "qh-%d-" % x)
            prefix = "%s.%d." % (_HOSTS_NET, x)
            if " inet " + prefix not in _ip("-4", "-o", "addr", "show"):
                self.subnet = "%s0/24" % prefix
                return x
            self._lock = None
            os.close(fd)
        raise _HostsUnavailable("no free %s.X.0/24 for network namespaces"
                                % _HOSTS_NET)

    @staticmethod
    def _sweep(netns_prefix, link_prefix):
        """Delete namespaces and links of ours (by name prefix) that outlived
        their process."""
        for line in _ip("netns", "list").splitlines():
            name = line.split(" ")[0]
            if name.startswith(netns_prefix):
                _Hosts._remove(name, None)
        for line in _ip("-o", "link", "show").splitlines():
            fields = line.split(": ")
            name = fields[1].split("@")[0] if len(fields) > 1 else ""
            if name.startswith(link_prefix):
                _Hosts._remove(None, name)

    @staticmethod
    def _remove(netns, link):
        """Kill every process in netns, delete link and netns; never raises."""
        if netns:
            try:
                for pid in _ip("netns", "pids", netns).split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
            except _HostsUnavailable:
                pass
        for args in (("link", "del", link) if link else None,
                     ("netns", "del", netns) if netns else None):
            if args:
                try:
                    _ip(*args)
                except _HostsUnavailable:
                    pass

    def close(self):
        """Kill what runs in the hosts, delete their links and namespaces."""
        for host in self.hosts:
            for proc in host._procs:
                if proc.poll() is None:
                    _kill_group(proc.pid)
        for host in self.hosts:
            self._remove(host.name, host.link)
            for proc in host._procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream:
                        stream.close()
        self.hosts = []
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _start_hosts(testcase, n):
    """_Hosts(n), open until testcase ends. Where namespaces cannot be made,
    skips testcase with the reason, or fails it if $QUEUECTL_TEST_HOSTS is
    `required` (as .ci/run sets it)."""
    hosts = _Hosts(n)
    try:
        hosts.open()
    except _HostsUnavailable as exc:
        if os.environ.get("QUEUECTL_TEST_HOSTS") == "required":
            testcase.fail("QUEUECTL_TEST_HOSTS=required but cannot make "
                          "network namespaces: %s" % exc)
        testcase.skipTest("cannot make network namespaces: %s" % exc)
    testcase.addCleanup(hosts.close)
    return hosts


# Run inside a host: connect to argv[1], print hostname, the client and the
# server address PostgreSQL saw.
_PG_PROBE = r"""
import socket, sys
try:
    import psycopg as driver
except ImportError:
    import psycopg2 as driver
conn = driver.connect(sys.argv[1], connect_timeout=int(sys.argv[2]))
cur = conn.cursor()
cur.execute("SELECT host(inet_client_addr()), host(inet_server_addr())")
print(socket.gethostname(), *cur.fetchone())
conn.close()
"""


class TestHostsHarness(unittest.TestCase):
    """The harness of the multi-host test: hosts with their own hostnames
    reach PostgreSQL over their links, a cut link stops them, and nothing is
    left behind."""

    def test_namespaces_reach_postgres(self):
        url = os.environ.get("QUEUECTL_TEST_PG")
        if not url:
            self.skipTest("QUEUECTL_TEST_PG is not set")
        for name in ("psycopg", "psycopg2"):
            try:
                __import__(name)
                break
            except ImportError:
                pass
        else:
            self.skipTest("QUEUECTL_TEST_PG is set but neither psycopg nor "
                          "psycopg2 is importable")
        hosts = _start_hosts(self, 2)

        def probe(host, timeout=5):
            return host.run([sys.executable, "-c", _PG_PROBE,
                             host.pg_url(url), str(timeout)], cwd=HERE)

        for host in hosts:
            rc, out = probe(host)
            self.assertEqual(rc, 0, out)
            self.assertEqual(out.split(), [host.hostname, host.address,
                                           host.gateway], out)
        self.assertNotEqual(hosts[0].hostname, hosts[1].hostname)

        # A cut link stops that host only; restored, it connects again.
        hosts[0].cut()
        started = time.monotonic()
        rc, out = probe(hosts[0], timeout=2)
        self.assertNotEqual(rc, 0, "connected over a cut link: " + out)
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(probe(hosts[1])[0], 0)
        hosts[0].restore()
        wait_for(lambda: probe(hosts[0])[0] == 0, timeout=20,
                 what="a connection over the restored link")

    def test_close_leaves_nothing_behind(self):
        hosts = _start_hosts(self, 2)
        sleeper = hosts[1].popen(["sh", "-c", "sleep 600 & sleep 600"])

        def two_pids():
            pids = [int(p) for p in _ip("netns", "pids", hosts[1].name).split()]
            return pids if len(pids) >= 2 else None
        pids = wait_for(two_pids, what="sh's two sleeps in the namespace")
        names = [h.name for h in hosts]
        links = [h.link for h in hosts]
        subnet = hosts.subnet
        hosts.close()
        self.assertIsNotNone(sleeper.poll())
        self.assertEqual([p for p in pids if _alive(p)], [])
        netns = _ip("netns", "list")
        for name in names:
            self.assertNotIn(name, netns)
        all_links = _ip("-o", "link", "show")
        for link in links:
            self.assertNotIn(link + "@", all_links)
        self.assertNotIn(" inet " + subnet[:-len("0/24")],
                         _ip("-4", "-o", "addr", "show"))


def postgres_tests():
    """The tests that need QUEUECTL_TEST_PG, as one suite:
    `python3 -m unittest test_queuectl.postgres_tests`.

    .ci/run runs these in its PostgreSQL steps: the rest of the suite has
    already run, unchanged, under the same interpreters. Without
    QUEUECTL_TEST_PG each of them skips, saying why."""
    classes = [TestDatabaseURLs, TestPostgres, TestManyHosts,
               TestHostsHarness]
    classes += [value for name, value in sorted(globals().items())
                if name.endswith("OnPostgres")]
    loader = unittest.defaultTestLoader
    return unittest.TestSuite(loader.loadTestsFromTestCase(cls)
                              for cls in classes)


if __name__ == "__main__":
    unittest.main()
