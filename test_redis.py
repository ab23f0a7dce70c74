"""Scaling out: two app processes, one database file, one real redis-server.

redis-server comes from Debian's package `redis-server` (.ci/run installs it). Without it
these tests skip and say why; where BACKCHAT_REQUIRE_REDIS=1 (CI sets it) they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from conftest import ACK, LiveServer, free_port, live_client
from test_server import frame, frames_until, guess_all_at_once, login_cookie, make_room, ws_connect


class RedisServer:
    def __init__(self, workdir, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import redis

                with redis.Redis(port=self.port, socket_timeout=1) as probe:
                    if probe.ping():
                        return self
            except Exception:
                time.sleep(0.05)  # not listening yet: poll again, bounded by the deadline
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("BACKCHAT_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis package is not installed (pip install redis)")
    server = RedisServer(tmp_path).start()
    yield server
    if server.process.poll() is None:
        server.kill()


@contextlib.contextmanager
def workers(tmp_path, redis_server: RedisServer, **env: str):
    """Two app processes on different ports sharing one database file and one Redis."""
    running = [LiveServer(tmp_path / "chat.db", CHAT_REDIS_URL=redis_server.url, **env).start() for _ in range(2)]
    try:
        yield running
    finally:
        for worker in running:
            worker.stop()


@pytest.fixture
def two_workers(tmp_path, redis_server):
    with workers(tmp_path, redis_server, CHAT_MESSAGE_RATE="0") as running:
        yield running


def ada_and_bob(a: LiveServer, b: LiveServer, room: str) -> tuple[str, str, str]:
    """ada (registered through worker a) creates `room`; bob registers through worker b.
    Returns the room's slug and their Cookie headers."""
    client, ada = login_cookie(a, "ada")
    slug = make_room(client, room)
    _, bob = login_cookie(b, "bob")
    return slug, ada, bob


def test_messages_and_presence_cross_workers(two_workers):
    a, b = two_workers
    slug, ada, bob = ada_and_bob(a, b, "across")

    async def run() -> None:
        async with ws_connect(a, slug, ada) as on_a:
            await frames_until(on_a, "<bdi>ada</bdi>")
            async with ws_connect(b, slug, bob) as on_b:
                # presence is the union over both workers, shown on both
                for ws in (on_a, on_b):
                    presence = await frames_until(ws, "<bdi>bob</bdi>")
                    assert "<bdi>ada</bdi>" in presence
                await on_a.send(frame("from worker a"))
                await on_b.send(frame("from worker b"))
                for ws in (on_a, on_b):
                    texts = []
                    while len(texts) < 2:
                        texts += re.findall(r"<div class=\"body\" dir=\"auto\"><p>(from worker .)</p>", await frames_until(ws, "msg-"))
                    assert sorted(texts) == ["from worker a", "from worker b"]  # each once
            presence = await frames_until(on_a, 'id="presence"')  # bob left, as seen on worker a
            assert "bob" not in presence

    asyncio.run(run())
    with sqlite3.connect(a.db_path) as db:
        assert sorted(t for (t,) in db.execute("SELECT text FROM messages")) == ["from worker a", "from worker b"]


def test_redis_outage_loses_nothing_and_clients_recover(two_workers, redis_server):
    a, b = two_workers
    slug, ada, bob = ada_and_bob(a, b, "outage")

    async def run() -> tuple[int, str]:
        async with ws_connect(a, slug, ada) as on_a, ws_connect(b, slug, bob) as on_b:
            await frames_until(on_b, "<bdi>ada</bdi>")
            await on_a.send(frame("before"))
            last_seen = int(re.search(r"msg-(\d+)", await frames_until(on_b, "before")).group(1))

            redis_server.kill()
            await on_a.send(frame("during the outage"))
            await frames_until(on_a, "during the outage")  # worker a still serves its own pages

            redis_server.start()  # same port: both workers reconnect to it by themselves
            with pytest.raises(ConnectionClosed) as closed:  # worker b asks its pages to reconnect
                while True:
                    await asyncio.wait_for(on_b.recv(), 30)
            code = closed.value.rcvd.code
        # bob's page reconnects, as htmx would, with the newest id it holds, and catches up
        async with ws_connect(b, slug, bob, query=f"?revision={last_seen}") as again:
            return code, await frames_until(again, "during the outage")

    code, caught_up = asyncio.run(run())
    assert code == 1012
    assert "during the outage" in caught_up and "before" not in caught_up
    with sqlite3.connect(a.db_path) as db:
        assert [t for (t,) in db.execute("SELECT text FROM messages ORDER BY id")] == ["before", "during the outage"]
    assert "Redis unreachable" in a.log_path.read_text()


def test_rate_limits_count_across_workers(tmp_path, redis_server):
    with workers(tmp_path, redis_server, CHAT_MESSAGE_RATE="3") as (a, b):
        client, ada = login_cookie(a, "ada")
        slug = make_room(client, "limits")

        async def run() -> str:
            async with ws_connect(a, slug, ada) as on_a, ws_connect(b, slug, ada) as on_b:
                for ws, text in ((on_a, "one"), (on_b, "two"), (on_a, "three")):
                    await ws.send(frame(text))
                    await frames_until(ws, ACK)
                await on_b.send(frame("four"))
                return await frames_until(on_b, "chat-error")

        assert "too fast" in asyncio.run(run())
        with sqlite3.connect(a.db_path) as conn:
            assert conn.execute("SELECT count(*) FROM messages").fetchone() == (3,)


def test_a_crashed_workers_users_leave_presence(two_workers):
    a, b = two_workers
    slug, ada, bob = ada_and_bob(a, b, "crash")

    async def run() -> str:
        async with ws_connect(a, slug, ada) as on_a:
            await ws_connect(b, slug, bob).__aenter__()  # never closed: its worker dies
            await frames_until(on_a, "<bdi>bob</bdi>")
            b.process.kill()  # no goodbye: bob's entry stays in Redis until it expires
            # within PRESENCE_TTL (20 s) + one heartbeat (5 s), worker a's heartbeat drops it
            for _ in range(20):
                presence = await asyncio.wait_for(on_a.recv(), 40)
                if 'id="presence"' in presence and "bob" not in presence:
                    return presence
            raise AssertionError("bob never left")

    assert "<bdi>ada</bdi>" in asyncio.run(run())


def test_logging_out_closes_the_sessions_sockets_on_every_worker(two_workers):
    a, b = two_workers
    client, ada = login_cookie(a, "ada")
    slug = make_room(client, "log out here, closed there")

    async def run() -> tuple[int, str]:
        async with ws_connect(b, slug, ada) as on_b:  # the same session's page, on the other worker
            await frames_until(on_b, "<bdi>ada</bdi>")
            token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)
            assert client.post("/auth/logout/", data={"csrf_token": token}).status_code == 303  # through a
            received = []
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(5):  # at once: not after heartbeats
                    received.append(await asyncio.wait_for(on_b.recv(), 10))
            return closed.value.rcvd.code, "".join(received)

    code, received = asyncio.run(run())
    assert code == 1008 and "You were logged out" in received


def test_concurrent_password_guesses_across_workers_cannot_skip_the_limit(two_workers):
    a, b = two_workers
    login_cookie(a, "ada")
    statuses = asyncio.run(guess_all_at_once([a.url, b.url], 40, live_client(a.url)))
    checked = statuses[:-1].count(400)
    assert checked <= 10 and statuses[-1] == 429, statuses


def test_the_login_refusal_says_truly_when_to_try_again_across_workers(two_workers):
    """Failures count in blocks of the clock (15 minutes, the same on every worker): the
    refusal names the end of the block, when the count starts again (it said "16 minutes",
    each failure's counter lifetime, however little of the block was left)."""
    a, b = two_workers
    login_cookie(a, "ada")
    client = live_client(a.url)
    assert asyncio.run(guess_all_at_once([a.url], 10, client)) == [400] * 10 + [429]  # (its last: a look)
    page = live_client(b.url, cookies=client.cookies)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get("/auth/login/").text).group(1)
    minutes = [-(-int(900 - time.time() % 900) // 60)]  # what is left of the block, in whole minutes
    refused = page.post("/auth/login/", data={"csrf_token": token, "username": "ada", "password": "wrong"})
    minutes.append(-(-int(900 - time.time() % 900) // 60))
    said = refused.text
    assert refused.status_code == 429
    assert any(f"Try again {'in a minute' if m == 1 else f'in {m} minutes'}." in said for m in minutes), said


# --- Redis: failures and limits across workers ---------------------------------------------------


def redis_client(redis_server: RedisServer):
    import redis

    return redis.Redis(port=redis_server.port, socket_timeout=10)


def test_a_message_stored_during_a_redis_pause_reaches_the_other_workers_pages(two_workers, redis_server):
    """What a failover does: Redis stops taking writes for 5 s. A message sent meanwhile is
    stored and shown on its own worker; when Redis answers again, every worker asks the
    pages in that room to reconnect (1012), and they catch up on it."""
    a, b = two_workers
    slug, ada, bob = ada_and_bob(a, b, "paused")

    async def run() -> tuple[int, str]:
        async with ws_connect(a, slug, ada) as on_a, ws_connect(b, slug, bob) as on_b:
            await frames_until(on_b, "<bdi>ada</bdi>")
            await on_a.send(frame("before"))
            last_seen = int(re.search(r'name="revision" value="(\d+)"', await frames_until(on_b, "before")).group(1))
            with redis_client(redis_server) as admin:
                admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            await on_a.send(frame("during the pause"))
            await frames_until(on_a, "during the pause", limit=50)  # stored, and shown on its own worker
            received = []
            with pytest.raises(ConnectionClosed) as closed:  # once Redis answers: reconnect and catch up
                while True:
                    received.append(await asyncio.wait_for(on_b.recv(), 30))
            code = closed.value.rcvd.code
        if any("during the pause" in f for f in received):
            return code, "live"
        async with ws_connect(b, slug, bob, query=f"?revision={last_seen}") as again:
            return code, await frames_until(again, "during the pause")

    code, caught_up = asyncio.run(run())
    assert code == 1012 and "during the pause" in caught_up
    log = a.log_path.read_text()
    assert "Redis unreachable" in log and "Redis is back" in log


def test_the_login_form_cannot_fill_redis(two_workers, redis_server):
    a, _ = two_workers
    client, _ = login_cookie(a, "ada")
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/auth/login/").text).group(1)
    with redis_client(redis_server) as admin:
        before, used = set(admin.keys("*")), admin.info("memory")["used_memory"]
        for n in range(200):
            response = client.post("/auth/login/", data={"csrf_token": token, "username": f"{n}{'x' * 60_000}",
                                                          "password": "wrong"})
            assert response.status_code == 400
        assert set(admin.keys("*")) <= before  # refused before anything was counted
        for n in range(20):  # names that could exist are counted, under keys of one size
            client.post("/auth/login/", data={"csrf_token": token, "username": f"someone{n}{'y' * 140}",
                                              "password": "wrong"})
        counted = set(admin.keys("*")) - before
        assert counted and all(re.fullmatch(rb"backchat:(failures|inflight):900:[0-9a-f]{24}(:\d+)?", k) for k in counted)
        assert admin.info("memory")["used_memory"] - used < 256 * 1024


def test_slow_mode_is_a_sliding_window_on_every_worker(two_workers):
    """Issue 29, 12: with Redis, slow mode counted in fixed blocks of the clock, so two
    messages 0.81 s apart passed under 30 s slow mode when they straddled a block's end. Now
    every limit counted in Redis is a sliding window, as in one process."""
    a, b = two_workers
    owner, _ = login_cookie(a, "ada")
    slug = make_room(owner, "slow across")
    _, bob = login_cookie(b, "bob")
    httpx.get(f"{b.url}/room/{slug}/", headers={"Cookie": bob})
    assert owner_step(owner, slug, "slow_mode", slow_mode="5").status_code == 303

    async def run() -> str:
        async with ws_connect(a, slug, bob) as on_a, ws_connect(b, slug, bob) as on_b:
            await frames_until(on_a, "presence")
            await frames_until(on_b, "presence")
            await asyncio.sleep(5 - time.time() % 5 + 4.5)  # half a second before a 5 s block ends
            await on_a.send(frame("just before"))
            await frames_until(on_a, "just before")
            await asyncio.sleep(1.0)  # the next block of the clock: a fixed window starts again
            await on_b.send(frame("too soon"))
            return await frames_until(on_b, "chat-error")
    answer = asyncio.run(run())
    assert "Slow mode" in answer
    with sqlite3.connect(a.db_path) as db:
        assert [text for (text,) in db.execute("SELECT text FROM messages")] == ["just before"]


# --- Redis: moderation, reactions and room state across workers ----------------------------------


def owner_step(client: httpx.Client, slug: str, step: str, **fields: str) -> httpx.Response:
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get(f"/room/{slug}/manage").text).group(1)
    return client.post(f"/room/{slug}/manage", data={"csrf_token": token, "step": step, **fields})


def test_removing_locking_clearing_and_deleting_reach_the_other_workers_pages(two_workers):
    a, b = two_workers
    client, ada = login_cookie(a, "ada")
    slug = make_room(client, "run across workers")
    bob_client, bob = login_cookie(b, "bob")
    _, carol = login_cookie(b, "carol")
    for cookie in (bob, carol):  # both become members by opening the room
        httpx.get(f"{b.url}/room/{slug}/", headers={"Cookie": cookie})
    bob_id = int(re.search(r'name="user_id" value="(\d+)"[^<]*<button[^>]*>Remove bob',
                           client.get(f"/room/{slug}/manage").text.replace("\n", " ")).group(1))

    async def run() -> None:
        async with ws_connect(b, slug, bob) as bob_page, ws_connect(b, slug, carol) as carol_page:
            await frames_until(carol_page, "<bdi>bob</bdi>")
            owner_step(client, slug, "lock")  # through worker a...
            assert "data-locked" in await frames_until(carol_page, "room-state")  # ...seen on worker b
            await carol_page.send(frame("may I?"))
            assert "locked by its owner" in await frames_until(carol_page, "chat-error")  # and obeyed there
            owner_step(client, slug, "unlock")
            await frames_until(carol_page, 'data-owners')
            owner_step(client, slug, "remove", user_id=str(bob_id))
            received = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.append(await asyncio.wait_for(bob_page.recv(), 10))
            assert closed.value.rcvd.code == 1008 and "You were removed from this room." in "".join(received)
            await carol_page.send(frame("before the clear"))
            await frames_until(carol_page, "before the clear")
            token = re.search(r'name="csrf_token" value="([^"]+)"', client.get(f"/room/{slug}/clear").text).group(1)
            assert client.post(f"/room/{slug}/clear", data={"csrf_token": token}).status_code == 303
            emptied = await frames_until(carol_page, 'id="messages"')
            assert 'hx-swap-oob="innerHTML"' in emptied and "before the clear" not in emptied
            token = re.search(r'name="csrf_token" value="([^"]+)"', client.get(f"/room/{slug}/delete-room").text).group(1)
            assert client.post(f"/room/{slug}/delete-room", data={"csrf_token": token}).status_code == 303
            received = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.append(await asyncio.wait_for(carol_page.recv(), 10))
            assert closed.value.rcvd.code == 1008 and "This room was deleted." in "".join(received)

    asyncio.run(run())
    assert httpx.get(f"{b.url}/room/{slug}/", headers={"Cookie": carol}).status_code == 404


def test_a_room_state_from_a_worker_of_another_version_is_understood_by_name(two_workers, redis_server):
    """The room's state travels by name: a field this worker does not know (a newer worker's)
    is left out, one missing (an older worker's) keeps its default, and a notice it cannot read
    at all (the old positional list) is skipped. The sockets stay open throughout (a state
    notice unpacked by position raised in the listener, which took it for Redis being away
    and closed every socket with 1012)."""
    import redis

    a, b = two_workers
    slug, ada, bob = ada_and_bob(a, b, "versions")
    httpx.get(f"{b.url}/room/{slug}/", headers={"Cookie": bob})  # bob becomes a member
    with sqlite3.connect(a.db_path) as db:
        room_id, ada_id = db.execute("SELECT id, created_by FROM rooms WHERE code = ?", (slug,)).fetchone()
    notices = redis.Redis(port=redis_server.port)

    def state(frame_text: str, **fields) -> str:
        return json.dumps({"room_id": room_id, "frame": f'<p id="probe" hx-swap-oob="true">{frame_text}</p>',
                           "state": fields})

    async def run() -> None:
        async with ws_connect(b, slug, bob) as bob_page:
            await frames_until(bob_page, "<bdi>bob</bdi>")
            notices.publish("backchat:state", json.dumps({"room_id": room_id, "frame": "<p>old</p>",
                                                          "state": [slug, [ada_id], True, 0]}))
            notices.publish("backchat:state", state("newer", code=slug, owners=[ada_id], locked=True, slow_mode=0,
                                                    pinned={"message_id": 7}, colour="red"))
            assert "newer" in await frames_until(bob_page, "probe")
            await bob_page.send(frame("may I?"))
            assert "locked by its owner" in await frames_until(bob_page, "chat-error")  # applied
            notices.publish("backchat:state", state("older", code=slug, owners=[ada_id]))  # no lock, no slow mode
            assert "older" in await frames_until(bob_page, "probe")
            await bob_page.send(frame("now?"))
            assert "now?" in await frames_until(bob_page, "msg-")  # unlocked: the default
    asyncio.run(run())
    assert "could not use a notice on backchat:state" in b.log_path.read_text()
    assert "Redis unreachable" not in b.log_path.read_text()


def test_reactions_and_quotes_reach_the_other_workers_pages(two_workers):
    a, b = two_workers
    client, ada = login_cookie(a, "ada")
    slug = make_room(client, "reacting across workers")
    bob_client, bob = login_cookie(b, "bob")
    httpx.get(f"{b.url}/room/{slug}/", headers={"Cookie": bob})  # a member

    async def run() -> None:
        async with ws_connect(a, slug, ada) as ada_page, ws_connect(b, slug, bob) as bob_page:
            await bob_page.send(frame("a message on worker b"))
            said = int(re.search(r'id="msg-(\d+)"', await frames_until(ada_page, "a message on worker b")).group(1))
            token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)
            given = client.post(f"/room/{slug}/messages/{said}/react", data={"give": "🎉"},
                                headers={"x-csrf-token": token, "hx-request": "true"})
            assert given.status_code == 200  # through worker a...
            assert re.search(r'title="party">.*🎉 1</button>', await frames_until(bob_page, "reactions"))  # ...on b
            await ada_page.send(json_frame("an answer from a", reply_to=str(said)))
            answer = await frames_until(bob_page, "an answer from a")
            assert f'<a class="quote" href="#msg-{said}"><bdi>bob</bdi>: <q dir="auto">a message on worker b</q>' in answer

    asyncio.run(run())


def test_votes_the_pin_and_answers_reach_the_other_workers_pages_and_a_page_that_was_offline(two_workers):
    """Issue 32: a poll voted in, pinned, and a question answered through worker a reach a page on
    worker b live, and a page that was offline catches up with all of it on reconnecting (to b)."""
    a, b = two_workers
    client, ada = login_cookie(a, "ada")
    slug = make_room(client, "a class across workers")
    room = f"/room/{slug}/"
    bob_client, bob = login_cookie(b, "bob")
    offline_at = int(re.search(r'id="room-revision" name="revision" value="(\d+)"',
                               bob_client.get(room).text).group(1))  # (a member; the page then goes away)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)
    htmx = {"x-csrf-token": token, "hx-request": "true"}

    async def run() -> None:
        async with ws_connect(b, slug, bob) as bob_page:
            assert client.post(f"{room}polls", data={"question": "Tabs?", "options": "yes\nno"},
                               headers=htmx).status_code == 200
            poll = int(re.search(r'id="msg-(\d+)"', await frames_until(bob_page, "Tabs?")).group(1))
            await bob_page.send(json.dumps({"message": "Why tabs?", "question": "1"}))
            question = int(re.search(r'id="msg-(\d+)"', await frames_until(bob_page, "Why tabs?")).group(1))
            for url, fields, seen in [(f"polls/{poll}/vote", {"option": "2"}, "1 vote"),
                                      (f"messages/{poll}/pin", {}, 'id="pinned-title"'),
                                      (f"questions/{question}/answered", {}, "<h3>Answered</h3>")]:
                assert client.post(room + url, data=fields, headers=htmx).status_code == 200  # through a...
                await frames_until(bob_page, seen)  # ...on b
        async with ws_connect(b, slug, bob) as returning:  # the page that was offline all along
            await returning.send(json.dumps({"revision": str(offline_at)}))
            caught_up = await frames_until(returning, 'id="pinned"')
            assert "Tabs?" in caught_up and "1 vote" in caught_up and "<h3>Answered</h3>" in caught_up

    asyncio.run(run())


def json_frame(text: str, **fields: str) -> str:
    return json.dumps({"message": text, **fields})


def room_subscribers(redis_server: RedisServer, room_id: int) -> int:
    """How many workers are subscribed to the room's frames."""
    return dict(redis_client(redis_server).pubsub_numsub(f"backchat:room:{room_id}"))[f"backchat:room:{room_id}".encode()]


def test_a_worker_hears_only_the_rooms_it_has_sockets_in(two_workers, redis_server):
    a, b = two_workers
    ada_client, ada = login_cookie(a, "ada")
    here = make_room(ada_client, "on worker a")
    bob_client, bob = login_cookie(b, "bob")
    there = make_room(bob_client, "on worker b")
    with sqlite3.connect(a.db_path) as db:
        here_id, there_id = (db.execute("SELECT id FROM rooms WHERE code = ?", (slug,)).fetchone()[0] for slug in (here, there))
    bob_client.get(f"/room/{here}/")  # bob is a member of ada's room, through worker b, with no socket there

    def subscribers_become(room_id: int, count: int) -> None:
        deadline = time.monotonic() + 10
        while room_subscribers(redis_server, room_id) != count:
            assert time.monotonic() < deadline, f"room {room_id} kept {room_subscribers(redis_server, room_id)} subscribers"
            time.sleep(0.02)

    async def run() -> None:
        assert room_subscribers(redis_server, here_id) == 0  # nobody has a socket in it yet
        async with ws_connect(a, here, ada) as ada_page, ws_connect(b, there, bob) as bob_page:
            await frames_until(ada_page, "<bdi>ada</bdi>")
            await frames_until(bob_page, "<bdi>bob</bdi>")
            # each worker is subscribed to its own room only: b gets none of a's room's frames
            assert room_subscribers(redis_server, here_id) == 1 and room_subscribers(redis_server, there_id) == 1
            token = re.search(r'name="csrf_token" value="([^"]+)"', bob_client.get(f"/room/{here}/").text).group(1)
            assert bob_client.post(f"/room/{here}/messages", data={"csrf_token": token, "message": "posted on b"}).status_code == 303
            await frames_until(ada_page, "posted on b")  # sent through b, heard on a
            async with ws_connect(b, here, bob) as bob_in_here:  # b's first socket in it: b subscribes...
                assert room_subscribers(redis_server, here_id) == 2
                assert "<bdi>bob</bdi>" in await frames_until(ada_page, 'id="presence"')  # presence crosses
                await ada_page.send(frame("from a to both"))
                await frames_until(bob_in_here, "from a to both")
            subscribers_become(here_id, 1)  # ...and unsubscribes after its last socket there closes
            await ada_page.send(frame("after bob left"))
            await frames_until(ada_page, "after bob left")
            with pytest.raises(asyncio.TimeoutError):  # bob's page in his own room hears nothing of it
                while True:
                    assert "after bob left" not in await asyncio.wait_for(bob_page.recv(), 1)
        subscribers_become(here_id, 0)
        subscribers_become(there_id, 0)

    asyncio.run(run())


def test_a_real_code_past_the_guess_limit_is_refused_on_every_worker(tmp_path, redis_server):
    """A handshake with a real code is not counted as a guess (one look at the counts in Redis),
    but once the user's guesses are past the limit it is refused there too, on any worker."""
    with workers(tmp_path, redis_server, CHAT_ROOM_GUESSES="3") as (a, b):
        client, ada = login_cookie(a, "ada")
        real = make_room(client, "real")

        async def handshake(server: LiveServer) -> bool:
            try:
                async with ws_connect(server, real, ada):
                    return True
            except Exception:  # refused: 403 at the handshake
                return False

        assert asyncio.run(handshake(b))  # a real code: in, and not counted
        assert [client.get(f"/room/room-guess{n}/").status_code for n in range(3)] == [404] * 3  # guesses, on a
        assert client.get(f"/room/{real}/").status_code == 429
        assert not asyncio.run(handshake(b))  # past the limit: refused on b as well


def test_a_class_arriving_at_once_is_written_to_redis_in_a_few_trips(tmp_path, redis_server):
    """Who came online is written when the presence window ends, in one pipeline with every
    other room's: 12 people opening a room at once on two workers cost a few ZADDs, not one
    each (and one presence read per worker per window), and every page lists all 12."""
    # (Handshakes are counted in Redis too, in sorted sets of their own: off here, so that
    # every ZADD counted is presence's.)
    with workers(tmp_path, redis_server, CHAT_REGISTER_RATE="0", CHAT_HANDSHAKE_RATE="0") as (a, b):
        client, _ = login_cookie(a, "teacher")
        slug = make_room(client, "class")
        cookies = [login_cookie(a, f"student{n}")[1] for n in range(12)]
        stats = redis_client(redis_server)
        stats.config_resetstat()

        async def run() -> None:
            async with contextlib.AsyncExitStack() as stack:
                pages = await asyncio.gather(*(stack.enter_async_context(ws_connect((a, b)[n % 2], slug, cookie))
                                               for n, cookie in enumerate(cookies)))
                for page in pages:
                    await frames_until(page, 'id="online-count" hx-swap-oob="true">12<')

        asyncio.run(run())
        calls = {name: stats.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0)
                 for name in ("zadd", "zrangebyscore")}
        assert calls["zadd"] <= 6 and calls["zrangebyscore"] <= 12, calls  # (each socket did one of each)



def test_a_bot_posts_through_one_worker_to_pages_on_the_other_its_webhook_is_called_once_and_removal_stops_it_on_both(
        two_workers):
    """Issue 33: a bot's post through worker a reaches a page on worker b, marked "bot"; a mention
    stored by b calls the webhook once (from b, not from every worker) and its answer reaches the
    page; the bot removed through b, its token is refused at once by both workers."""
    from test_bots import Webhook

    a, b = two_workers
    client, ada = login_cookie(a, "ada")
    slug = make_room(client, "a bot across workers")
    hook = Webhook({"text": "It is noon."})
    added = owner_step(client, slug, "add_bot", bot_name="clock", webhook_url=hook.url)  # through a
    token = re.search(r'<code id="bot-token">([^<]+)</code>', added.text).group(1)
    with sqlite3.connect(a.db_path) as db:
        bot_id = str(db.execute("SELECT user_id FROM bots").fetchone()[0])
    b_client = live_client(b.url, cookies=client.cookies, follow_redirects=False)
    try:
        _, bob = login_cookie(b, "bob")
        bearer = {"authorization": f"Bearer {token}"}

        async def run() -> None:
            async with ws_connect(b, slug, bob) as bob_page:
                posted = httpx.post(f"{a.url}/api/rooms/{slug}/messages", headers=bearer,
                                    json={"text": "build 41 passed"})
                assert posted.status_code == 201, posted.text
                seen = await frames_until(bob_page, "build 41 passed")
                assert '<bdi class="author">clock</bdi> <small class="guest">bot</small>' in seen
                await bob_page.send(json_frame("@clock what time is it?"))
                await frames_until(bob_page, "It is noon.")

        asyncio.run(run())
        assert [called["message"]["text"] for _, called in hook.calls] == ["@clock what time is it?"]
        assert owner_step(b_client, slug, "remove_bot", user_id=bot_id).status_code == 303
        for worker in (a, b):
            refused = httpx.post(f"{worker.url}/api/rooms/{slug}/messages", headers=bearer,
                                 json={"text": "after removal"})
            assert refused.status_code == 401, worker.url
    finally:
        b_client.close()
        hook.close()
