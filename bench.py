"""Backchat's benchmark: fan-out cost against a bare Starlette + uvicorn broadcast loop.

    python bench.py                 # about a minute: one fan-out run per server, history timings
    python bench.py --full          # the grid: N = 100, 500, 1000 sockets x R = 10, 20, 50 msg/s
    python bench.py --floor         # also the floor: the loop plus the least the app's promises cost
    python bench.py --json          # machine-readable

Each server runs in its own process, pinned to core 0 when `taskset` exists; this load
generator pins itself to core 1. It drives a server the way browsers do (register, log in,
create a room, open N WebSockets with the session cookie and a same-site Origin, send
`{"message": ...}` frames) and finds each delivery by the unique token in the frame.

The load generator speaks WebSocket over raw asyncio protocols (no client library) so that it
costs little per received frame; a run in which it used more than 90% of its core is marked
invalid, because then it, not the server, set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-password"
# Each message's unique token ("tok17kot"): plain letters and digits, so that it changes
# nothing about how the app treats the message (a "~" once sent every one through Markdown).
TOKEN_RE = re.compile(rb"tok(\d+)kot")
# What a message says besides its token: a line of chat as people write it (punctuation and
# all), repeated to --size characters.
CHAT_LINE = "Thanks! That works now, see you at 5 & bring the notes from today's class. "


# --- the baseline server: the least a Starlette/uvicorn chat can do ---------------------


def baseline_app(floor_db: Path | None = None):
    """Accept, keep a set per room, send each text to all. No auth, no database, no HTML.

    With `floor_db`, the floor: the loop plus the least the app's promises cost, done as
    the app does them. A handshake checks the signed session cookie (Starlette's
    SessionMiddleware), the Origin, and reads the session on a reader thread; a message is
    committed on a writer thread (SQLite, WAL, synchronous=NORMAL) before anyone gets it."""
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    rooms: dict[str, set] = {}
    if floor_db is not None:
        connect = functools.partial(sqlite3.connect, floor_db, isolation_level=None, check_same_thread=False)
        write_db, read_db = connect(), connect()
        write_db.execute("PRAGMA journal_mode=WAL")
        write_db.execute("PRAGMA synchronous=NORMAL")
        write_db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, user_id INTEGER)")
        write_db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, user_id INTEGER, text TEXT)")
        write_db.execute("INSERT INTO sessions VALUES (?, 1)", (FLOOR_SESSION_ID,))
        writer, reader = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    def session_user(session_id: str):
        return read_db.execute("SELECT user_id FROM sessions WHERE id = ?", (session_id,)).fetchone()

    def store(user_id: int, text: str) -> None:
        write_db.execute("INSERT INTO messages (user_id, text) VALUES (?, ?)", (user_id, text))

    async def chat(websocket):
        loop = asyncio.get_running_loop()
        if floor_db is not None:
            user = await loop.run_in_executor(reader, session_user, websocket.session.get("sid", ""))
            if user is None or websocket.headers.get("origin") != f"http://{websocket.headers.get('host')}":
                return await websocket.close()
        await websocket.accept()
        room = rooms.setdefault(websocket.path_params["code"], set())
        room.add(websocket)
        try:
            while True:
                text = await websocket.receive_text()
                if floor_db is not None:
                    await loop.run_in_executor(writer, store, user[0], text)
                for peer in list(room):
                    await peer.send_text(text)
        except WebSocketDisconnect:
            pass
        finally:
            room.discard(websocket)

    middleware = [Middleware(SessionMiddleware, secret_key=FLOOR_SECRET)] if floor_db is not None else []
    return Starlette(routes=[WebSocketRoute("/chat/{code}/", chat)], middleware=middleware)


FLOOR_SECRET, FLOOR_SESSION_ID = "bench", "floor-session"


def floor_cookie() -> str:
    """The session cookie the floor server accepts, made as SessionMiddleware makes one."""
    import itsdangerous

    data = base64.b64encode(json.dumps({"sid": FLOOR_SESSION_ID}).encode())
    return f"session={itsdangerous.TimestampSigner(FLOOR_SECRET).sign(data).decode()}"


def serve_baseline(port: int, ws: str, floor_db: Path | None = None, loop: str = "auto") -> None:
    import uvicorn

    # Logging as uvicorn does by default and as `python chat.py` does (INFO: three lines per
    # WebSocket), so that the handshake figures compare the apps, not their log levels.
    uvicorn.run(baseline_app(floor_db), host="127.0.0.1", port=port, ws=ws, loop=loop, ws_per_message_deflate=False,
                ws_max_size=65536, log_level="info")


# --- server processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned_cmd(cmd: list[str], core: int) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if shutil.which("taskset") and os.cpu_count() >= 2 else cmd


class Server:
    """A server process pinned to core 0: the app (`python chat.py`, or with `workers`,
    `uvicorn chat:app --workers N` sharing a redis-server; with `pinned` too, N processes
    `python chat.py` on ports of their own, so that a load generator can choose each room's
    worker) or the baseline."""

    def __init__(self, kind: str, workdir: Path, ws: str, workers: int = 0, pinned: bool = False) -> None:
        self.kind, self.port = kind, free_port()
        self.db_path = workdir / "bench.db"
        self.ports = [self.port]
        self.workers: list[subprocess.Popen] = []
        # Every limit a load generator would trip (one user, one address, many sockets) is off.
        env = {**os.environ, "CHAT_MESSAGE_RATE": "0", "CHAT_ROOM_RATE": "0", "CHAT_LOGIN_FAILURES": "0",
               "CHAT_REGISTER_RATE": "0", "CHAT_ROOM_GUESSES": "0", "CHAT_SOCKETS_PER_USER": "0",
               "CHAT_SOCKETS_PER_ADDRESS": "0", "CHAT_HANDSHAKE_RATE": "0", "CHAT_SEARCH_RATE": "0",
               "CHAT_CONNECTIONS_PER_ADDRESS": "0", "CHAT_MAX_CONNECTIONS": "20000", "CHAT_SECRET_KEY": "bench", "CHAT_WS": ws, "CHAT_DB": str(workdir / "bench.db")}
        self.redis: subprocess.Popen | None = None
        if kind == "app" and workers:
            redis_port = free_port()
            self.redis = subprocess.Popen(pinned_cmd(["redis-server", "--port", str(redis_port), "--save", "",
                                                  "--appendonly", "no"], 0),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            env["CHAT_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            cmd = [sys.executable, "-m", "uvicorn", "chat:app", "--port", str(self.port), "--workers", str(workers),
                   "--ws", ws, "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--log-level", "warning",
                   "--loop", os.environ.get("CHAT_LOOP", "auto")]
        elif kind == "app":
            cmd = [sys.executable, str(HERE / "chat.py"), "--port", str(self.port), "--db", env["CHAT_DB"]]
        else:
            cmd = [sys.executable, str(HERE / "bench.py"), "--serve-baseline", str(self.port), "--ws", ws,
                   "--loop", os.environ.get("CHAT_LOOP", "auto")]
            if kind == "floor":
                cmd += ["--floor-db", str(workdir / "floor.db")]
        self.log = open(workdir / f"{kind}.log", "wb")
        if kind == "app" and workers and pinned:
            self.ports = [self.port] + [free_port() for _ in range(workers - 1)]
            self.workers = [subprocess.Popen(pinned_cmd([sys.executable, str(HERE / "chat.py"), "--port", str(port), "--db",
                                                         env["CHAT_DB"]], 0), env=env, cwd=HERE, stdout=self.log,
                                             stderr=subprocess.STDOUT) for port in self.ports]
            self.process = self.workers[0]
        else:
            self.process = subprocess.Popen(pinned_cmd(cmd, 0), env=env, cwd=HERE, stdout=self.log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        for port in self.ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{kind} server did not start: see {workdir}") from None
                    time.sleep(0.05)
        time.sleep(1.0 if workers else 0)  # let every worker finish starting

    def pids(self, roots: list[int] | None = None) -> list[int]:
        """The server's processes (or those of `roots`), every process below them, and its
        redis-server if any."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found = []
        todo = roots if roots is not None else [p.pid for p in (self.workers or [self.process])] + (
            [self.redis.pid] if self.redis else [])
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def cpu_seconds(self, roots: list[int] | None = None) -> float:
        """User + system CPU of the whole server (all its processes), or of `roots`, from /proc."""
        total = 0
        for pid in self.pids(roots):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in fields[11:13])
        return total / CLK_TCK

    def cpu_by_worker(self) -> list[float]:
        """With pinned workers: each one's CPU seconds (Redis's is in cpu_seconds only)."""
        return [self.cpu_seconds([worker.pid]) for worker in self.workers]

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, AttributeError):
                total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
        return total

    def stop(self) -> None:
        for process in (*(self.workers or [self.process]), self.redis):
            if process is None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.log.close()


# --- a minimal WebSocket client ----------------------------------------------------------


class Client(asyncio.Protocol):
    """One WebSocket connection: handshake, masked text frames out, tokens found in frames in."""

    def __init__(self, request: bytes, on_token, on_frame=None) -> None:
        self.request, self.on_token, self.on_frame = request, on_token, on_frame
        self.buffer = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.transport = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.open.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[:12])
            del buffer[:end + 4]
            if b" 101" not in status:
                self.open.set_exception(RuntimeError(f"handshake refused: {status!r}"))
                return
            self.open.set_result(True)
        now = time.perf_counter()
        while len(buffer) >= 2:
            opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = struct.unpack_from("!H", buffer, 2)[0], 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = struct.unpack_from("!Q", buffer, 2)[0], 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start:start + length])
            del buffer[:start + length]
            if opcode == 0x1 and self.on_frame:  # (a shape that looks for something else)
                self.on_frame(payload, now)
            if opcode == 0x1:  # (a token counts once per frame: the app's frame says it twice,
                for token in set(TOKEN_RE.findall(payload)):  # for the eye and for a screen reader)
                    self.on_token(int(token), now)
            elif opcode == 0x9:  # ping: answer so the server keeps us
                self.send(payload, opcode=0xA)
            elif opcode == 0x8:
                self.closed = True

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        self.transport.write(header + b"\0\0\0\0" + payload)  # a zero mask leaves the payload as is

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.open.done():
            self.open.set_exception(ConnectionError("closed during handshake"))


def upgrade_request(port: int, path: str, cookie: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n"
            f"Cookie: {cookie}\r\n\r\n").encode()


# --- one fan-out run ---------------------------------------------------------------------


@dataclass
class Run:
    server: str
    sockets: int  # per room
    rate: float  # messages per second, per room
    senders: int  # per room
    rooms: int = 1
    expected: int = 0
    received: int = 0
    lost: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    cpu_us_per_frame: float = 0.0
    cpu_us_per_message: float = 0.0
    rss_kib_per_idle_socket: float = 0.0
    handshakes_per_s: float = 0.0
    generator_cpu_share: float = 0.0
    per_worker: list[dict] = field(default_factory=list)  # with pinned workers: each one's rooms and CPU
    valid: bool = True
    notes: list[str] = field(default_factory=list)


def http_setup(port: int, rooms: int = 1) -> tuple[str, list[str]]:
    """Register, log in and create rooms on the app, as a browser does; return (cookie, slugs)."""
    import httpx

    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def token(path: str) -> str:
        return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)

    name = f"bench{os.getpid()}"
    client.post("/auth/register/", data={"csrf_token": token("/auth/register/"), "username": name,
                                         "password1": PASSWORD, "password2": PASSWORD})
    client.cookies.clear()
    client.post("/auth/login/", data={"csrf_token": token("/auth/login/"), "username": name, "password": PASSWORD})
    slugs = []
    for n in range(rooms):
        response = client.post("/create/", data={"csrf_token": token("/"), "room_name": f"bench {n}"})
        slugs.append(response.headers["location"].split("/")[2])
    return f"session={client.cookies['session']}", slugs


def code_block(n: int) -> str:
    """A Python function of 10-30 lines (the nth message's), in a fenced block: what a class
    pastes."""
    lines = 10 + (n * 7) % 21
    body = "".join(f"    total += values[{k}] * {k}  # step {k} of the sum\n" for k in range(lines - 3))
    return f"look at this:\n```python\ndef weighted(values):\n    total = 0\n{body}    return total\n```"


def add_bot(port: int, cookie: str, slug: str, webhook_url: str = "") -> str:
    """Add a bot "hook" to the room on its Manage page, as its owner does; its token."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"cookie": cookie}, timeout=30) as client:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get(f"/room/{slug}/manage").text).group(1)
        answer = client.post(f"/room/{slug}/manage", data={"csrf_token": csrf, "step": "add_bot", "bot_name": "hook",
                                                            "webhook_url": webhook_url})
        return re.search(r'<code id="bot-token">([^<]+)</code>', answer.text).group(1)


class SlowWebhook:
    """A bot's webhook that takes longer than the app waits (7 s): every call times out."""

    def __init__(self, seconds: float = 8.0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hook = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.calls += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(seconds)
                with contextlib.suppress(OSError):
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def fan_out(server: Server, sockets: int, rate: float, senders: int, duration: float, size: int,
                  rooms: int = 1, code_share: float = 0.0, bot: str = "") -> Run:
    """`rooms` rooms of `sockets` sockets each; in each, `senders` of them send `rate`
    messages a second between them; with `code_share`, that share of them (one in five: 0.2)
    is a 10-30 line code block (code_block). `bot`: "api", the messages are a bot's, posted
    through the JSON API instead; "webhook", one in five mentions a bot whose webhook takes
    longer than the app waits (SlowWebhook)."""
    run = Run(server.kind if not server.redis else "app+redis", sockets, rate, senders, rooms)
    # Pinned workers: room k is served by worker k % (N - 1), and the last worker serves none:
    # it shows what a worker spends on rooms it has no socket in.
    serving = max(1, len(server.ports) - 1)

    def port_of(room: int) -> int:
        return server.ports[room % serving]
    hook = SlowWebhook() if bot == "webhook" else None
    api, tokens, posts = None, [], set()
    if server.kind == "app":
        cookie, slugs = http_setup(server.port, rooms)
        if bot:
            tokens = [add_bot(server.port, cookie, slug, hook.url if hook else "") for slug in slugs]
        if bot == "api":
            import httpx

            api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30,
                                    limits=httpx.Limits(max_connections=20))
    else:
        cookie = floor_cookie() if server.kind == "floor" else ""
        slugs = [f"bench{n}" for n in range(rooms)]
    loop = asyncio.get_running_loop()
    sent_at: dict[int, float] = {}
    latencies: list[float] = []

    def on_token(token: int, now: float) -> None:
        latencies.append(now - sent_at[token])

    async def open_one(path: str, port: int) -> Client:
        _, client = await loop.create_connection(lambda: Client(upgrade_request(port, path, cookie), on_token),
                                                 "127.0.0.1", port)
        await client.open
        return client

    await asyncio.sleep(0.5)
    rss_before = server.rss_kib()
    started = time.perf_counter()
    by_room: list[list[Client]] = [[] for _ in slugs]
    in_flight = asyncio.Semaphore(50)  # like many browsers arriving at once, not all in one instant

    async def open_limited(room: int) -> None:
        async with in_flight:
            by_room[room].append(await open_one(f"/chat/{slugs[room]}/", port_of(room)))

    await asyncio.gather(*(open_limited(room) for room in range(rooms) for _ in range(sockets)))
    clients = [client for room in by_room for client in room]
    run.handshakes_per_s = len(clients) / (time.perf_counter() - started)
    await asyncio.sleep(1.0)  # let the server settle (presence frames, catch-up reads)
    run.rss_kib_per_idle_socket = (server.rss_kib() - rss_before) / len(clients)

    latencies.clear()
    total = int(rate * duration) * rooms  # messages in all, round-robin over the rooms
    rate *= rooms
    run.expected = total * sockets
    filler = (CHAT_LINE * (1 + size // len(CHAT_LINE)))[:max(0, size - 20)].strip()
    cpu_before, gen_before, wall_before = server.cpu_seconds(), time.process_time(), time.perf_counter()
    workers_before = server.cpu_by_worker()
    for n in range(total):
        target = wall_before + n / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[n] = time.perf_counter()
        room = by_room[n % rooms]
        text = f"tok{n}kot " + (code_block(n) if code_share and n % round(1 / code_share) == 0 else filler)
        if hook and n % 5 == 0:
            text = f"tok{n}kot @hook " + filler
        if api:  # (not awaited here: the next post goes at its time)
            posts.add(task := asyncio.create_task(api.post(
                f"/api/rooms/{slugs[n % rooms]}/messages", json={"text": text},
                headers={"authorization": f"Bearer {tokens[n % rooms]}"})))
            task.add_done_callback(posts.discard)
        else:
            room[(n // rooms) % senders].send(json.dumps({"message": text, "headers": {}}).encode())
    deadline = time.perf_counter() + 10  # wait for stragglers, bounded
    while len(latencies) < run.expected and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - wall_before
    server_cpu = server.cpu_seconds() - cpu_before
    for worker, (before, after) in enumerate(zip(workers_before, server.cpu_by_worker())):
        its_rooms = [room for room in range(rooms) if len(server.ports) > 1 and worker < serving and room % serving == worker]
        its_messages = sum(1 for n in range(total) if n % rooms in its_rooms)
        run.per_worker.append({"worker": worker, "rooms": len(its_rooms), "messages": its_messages,
                               "cpu_ms": round(1000 * (after - before), 1),
                               "cpu_us_per_message_of_its_rooms": round(1e6 * (after - before) / its_messages, 1)
                               if its_messages else None})
    run.generator_cpu_share = (time.process_time() - gen_before) / wall
    run.received = len(latencies)
    run.lost = run.expected - run.received
    if latencies:
        ordered = sorted(latencies)
        run.p50_ms = 1000 * statistics.median(ordered)
        run.p99_ms = 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        run.max_ms = 1000 * ordered[-1]
        run.cpu_us_per_frame = 1e6 * server_cpu / run.received
        run.cpu_us_per_message = 1e6 * server_cpu / total
    if run.generator_cpu_share > 0.9:
        run.valid = False
        run.notes.append("load generator saturated its core")
    closed = sum(c.closed for c in clients)
    if closed:
        run.notes.append(f"{closed} sockets closed by the server")
    for client in clients:
        client.transport.close()
    if api:
        await api.aclose()
    if hook:
        run.notes.append(f"{hook.calls} webhook calls, each held past the app's 7 s")
        hook.close()
    return run


VOTES_RE = re.compile(rb"(\d+) votes? so far")


async def class_poll(server: Server, voters: int, seconds: float, rounds: int) -> dict:
    """A class of `voters` (each a user with a page open, and the owner's page) votes in a poll
    within `seconds`: CPU per vote, and for each vote the time until every page shows a total
    that counts it. Then the same people each send one plain message in the same time, for
    the CPU and delay of a message in that room. `rounds` times over (a new poll each)."""
    import httpx

    base = f"http://127.0.0.1:{server.port}"
    owner_cookie, (slug,) = http_setup(server.port, 1)
    owner = httpx.AsyncClient(base_url=base, headers={"cookie": owner_cookie}, timeout=30)
    people = []
    for n in range(voters):  # (registered as a browser does; their forms need their own CSRF)
        client = httpx.AsyncClient(base_url=base, timeout=30)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', (await client.get("/auth/register/")).text).group(1)
        await client.post("/auth/register/", data={"csrf_token": csrf, "username": f"voter{n}",
                                                   "password1": PASSWORD, "password2": PASSWORD})
        room_page = (await client.get(f"/room/{slug}/")).text  # (opening it makes them a member)
        people.append((client, re.search(r'name="csrf_token" value="([^"]+)"', room_page).group(1)))
    owner_csrf = re.search(r'name="csrf_token" value="([^"]+)"', (await owner.get(f"/room/{slug}/")).text).group(1)
    loop = asyncio.get_running_loop()
    totals: list[dict[int, float]] = []  # per page: the first time it showed each total
    sent_at: dict[int, float] = {}
    seen: list[float] = []

    def page_of(shown: dict[int, float]):
        def on_frame(payload: bytes, now: float) -> None:
            for total in VOTES_RE.findall(payload):
                shown.setdefault(int(total), now)
        return on_frame

    pages = []
    for cookie in [owner_cookie] + [f"session={client.cookies['session']}" for client, _ in people]:
        totals.append(shown := {})
        _, page = await loop.create_connection(
            lambda: Client(upgrade_request(server.port, f"/chat/{slug}/", cookie),
                           lambda token, now: seen.append(now - sent_at[token]), page_of(shown)),
            "127.0.0.1", server.port)
        await page.open
        pages.append(page)
    await asyncio.sleep(1.0)
    vote_delays, message_delays, vote_cpu, message_cpu = [], [], 0.0, 0.0
    for round_ in range(rounds):
        for shown in totals:
            shown.clear()
        await owner.post(f"/room/{slug}/polls", data={"csrf_token": owner_csrf, "question": f"Round {round_}?",
                                                       "options": "yes\nno\nnot sure"})
        with sqlite3.connect(server.db_path) as db:
            poll = db.execute("SELECT max(id) FROM messages WHERE kind = 'poll'").fetchone()[0]
        await asyncio.sleep(0.5)
        for shown in totals:
            shown.clear()
        cpu, started, votes = server.cpu_seconds(), time.perf_counter(), []
        vote_sent: dict[int, float] = {}
        for k, (client, csrf) in enumerate(people, 1):
            await asyncio.sleep(max(0.0, started + (k - 1) * seconds / voters - time.perf_counter()))
            vote_sent[k] = time.perf_counter()
            votes.append(asyncio.create_task(client.post(f"/room/{slug}/polls/{poll}/vote",
                                                         data={"csrf_token": csrf, "option": str(1 + k % 3)})))
        await asyncio.gather(*votes)
        deadline = time.perf_counter() + 10
        while any(voters not in shown for shown in totals) and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        vote_cpu += server.cpu_seconds() - cpu
        for shown in totals:  # the k-th vote is shown once a page shows a total of k or more
            for k, at in vote_sent.items():
                first = min((when for total, when in shown.items() if total >= k), default=None)
                vote_delays.append(first - at if first is not None else float("inf"))
        seen.clear()
        cpu, started = server.cpu_seconds(), time.perf_counter()
        for k, page in enumerate(pages[1:]):
            await asyncio.sleep(max(0.0, started + k * seconds / voters - time.perf_counter()))
            token = round_ * voters + k
            sent_at[token] = time.perf_counter()
            page.send(json.dumps({"message": f"tok{token}kot " + CHAT_LINE, "headers": {}}).encode())
        deadline = time.perf_counter() + 10
        while len(seen) < voters * len(pages) and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        message_cpu += server.cpu_seconds() - cpu
        message_delays += seen + [float("inf")] * (voters * len(pages) - len(seen))
    for page in pages:
        page.transport.close()
    for client, _ in people:
        await client.aclose()
    await owner.aclose()

    def p99(delays: list[float]) -> float:
        ordered = sorted(delays)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    return {"voters": voters, "seconds": seconds, "rounds": rounds, "pages": len(pages),
            "cpu_us_per_vote": 1e6 * vote_cpu / (voters * rounds),
            "cpu_us_per_message": 1e6 * message_cpu / (voters * rounds),
            "vote_p99_ms": p99(vote_delays), "message_p99_ms": p99(message_delays),
            "lost": sum(d == float("inf") for d in vote_delays + message_delays)}


def one_run(kind: str, sockets: int, rate: float, senders: int, duration: float, size: int, ws: str,
            workers: int = 0, rooms: int = 1, pinned: bool = False, code_share: float = 0.0, bot: str = "") -> Run:
    with tempfile.TemporaryDirectory() as workdir:
        server = Server(kind, Path(workdir), ws, workers, pinned)
        try:
            return asyncio.run(fan_out(server, sockets, rate, senders, duration, size, rooms, code_share, bot))
        finally:
            server.stop()


# --- history: page load time against room size -------------------------------------------


def median_get_ms(client, url: str, repeats: int) -> float:
    client.get(url)  # warm
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert client.get(url).status_code == 200
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def catch_up_against_page_ms(path: Path, room_id: int, slug: str, count: int, repeats: int) -> dict:
    """A reconnect's catch-up at its bound (CATCH_UP_LIMIT missed messages, or all there are)
    against the newest history page, both read and rendered here, as the reader thread does."""
    import chat

    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    chat.add_sql_functions(db)

    def median_ms(work) -> float:
        work()  # warm
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            samples.append(time.perf_counter() - start)
        return 1000 * statistics.median(samples)

    try:
        return {"catch_up_ms": median_ms(lambda: chat.catch_up_frame(db, room_id, max(0, count - chat.CATCH_UP_LIMIT),
                                                                     f"http://127.0.0.1/room/{slug}/")),
                "history_page_ms": median_ms(lambda: str(chat.fragments.history_page(
                    {"code": slug}, *chat.page_before(db, room_id, None), oob=True)))}
    finally:
        db.close()


def fill_room(workdir: Path, slug: str, count: int, code: bool = False) -> int:
    """Put `count` messages in the room, in one transaction, straight into the database ("history
    message <n>"; the one halfway back also says "needle"; with `code`, each a code block of
    10-30 lines), each rendered as the app renders it; the room's id."""
    import chat

    def text(n: int) -> str:
        return (code_block(n) + "\n" if code else "") + f"history message {n}" + (" needle" if n == count // 2 else "")
    with sqlite3.connect(workdir / "bench.db") as db:
        room_id, user_id = db.execute("SELECT id, created_by FROM rooms WHERE code = ?", (slug,)).fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, html, created_at, revision) VALUES (?, ?, ?, ?, ?, ?)",
                       ((room_id, user_id, text(n), chat.render_text(text(n)).html, "2026-01-01T00:00:00Z", n + 1)
                        for n in range(count)))
    return room_id


def history_timings(sizes: list[int], repeats: int = 30, code: bool = False) -> list[dict]:
    results = []
    for count in sizes:
        with app_with_a_room_of(count, code) as (client, db_path, room_id, slug):
            older = f"/room/{slug}/messages?before={count // 2 + 1}"
            results.append({"messages": count, "room_page_ms": median_get_ms(client, f"/room/{slug}/", repeats),
                            "older_page_ms": median_get_ms(client, older, repeats),
                            **catch_up_against_page_ms(db_path, room_id, slug, count, repeats)})
    return results


@contextlib.contextmanager
def app_with_a_room_of(count: int, code: bool = False) -> Iterator[tuple[Any, Path, int, str]]:
    """The app on a fresh database with one room of `count` messages: (an httpx client logged
    in as its owner, the database's path, the room's id and its code); stopped afterwards."""
    import httpx

    with tempfile.TemporaryDirectory() as workdir:
        server = Server("app", Path(workdir), "auto")
        try:
            cookie, (slug,) = http_setup(server.port)
            room_id = fill_room(Path(workdir), slug, count, code)
            with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers={"Cookie": cookie}) as client:
                yield client, Path(workdir) / "bench.db", room_id, slug
        finally:
            server.stop()


# --- search: time to a page of hits against the number of messages -----------------------

SEARCHES = {"common word": "message", "rare word": "needle", "prefix": "mess", "two words": "history needle"}


def search_timings(sizes: list[int], repeats: int = 30) -> list[dict]:
    """GET /search/ (median ms) in a room of `count` messages, once the server has indexed them
    all: a word in every message (the newest 50 of them), a word in one message halfway back,
    a prefix of the common word, and two words."""
    results = []
    for count in sizes:
        with app_with_a_room_of(count) as (client, db_path, _, _):
            while True:  # the server indexes new messages in batches, each second: wait for all
                with sqlite3.connect(db_path) as db:
                    if db.execute("SELECT indexed_up_to >= (SELECT max(id) FROM messages) FROM search_state").fetchone()[0]:
                        break
                time.sleep(0.2)
            results.append({"messages": count, **{
                name: median_get_ms(client, f"/search/?q={query.replace(' ', '+')}", repeats)
                for name, query in SEARCHES.items()}})
    return results


# --- reporting ---------------------------------------------------------------------------


def print_pair(app: Run, base: Run, labels: tuple[str, str] = ("app", "baseline")) -> None:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    if app.rooms > 1:
        print(f"\n{app.rooms} rooms x {app.sockets} sockets, {app.rate:g} msg/s per room "
              f"({app.rooms * app.rate:,g} msg/s in all), {app.senders} sender per room")
    else:
        print(f"\nN={app.sockets} sockets, R={app.rate:g} msg/s, {app.senders} senders")
    rows = [
        ("deliveries expected", app.expected, base.expected, None),
        ("received", app.received, base.received, None),
        ("lost", app.lost, base.lost, None),
        ("latency p50 (ms)", app.p50_ms, base.p50_ms, None),
        ("latency p99 (ms)", app.p99_ms, base.p99_ms, None),
        ("latency max (ms)", app.max_ms, base.max_ms, None),
        ("server CPU per frame (us)", app.cpu_us_per_frame, base.cpu_us_per_frame, True),
        ("server CPU per message (us)", app.cpu_us_per_message, base.cpu_us_per_message, True),
        ("RSS per idle socket (KiB)", app.rss_kib_per_idle_socket, base.rss_kib_per_idle_socket, True),
        ("handshakes/s", app.handshakes_per_s, base.handshakes_per_s, True),
        ("generator CPU share (%)", 100 * app.generator_cpu_share, 100 * base.generator_cpu_share, None),
    ]
    print(f"  {'':28}{labels[0]:>12}{labels[1]:>12}{'ratio':>9}")
    for label, a, b, show_ratio in rows:
        fa = f"{a:,.1f}" if isinstance(a, float) else f"{a:,}"
        fb = f"{b:,.1f}" if isinstance(b, float) else f"{b:,}"
        print(f"  {label:28}{fa:>12}{fb:>12}{ratio(a, b) if show_ratio else '':>9}")
    for worker in app.per_worker:
        print(f"  worker {worker['worker']}: {worker['rooms']} rooms, {worker['messages']:,} messages in them, "
              f"{worker['cpu_ms']:,.0f} ms CPU" + (f", {worker['cpu_us_per_message_of_its_rooms']:,.0f} µs per message"
                                                  if worker["messages"] else " (no socket in any room)"))
    for run in (app, base):
        if not run.valid or run.notes:
            print(f"  {run.server}: {'INVALID: ' if not run.valid else ''}{'; '.join(run.notes)}")


def compare(args: argparse.Namespace, run) -> dict:
    """One shape: the app against the baseline, then (when asked) the floor against the
    baseline and Redis workers against one process; `run(kind, workers=0)` makes one run."""
    app, base = run("app"), run("baseline")
    result = {"app": asdict(app), "baseline": asdict(base)}
    if not args.json:
        print_pair(app, base)
    if args.floor:
        floor = run("floor")
        result["floor"] = asdict(floor)
        if not args.json:
            print("  the floor (the loop + a session read and a commit, each on a thread) against the loop:")
            print_pair(floor, base, ("floor", "baseline"))
    if args.workers:
        scaled = run("app", workers=args.workers, pinned=args.pinned)
        result["app_redis"] = asdict(scaled)
        if not args.json:
            print(f"  with Redis fan-out, {args.workers} workers{' (rooms pinned)' if args.pinned else ''}, "
                  "against one process:")
            print_pair(scaled, app, ("workers", "1 process"))
    result["ratios"] = ratios(result)
    if not args.json:
        print("  ratios: " + ", ".join(f"{name} {value:.2f}x" for name, value in result["ratios"].items()))
    return result


def ratios(result: dict) -> dict[str, float]:
    """The figures the performance targets are stated in, for one shape: the app against the
    loop and the floor, and Redis workers against one process."""
    app, base = result["app"], result["baseline"]
    per = "cpu_us_per_message" if app["rooms"] > 1 else "cpu_us_per_frame"
    found = {}

    def add(name: str, a: float, b: float) -> None:
        if a and b:
            found[name] = a / b

    add(f"app/loop {per}", app[per], base[per])
    add("app/loop handshakes", app["handshakes_per_s"], base["handshakes_per_s"])
    if floor := result.get("floor"):
        add(f"app/floor {per}", app[per], floor[per])
        add("app/floor handshakes", app["handshakes_per_s"], floor["handshakes_per_s"])
    if scaled := result.get("app_redis"):
        add(f"workers/1 process {per}", scaled[per], app[per])
        add("workers/1 process handshakes", scaled["handshakes_per_s"], app["handshakes_per_s"])
    return found


def many_rooms(args: argparse.Namespace) -> dict:
    """Small rooms, which is what most chats are: here the per-message work is the whole cost."""
    shape = dict(sockets=args.room_sockets, senders=1, duration=args.duration, size=args.size, ws=args.ws,
                 rooms=args.rooms)
    result: dict = {"runs": [], "capacity": {}}
    for rate in args.room_rates:
        result["runs"].append(compare(args, functools.partial(one_run, rate=rate, **shape)))
    if args.capacity:
        for kind in ("app", "baseline"):
            best = 0.0
            for rate in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 120, 140, 160, 200):  # per room
                run = one_run(kind, rate=rate, **{**shape, "duration": 5})
                if run.lost or run.p99_ms >= 100 or not run.valid:
                    break
                best = rate * args.rooms
            result["capacity"][kind] = best
        if not args.json:
            app, base = result["capacity"]["app"], result["capacity"]["baseline"]
            print(f"\nCapacity, {args.rooms} rooms x {args.room_sockets} sockets (nothing lost, p99 < 100 ms):"
                  f" app {app:,.0f} msg/s, baseline {base:,.0f} msg/s")
    return result


def code_messages(args: argparse.Namespace) -> dict:
    """A programming class: the many-rooms shape with one message in five a 10-30 line code
    block, against the same shape with plain messages, in the same run (app, then app), and a
    room page of 50 such messages against one of 50 plain ones."""
    shape = dict(sockets=args.room_sockets, senders=1, duration=args.duration, size=args.size, ws=args.ws,
                 rooms=args.rooms or 100, rate=args.room_rates[0])
    plain = one_run("app", **shape)
    code = one_run("app", **shape, code_share=0.2)
    result = {"plain": asdict(plain), "code": asdict(code),
              "code/plain cpu_us_per_message": over(code.cpu_us_per_message, plain.cpu_us_per_message),
              "page of 50 plain ms": history_timings([50])[0]["room_page_ms"],
              "page of 50 code ms": history_timings([50], code=True)[0]["room_page_ms"]}
    if not args.json:
        print(f"\nCode in messages, {shape['rooms']} rooms x {shape['sockets']} at {shape['rate']:g} msg/s per room,"
              " one message in five a 10-30 line code block:")
        print_pair(code, plain, ("with code", "plain"))
        print(f"  a room page of 50 messages: {result['page of 50 code ms']:.2f} ms with code blocks, "
              f"{result['page of 50 plain ms']:.2f} ms plain")
    return result


def over(a: float, b: float) -> float:
    """a / b, or 0 where b read 0 (CPU is counted in 10 ms ticks: a short run may read none)."""
    return a / b if b else 0.0


def class_shapes(args: argparse.Namespace) -> dict:
    """What a class and its scripts do, each against the plain message in the same run: a bot
    posting through the JSON API against the socket path (one room of 30, 50 msg/s); a room of
    30 talking at 10 msg/s while one message in five calls a webhook that never answers in
    time (the room's p99 must not move); a class of 30 voting in a poll within 2 s. (30:
    --class-size.)"""
    shape = dict(sockets=args.class_size, senders=1, duration=args.duration, size=args.size, ws=args.ws)
    socket_path, api_path = one_run("app", rate=50, **shape), one_run("app", rate=50, bot="api", **shape)
    quiet, hooked = one_run("app", rate=10, **shape), one_run("app", rate=10, bot="webhook", **shape)
    with tempfile.TemporaryDirectory() as workdir:
        server = Server("app", Path(workdir), args.ws)
        try:
            poll = asyncio.run(class_poll(server, voters=args.class_size, seconds=2.0, rounds=3))
        finally:
            server.stop()
    result = {"bot_socket": asdict(socket_path), "bot_api": asdict(api_path), "webhook_off": asdict(quiet),
              "webhook_slow": asdict(hooked), "poll": poll, "ratios": {
                  "api/socket cpu_us_per_message": over(api_path.cpu_us_per_message, socket_path.cpu_us_per_message),
                  "slow webhook/none p99": over(hooked.p99_ms, quiet.p99_ms),
                  "vote/message cpu_us": over(poll["cpu_us_per_vote"], poll["cpu_us_per_message"])}}
    if not args.json:
        print("\nA bot posting through the JSON API, one room of 30 at 50 msg/s, against the socket path:")
        print_pair(api_path, socket_path, ("API", "socket"))
        print("\nA webhook that takes over 7 s for one message in five, one room of 30 at 10 msg/s:")
        print_pair(hooked, quiet, ("slow hook", "no hook"))
        print(f"\nA class of {poll['voters']} voting in a poll within {poll['seconds']:g} s "
              f"({poll['rounds']} rounds, {poll['pages']} pages), against one message each in the same time:")
        print(f"  CPU per vote {poll['cpu_us_per_vote']:,.0f} us, per message {poll['cpu_us_per_message']:,.0f} us; "
              f"p99 until every page shows it: vote {poll['vote_p99_ms']:.1f} ms, message "
              f"{poll['message_p99_ms']:.1f} ms; lost {poll['lost']}")
        print("  ratios: " + ", ".join(f"{name} {value:.2f}x" for name, value in result["ratios"].items()))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the N x R grid (several minutes)")
    parser.add_argument("--sockets", type=int, nargs="+", default=[100, 500], help="N: sockets in the room")
    parser.add_argument("--rates", type=float, nargs="+", default=[20], help="R: messages per second offered")
    parser.add_argument("--senders", type=int, default=5, help="S: sockets that send")
    parser.add_argument("--duration", type=float, default=8, help="seconds of sending per run")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--history", type=int, nargs="*", default=[0, 50, 10_000, 100_000], help="room sizes to time")
    parser.add_argument("--search", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="room sizes to time a search in")
    parser.add_argument("--ws", default="auto", help="uvicorn WebSocket implementation for both servers")
    parser.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="the event loop of every server in the run (uvicorn's; auto: uvloop if installed)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also run the app as `uvicorn chat:app --workers N` with Redis fan-out (needs redis-server)")
    parser.add_argument("--pinned", action="store_true",
                        help="with --workers N: N processes on ports of their own, each room on one of the first "
                             "N-1 (the last serves none), CPU per worker")
    parser.add_argument("--rooms", type=int, default=0,
                        help="also run the many-rooms shape: this many rooms of --room-sockets each, one sender each")
    parser.add_argument("--room-sockets", type=int, default=3, help="sockets per room in the many-rooms shape")
    parser.add_argument("--room-rates", type=float, nargs="+", default=[10, 30], help="messages/s per room there")
    parser.add_argument("--capacity", action="store_true",
                        help="step the many-rooms rate up until p99 passes 100 ms or a message is lost")
    parser.add_argument("--floor", action="store_true",
                        help="also run the floor: the baseline plus a session read and a commit on threads")
    parser.add_argument("--code", action="store_true",
                        help="the many-rooms shape with one message in five a 10-30 line code block, against plain")
    parser.add_argument("--shapes", action="store_true",
                        help="a bot through the API, a slow webhook, a class voting in a poll (with --rooms too)")
    parser.add_argument("--no-shapes", action="store_true", help="with --rooms: not the code and class shapes")
    parser.add_argument("--class-size", type=int, default=30, help="sockets and voters in the class shapes")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--floor-db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline, args.ws, args.floor_db, args.loop)
    os.environ["CHAT_LOOP"] = args.loop  # every server of the run (app, floor, loop) on the same loop
    if args.full:
        args.sockets, args.rates, args.duration = [100, 500, 1000], [10, 20, 50], 10
        args.rooms, args.capacity, args.floor = args.rooms or 100, True, True
    os.sched_setaffinity(0, {1}) if hasattr(os, "sched_setaffinity") and os.cpu_count() >= 2 else None

    report: dict = {"fan_out": [], "history": []}
    for sockets in args.sockets:
        for rate in args.rates:
            report["fan_out"].append(compare(args, functools.partial(
                one_run, sockets=sockets, rate=rate, senders=args.senders, duration=args.duration, size=args.size,
                ws=args.ws)))
    if args.rooms:
        report["many_rooms"] = many_rooms(args)
    if args.code or (args.rooms and not args.no_shapes):
        report["code"] = code_messages(args)
    if args.shapes or (args.rooms and not args.no_shapes):
        report["class"] = class_shapes(args)
    if args.history:
        report["history"] = history_timings(args.history)
        if not args.json:
            print("\nHistory (median of 30 GETs)")
            print(f"  {'messages':>10}{'room page (ms)':>16}{'older page (ms)':>17}"
                  f"{'catch-up at its bound (ms)':>28}{'a history page (ms)':>21}")
            for row in report["history"]:
                print(f"  {row['messages']:>10,}{row['room_page_ms']:>16.2f}{row['older_page_ms']:>17.2f}"
                      f"{row['catch_up_ms']:>28.2f}{row['history_page_ms']:>21.2f}")
    if args.search:
        report["search"] = search_timings(args.search)
        if not args.json:
            print("\nSearch (median of 30 GETs of /search/, ms)")
            print(f"  {'messages':>10}" + "".join(f"{name:>14}" for name in SEARCHES))
            for row in report["search"]:
                print(f"  {row['messages']:>10,}" + "".join(f"{row[name]:>14.2f}" for name in SEARCHES))
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
