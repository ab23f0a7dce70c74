"""Fixtures shared by the tests that need a real server process or a real browser."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# In the frame that answers the sender of a message: taken (empty), or refused (with why).
ACK = "data-key="


def app_settings(**overrides):
    """Settings for an app under Starlette's TestClient, whose requests say Host: testserver."""
    import chat

    return chat.Settings(**{"secret_key": "test-secret", "allowed_hosts": frozenset({"testserver"}), **overrides})


# uvicorn closes a keep-alive connection idle for 5 s. A request sent on it as it closes gets
# "Server disconnected without sending a response": browsers resend it, httpx does not. So a
# test's client drops an idle connection after 2 s, and a slow set-up cannot race the close.
KEEPALIVE = httpx.Limits(keepalive_expiry=2)


def live_client(url: str, **options) -> httpx.Client:
    """An httpx client for a live server, which never reuses a connection the server may close."""
    return httpx.Client(base_url=url, limits=KEEPALIVE, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python chat.py` in a child process, on a free loopback port."""

    def __init__(self, db_path: Path, port: int | None = None, open_files: int | None = None, **env: str) -> None:
        self.db_path = db_path
        self.port = port or free_port()
        self.open_files = open_files  # RLIMIT_NOFILE for the server, like `ulimit -n`
        self.env = {**os.environ, "CHAT_SECRET_KEY": "live-test-secret", "PYTHONUNBUFFERED": "1", **env}
        self.log_path = db_path.with_suffix(f".{self.port}.log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        if self.process is not None:
            self.stop()  # a restart: reap the old process (a test may have killed it) first
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "chat.py"), "--port", str(self.port), "--db", str(self.db_path)],
            cwd=self.db_path.parent, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=self.open_files and (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files,) * 2)),
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)  # not listening yet: poll again, bounded by the deadline
        raise RuntimeError(f"server did not start within 20 s:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        try:
            if self.process.poll() is None:  # a test may have killed it already
                self.process.send_signal(sig)
            return self.process.wait(timeout)
        finally:
            self.log.close()


@pytest.fixture
def live_server(tmp_path):
    server = LiveServer(tmp_path / "chat.db").start()
    yield server
    server.stop()


def chromium_path() -> str | None:
    """Debian's chromium (what CI installs), or None to let Playwright use its own browser."""
    for candidate in (os.environ.get("CHAT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


# Module scope: Playwright's sync API keeps an event loop running while it is open, and
# the real-server tests need asyncio.run() afterwards.
@pytest.fixture(scope="module")
def browser():
    """A headless Chromium. Missing locally: the browser tests skip, saying why.
    Missing where BACKCHAT_REQUIRE_BROWSER=1 (CI sets it): they fail."""
    required = os.environ.get("BACKCHAT_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as missing:
        if required:
            pytest.fail(f"Playwright is not installed: {missing}")
        pytest.skip("Playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=chromium_path(),
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
        except Exception as missing:
            if required:
                pytest.fail(f"no Chromium to drive: {missing}")
            pytest.skip(f"no Chromium found (apt-get install chromium, or `playwright install chromium`): {missing}")
        yield browser
        browser.close()
