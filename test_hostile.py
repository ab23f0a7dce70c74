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
                                                        "room_name", "room_slug", "extra"]),
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


# --- attacks from outsiders with a few free accounts (issue 9) ---------------------------------


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
        assert post_form(client, "/", "/join/", room_slug=real).status_code == 429
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
            db.execute("INSERT INTO rooms (slug, name, created_by, created_at) VALUES ('old-1a2b3c', 'Old', 1, '')")
        assert room_code_status(client, "old-1a2b3c") == 200


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
    with limited_app(tmp_path, sockets_per_user=0) as client:
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
                                       "admin\u202e", "a\u2800"])
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
        assert '<bdi class="author">owner</bdi>' in frame and '<p dir="auto">مرحبا</p>' in frame


def test_odd_numbers_and_deep_json_get_clear_errors_and_the_socket_stays_open(tmp_path):
    with limited_app(tmp_path) as client:
        register(client, "owner")
        slug = create_room(client, "odd input")
        for after in ("²", str(2**64), "-1", "1e3"):
            with client.websocket_connect(f"/chat/{slug}/?after={after}", headers=ORIGIN) as ws:
                ws.send_text("[" * 25_000 + "]" * 25_000)
                assert "not JSON" in receive_until(ws, "chat-error")
                send(ws, f"still here after {after}")
                receive_until(ws, f"still here after {after}")
        # the same numbers, and worse, in the catch-up form's frame
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            for after in ("²", str(2**64), "-1", "1e3", "", 5, None, ["1"], "9" * 100_000):
                ws.send_text(json.dumps({"after": after}))
                assert "`after` must be the revision number" in receive_until(ws, "chat-error")
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
    assert len(limiter._events) == 10_000 and all(key.startswith("new") for key in limiter._events)
