"""Load test on loopback: N browser sessions explore the app at once for a bounded time.

The app is started as a user starts it (`python -m nsa_core.cli app --device cpu`) on 127.0.0.1 with
a short disconnected-session TTL, and Debian's Chromium (driven by Playwright, no browser download)
opens N pages in separate contexts, so N independent Streamlit sessions. Each session loops until
the deadline: set the Explorer's "Max tokens" to a length of its own, wait for the run to finish and
read back the "Tokens" metric (a result that does not show, or shows another session's length, is a
lost result); every few steps it visits the Gates page and comes back, and now and then reloads (a
new session replaces the old one). Any exception box or error alert counts as an error.

Server memory is the resident set of the server process tree, sampled every half second:
- cold: the server started, before any session (no model loaded yet);
- baseline: after a warm-up round of the same load (the model, the bounded caches and the allocator's
  pools at their working size, as on a server that has been in use), its sessions closed and expired;
- peak: during the load;
- after: once every session has closed and the TTL has passed.
"Back to baseline" means after - baseline <= max(64 MiB, 10% of baseline).

    python benchmarks/load_test.py --sessions 8 --seconds 60 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from playwright.async_api import async_playwright, expect

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SESSION_TTL_S = 30  # how long the server keeps a disconnected session (Streamlit's default is 120)
TIMEOUT_MS = 180_000  # one step on a busy 2-core machine: 8 sessions share its CPU
# Input lengths the sessions cycle through: more than the trace cache holds (8), so runs keep happening.
LENGTHS = tuple(range(64, 64 + 16 * 12, 16))


@dataclass
class SessionLog:
    index: int
    steps: int = 0  # results asked for
    results: int = 0  # results that showed, with this session's own length
    lost: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log_path: str | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), STREAMLIT_SERVER_DISCONNECTED_SESSION_TTL=str(SESSION_TTL_S))
    # The log file stays open as long as the server writes to it.
    log = open(log_path, "w", encoding="utf-8") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "nsa_core.cli", "app", "--port", str(port), "--address",
                             "127.0.0.1", "--headless", "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the app did not open its port within 120 s")


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants (the launcher runs Streamlit as a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    """Samples the server's RSS every half second and keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.stop.wait(0.5)


async def settle(page) -> None:
    """Wait until the app is connected and its script has finished."""
    await page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']")
    await page.wait_for_timeout(300)
    await page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")


async def page_errors(page) -> list[str]:
    boxes = page.locator("[data-testid='stException'], [data-testid='stAlertContentError']")
    return [(await boxes.nth(i).inner_text())[:300] for i in range(await boxes.count())]


async def wait_for_tokens(page, length: int) -> str | None:
    """Wait until the Tokens metric shows `length`; None when it does, else what it showed at the timeout.

    A rerun may start a moment after the input is committed, so the page is not read at once: the
    result counts as lost only if it never shows.
    """
    value = page.locator("[data-testid='stMetric']").filter(has_text="Tokens").first.locator(
        "[data-testid='stMetricValue']")
    try:
        await expect(value).to_have_text(f"{length:,}", timeout=TIMEOUT_MS)
    except AssertionError:
        return (await value.inner_text()).strip() if await value.count() else "nothing"
    await settle(page)
    return None


async def set_length(page, length: int) -> None:
    box = page.get_by_role("spinbutton", name="Max tokens")
    await box.fill(str(length))
    await box.press("Enter")
    await settle(page)


async def back_on_explorer(page, length: int, log: SessionLog) -> None:
    """After a page switch or a reload the Explorer must show the session's last input again (the input
    panel keeps it across pages; a reload restores it from the URL): otherwise the result is lost."""
    log.steps += 1
    wrong = await wait_for_tokens(page, length)
    if wrong is None:
        log.results += 1
    else:
        log.lost.append(f"back on the Explorer with {length} tokens, saw {wrong!r} after {TIMEOUT_MS // 1000} s")
    log.errors += await page_errors(page)


async def explore(page, url: str, log: SessionLog, deadline: float) -> None:
    """One session's loop: its own lengths, page visits, reloads, until the deadline."""
    await page.goto(f"{url}/?tokens={LENGTHS[log.index % len(LENGTHS)]}")
    await settle(page)
    step = 0
    while time.monotonic() < deadline:
        length = LENGTHS[(log.index * 5 + step) % len(LENGTHS)]
        started = time.monotonic()
        log.steps += 1
        await set_length(page, length)
        wrong = await wait_for_tokens(page, length)
        log.step_seconds.append(time.monotonic() - started)
        if wrong is None:
            log.results += 1
        else:
            log.lost.append(f"asked for {length} tokens, saw {wrong!r} after {TIMEOUT_MS // 1000} s")
        log.errors += await page_errors(page)
        step += 1
        if step % 3 == 0 and time.monotonic() < deadline:
            await page.get_by_role("link", name="Gates").first.click()
            await page.get_by_role("heading", name="Gates", exact=True).wait_for()
            await settle(page)
            log.errors += await page_errors(page)
            await page.get_by_role("link", name="Explorer").first.click()
            await back_on_explorer(page, length, log)
        if step % 5 == 0 and time.monotonic() < deadline:
            await page.reload()
            await back_on_explorer(page, length, log)


async def run_session(browser, url: str, log: SessionLog, deadline: float) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        await explore(page, url, log, deadline)
    except Exception as err:  # a session that breaks is an error of the run, not of the script
        log.errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    finally:
        await context.close()


async def load(url: str, server_pid: int, warm_logs: list[SessionLog], logs: list[SessionLog], warm_seconds: float,
               seconds: float) -> dict:
    """Cold RSS; a warm-up round of the same load; baseline; the measured round; peak and after."""
    cold = tree_rss(server_pid)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        started = time.monotonic()
        await asyncio.gather(*(run_session(browser, url, log, started + warm_seconds) for log in warm_logs))
        await asyncio.sleep(2 * SESSION_TTL_S)  # the warm-up sessions expire
        baseline = tree_rss(server_pid)
        sampler = Sampler(server_pid)
        sampler.start()
        started = time.monotonic()
        await asyncio.gather(*(run_session(browser, url, log, started + seconds) for log in logs))
        elapsed = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
        await browser.close()
    await asyncio.sleep(2 * SESSION_TTL_S)  # every session expires
    return {"cold": cold, "baseline": baseline, "peak": sampler.peak, "after": tree_rss(server_pid), "elapsed": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="exploration time (a bound, not a target)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of the same load before the baseline")
    parser.add_argument("--json", help="write the summary and per-session logs here")
    parser.add_argument("--server-log", help="write the server's output here")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 32 or not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 600:
        parser.error("--sessions must be in 1..32, --seconds in (0, 600] and --warmup in [0, 600]")
    port = free_port()
    server = start_server(port, args.server_log)
    url = f"http://127.0.0.1:{port}"
    warm_logs = [SessionLog(i) for i in range(args.sessions)]
    logs = [SessionLog(i) for i in range(args.sessions)]
    try:
        memory = asyncio.run(load(url, server.pid, warm_logs, logs, args.warmup, args.seconds))
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    baseline, after, elapsed = memory["baseline"], memory["after"], memory["elapsed"]
    steps = sum(log.steps for log in logs)
    results = sum(log.results for log in logs)
    errors = sum(len(log.errors) for log in logs + warm_logs)
    lost = sum(len(log.lost) for log in logs + warm_logs)
    durations = sorted(s for log in logs for s in log.step_seconds)
    back = after - baseline <= max(64 << 20, baseline // 10)
    summary = {
        "sessions": args.sessions, "bound_s": args.seconds, "elapsed_s": round(elapsed, 1),
        "warmup_steps": sum(log.steps for log in warm_logs), "steps": steps, "results": results, "lost": lost,
        "errors": errors, "server_alive": alive,
        "step_median_s": round(durations[len(durations) // 2], 2) if durations else None,
        "step_max_s": round(durations[-1], 2) if durations else None,
        "rss_cold_mib": round(memory["cold"] / 2**20, 1), "rss_baseline_mib": round(baseline / 2**20, 1),
        "rss_peak_mib": round(memory["peak"] / 2**20, 1), "rss_after_mib": round(after / 2**20, 1),
        "back_to_baseline": back,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "sessions": [asdict(log) for log in logs]},
                                              indent=1), encoding="utf-8")
    for log in warm_logs + logs:
        for message in log.errors + log.lost:
            print(f"session {log.index}: {message}")
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    every_session_served = all(log.results >= 1 for log in logs)
    ok = errors == 0 and lost == 0 and alive and back and results == steps and every_session_served
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
