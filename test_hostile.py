"""Property-based tests: hostile input to the forms and the WebSocket never breaks anything.

Invariants checked after every generated input: no 500 and no traceback in a response, the
socket of an innocent client stays open and working, the database holds no empty or oversized
message, and /healthz still answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import chat
from conftest import app_settings as make_settings
from test_chat import (ORIGIN, create_room, csrf, post_form, receive_until, refused_at_handshake, register, send,
                       writes_done)

# Any code point at all: NUL, lone surrogates, right-to-left overrides, emoji...
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)
nasty_text = st.one_of(
    any_text,
    st.sampled_from(["\x00", "\ud800", "\u202eevil", "<script>alert(1)</script>", " ", "x" * 1_000_000]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
HOSTILE = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
def app_settings(tmp_path):
    return make_settings(db_path=tmp_path / "chat.db", message_rate=0, room_rate=0, login_failures=0,
                         register_rate=0, room_guesses=0)


def assert_database_consistent(app_settings: chat.Settings) -> None:
    with sqlite3.connect(app_settings.db_path) as db:
        assert db.execute("SELECT count(*) FROM messages WHERE length(trim(text)) = 0 OR length(text) > 4000").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM rooms WHERE length(name) NOT BETWEEN 1 AND 128").fetchone() == (0,)
        names = [name for (name,) in db.execute("SELECT username FROM users")]
    assert all(re.fullmatch(r"[\w.@+-]{1,150}", name) for name in names)


def test_forms_survive_any_input(app_settings):
    with TestClient(chat.create_app(app_settings), raise_server_exceptions=False) as client:
        register(client, "owner")
        token = csrf(client.get("/").text)

        @HOSTILE
        @given(path=st.sampled_from(["/auth/register/", "/auth/login/", "/create/", "/join/"]),
               fields=st.dictionaries(st.sampled_from(["username", "password", "password1", "password2", "next",
                                                        "room_name", "code", "extra"]),
                                      st.binary(max_size=300) | nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                                      max_size=5))
        def post_anything(path, fields):
            body = "&".join(f"{name}={quote_from_bytes(value)}" for name, value in {**fields, "csrf_token": token.encode()}.items())
            response = client.post(path, content=body.encode(), follow_redirects=False,
                                   headers={"content-type": "application/x-www-form-urlencoded"})
            assert response.status_code < 500, response.text
            assert "Traceback" not in response.text
            if path == "/auth/register/" and response.status_code == 303:
                client.cookies.clear()  # a new account logged us in as someone else: back to owner
                client.post("/auth/login/", data={"csrf_token": csrf(client.get("/auth/login/").text),
                                                  "username": "owner", "password": "correct horse"})

        post_anything()
        assert client.get("/healthz").status_code == 200
    assert_database_consistent(app_settings)


def test_websocket_survives_any_frame(app_settings):
    with TestClient(chat.create_app(app_settings)) as client:
        register(client, "owner")
        slug = create_room(client, "hostile")
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as bystander, \
                client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as attacker:
            receive_until(bystander, "presence")

            @HOSTILE
            @given(frame=st.one_of(
                st.binary(max_size=200),
                nasty_text,
                json_values.map(json.dumps),
                st.fixed_dictionaries({"message": nasty_text}, optional={"headers": json_values, "body": json_values})
                .map(json.dumps),
            ))
            def send_anything(frame):
                if isinstance(frame, bytes):
                    attacker.send_bytes(frame)
                else:
                    attacker.send_text(frame)
                # Both sockets still work: a marker message reaches each of them.
                send(attacker, "marker")
                receive_until(attacker, ">marker<")
                receive_until(bystander, ">marker<")

            send_anything()
        assert client.get("/healthz").status_code == 200
    assert_database_consistent(app_settings)


# --- accounts, rooms and the socket under attack from outsiders with a few free accounts ---------


def limited_app(tmp_path, **limits) -> TestClient:
    return TestClient(chat.create_app(make_settings(db_path=tmp_path / "chat.db", **limits)))


def room_code_status(client: TestClient, code: str) -> int:
    return client.get(f"/room/{code}/", follow_redirects=False).status_code


def test_room_code_enumeration_is_refused_long_before_it_could_succeed(tmp_path):
    with limited_app(tmp_path, room_guesses=5) as client:
        register(client, "owner")
        real = create_room(client, "real room")
        assert room_code_status(client, real) == 200  # real rooms do not count as guesses
        statuses = [room_code_status(client, f"room-guess{n}") for n in range(5)]
        assert statuses == [404] * 5
        # past the limit every lookup is refused, a real code too, on every path
        assert room_code_status(client, real) == 429
        assert post_form(client, "/", "/join/", code=real).status_code == 429
        assert client.get(f"/room/{real}/messages?before=10").status_code == 429
        refused_at_handshake(client, f"/chat/{real}/", ORIGIN)
        # the address is counted too: another account from the same address is refused
        client.cookies.clear()
        register(client, "sidekick")
        assert room_code_status(client, real) == 429


def test_codes_have_65_random_bits_and_old_short_codes_keep_working(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        codes = {create_room(client, "日本語") for _ in range(5)}
        assert all(re.fullmatch(r"room-[a-kmnp-z2-9]{13}", code) for code in codes) and len(codes) == 5
        with sqlite3.connect(tmp_path / "chat.db") as db:  # a room from before: a 24-bit code
            db.execute("INSERT INTO rooms (code, name, created_by, created_at) VALUES ('old-1a2b3c', 'Old', 1, '')")
        assert room_code_status(client, "old-1a2b3c") == 200


def test_a_reconnect_loop_is_refused_before_it_costs_a_read(tmp_path):
    """Issue 29, 7: one account's sockets reconnecting in a loop with `?revision=0` (a full
    catch-up each) took 88% of a core. Handshakes are counted per session and per address
    (CHAT_HANDSHAKE_RATE per 10 s, and ten times that per address) before anything is read."""
    with limited_app(tmp_path, handshake_rate=5) as client:
        register(client, "looper")
        slug = create_room(client, "loop")
        for _ in range(5):
            with client.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN):
                pass
        refused_at_handshake(client, f"/chat/{slug}/?revision=0", ORIGIN)
        client.cookies.clear()
        register(client, "neighbour")  # another session from the same address still gets in
        create = create_room(client, "next door")
        with client.websocket_connect(f"/chat/{create}/", headers=ORIGIN) as ws:
            receive_until(ws, "presence")


def test_sockets_per_user_and_per_address_are_capped(tmp_path):
    with limited_app(tmp_path, sockets_per_user=2, sockets_per_address=3) as client:
        register(client, "owner")
        slug = create_room(client, "many tabs")
        first = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        second = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        refused_at_handshake(client, f"/chat/{slug}/", ORIGIN)  # a third tab of the same user
        first.__exit__(None, None, None)
        receive_until(second, "presence")
        third = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()  # room again
        client.cookies.clear()
        register(client, "same-address")
        fourth = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        refused_at_handshake(client, f"/chat/{slug}/", ORIGIN)  # the address has 3 open
        for ws in (second, third, fourth):
            ws.__exit__(None, None, None)
        assert client.get("/healthz").status_code == 200


def test_presence_churn_is_coalesced(tmp_path):
    with limited_app(tmp_path, sockets_per_user=0, handshake_rate=0) as client:
        register(client, "watcher")
        slug = create_room(client, "churn")
        watcher_cookies = client.cookies
        client.cookies = type(watcher_cookies)()
        register(client, "churner")
        churner = client.cookies
        client.cookies = watcher_cookies
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as watcher:
            receive_until(watcher, "presence")
            client.cookies = churner
            for _ in range(60):  # one account connecting and closing in a loop
                with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN):
                    pass
            client.cookies = watcher_cookies
            send(watcher, "end of churn")
            frames = []
            while "end of churn" not in (frame := watcher.receive_text()):
                frames.append(frame)
    presence_frames = sum('id="presence"' in frame for frame in frames)
    assert presence_frames <= 10, presence_frames  # 120 without coalescing


def test_registrations_are_limited_per_address(tmp_path):
    with limited_app(tmp_path, register_rate=3) as client:
        statuses = []
        for n in range(4):
            client.cookies.clear()
            statuses.append(register(client, f"sock{n}").status_code)
        assert statuses == [303, 303, 303, 429]


def test_passwords_are_argon2id_and_old_scrypt_hashes_upgrade_at_login(tmp_path):
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"correct horse", salt=salt, n=2**14, r=8, p=1, dklen=32)
    old_hash = f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"
    with limited_app(tmp_path) as client:
        register(client, "newcomer")
        with sqlite3.connect(tmp_path / "chat.db") as db:
            db.execute("INSERT INTO users (username, username_key, password_hash, created_at, username_skeleton) "
                       "VALUES ('oldtimer', 'oldtimer', ?, '', ?)", (old_hash, chat.name_skeleton("oldtimer")))
        client.cookies.clear()
        response = post_form(client, "/auth/login/", "/auth/login/", username="oldtimer", password="correct horse")
        assert response.status_code == 303
    with sqlite3.connect(tmp_path / "chat.db") as db:
        hashes = dict(db.execute("SELECT username, password_hash FROM users"))
    assert all(h.startswith("$argon2id$v=19$m=19456,t=2,p=1$") for h in hashes.values()), hashes


@pytest.mark.parametrize("lookalike", ["аdmin", "ＡＤＭＩＮ", "adrnin", "Admin", "ad\u200bmin", "\u3164",
                                       "admin\u202e", "a\u2800", "AdmIn"])
def test_lookalike_and_invisible_usernames_are_refused(tmp_path, lookalike):
    with limited_app(tmp_path) as client:
        assert register(client, "admin").status_code == 303
        client.cookies.clear()
        response = register(client, lookalike)
        assert response.status_code == 400 and "role=\"alert\"" in response.text
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT count(*) FROM users").fetchone() == (1,)


def test_invisible_and_bidi_characters_are_refused_in_room_names_and_user_text_is_isolated(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        for name in ("evil\u202eroom", "zero\u200bwidth", "\u3164"):
            assert post_form(client, "/", "/create/", room_name=name).status_code == 400
        slug = create_room(client, "שלום room")
        page = client.get(f"/room/{slug}/").text
        assert '<h1 dir="auto">' in page and "<bdi>owner</bdi>" in client.get("/").text
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            send(ws, "مرحبا")
            frame = receive_until(ws, "مرحبا")
        assert '<bdi class="author">owner</bdi>' in frame and '<div class="body" dir="auto"><p>مرحبا</p>' in frame


def test_odd_numbers_and_deep_json_get_clear_errors_and_the_socket_stays_open(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        slug = create_room(client, "odd input")
        for after in ("²", str(2**64), "-1", "1e3"):
            with client.websocket_connect(f"/chat/{slug}/?revision={after}", headers=ORIGIN) as ws:
                ws.send_text("[" * 25_000 + "]" * 25_000)
                assert "not JSON" in receive_until(ws, "chat-error")
                send(ws, f"still here after {after}")
                receive_until(ws, f"still here after {after}")
        # the same numbers, and worse, in the catch-up form's frame
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            for after in ("²", str(2**64), "-1", "1e3", "", 5, None, ["1"], "9" * 100_000):
                ws.send_text(json.dumps({"revision": after}))
                assert "`revision` must be the revision number" in receive_until(ws, "chat-error")
            send(ws, "still here")
            receive_until(ws, "still here")
        for before in ("²", str(2**64), "x"):
            assert client.get(f"/room/{slug}/messages?before={before}").status_code == 400


def test_a_500_page_carries_the_security_headers(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(chat, "rooms_of", broken)
    with TestClient(chat.create_app(make_settings(db_path=tmp_path / "chat.db")), raise_server_exceptions=False) as client:
        register(client, "owner")
        response = client.get("/")
    assert response.status_code == 500 and "Something broke" in response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY" and "a bug" not in response.text


def test_only_this_servers_host_names_are_served(tmp_path):
    settings = make_settings(db_path=tmp_path / "chat.db", allowed_hosts=frozenset({"localhost"}))
    with TestClient(chat.create_app(settings), base_url="http://localhost") as client:
        assert client.get("/auth/login/").status_code == 200
        for host in ("127.0.0.1:8000", "[::1]:8000", "192.168.1.20", "LOCALHOST"):
            assert client.get("/auth/login/", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "localhost.evil.example", "attacker.test:8000", ""):
            response = client.get("/auth/login/", headers={"host": host})
            assert response.status_code == 400, host
        register(client, "owner")
        slug = create_room(client, "rebinding")
        with pytest.raises(WebSocketDisconnect):
            client.websocket_connect(f"/chat/{slug}/", headers={"host": "evil.example",
                                                                 "origin": "http://evil.example"}).__enter__()


def test_head_is_not_a_post(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        token = csrf(client.get("/").text)
        response = client.request("HEAD", "/create/", content=f"csrf_token={token}&room_name=sneaky".encode(),
                                  headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT count(*) FROM rooms").fetchone() == (0,)


@pytest.mark.parametrize("column, days", [("last_seen_at", chat.SESSION_IDLE_DAYS), ("created_at", chat.SESSION_MAX_DAYS)])
def test_sessions_end_on_the_server_when_idle_or_old(tmp_path, column, days):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        assert client.get("/", follow_redirects=False).status_code == 200
        with sqlite3.connect(tmp_path / "chat.db") as db:
            db.execute(f"UPDATE sessions SET {column} = ?", (chat.utc_ago(days=days, minutes=1),))
        assert client.get("/", follow_redirects=False).status_code == 303  # to the login page


def test_an_active_session_is_kept_alive(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        with sqlite3.connect(tmp_path / "chat.db") as db:
            db.execute("UPDATE sessions SET last_seen_at = ?", (chat.utc_ago(days=chat.SESSION_IDLE_DAYS - 1),))
        assert client.get("/").status_code == 200  # used today: the idle clock restarts
        writes_done(client)  # the background write that restarts the idle clock
    with sqlite3.connect(tmp_path / "chat.db") as db:
        (seen,) = db.execute("SELECT last_seen_at FROM sessions").fetchone()
    assert seen >= chat.utc_ago(minutes=5)


def test_rate_limiter_forgets_expired_keys_without_sweeping_them_all(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(chat.time, "monotonic", lambda: clock[0])
    limiter = chat.RateLimiter(limit=3, window=60)

    async def fill(prefix: str) -> None:
        for n in range(10_000):
            assert await limiter.allow(f"{prefix}{n}")

    asyncio.run(fill("old"))
    clock[0] += 61  # every old key has expired
    asyncio.run(fill("new"))
    assert set(limiter._events) == {chat.limit_key(f"new{n}") for n in range(10_000)}


# --- accounts, sessions and the database under attack from insiders ------------------------------


def test_login_limit_keys_are_bounded_and_overlong_names_count_nowhere(tmp_path):
    """A username longer than any account can have is refused before anything is counted:
    200 log-ins with 60,000-character names leave the limiter's tables empty. Every key a
    limiter stores is a fixed-length digest, whatever was typed."""
    with limited_app(tmp_path) as client:
        token = csrf(client.get("/auth/login/").text)
        for n in range(200):
            response = client.post("/auth/login/", data={"csrf_token": token, "username": f"{n}{'x' * 60_000}",
                                                         "password": "whatever"})
            assert response.status_code == 400 and "Wrong username or password" in response.text
            assert len(response.content) < 20_000  # the name is not echoed back whole either
        limit = client.app.state.chat.login_limit
        assert not limit._events and not limit._in_flight
        refused = client.post("/auth/register/", data={"csrf_token": token, "username": "x" * 60_000,
                                                        "password1": "long enough", "password2": "long enough"})
        assert refused.status_code == 400 and len(refused.content) < 20_000  # nor by the sign-up form
    assert {len(chat.limit_key(key)) for key in (("user", "x" * 60_000), ("address", "127.0.0.1"), 7)} == {24}


def login_as(client: TestClient, username: str, password: str):
    return post_form(client, "/auth/login/", "/auth/login/", username=username, password=password)


def test_the_login_refusal_says_truthfully_when_to_try_again(tmp_path):
    with limited_app(tmp_path, login_failures=3) as client:
        register(client, "ada")
        client.cookies.clear()
        limit = client.app.state.chat.login_limit
        now = [1000.0]
        limit.clock = lambda: now[0]
        assert [login_as(client, "ada", f"wrong {n}").status_code for n in range(3)] == [400, 400, 400]
        refused = login_as(client, "ada", "correct horse")
        assert refused.status_code == 429 and "Try again in 15 minutes." in refused.text
        now[0] += 10 * 60 + 1
        assert "Try again in 5 minutes." in login_as(client, "ada", "correct horse").text
        now[0] += 5 * 60
        assert login_as(client, "ada", "correct horse").status_code == 303  # the failures have expired


@pytest.mark.parametrize("taken, lookalike", [("Al", "AI"), ("bill", "biII"), ("Daniel", "DanieI"), ("0scar", "Oscar"),
                                              ("AI", "al"), ("O0", "oo")])
def test_names_that_look_alike_once_case_is_set_aside_are_refused(tmp_path, taken, lookalike):
    with limited_app(tmp_path, guests=True) as client:
        assert register(client, taken).status_code == 303
        client.cookies.clear()
        assert register(client, lookalike).status_code == 400
        as_guest = post_form(client, "/auth/login/", "/auth/guest/", guest_name=lookalike)
        assert as_guest.status_code == 400 and "taken" in as_guest.text
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT count(*) FROM users").fetchone() == (1,)


def test_an_account_holds_at_most_100_sessions_and_ended_ones_go_in_bounded_batches(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "ada")
        with sqlite3.connect(tmp_path / "chat.db") as db:  # 1,000 of other people's ended sessions
            db.execute("INSERT INTO users (id, username, username_key, password_hash, created_at) "
                       "VALUES (99, 'old', 'old', '', '2020-01-01T00:00:00Z')")
            db.executemany("INSERT INTO sessions (id, user_id, created_at, last_seen_at) VALUES (?, 99, ?, ?)",
                           [(f"old-{n}", "2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z") for n in range(1000)])
        for attempt in range(chat.MAX_SESSIONS + 4):  # log in again and again from fresh devices
            client.cookies.clear()
            assert login_as(client, "ada", "correct horse").status_code == 303
            if attempt == 0:  # each login clears a bounded batch of ended sessions, not all of them
                with sqlite3.connect(tmp_path / "chat.db") as db:
                    assert db.execute("SELECT count(*) FROM sessions WHERE user_id = 99").fetchone() == (
                        1000 - chat.SESSION_SWEEP,)
        assert client.get("/", follow_redirects=False).status_code == 200  # the newest lives
    with sqlite3.connect(tmp_path / "chat.db") as db:
        counts = dict(db.execute("SELECT user_id, count(*) FROM sessions GROUP BY user_id"))
    assert counts[1] == chat.MAX_SESSIONS
    assert counts.get(99, 0) == 0  # cleared, a bounded batch per login (105 logins x 100 each)


GROWS_WITH_USE = ("users", "sessions", "rooms", "room_members", "messages", "deletions")


def test_every_query_a_request_or_a_message_makes_uses_an_index(tmp_path, monkeypatch):
    """Each statement the app runs while it is used (not at start-up) is planned by SQLite
    on a database of realistic shape, and none may read a whole table that grows with use."""
    statements: list[str] = []
    connect = chat.Store._connect

    def traced(self, for_writing: bool):
        db = connect(self, for_writing)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(chat.Store, "_connect", traced)
    with limited_app(tmp_path, guests=True) as client:
        statements.clear()  # start-up: the schema and its migrations
        register(client, "ada")
        slug = create_room(client, "plans")
        room = f"/room/{slug}/"
        post_form(client, "/", "/join/", code=slug)
        post_form(client, "/", "/join/", code="no-such-code")
        client.get(room)
        client.get("/")
        with client.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN) as ws:
            send(ws, "hello")
            receive_until(ws, "hello")
            ws.send_text(json.dumps({"revision": "0"}))
        writes_done(client)
        mid = re.search(r'id="msg-(\d+)"', client.get(room).text).group(1)
        client.get(f"{room}messages?before={mid}")
        client.get(f"{room}messages/{mid}/edit")
        token = csrf(client.get(room).text)
        client.post(f"{room}messages/{mid}/edit", data={"message": "edited"}, headers={"x-csrf-token": token})
        client.post(f"{room}messages/{mid}/delete", headers={"x-csrf-token": token})
        # the class tools: a poll, votes, the pin, a question and its votes
        htmx = {"x-csrf-token": token, "hx-request": "true"}
        client.post(f"{room}polls", data={"question": "Which?", "options": "a\nb"}, headers=htmx)
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            ws.send_text(json.dumps({"message": "why?", "question": "1"}))
            receive_until(ws, "why?")
        writes_done(client)
        poll, question = (int(re.search(rf'id="msg-(\d+)"[^>]*>\s*<header>[^\n]*{kind}', client.get(room).text)
                              .group(1)) for kind in ("Poll", "Question"))
        for url, fields in [(f"polls/{poll}/vote", {"option": "1"}), (f"polls/{poll}/vote", {"option": "0"}),
                            (f"messages/{poll}/pin", {}), (f"questions/{question}/vote", {"vote": "1"}),
                            (f"questions/{question}/answered", {}), (f"polls/{poll}/close", {}),
                            ("unpin", {})]:
            assert client.post(room + url, data=fields, headers=htmx).status_code == 200, url
        client.portal.call(chat.check_sessions, client.app.state.chat)
        post_form(client, room, f"{room}messages", message="from the plain form")
        post_form(client, room, f"{room}leave")
        post_form(client, "/", "/auth/logout/")
        login_as(client, "ada", "correct horse")
        client.cookies.clear()
        post_form(client, "/auth/login/", "/auth/guest/", guest_name="visitor")
        writes_done(client)
    with sqlite3.connect(tmp_path / "chat.db") as db:
        db.create_function("pseudonym", 3, lambda *_: "")  # (the app's: Store._connect)
        scans = {}
        for statement in {s for s in statements if re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)", s, re.I)}:
            plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]
            scanned = [step for step in plan if re.match(rf"SCAN ({'|'.join(GROWS_WITH_USE)}|[a-z])\b", step)]
            if scanned:
                scans[statement] = scanned
    assert len(statements) > 50 and not scans, scans


def test_private_pages_are_never_cached(tmp_path):
    with limited_app(tmp_path) as client:
        pages = ["/auth/login/", "/auth/register/"]
        register(client, "ada")
        slug = create_room(client, "private")
        pages += ["/", "/create/", "/join/", f"/room/{slug}/", f"/room/{slug}/messages?before=9", "/room/nope/"]
        for page in pages:
            assert client.get(page).headers["cache-control"] == "no-store", page
        assert "no-store" not in client.get("/static/chat.css").headers["cache-control"]


def test_the_wire_view_never_shows_a_secret(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "teacher")
        slug = create_room(client, "projected")
        token = csrf(client.get(f"/room/{slug}/?wire=1").text)
        with client.websocket_connect(f"/chat/{slug}/?wire=1", headers=ORIGIN) as ws:
            ws.send_text(json.dumps({"csrf_token": token, "key": "secret-key-1", "message": "hello class",
                                     "headers": {"HX-Request": "true", "X-CSRF-Token": token}}))
            sent = receive_until(ws, "Sent by this page")
            answer = receive_until(ws, 'data-key="secret-key-1"')  # the page itself gets the real key...
    echoes = sent + answer.split('<div hx-swap-oob="afterbegin:#wire-log">', 1)[1]
    assert token not in echoes and "secret-key-1" not in echoes  # ...the projector never does
    assert "&#34;csrf_token&#34;: &#34;…&#34;" in sent and "&#34;key&#34;: &#34;…&#34;" in sent
    assert "hello class" in sent and "data-key=&#34;…&#34;" in answer


def test_guest_sessions_end_when_guest_mode_is_turned_off(tmp_path):
    with limited_app(tmp_path, guests=True) as client:
        post_form(client, "/auth/login/", "/auth/guest/", guest_name="visitor")
        slug = create_room(client, "class")
        cookies = client.cookies
        assert client.get("/", follow_redirects=False).status_code == 200
    with limited_app(tmp_path, guests=False) as client:  # restarted without --guests
        client.cookies = cookies
        assert client.get("/", follow_redirects=False).status_code == 303
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            assert "You were logged out" in ws.receive_text()
    with limited_app(tmp_path, guests=True) as client:  # and guest mode back on: ended, not paused
        client.cookies = cookies
        assert client.get("/", follow_redirects=False).status_code == 303


def test_an_open_socket_keeps_its_session_alive_and_ends_with_it(tmp_path):
    with limited_app(tmp_path, guests=True) as client:
        post_form(client, "/auth/login/", "/auth/guest/", guest_name="chatty")
        slug = create_room(client, "all day")
        chat_app = client.app.state.chat
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            with sqlite3.connect(tmp_path / "chat.db") as db:  # 11 of a guest's 12 idle hours gone
                db.execute("UPDATE sessions SET last_seen_at = ?", (chat.utc_ago(hours=11),))
            client.portal.call(chat.check_sessions, chat_app)  # (every SESSION_CHECK_SECONDS)
            writes_done(client)
            with sqlite3.connect(tmp_path / "chat.db") as db:
                (seen,) = db.execute("SELECT last_seen_at FROM sessions").fetchone()
            assert seen >= chat.utc_ago(minutes=5)  # the open page kept it alive
            with sqlite3.connect(tmp_path / "chat.db") as db:  # then it ends (here: idle too long)
                db.execute("UPDATE sessions SET last_seen_at = ?", (chat.utc_ago(hours=13),))
            client.portal.call(chat.check_sessions, chat_app)
            assert "You were logged out" in receive_until(ws, "logged out")
            with pytest.raises(WebSocketDisconnect) as closed:
                for _ in range(5):
                    ws.receive_text()
            assert closed.value.code == chat.SESSION_ENDED


def test_a_write_the_disk_refuses_is_a_clear_503_that_keeps_the_input(tmp_path, caplog):
    """A full disk (here: the writer made read-only): each form answers as a send does, in
    place and in plain words, with what was typed kept, and nothing half-stored."""
    with limited_app(tmp_path) as client:
        register(client, "ada")
        slug = create_room(client, "full disk")
        room = f"/room/{slug}/"
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            send(ws, "keep me")
            receive_until(ws, "keep me")
        mid = re.search(r'id="msg-(\d+)"', client.get(room).text).group(1)
        store = client.app.state.chat.store
        client.portal.call(store.write, lambda db: db.execute("PRAGMA query_only = ON"))
        token = csrf(client.get(room).text)
        edit = client.post(f"{room}messages/{mid}/edit", data={"message": "new words"}, headers={"x-csrf-token": token})
        assert edit.status_code == 503 and "could not be saved" in edit.text and 'id="edit-error"' in edit.text
        delete = client.post(f"{room}messages/{mid}/delete", headers={"x-csrf-token": token})
        assert delete.status_code == 503 and 'id="chat-error"' in delete.text and "could not be deleted" in delete.text
        made = post_form(client, "/", "/create/", room_name="another room")
        assert made.status_code == 503 and 'value="another room"' in made.text
        left = post_form(client, room, f"{room}leave")
        assert left.status_code == 503 and "Nothing was changed" in left.text
        client.cookies.clear()
        joined = register(client, "grace")
        assert joined.status_code == 503 and 'value="grace"' in joined.text and "could not be created" in joined.text
        client.portal.call(store.write, lambda db: db.execute("PRAGMA query_only = OFF"))
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute("SELECT text FROM messages").fetchall() == [("keep me",)]
        assert db.execute("SELECT count(*) FROM users").fetchone() == (1,)
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]
