"""Load the dashboard in headless Chromium and check what it rendered.

Standard library only.  Usage: python3 .ci/browser_check.py [SCREENSHOT.png]
Exit 0 when the page shows the expected counts and job ids, renders job
text containing markup as text, and ran no injected code; 1 otherwise;
77 when no Chromium is installed (the caller decides what that means).
"""

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, os.pardir, "queuectl.py")
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def cli(db, *args):
    return subprocess.check_output([sys.executable, SCRIPT, "--db", db]
                                   + list(args)).decode().strip()


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(browser, url, profile, *extra):
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic",
            "--user-data-dir=" + profile, "--virtual-time-budget=8000"]
    return subprocess.run(argv + list(extra) + [url], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)


def main():
    browser = chromium()
    if browser is None:
        print("browser check: no chromium installed")
        return 77
    shot = sys.argv[1] if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as folder:
        db = os.path.join(folder, "q.db")
        cli(db, "config", "set", "backoff-max", "0")
        done = cli(db, "enqueue", "echo rendered-output-ok", "--id", "done-1")
        evil = cli(db, "enqueue", "echo '%s'; exit 3" % HOSTILE,
                   "--max-retries", "0", "--id", "evil-1")
        subprocess.check_call([sys.executable, SCRIPT, "--db", db, "worker",
                               "start", "--exit-when-idle"],
                              stderr=subprocess.DEVNULL)
        waiting = [cli(db, "enqueue", "sleep 1", "--delay", "3600", "--id",
                       "later-%d" % n) for n in range(3)]
        server = subprocess.Popen([sys.executable, SCRIPT, "--db", db,
                                   "dashboard", "--port", "0"],
                                  stdout=subprocess.PIPE)
        try:
            url = server.stdout.readline().decode().split()[2]
            page = browse(browser, url + "#job=" + evil, os.path.join(
                folder, "profile"), "--dump-dom")
            dom = page.stdout.decode("utf-8", "replace")
            # A pending job's panel offers Cancel (a dead one does not).
            pending_dom = browse(browser, url + "#job=" + waiting[0],
                                 os.path.join(folder, "profile3"),
                                 "--dump-dom").stdout.decode("utf-8",
                                                             "replace")
            if shot:
                browse(browser, url + "#job=" + evil, os.path.join(
                    folder, "profile2"), "--screenshot=" + shot,
                    "--window-size=1280,800", "--hide-scrollbars")
        finally:
            server.terminate()
            server.wait()
    problems = []
    expected = ['id="count-completed"><b>1</b>', 'id="count-dead"><b>1</b>',
                'id="count-pending"><b>3</b>', done, evil] + waiting
    for text in expected:
        if text not in dom:
            problems.append("missing from the rendered page: %s" % text)
    escaped = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(
        ">", "&gt;")
    if escaped not in dom:
        problems.append("the hostile output is not shown as text")
    if "<script>alert(1)" in dom or 'onerror="alert' in dom or \
            "<img src=" in dom:
        problems.append("job text was inserted as markup")
    if 'id="output"' not in dom:
        problems.append("the job's detail panel did not render")
    if 'id="retry"' not in dom or 'id="cancel"' in dom:
        problems.append("a dead job's panel must offer Retry, not Cancel")
    if 'id="cancel"' not in pending_dom or 'id="retry"' in pending_dom:
        problems.append("a pending job's panel must offer Cancel, not Retry")
    if shot and (not os.path.exists(shot) or os.path.getsize(shot) < 10000):
        problems.append("no screenshot was written")
    for problem in problems:
        print("browser check: FAILED: " + problem)
    if problems:
        print(dom[:3000])
        return 1
    print("browser check: ok (%d bytes of DOM%s)" % (
        len(dom), ", screenshot %s" % shot if shot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
