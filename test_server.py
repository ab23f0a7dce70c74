"""Backchat as a real process on a real port: restarts, crashes, slow and hostile clients.

Each test starts `python chat.py` (conftest.LiveServer) and talks to it over loopback with
httpx and the `websockets` client, the way browsers and scripts do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import HERE, KEEPALIVE, LiveServer, free_port, live_client

PASSWORD = "password123"


def login_cookie(server: LiveServer, username: str) -> tuple[httpx.Client, str]:
    """Register `username` on the server; return the logged-in client and its Cookie header."""
    client = live_client(server.url)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/auth/register/").text).group(1)
    response = client.post("/auth/register/", data={"csrf_token": token, "username": username,
                                                    "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 303, response.text
    return client, f"session={client.cookies['session']}"


def make_room(client: httpx.Client, name: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)
    response = client.post("/create/", data={"csrf_token": token, "room_name": name})
    return response.headers["location"].split("/")[2]


def ws_connect(server: LiveServer, slug: str, cookie: str, query: str = "", **kwargs):
    return connect(f"ws://127.0.0.1:{server.port}/chat/{slug}/{query}", additional_headers={"Cookie": cookie},
                   origin=server.url, open_timeout=10, **kwargs)


def frame(text: str) -> str:
    return json.dumps({"message": text, "headers": {}})


async def frames_until(ws, needle: str, limit: int = 20) -> str:
    for _ in range(limit):
        received = await asyncio.wait_for(ws.recv(), 10)
        if needle in received:
            return received
    raise AssertionError(f"no frame with {needle!r}")


def stored_messages(server: LiveServer) -> dict[int, str]:
    with sqlite3.connect(server.db_path) as db:
        return dict(db.execute("SELECT id, text FROM messages"))


@pytest.fixture
def server(tmp_path):
    # Many sockets from one user, session and address: the per-user, per-session and
    # per-address caps are off here (test_hostile.py tests them).
    live = LiveServer(tmp_path / "chat.db", CHAT_MESSAGE_RATE="0", CHAT_SOCKETS_PER_USER="0",
                      CHAT_SOCKETS_PER_ADDRESS="0", CHAT_HANDSHAKE_RATE="0").start()
    yield live
    live.stop()


def test_shutdown_closes_sockets_with_a_reconnect_code_and_sessions_survive(tmp_path):
    # No CHAT_SECRET_KEY: the key generated at first start must be reused after the restart.
    first = LiveServer(tmp_path / "chat.db", CHAT_SECRET_KEY="").start()
    client, cookie = login_cookie(first, "ada")
    slug = make_room(client, "restart")

    async def connected_then_shut_down() -> int:
        async with ws_connect(first, slug, cookie) as ws:
            await frames_until(ws, "presence")
            first.process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd.code

    assert asyncio.run(connected_then_shut_down()) == 1012  # htmx reconnects on 1012, not on 1000
    # uvicorn shuts down gracefully, then re-raises the signal, as a well-behaved daemon does.
    assert first.process.wait(10) == -signal.SIGTERM
    first.stop()
    assert "Application shutdown complete" in first.log_path.read_text()

    second = LiveServer(tmp_path / "chat.db", port=first.port, CHAT_SECRET_KEY="").start()
    try:
        assert client.get("/", follow_redirects=False).status_code == 200  # still logged in
    finally:
        second.stop()


def test_sigkill_mid_burst_loses_no_message_anyone_saw(server):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "burst")
    seen: dict[int, str] = {}

    async def burst_then_kill() -> None:
        async with ws_connect(server, slug, cookie, close_timeout=1) as sender, \
                ws_connect(server, slug, cookie, close_timeout=1) as watcher:
            for n in range(400):
                await sender.send(frame(f"burst {n}"))
            while len(seen) < 150:  # kill while the burst is still being stored
                for msg_id, text in re.findall(r'id="msg-(\d+)".*?<div class="body" dir="auto"><p>(.*?)</p>', await watcher.recv(), re.S):
                    seen[int(msg_id)] = text
            server.process.kill()

    asyncio.run(burst_then_kill())
    server.start()  # the same database file, after a crash
    stored = stored_messages(server)
    assert len(stored) < 400, "the kill came too late to test anything"
    assert all(stored.get(msg_id) == text for msg_id, text in seen.items())
    assert list(stored.values()) == [f"burst {n}" for n in range(len(stored))]  # no gaps, no half rows


def stuck_socket(server: LiveServer, slug: str, cookie: str, query: str = "") -> socket.socket:
    """A client that completes the WebSocket handshake and then never reads a byte."""
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", server.port))
    stuck.sendall((f"GET /chat/{slug}/{query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   f"Sec-WebSocket-Version: 13\r\nOrigin: {server.url}\r\nCookie: {cookie}\r\n\r\n").encode())
    return stuck


CLOSE_TOO_SLOW = b"\x88\x0a\x03\xf5too slow"  # a close frame: code 1013, reason "too slow"


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """Everything the socket delivers up to `marker` (or EOF, or 30 s of silence)."""
    sock.settimeout(30)
    received = bytearray()
    while marker not in received and (chunk := sock.recv(65536)):
        received += chunk
    sock.close()
    return bytes(received)


async def count_deliveries(readers, text: str, expected: int) -> list[int]:
    counts = [0] * len(readers)

    async def read(i: int) -> None:
        while counts[i] < expected:  # (the part for screen readers says each message again)
            counts[i] += (await asyncio.wait_for(readers[i].recv(), 20)).split("upsert:#announcer")[0].count(text)

    await asyncio.gather(*(read(i) for i in range(len(readers))))
    return counts


def test_a_reader_that_stops_reading_holds_up_nobody(server):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "slow reader")
    text = "x" * 2000
    stuck = stuck_socket(server, slug, cookie)
    rss_before = server_rss_kib(server)

    async def fan_out() -> list[int]:
        readers = [await ws_connect(server, slug, cookie, max_queue=None).__aenter__() for _ in range(50)]
        async with ws_connect(server, slug, cookie) as sender:
            reading = asyncio.ensure_future(count_deliveries(readers, text, 200))
            for n in range(200):
                await sender.send(frame(f"{n} {text}"))
                await asyncio.sleep(0.05)  # the offered rate: 20 messages/s
            counts = await asyncio.wait_for(reading, 30)
        for reader in readers:
            await reader.close()
        return counts

    assert asyncio.run(fan_out()) == [200] * 50
    growth_mib = (server_rss_kib(server) - rss_before) / 1024
    assert growth_mib < 40, f"server memory grew by {growth_mib:.1f} MiB"
    stuck.close()


def test_a_reader_too_far_behind_is_dropped(server):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "overflow")
    text = "z" * 3900
    total = 1500
    # Teaching mode doubles every frame (each carries its own escaped copy): ~12 MB in all,
    # far more than the kernel's buffers plus the server's backlog hold for one socket.
    stuck = stuck_socket(server, slug, cookie, query="?wire=1")

    async def flood() -> list[int]:
        async with ws_connect(server, slug, cookie, max_queue=None) as reader, \
                ws_connect(server, slug, cookie, max_queue=None) as sender:
            reading = asyncio.ensure_future(count_deliveries([reader], text, total))
            for n in range(total):
                await sender.send(frame(f"{n} {text}"))
            return await asyncio.wait_for(reading, 60)

    assert asyncio.run(flood()) == [total]  # the reading client got everything
    # What was buffered for it, then a close frame with 1013 ("try again later"), which htmx
    # reconnects on, and then catches up from the database. A peer that reads nothing may
    # not even take the close frame (the server waits a second for it, then hangs up), which
    # a browser sees as 1006 and htmx reconnects on too. Either way it was let go: read_until
    # returns at the close frame or when the server hangs up, and raises after 30 s of silence.
    received = read_until(stuck, CLOSE_TOO_SLOW)
    assert received.count(text.encode()) < total


def server_rss_kib(server: LiveServer) -> int:
    status = open(f"/proc/{server.process.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def test_oversized_frame_closes_only_its_socket_and_no_compression(server):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "sizes")

    async def run() -> tuple[int, str | None]:
        async with ws_connect(server, slug, cookie) as bystander, \
                ws_connect(server, slug, cookie, max_size=None) as offender:
            extensions = offender.response.headers.get("Sec-WebSocket-Extensions")
            await offender.send(frame("y" * 70_000))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(offender.recv(), 10)
            await bystander.send(frame("still fine"))
            await frames_until(bystander, "still fine")
            return closed.value.rcvd.code, extensions

    code, extensions = asyncio.run(run())
    assert code == 1009  # "message too big"
    assert extensions is None  # the client offered permessage-deflate; the server declined
    assert list(stored_messages(server).values()) == ["still fine"]


@contextlib.contextmanager
def write_locked(server: LiveServer, release: str):
    """Another process holds the database's write lock until the block ends."""
    blocker = sqlite3.connect(server.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute(release)
        blocker.close()


def message_under_lock(server: LiveServer, release: str, then) -> str:
    """Send a message while the write lock is held, run `then(client, slug, ws)` (a
    coroutine) meanwhile, and return the first frame the sender gets back after it."""
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "locked")

    async def run() -> str:
        async with ws_connect(server, slug, cookie) as ws:
            await frames_until(ws, "presence")
            with write_locked(server, release):
                await ws.send(frame("under the lock"))
                reply = await then(client, slug, ws)
            return reply or await frames_until(ws, "msg-")

    return asyncio.run(run())


def test_reads_do_not_wait_behind_a_blocked_write(server):
    async def load_pages(client, slug, ws) -> None:
        # The server's write is stuck in busy_timeout (5 s); pages still load.
        async with httpx.AsyncClient(limits=KEEPALIVE, base_url=server.url, cookies=client.cookies, timeout=3) as browser:
            assert (await browser.get(f"/room/{slug}/")).status_code == 200
            assert (await browser.get("/healthz")).status_code == 200

    assert "under the lock" in message_under_lock(server, "COMMIT", load_pages)


def test_write_that_cannot_get_the_lock_is_refused_not_lost(server):
    async def wait_for_refusal(client, slug, ws) -> str:
        return await frames_until(ws, "chat-error")  # after the 5 s busy timeout

    assert "could not be saved" in message_under_lock(server, "ROLLBACK", wait_for_refusal)
    assert stored_messages(server) == {}
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_refused_handshakes_are_one_info_line_each_never_an_error(server):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "guarded")
    _, grace_cookie = login_cookie(server, "grace")
    post_logout = client.post("/auth/logout/", data={
        "csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)})
    assert post_logout.status_code == 303

    async def knock() -> list[str]:
        outcomes = []
        for path, headers in ((f"/chat/{slug}/", {"Origin": "http://evil.example"}),
                              ("/chat/no-such-room/", {"Origin": server.url, "Cookie": grace_cookie})):
            with pytest.raises(Exception) as refused:
                async with connect(f"ws://127.0.0.1:{server.port}{path}", additional_headers=headers,
                                   open_timeout=10):
                    pass
            outcomes.append(str(refused.value))
        async with ws_connect(server, slug, cookie) as ended:  # the logged-out session: told, then closed
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ended.recv(), 10)
            outcomes.append(closed.value.rcvd.code)
        return outcomes

    assert asyncio.run(knock()) == ["server rejected WebSocket connection: HTTP 403"] * 2 + [1008]
    server.stop()
    log = server.log_path.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log
    assert log.count("refused WebSocket") == 2
    assert "cross-site Origin" in log and "no such room" in log and "no live session" in log


def test_a_connection_that_dies_silently_leaves_presence(tmp_path):
    """Wi-Fi gone: no close frame, no FIN. Pings find it; its user leaves the room."""
    server = LiveServer(tmp_path / "chat.db", CHAT_HEARTBEAT="1").start()
    try:
        client, cookie = login_cookie(server, "ada")
        slug = make_room(client, "pings")
        _, grace_cookie = login_cookie(server, "grace")
        silent = stuck_socket(server, slug, grace_cookie)  # handshakes, then never reads nor answers

        async def watch() -> str:
            async with ws_connect(server, slug, cookie) as ada:
                await frames_until(ada, "<bdi>grace</bdi>")
                # ping every 1 s, 2 s to answer: gone within about 3 s (default heartbeat: 30 s)
                return await frames_until(ada, '<ul id="presence"', limit=20)

        assert "grace" not in asyncio.run(watch())
        silent.close()
    finally:
        server.stop()


# --- the server under attack: bounded in count and time, loopback only ---------------------------


def login_form(client: httpx.AsyncClient, username: str, password: str, token: str, **headers: str):
    return client.post("/auth/login/", data={"csrf_token": token, "username": username, "password": password},
                       headers=headers)


async def guess_all_at_once(urls: list[str], guesses: int, cookie_jar_from: httpx.Client) -> list[int]:
    """`guesses` wrong passwords for ada, sent at once, spread over `urls` (workers)."""
    token = re.search(r'name="csrf_token" value="([^"]+)"', cookie_jar_from.get("/auth/login/").text).group(1)
    clients = [httpx.AsyncClient(limits=KEEPALIVE, base_url=url, cookies=cookie_jar_from.cookies, timeout=60) for url in urls]
    try:
        responses = await asyncio.gather(*(login_form(clients[n % len(clients)], "ada", f"wrong {n}", token)
                                           for n in range(guesses)))
        right = await login_form(clients[0], "ada", PASSWORD, token)
    finally:
        for client in clients:
            await client.aclose()
    return [r.status_code for r in responses] + [right.status_code]


def test_concurrent_password_guesses_cannot_skip_the_limit(server):
    login_cookie(server, "ada")
    statuses = asyncio.run(guess_all_at_once([server.url], 60, live_client(server.url)))
    checked = statuses[:-1].count(400)  # passwords actually checked (and wrong)
    assert checked <= 10 and statuses[:-1].count(429) == 60 - checked, statuses
    assert statuses[-1] == 429  # even the right password, once the limit is reached


def test_forwarded_for_is_believed_only_from_named_proxies(tmp_path):
    """A client on loopback that rotates X-Forwarded-For must not get a fresh address each time."""
    for trusted, expect_limited in (("", True), ("127.0.0.1", False)):
        server = LiveServer(tmp_path / f"xff{bool(trusted)}.db", CHAT_TRUSTED_PROXIES=trusted).start()
        try:
            with live_client(server.url) as client:
                token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/auth/login/").text).group(1)
                statuses = [client.post("/auth/login/", headers={"X-Forwarded-For": f"203.0.113.{n}"}, data={
                    "csrf_token": token, "username": f"user{n}", "password": "wrong"}).status_code for n in range(12)]
        finally:
            server.stop()
        assert (429 in statuses) == expect_limited, statuses


def test_idle_and_slow_connections_cannot_exhaust_the_server(tmp_path):
    """`ulimit -n 600` (room for 152 connections), then 400 that send half a request head and stop."""
    server = LiveServer(tmp_path / "chat.db", open_files=600).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # ...and never finishes
            idle.append(sock)
        # Past the total, a connection gets a clear 503 at once, not a hang.
        refused = httpx.get(server.url + "/healthz", timeout=5)
        assert refused.status_code == 503
        # Every unfinished head is cut off after REQUEST_HEAD_SECONDS: the server answers again.
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the idle connections were never cut off"
            time.sleep(0.5)
        for sock in idle:  # each was answered with a 503 at once, or cut off: closed either way
            assert sock.recv(1024) in (b"", b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
    finally:
        for sock in idle:
            sock.close()
        server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert len(log) < 200_000  # a refusal per connection at most, never a flood


def test_trickled_bodies_are_cut_off_and_one_address_cannot_take_every_connection(tmp_path):
    """Issue 29, 2: the head's deadline did not cover the body, so 199 POSTs promising 65,000
    bytes and sending one every few seconds held the connection cap (every other request
    503) for as long as they liked, and each abort logged a traceback. Now a body has a
    deadline (CHAT_REQUEST_BODY_SECONDS), one address holds at most
    CHAT_CONNECTIONS_PER_ADDRESS connections, and a client that goes away is an INFO line."""
    server = LiveServer(tmp_path / "chat.db", CHAT_REQUEST_BODY_SECONDS="2",
                        CHAT_CONNECTIONS_PER_ADDRESS="20").start()
    trickling: list[socket.socket] = []
    try:
        client, _ = login_cookie(server, "ada")  # (its keep-alive connection is one of the 20)
        for _ in range(15):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"POST /auth/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/x-www-form-urlencoded\r\nContent-Length: 65000\r\n\r\nu")
            trickling.append(sock)
        more = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(10)]
        trickling += more
        refused = []
        for sock in more:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                refused.append(sock.recv(1024).startswith(b"HTTP/1.1 503"))
        assert 5 <= sum(refused) <= 10  # past its share of 20: a 503 at once
        other = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=("127.0.0.2", 0))
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert other.recv(1024).startswith(b"HTTP/1.1 200")  # another address is not held up
        other.close()
        started = time.monotonic()
        for sock in trickling[:15]:  # one more byte now and then: cut off all the same
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
        for sock in trickling[:15]:
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                while sock.recv(1024):
                    pass
        assert time.monotonic() - started < 8
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in trickling:
            sock.close()
        server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "its request body took over 2 s" in log, log[-3000:]


def test_a_huge_catch_up_is_bounded_in_memory(server):
    """500 messages of 4,000 `&` (5 x longer escaped), caught up by 20 sockets that never
    read, in teaching mode: was +856 MiB of server memory; now a bounded frame each."""
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "ampersands")
    with sqlite3.connect(server.db_path) as db:
        room_id, user_id = db.execute("SELECT id, created_by FROM rooms").fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at, revision) VALUES (?, ?, ?, '', ?)",
                       [(room_id, user_id, "&" * 4000, n) for n in range(1, 501)])
        db.execute("UPDATE rooms SET revision = 500")
    rss_before = server_rss_kib(server)

    async def catch_up_and_measure() -> int:
        async with ws_connect(server, slug, cookie, "?revision=0&wire=1", max_size=None) as reader:
            frame = await frames_until(reader, "&amp;")
        assert frame.count('class="msg"') >= 5  # what fits of the newest page, with "load older"
        return len(frame)

    biggest = asyncio.run(catch_up_and_measure())
    assert biggest <= 256 * 1024 + 80 * 1024, biggest  # the catch-up bound plus a bounded wire echo
    stuck = [stuck_socket(server, slug, cookie, "?revision=0&wire=1") for _ in range(20)]
    peak = 0
    for _ in range(10):  # the catch-ups render on the database thread; watch memory for a while
        peak = max(peak, server_rss_kib(server) - rss_before)
        time.sleep(0.3)
    for sock in stuck:
        sock.close()
    assert peak < 64 * 1024, f"server memory grew by {peak / 1024:.0f} MiB"


def chat_py_printing(tmp_path, until: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """`python chat.py ARGS` with a database in tmp_path, read until a line says `until`: the
    process (the caller stops it) and the lines it printed."""
    process = subprocess.Popen([sys.executable, str(HERE / "chat.py"), *args, "--db", str(tmp_path / "chat.db")],
                               cwd=tmp_path, env={**os.environ, "CHAT_SECRET_KEY": "k", "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed: list[str] = []
    while not any(until in line for line in printed):
        printed.append(process.stdout.readline())
        if not printed[-1]:
            process.kill()
            raise AssertionError("".join(printed))
    return process, printed


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_python_chat_py_says_which_event_loop_it_runs(tmp_path, loop):
    """uvloop when it is installed (requirements.txt), unless --loop asyncio asks otherwise."""
    import importlib.util

    process, printed = chat_py_printing(tmp_path, "event loop", "--port", str(free_port()), "--loop", loop)
    try:
        expected = "uvloop" if loop == "auto" and importlib.util.find_spec("uvloop") else "asyncio"
        assert printed[-1].strip() == f"Backchat: event loop {expected}", printed
    finally:
        process.terminate()
        process.wait(15)


def test_listening_on_every_interface_prints_the_lan_urls_and_invites_use_the_visitors_address(tmp_path):
    """A teacher's `python chat.py --host 0.0.0.0 --guests`. (Requests go to 127.0.0.1 only;
    a LAN address appears only as the Host a student's browser would send.)"""
    port = free_port()
    process, printed = chat_py_printing(tmp_path, "guest mode is on", "--host", "0.0.0.0", "--port", str(port),
                                        "--guests")
    try:
        urls = [line.split("open ", 1)[1].strip() for line in printed if "Backchat: open" in line]
        lan = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
               if "." in a and not a.startswith("127.")]
        assert lan and urls[0] in {f"http://{address}:{port}/" for address in lan}, printed  # the one to share first
        assert urls[-1] == f"http://localhost:{port}/  (this machine only)", printed
        assert {f"http://{address}:{port}/" for address in lan} <= set(urls), (urls, lan)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with live_client(f"http://127.0.0.1:{port}", headers={"Host": f"{lan[0]}:{port}"}) as student:
            token = re.search(r'name="csrf_token" value="([^"]+)"', student.get("/auth/login/").text).group(1)
            student.post("/auth/guest/", data={"csrf_token": token, "guest_name": "teacher", "next": "/"})
            room = make_room(student, "lesson")
            invite = re.search(r'id="invite"[^>]* value="([^"]+)"', student.get(f"/room/{room}/").text)
        assert invite.group(1) == f"http://{lan[0]}:{port}/room/{room}/"  # the address the visitor used
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Host": "evil.example"}).status_code == 400
    finally:
        process.terminate()
        process.wait(15)


# --- rooms: a page rendered while another closes -------------------------------------------------


def test_a_page_rendered_while_another_closes_does_not_race_its_read_marker(server):
    """A reload closes the old page's socket as the new page is asked for. The closing
    socket marks the room read on the writer thread, and stays in the hub until that is
    written, so the new page counts it as a page that saw everything live: no "New" above
    what was seen, however slow the write (here: held up behind another writer's lock)."""
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "reload")
    assert "new-divider" not in client.get(f"/room/{slug}/").text

    async def run() -> None:
        async with ws_connect(server, slug, cookie) as ws:
            await ws.send(frame("seen live"))
            await frames_until(ws, "seen live")
            db.execute("UPDATE room_members SET last_read_id = 0")  # as if not yet marked read
            db.execute("BEGIN IMMEDIATE")  # and the writer is held up behind this lock
        # (the socket closed: its write waits for the lock, up to busy_timeout)

    db = sqlite3.connect(server.db_path, isolation_level=None)
    try:
        asyncio.run(run())
        assert "new-divider" not in client.get(f"/room/{slug}/").text
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert "new-divider" not in client.get(f"/room/{slug}/").text


# --- accounts: a class logging in at once --------------------------------------------------------


def test_a_class_logging_in_at_once_from_one_address_all_get_in(tmp_path):
    """25 people behind one NAT press Log in at the same moment with the right passwords:
    a limit counts failures, not attempts still being checked, so all 25 get in (and
    guesses sent at once are still checked no more than the limit allows: the test above)."""
    live = LiveServer(tmp_path / "chat.db", CHAT_REGISTER_RATE="0").start()
    try:
        names = [f"student{n}" for n in range(25)]
        for name in names:
            login_cookie(live, name)

        async def everyone_at_once() -> list[int]:
            clients = [httpx.AsyncClient(limits=KEEPALIVE, base_url=live.url, timeout=60) for _ in names]
            try:
                tokens = [re.search(r'name="csrf_token" value="([^"]+)"', (await c.get("/auth/login/")).text).group(1)
                          for c in clients]
                responses = await asyncio.gather(*(login_form(c, name, PASSWORD, token)
                                                   for c, name, token in zip(clients, names, tokens)))
                return [r.status_code for r in responses]
            finally:
                for c in clients:
                    await c.aclose()

        assert asyncio.run(everyone_at_once()) == [303] * 25
    finally:
        live.stop()


def chat_py(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python chat.py ARGS` to its end (with CHAT_* variables from `env`, if any)."""
    return subprocess.run([sys.executable, str(HERE / "chat.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


# --- the operator's commands ---------------------------------------------------------------------


def test_a_backup_taken_while_the_server_runs_restores_as_the_readme_says(server, tmp_path):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "kept safe")

    async def chatter(count: int) -> None:
        async with ws_connect(server, slug, cookie) as ws:
            for n in range(count):
                await ws.send(frame(f"message {n}"))
            await frames_until(ws, f"message {count - 1}", limit=3 * count)

    asyncio.run(chatter(50))
    copy = tmp_path / "backup" / "chat-backup.db"
    copy.parent.mkdir()
    done = chat_py("backup", str(copy), "--db", str(server.db_path), cwd=tmp_path)  # while it runs
    assert done.returncode == 0 and "copied to" in done.stdout, done.stderr
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (50,)
    again = chat_py("backup", str(copy), "--db", str(server.db_path), cwd=tmp_path)
    assert again.returncode != 0 and "exists already" in again.stderr  # never overwrites
    # Issue 29, 14: the database and its backups hold password hashes and session ids: 0600,
    # and a backup never writes through a link, even a dangling one.
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in (server.db_path, copy))
    dangling = tmp_path / "backup" / "planted.db"
    dangling.symlink_to(tmp_path / "elsewhere.db")
    through = chat_py("backup", str(dangling), "--db", str(server.db_path), cwd=tmp_path)
    assert through.returncode != 0 and not (tmp_path / "elsewhere.db").exists()
    asyncio.run(chatter(5))  # said after the backup: gone once it is restored
    # The README's restore: stop the server, put the copy in place of chat.db (its -wal and
    # -shm files removed), start the server.
    server.stop()
    for leftover in (server.db_path.with_name("chat.db-wal"), server.db_path.with_name("chat.db-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copyfile(copy, server.db_path)
    server.start()
    page = client.get(f"/room/{slug}/").text  # the same session: sessions are in the backup too
    assert "message 49" in page and page.count('class="msg"') == 50




def test_the_operator_lists_accounts_closes_one_and_makes_login_links(server, tmp_path):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "operated")
    _, grace_cookie = login_cookie(server, "grace")
    db = ["--db", str(server.db_path)]
    listed = chat_py("users", *db, cwd=tmp_path)
    assert listed.returncode == 0 and re.search(r"^ada\s+\S+T\S+Z\s+\S+\s+1\s*$", listed.stdout, re.M), listed.stdout
    assert re.search(r"^grace\s", listed.stdout, re.M)

    async def closed_within_seconds() -> int:
        async with ws_connect(server, slug, grace_cookie) as page:
            await frames_until(page, "<bdi>grace</bdi>")
            done = chat_py("users", "deactivate", "grace", *db, cwd=tmp_path)
            assert done.returncode == 0 and "grace is closed" in done.stdout, done.stderr
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(page.recv(), 30)
            assert time.monotonic() - started < 15  # within SESSION_CHECK_SECONDS, and then some
            return closed.value.rcvd.code

    assert asyncio.run(closed_within_seconds()) == 1008  # told in place, not retried
    assert httpx.get(f"{server.url}/", headers={"Cookie": grace_cookie}, follow_redirects=False).status_code == 303
    again = live_client(server.url)
    token = re.search(r'name="csrf_token" value="([^"]+)"', again.get("/auth/login/").text).group(1)
    refused = again.post("/auth/login/", data={"csrf_token": token, "username": "grace", "password": PASSWORD})
    assert refused.status_code == 403 and "closed" in refused.text
    assert chat_py("users", "login-link", "grace", *db, cwd=tmp_path).returncode != 0  # not for a closed account
    assert chat_py("users", "deactivate", "nobody", *db, cwd=tmp_path).returncode != 0

    made = chat_py("users", "login-link", "ada", *db, "--url", server.url, cwd=tmp_path)
    link = re.search(r"(http://\S+/auth/link/\S+)", made.stdout).group(1)
    assert made.returncode == 0 and "one use within 1 hour" in made.stdout
    forgot = live_client(server.url)  # ada, who forgot her password, on another device
    page = forgot.get(link)
    assert page.status_code == 200 and "Set a new password" in page.text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    short = forgot.post(link, data={"csrf_token": token, "password1": "short", "password2": "short"})
    assert short.status_code == 400  # and the link still works
    used = forgot.post(link, data={"csrf_token": token, "password1": "a new password", "password2": "a new password"})
    assert used.status_code == 303 and forgot.get("/", follow_redirects=False).status_code == 200
    assert forgot.get(link).status_code == 404  # once only
    secret = link.rsplit("/", 1)[1]  # (issue 29, 13: only its hash is kept, and now in no log either)
    assert secret not in server.log_path.read_text() and "/auth/link/…" in server.log_path.read_text()
    assert httpx.get(f"{server.url}/", headers={"Cookie": cookie}, follow_redirects=False).status_code == 303  # her old sessions end
    fresh = live_client(server.url)
    token = re.search(r'name="csrf_token" value="([^"]+)"', fresh.get("/auth/login/").text).group(1)
    assert fresh.post("/auth/login/", data={"csrf_token": token, "username": "ada", "password": "a new password"}
                      ).status_code == 303
    with sqlite3.connect(server.db_path) as conn:  # the database holds only the link's hash
        assert link.rsplit("/", 1)[1] not in str(conn.execute("SELECT * FROM login_links").fetchall())
    for bogus in ("nope", "x" * 5000):
        assert httpx.get(f"{server.url}/auth/link/{bogus}", headers={"Cookie": cookie}).status_code == 404


def test_a_transcript_of_100000_messages_streams_in_flat_memory(server):
    client, cookie = login_cookie(server, "ada")
    slug = make_room(client, "long class")
    with sqlite3.connect(server.db_path) as db:
        room_id, user_id = db.execute("SELECT id, created_by FROM rooms").fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at, revision) VALUES (?, ?, ?, ?, ?)",
                       ((room_id, user_id, f"message {n} " + "x" * 200, "2026-11-30T10:00:00Z", n + 1)
                        for n in range(100_000)))
    rss_before = server_rss_kib(server)
    peak, size, count, tail = 0, 0, 0, ""
    with client.stream("GET", f"/room/{slug}/transcript", timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_text():
            size += len(chunk)
            count += (tail + chunk).count("**ada**")  # (a name may straddle two chunks; the
            tail = (tail + chunk)[-6:]                 # tail is too short to hold a whole one)
            peak = max(peak, server_rss_kib(server) - rss_before)
    assert count == 100_000 and size > 20_000_000  # all of it, about 22 MB of Markdown...
    assert peak < 16 * 1024, f"server memory grew by {peak / 1024:.0f} MiB"  # ...in a few MiB of memory


def test_transcript_readers_that_stop_reading_hold_little_memory_and_a_few_at_a_time(server):
    """Issue 29, 3: the transcript was one string per 500 messages (HTML escaping made `&`
    five times longer) and uvicorn held a chunk for a reader that never read: 100 such readers
    pinned about 1.5 GiB. Now pieces of 16 KiB go out one at a time as the connection drains,
    a user runs at most two at once, and a stalled reader costs the server little."""
    owner, owner_cookie = login_cookie(server, "ada")
    slug = make_room(owner, "ampersands")
    cookies = [owner_cookie]
    for n in range(9):
        client, cookie = login_cookie(server, f"reader{n}")
        client.get(f"/room/{slug}/")  # a member
        cookies.append(cookie)
    with sqlite3.connect(server.db_path) as db:
        room_id, user_id = db.execute("SELECT id, created_by FROM rooms").fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at, revision) VALUES (?, ?, ?, ?, ?)",
                       ((room_id, user_id, "&" * 4000, "2026-11-30T10:00:00Z", n + 1) for n in range(2000)))
    rss_before = server_rss_kib(server)
    stalled = []
    for cookie in cookies:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /room/{slug}/transcript HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode())
            stalled.append(sock)
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/room/{slug}/transcript", headers={"Cookie": cookies[0]},
                        timeout=10).status_code != 429:  # two at once per user: a third waits
            assert time.monotonic() < deadline
        time.sleep(2)  # (what the readers let through by now is all they will get)
        stalled[0].settimeout(5)
        assert stalled[0].recv(4096).startswith(b"HTTP/1.1 200")
        grown = server_rss_kib(server) - rss_before
        assert grown < 20 * 2 * 1024, f"{grown / 1024:.0f} MiB for 20 stalled readers"
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        for sock in stalled:
            sock.close()


def test_the_command_line_says_what_is_wrong_in_one_line_and_open_only_once_listening(tmp_path):
    """Issue 31, 3.3 and the rest: `--ws wsproto` (not installed) and `--ws bogus` were 47- and
    33-line tracebacks, both after "open http://..."; a port already taken printed "open" too.
    Now: argparse's choices, a line that says what to install, and "open" once it listens.
    `--help` shows defaults and variables; `users login-link` without a name says so."""
    bogus = chat_py("--ws", "bogus", cwd=tmp_path)
    assert bogus.returncode == 2 and "invalid choice: 'bogus'" in bogus.stderr and "Traceback" not in bogus.stderr
    assert "open http" not in bogus.stdout
    wsproto = chat_py("--ws", "wsproto", cwd=tmp_path)
    assert wsproto.returncode == 2 and "pip install wsproto" in wsproto.stderr and "Traceback" not in wsproto.stderr
    helped = chat_py("--help", cwd=tmp_path).stdout
    assert "(CHAT_PORT) (default: 8000)" in " ".join(helped.split()) and "(CHAT_HOST)" in helped
    nameless = chat_py("users", "login-link", cwd=tmp_path)
    assert nameless.returncode == 2 and "python chat.py users login-link NAME" in nameless.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = chat_py("--port", str(port), "--db", str(tmp_path / "chat.db"), cwd=tmp_path)
    assert busy.returncode != 0 and "open http" not in busy.stdout and "address already in use" in busy.stdout + busy.stderr


def test_last_seen_is_when_somebody_was_last_seen_and_login_links_use_the_printed_address(server, tmp_path):
    """Issue 31, 3.6 and 3.7: `users` said "last seen -" for anyone logged out (it read their
    newest live session) and lagged an hour while they were logged in; `users login-link`
    made links for http://localhost:8000 while the server prints http://127.0.0.1:8000."""
    client, _ = login_cookie(server, "ada")
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)
    assert client.post("/auth/logout/", data={"csrf_token": token}).status_code == 303
    listed = chat_py("users", "--db", str(server.db_path), cwd=tmp_path).stdout
    seen = re.search(r"^ada\s+\S+\s+(\S+)", listed, re.M).group(1)
    assert seen != "-" and seen[:10] == time.strftime("%Y-%m-%d", time.gmtime())
    link = chat_py("users", "login-link", "ada", "--db", str(server.db_path), cwd=tmp_path).stdout
    assert "http://127.0.0.1:8000/auth/link/" in link
    moved = chat_py("users", "login-link", "ada", "--db", str(server.db_path), cwd=tmp_path,
                    env={"CHAT_PORT": "9001"}).stdout
    assert "http://127.0.0.1:9001/auth/link/" in moved
    missing = chat_py("backup", str(tmp_path / "no-such-dir" / "copy.db"), "--db", str(server.db_path), cwd=tmp_path)
    assert missing.returncode != 0 and "no-such-dir/copy.db" in missing.stderr
