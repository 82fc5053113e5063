"""Tests for queuectl: mostly the real CLI in subprocesses on a temp database.

Run: python3 -m unittest -v test_queuectl   (pytest works too)
QUEUECTL_STRESS=N multiplies the sizes of the fault tests for long runs.
"""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

import queuectl

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "queuectl.py")
STRESS = max(1, int(os.environ.get("QUEUECTL_STRESS", "1") or 1))


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


class CLITestCase(unittest.TestCase):
    """Each test gets its own folder, HOME and database."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.db = os.path.join(self.dir, "q.db")
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
        except sqlite3.Error:
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
                    contextlib.redirect_stderr(err):
                code = queuectl.main((["--db", db] if db else []) + list(args))
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def expect_failure(self, code, message, *args, **kwargs):
        """A command that must fail with one error line and no changes.

        Runs in-process unless it needs its own environment."""
        before = self.dump()
        run = self.cli if "env" in kwargs else self.main
        got, out, err = run(*args, **kwargs)
        self.assertEqual(got, code, "queuectl %s: %r" % (args, err))
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("queuectl: error: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(message, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(self.dump(), before, "data changed by failed command")
        return err

    def ok_json(self, *args, **kwargs):
        return json.loads(self.ok(*(args + ("--json",)), **kwargs))

    def enqueue(self, command_or_json, *flags):
        return self.ok("enqueue", command_or_json, *flags).strip()

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

    def spawn(self, *args):
        """queuectl in the background with stdout and stderr piped."""
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--db", self.db] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            cwd=self.dir)
        self.procs.append(proc)
        return proc

    def dump(self):
        """Every row of the database, to prove a failed command changed none."""
        if not os.path.exists(self.db):
            return None
        conn = sqlite3.connect(self.db)
        try:
            return "\n".join(conn.iterdump())
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
        wait_for(lambda: self.state(job_id) == state, timeout,
                 what="job %s to be %s" % (job_id, state))

    def sql(self, query, *params):
        conn = sqlite3.connect(self.db, timeout=30)
        try:
            return conn.execute(query, params).fetchall()
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
        wait_for(lambda: os.path.exists(self.hold_path(name) + ".started"),
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
        wait_for(lambda: _thread_count(worker.pid) < threads,
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

    def test_enqueue_file_is_all_or_nothing(self):
        # One bad line in a file: an error naming it, and no job is added.
        self.enqueue("true")
        lines = '{"command": "true"}\n{"command": "true", "priority": "x"}\n'
        self.expect_failure(2, "job 2: priority must be an integer", "enqueue", "-f", "-",
                  input=lines)

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
            (("enqueue", "true", "--timeout", "nan"), "--timeout must be finite"),
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
            (("dashboard", "--port", "70000"), "--port must be 0-65535"),
            (("wait", "abc123", "--timeout", "-1"), "--timeout must be >= 0"),
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
        self.assertTrue(job["last_error"].startswith(
            "cannot start: cwd /nonexistent/dir"), job["last_error"])

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
        self.assertEqual(set(status), {"counts", "workers", "paused", "db"})
        self.assertEqual(set(status["counts"]), set(queuectl.STATES))
        self.assertEqual(status["db"], self.db)
        self.assertIn("pending", self.ok("status"))

    def test_c_locale_and_control_characters(self):
        # Unicode and control characters print safely under LANG=C.
        job_id = self.enqueue(json.dumps({"command": "echo 'caf\u00e9 \u2603'"
                                                 " # \x1b[31m red"}))
        env = {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}
        for args in (("list",), ("show", job_id), ("status",)):
            out = self.ok(*args, env=env)
            self.assertNotIn("\x1b", out)
        self.assertIn("\\x1b", self.ok("show", job_id, env=env))

    def test_colour_only_on_a_terminal_without_no_color(self):
        # State names are coloured on a TTY; NO_COLOR or a pipe turns it off.
        import pty
        self.enqueue("true")

        def on_tty(env):
            master, slave = pty.openpty()
            proc = subprocess.Popen(
                [sys.executable, SCRIPT, "--db", self.db, "list"],
                stdout=slave, stderr=subprocess.PIPE, env=env)
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
            return b"".join(chunks).decode()
        self.assertIn("\x1b[33mpending", on_tty(self.env))
        self.assertNotIn("\x1b[", on_tty(dict(self.env, NO_COLOR="1")))
        self.assertNotIn("\x1b[", self.ok("list"))

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


class TestWorkers(CLITestCase):

    def test_worker_stop_request_and_status(self):
        # A running worker shows in status with its job; `worker stop
        # --wait` lets the running job finish and returns once it has ended.
        job_id = self.enqueue(self.hold())
        worker = self.start_worker("--count", "2")
        self.wait_started()
        wait_for(lambda: len(self.ok_json("status")["workers"]) == 2,
                 what="workers to register")
        workers = self.ok_json("status")["workers"]
        self.assertEqual(sorted(w["job"] or "" for w in workers), ["", job_id])
        self.assertEqual(workers[0]["pid"], worker.pid)
        stopper = self.spawn("worker", "stop", "--wait")
        wait_for(lambda: self.sql("SELECT 1 FROM config"
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
        pgid = wait_for(lambda: self.pgid(job_id),
                        what="the job's process group to be recorded")
        self.first_signal(worker, threads, signal.SIGINT)
        worker.send_signal(signal.SIGINT)
        self.assertNotEqual(worker.wait(timeout=60), 0)
        job = self.ok_json("show", job_id)
        self.assertEqual((job["state"], job["attempts"], job["runs"]),
                         ("pending", 0, []))
        wait_for(lambda: not queuectl.group_alive(pgid), what="group to die")

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
        code, out, err = self.cli("wait", later, "--timeout", "0.2")
        self.assertEqual(code, 124)
        self.assertIn("timed out after 0.2s", err)
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
        wait_for(lambda: self.beats(worker.pid) >= beat + 2,
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
        pgid = wait_for(lambda: self.pgid(job_id),
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
            wait_for(lambda: len(self.ok_json("status")["workers"]) == 2,
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
        conn = sqlite3.connect(self.db)
        conn.execute("UPDATE workers SET host = 'elsewhere'")
        conn.commit()
        conn.close()
        started = time.monotonic()
        worker = self.start_worker()
        self.wait_state(job_id, "completed")
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        worker.terminate()
        self.assertEqual(worker.wait(timeout=60), 0)
        self._assert_recovered(job_id)

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
        for point in (0.05, 0.3, wal_over(32), wal_over(4 << 20)):
            proc = subprocess.Popen(
                [sys.executable, SCRIPT, "--db", self.db, "enqueue", "-f",
                 path], stdout=subprocess.DEVNULL, env=self.env)
            if callable(point):
                wait_for(lambda: point() or proc.poll() is not None,
                         interval=0.001, what="the enqueue to write")
            else:
                time.sleep(point)
            proc.kill()
            proc.wait()
            conn = sqlite3.connect(self.db)
            try:
                self.assertEqual(conn.execute("PRAGMA integrity_check")
                                 .fetchone()[0], "ok")
                count = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            finally:
                conn.close()
            self.assertIn(count % 100000, (0,), "partial enqueue: %d" % count)

    def test_timeout_kills_background_grandchildren(self):
        # Timeout kills the job's whole group, double-forked children too.
        # (They would sleep past every deadline here.)
        marker = "2718.28"
        job_id = self.enqueue("(sleep %s &); sleep %s & sleep %s; wait"
                              % (marker, marker, marker),
                              "--timeout", "0.5", "--max-retries", "0")
        self.drain()
        self.assertEqual(self.job(job_id)["last_error"], "timed out after 0.5s")
        wait_for(lambda: not _processes_with(marker),
                 what="grandchildren to die")

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
        wait_for(lambda: self.ok_json("status")["counts"]["completed"]
                 == total, 120, what="all jobs to complete")
        self.ok("worker", "stop", "--wait")
        for worker in workers:
            self.assertEqual(worker.wait(timeout=60), 0)
            worker.log.seek(0)
            self.assertNotIn("locked", worker.log.read())

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
        wait_for(lambda: self.beats(other.pid) >= 2,
                 what="the other worker to look for dead workers twice")
        beat = self.beats(os.getpid())
        wait_for(lambda: self.beats(os.getpid()) >= beat + 2,
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

    def test_claim_uses_the_index(self):
        # The claim, status and list queries never scan the jobs table.
        with tempfile.TemporaryDirectory() as folder:
            queue = queuectl.Queue(os.path.join(folder, "q.db"))
            try:
                plans = {
                    "claim": queue.conn.execute(
                        "EXPLAIN QUERY PLAN " + queuectl._CLAIM_SQL, (0, 8)),
                    "list": queue.conn.execute(
                        "EXPLAIN QUERY PLAN SELECT seq FROM jobs WHERE"
                        " state = 'dead' ORDER BY seq LIMIT 5"),
                }
                for name, rows in plans.items():
                    text = " ".join(str(r[-1]) for r in rows)
                    self.assertIn("USING INDEX", text.upper().replace(
                        "COVERING ", ""), name)
                    self.assertNotIn("TEMP B-TREE", text.upper(), name)
            finally:
                queue.close()


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

    def dashboard_free_metrics(self):
        queue = queuectl.Queue(self.db)
        try:
            return queue.metrics()
        finally:
            queue.close()


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
        self.assertIn("unknown state", self.get_json("/api/jobs?state=x", 400)
                      ["error"])
        self.assertIn("no such page", self.get_json("/nope", 404)["error"])

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

    def test_read_only_serves_no_writes(self):
        self.start("--read-only")
        self.assertEqual(self.token(), "")
        code, _, body = self.request("/api/jobs/evil/retry", "POST",
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
        sample = re.compile(r'^([a-z_]+)(\{[a-z]+="[^"\\]*"\})? '
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
        self.assertEqual(values['queuectl_jobs{state="dead"}'], 1)
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


class TestPerformanceStructure(CLITestCase):
    """What keeps queuectl fast, checked by structure, never by timing."""

    def test_enqueue_path_imports_no_worker_modules(self):
        # `enqueue` must not pay for subprocess, threading, sockets...
        # (What argparse itself imports when used, on some versions
        # threading by way of shutil and bz2, does not count.)
        code = ("import sys, sqlite3, json, argparse;"
                " argparse.ArgumentParser().add_argument('--x');"
                " base = set(sys.modules);"
                " sys.path.insert(0, %r); import queuectl;"
                " queuectl.main(['--db', %r, 'enqueue', 'true']);"
                " print(sorted(m for m in ('subprocess', 'threading', 'socket',"
                " 'http.server', 'select', 'signal', 'tempfile')"
                " if m in sys.modules and m not in base))" % (HERE, self.db))
        out = subprocess.check_output([sys.executable, "-S", "-c", code],
                                      env=self.env).decode()
        self.assertEqual(out.splitlines()[-1], "[]")

    def test_bulk_enqueue_is_one_transaction(self):
        # enqueue_many: one BEGIN IMMEDIATE, one COMMIT, whatever the size.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        statements = []
        queue.conn.set_trace_callback(lambda sql: statements.append(sql))
        queue.enqueue_many([{"command": "true"}] * 2000)
        begins = [s for s in statements if s.startswith("BEGIN")]
        commits = [s for s in statements if s == "COMMIT"]
        self.assertEqual((begins, len(commits)), (["BEGIN IMMEDIATE"], 1))
        self.assertEqual(queue.counts()["pending"], 2000)

    def test_hot_queries_use_indexes(self):
        # Claim, list by state, the status counts and a prefix lookup never
        # scan the jobs table or sort it in a temporary B-tree.
        queue = queuectl.Queue(self.db)
        self.addCleanup(queue.close)
        queries = [
            (queuectl._CLAIM_SQL, (0, 8)),
            ("SELECT seq FROM jobs WHERE state = 'dead' ORDER BY seq"
             " LIMIT 5 OFFSET 5", ()),
            ("SELECT state, n FROM counts", ()),
            ("SELECT seq, id FROM jobs WHERE id > ? AND id < ? ORDER BY id"
             " LIMIT 6", ("ab", "ac")),
            ("SELECT j.seq FROM jobs j JOIN attempts a ON a.id = j.attempt_id"
             " WHERE j.state = 'processing'", ()),
        ]
        for sql, args in queries:
            plan = " ".join(str(r[-1]) for r in queue.conn.execute(
                "EXPLAIN QUERY PLAN " + sql, args)).upper()
            self.assertNotIn("TEMP B-TREE", plan, sql)
            self.assertNotRegex(plan, r"SCAN (TABLE )?JOBS(?! USING)", sql)

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


if __name__ == "__main__":
    unittest.main()
