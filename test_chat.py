"""Backchat's tests through Starlette's TestClient: pages, forms, the WebSocket.

Tests that need a real server process or a real browser live in test_server.py and
test_browser.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import markupsafe
import hypothesis
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import chat
from conftest import ACK, app_settings

ORIGIN = {"origin": "http://testserver"}
PASSWORD = "correct horse"


# --- helpers -------------------------------------------------------------------------------------


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def post_form(client: TestClient, page: str, action: str, **fields: str):
    """Submit a form the way a browser does: load its page, then POST with its token."""
    token = csrf(client.get(page).text)
    return client.post(action, data={"csrf_token": token, **fields}, follow_redirects=False)


def register(client: TestClient, username: str, password: str = PASSWORD):
    return post_form(client, "/auth/register/", "/auth/register/",
                     username=username, password1=password, password2=password)


def create_room(client: TestClient, name: str) -> str:
    response = post_form(client, "/", "/create/", room_name=name)
    assert response.status_code == 303, response.text
    return re.fullmatch(r"/room/([^/]+)/", response.headers["location"]).group(1)


@contextmanager
def as_user(client: TestClient, cookies):
    """Act as another logged-in user on the same app (one event loop, one hub)."""
    saved = client.cookies
    client.cookies = cookies
    try:
        yield client
    finally:
        client.cookies = saved


@contextmanager
def socket_as(client: TestClient, cookies, slug: str):
    """A room socket opened as another user (or session), still open once the client's
    own cookies are back."""
    with as_user(client, cookies):
        ws = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
    try:
        yield ws
    finally:
        ws.__exit__(None, None, None)


def receive_until(ws, needle: str, limit: int = 10) -> str:
    """The first frame containing `needle`; fails if `limit` frames pass without one."""
    seen = []
    for _ in range(limit):
        frame = ws.receive_text()
        if needle in frame:
            return frame
        seen.append(frame)
    raise AssertionError(f"no frame with {needle!r} among {seen!r}")


def send(ws, text: str) -> None:
    ws.send_text(json.dumps({"message": text, "headers": {"HX-Request": "true"}}))


def writes_done(client: TestClient) -> None:
    """Wait until every write queued so far (write_soon too) has committed: the writer
    thread runs them in order, so a no-op write queued now finishes after all of them."""
    client.portal.call(client.app.state.chat.store.write, lambda db: None)


def db_rows(app_settings: chat.Settings, sql: str, *args):
    with sqlite3.connect(app_settings.db_path) as db:
        return db.execute(sql, args).fetchall()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> chat.Settings:
    return app_settings(db_path=tmp_path / "chat.db")


@pytest.fixture
def client(settings):
    with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
        yield client


@pytest.fixture
def alice(client):
    assert register(client, "alice").status_code == 303
    return client


@pytest.fixture
def two_users(client):
    """alice and bob, both registered; returns (client as alice, bob's cookies)."""
    assert register(client, "bob").status_code == 303
    bob_cookies = client.cookies
    client.cookies = type(bob_cookies)()
    assert register(client, "alice").status_code == 303
    return client, bob_cookies


def frozen_schema(name: str) -> str:
    """The schema an earlier release made, kept verbatim in test_data/ (it must not follow SCHEMA)."""
    return (Path(__file__).resolve().parent / "test_data" / name).read_text()


# sha256 of the files in the npm package htmx.org 4.0.1: vendored unmodified.
HTMX_FILES = {
    "htmx.min.js": "a0abb04f2f45a1f89d1d4844023245537e5e6014c87b144553e0607b4cc32130",
    "hx-ws.min.js": "a7c11e4eca05417d6299bb40aaacca01572e44605389fc4d5ef12be408a4d03b",
    "hx-upsert.min.js": "9e516c6608f765b568559a4caed3c3121eff2702fb7ce012f21775639d2699c3",
}


def top_level_tags(html: str) -> list[str]:
    """Opening tags of the top-level elements of a fragment."""
    from html.parser import HTMLParser

    tops, depth = [], 0
    void = {"input", "br", "img", "meta", "link", "hr"}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            nonlocal depth
            if depth == 0:
                tops.append(self.get_starttag_text())
            if tag not in void:
                depth += 1

        def handle_endtag(self, tag):
            nonlocal depth
            depth -= 1

    Parser().feed(html)
    return tops


def refused_at_handshake(client: TestClient, path: str, headers: dict) -> None:
    """A close before accept: over a real server that is an HTTP 403 (test_server.py)."""
    with pytest.raises(WebSocketDisconnect) as refused:
        client.websocket_connect(path, headers=headers).__enter__()
    assert refused.value.code == 1000


def send_many(settings: chat.Settings, count: int) -> str:
    """Send `count` messages one after another as alice; return the reply to one more."""
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "rates")
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            for n in range(count):
                send(ws, f"m{n}")
                receive_until(ws, ACK)
            send(ws, "one more")
            return receive_until(ws, "one more" if not settings.message_rate else "chat-error")


def composer_fields(html: str) -> dict[str, str]:
    """The composer form as the room page renders it: its action and hidden fields."""
    form = re.search(r'<form id="composer"[^>]*>.*?</form>', html, re.S).group(0)
    return {"action": re.search(r'action="([^"]+)"', form).group(1), "method": re.search(r'method="(\w+)"', form).group(1),
            "csrf_token": csrf(form), "key": re.search(r'name="key" value="([^"]+)"', form).group(1)}


def keyed(text: str, key: str | None) -> str:
    return json.dumps({"message": text, **({"key": key} if key else {}), "headers": {"HX-Request": "true"}})


def second_session(client: TestClient, username: str):
    """Log `username` in again from another device: that session's cookies."""
    saved = client.cookies
    client.cookies = type(saved)()
    post_form(client, "/auth/login/", "/auth/login/", username=username, password=PASSWORD)
    other, client.cookies = client.cookies, saved
    return other


def closed_with(ws) -> tuple[int, str]:
    """Read a socket to its end: its close code, and every frame it got on the way."""
    frames = []
    with pytest.raises(WebSocketDisconnect) as closed:
        for _ in range(20):
            frames.append(ws.receive_text())
    return closed.value.code, "".join(frames)


def message_ids(frame: str) -> list[int]:
    return [int(i) for i in re.findall(r'id="msg-(\d+)"', frame)]


def say_in(client: TestClient, slug: str, *texts: str) -> list[int]:
    """The client's user sends each text over a socket of its own and sees it stored; their ids."""
    ids = []
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        for text in texts:
            send(ws, text)
            ids += message_ids(receive_until(ws, text))
    return ids


def page_revision(page: str) -> int:
    """The revision a room page has: its catch-up form sends it whenever its socket opens."""
    return int(re.search(r'<input type="hidden" id="room-revision" name="revision" value="(\d+)">', page).group(1))


def htmx_post(client: TestClient, url: str, page: str, **fields: str):
    """What an htmx button does: POST with the page's CSRF token in X-CSRF-Token."""
    return client.post(url, data=fields, headers={"x-csrf-token": csrf(client.get(page).text), "hx-request": "true"})


def checkpointed(path: Path) -> None:
    """Move the whole WAL into the database file and empty it: retried until no writer of the
    app (the search indexer, each second) is in the way, for ten seconds at most."""
    deadline = time.monotonic() + 10
    with sqlite3.connect(path) as db:
        while db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:  # 1: busy, try again
            assert time.monotonic() < deadline, "the WAL could not be checkpointed"
            time.sleep(0.01)


def join_as_guest(client: TestClient, name: str, next_url: str = "/"):
    token = csrf(client.get("/auth/login/").text)
    return client.post("/auth/guest/", data={"csrf_token": token, "guest_name": name, "next": next_url},
                       follow_redirects=False)


@pytest.fixture
def classroom(tmp_path):
    with TestClient(chat.create_app(app_settings(db_path=tmp_path / "chat.db", guests=True))) as client:
        yield client


def lesson_app():
    import importlib.util

    spec = importlib.util.spec_from_file_location("minimal_chat", Path(__file__).parent / "lesson" / "minimal_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frame_shape(frame: str) -> list[tuple]:
    """What a message frame's swap and message are made of, whatever else either side adds:
    each top-level element's tag and hx-swap-oob, and the message's id, class, author and
    text elements."""
    from html.parser import HTMLParser

    shape, depth = [], 0
    kept = {"article": ("class", "id"), "bdi": ("class",), "div": ("class", "dir")}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            nonlocal depth
            attrs = dict(attrs)
            if depth == 0:
                shape.append((0, tag, attrs.get("hx-swap-oob")))
            elif tag in kept:
                shape.append((tag, *(re.sub(r"\d+", "N", attrs.get(name) or "") for name in kept[tag])))
            if tag not in ("input", "br"):
                depth += 1

        def handle_endtag(self, tag):
            nonlocal depth
            depth -= 1

    Parser().feed(frame)
    return [part for part in shape if part != (0, "input", "true")]  # (chat.py's revision cursor)


def moderate(client: TestClient, slug: str, step: str, **fields: str):
    return post_form(client, f"/room/{slug}/manage", f"/room/{slug}/manage", step=step, **fields)


def user_id_of(settings: chat.Settings, name: str) -> int:
    return db_rows(settings, "SELECT id FROM users WHERE username = ?", name)[0][0]


@pytest.fixture
def owned_room(two_users, settings):
    """alice owns a room bob is a member of: (client as alice, bob's cookies, the room's code)."""
    client, bob = two_users
    slug = create_room(client, "run by alice")
    with as_user(client, bob):
        client.get(f"/room/{slug}/")  # (the visit that makes a member is written just after the page)
        writes_done(client)
    return client, bob, slug


def search_page(client: TestClient, query: str, **params: str):
    """Search, once the index has every message sent so far (it is kept a second behind at most)."""
    while client.portal.call(client.app.state.chat.store.write, chat.index_new_messages):
        pass
    return client.get("/search/", params={"q": query, **params})


def react_post(client: TestClient, slug: str, message: int, **fields: str):
    """A reaction button pressed (the CSRF token from the home page: opening the room would join it)."""
    return htmx_post(client, f"/room/{slug}/messages/{message}/react", "/", **fields)


# --- the app: pages, headers, static files -------------------------------------------------------


def test_unknown_route_is_a_friendly_404(client):
    response = client.get("/no/such/page")
    assert response.status_code == 404 and "Not found" in response.text


def test_security_headers_on_html(client):
    headers = client.get("/auth/login/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "unsafe-eval" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"


def test_session_cookie_is_httponly_and_lax(client):
    cookie = client.get("/auth/login/").headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie


def test_https_setting_marks_the_cookie_secure(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", https_only=True)
    with TestClient(chat.create_app(settings), base_url="https://testserver") as client:
        assert "secure" in client.get("/auth/login/").headers["set-cookie"].lower()


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_scripts_are_unmodified_htmx_small_cacheable_and_blocking(alice):
    room = create_room(alice, "scripts")
    page = alice.get(f"/room/{room}/").text
    scripts = re.findall(r"<script[^>]*>", page)
    # core first, then its extensions, then our one script; no defer/async, so they run in
    # this order whatever order they arrive in, before htmx starts on DOMContentLoaded
    assert scripts == [f'<script src="/static/vendor/htmx-4.0.1/{name}">' for name in HTMX_FILES] + [
        '<script src="/static/room.js">']
    assert "<script>" not in page and "hx-on" not in page  # no inline script, nothing for eval
    on_the_wire = 0
    for name, digest in HTMX_FILES.items():
        response = alice.get(f"/static/vendor/htmx-4.0.1/{name}", headers={"accept-encoding": "gzip"})
        assert hashlib.sha256(response.content).hexdigest() == digest
        assert response.headers["content-encoding"] == "gzip"
        assert "max-age=31536000" in response.headers["cache-control"]
        on_the_wire += int(response.headers["content-length"])
    assert on_the_wire <= 64 * 1024, on_the_wire
    assert "Zero-Clause BSD" in alice.get("/static/vendor/htmx-4.0.1/LICENSE").text
    own = alice.get("/static/room.js")  # small, revalidated, and none of the things our CSP refuses
    code = re.sub(r"//.*", "", own.text)  # (its comments may name what it avoids)
    budget = re.sub(r"[\s;]+", "", re.sub(r"/\*.*?\*/", "", code, flags=re.S))
    assert own.headers["cache-control"] == "no-cache" and len(budget) <= 6_000, len(budget)  # (the guide's budget)
    assert not re.search(r"\beval\b|\bFunction\b|innerHTML|insertAdjacentHTML|setTimeout\(\s*['\"]", code)
    css = alice.get("/static/chat.css")
    assert css.headers["cache-control"] == "no-cache" and css.headers["etag"]
    assert alice.get("/static/chat.css", headers={"if-none-match": css.headers["etag"]}).status_code == 304


def test_oversized_form_body_is_refused(alice):
    response = post_form(alice, "/", "/create/", room_name="x" * (70 * 1024))
    assert response.status_code == 413


def test_every_setting_is_read_from_its_variable_and_a_bad_one_is_named(tmp_path):
    """Each CHAT_* variable sets its field, cast as its default is; an unset or empty one keeps
    the default; a value that is not one says which variable."""
    given = chat.Settings.from_env({
        "CHAT_DB": str(tmp_path / "x.db"), "CHAT_SECRET_KEY": "k", "CHAT_HOST": "0.0.0.0", "CHAT_PORT": "8123",
        "CHAT_WS": "wsproto", "CHAT_ALLOWED_ORIGINS": "https://A.example/, https://b.example",
        "CHAT_MESSAGE_RATE": "0", "CHAT_ALLOWED_HOSTS": "Chat.Example, [::1]", "CHAT_GUESTS": "yes",
        "CHAT_HTTPS_ONLY": "1", "CHAT_HEARTBEAT": "2.5", "CHAT_TIMEZONE": " Asia/Tokyo ", "CHAT_ROOM_RATE": ""})
    assert (given.db_path, given.secret_key, given.host, given.port, given.ws) == (
        tmp_path / "x.db", "k", "0.0.0.0", 8123, "wsproto")
    assert given.allowed_origins == {"https://a.example", "https://b.example"}
    assert given.allowed_hosts == {"chat.example", "::1"} and given.guests and given.https_only
    assert (given.message_rate, given.room_rate, given.heartbeat, given.timezone) == (0, 10, 2.5, "Asia/Tokyo")
    assert chat.Settings.from_env({}) == chat.Settings()
    for name, value in (("CHAT_PORT", "eighty"), ("CHAT_MESSAGE_RATE", "²"), ("CHAT_HEARTBEAT", "soon")):
        with pytest.raises(ValueError, match=name):
            chat.Settings.from_env({name: value})


def test_secret_key_is_generated_once_beside_the_database(tmp_path):
    settings = chat.Settings(db_path=tmp_path / "data" / "chat.db")
    first = chat.load_secret_key(settings)
    key_file = tmp_path / "data" / "chat.db.secret"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert chat.load_secret_key(settings) == first and len(first) > 40


def test_every_page_has_one_main_heading(classroom):
    pages = [classroom.get("/auth/login/").text, classroom.get("/auth/register/").text]
    register(classroom, "teacher")
    slug = create_room(classroom, "lesson")
    pages += [classroom.get(url).text for url in ("/", "/create/", "/join/", f"/room/{slug}/", "/room/nope/")]
    assert all(page.count("<h1") == 1 for page in pages)


# --- the database: upgrades, workers, group commit, its threads ----------------------------------


def test_a_database_from_the_previous_release_is_migrated(tmp_path):
    db_path = tmp_path / "old.db"
    with sqlite3.connect(db_path) as db:  # the schema as the previous release created it
        db.executescript(frozen_schema("schema-v0.sql"))
        db.execute("INSERT INTO users VALUES (1, 'ada', 'ada', 'x', '2026-01-01T00:00:00Z')")
        db.execute("INSERT INTO rooms VALUES (1, 'old-room-abcdef', 'Old room', 1, '2026-01-01T00:00:00Z')")
        db.execute("INSERT INTO messages VALUES (1, 1, 1, 'kept across the upgrade', '2026-01-01T00:00:00Z')")
        db.execute("INSERT INTO room_members VALUES (1, 1, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')")
        db.execute("INSERT INTO sessions VALUES ('old-session', 1, '2026-01-01T00:00:00Z')")
    settings = app_settings(db_path=db_path)
    with TestClient(chat.create_app(settings)):
        pass
    assert db_rows(settings, "SELECT id, text, client_key, revision FROM messages") == [
        (1, "kept across the upgrade", None, 1)]
    assert db_rows(settings, "SELECT revision FROM rooms") == [(1,)]  # catch-up cursors go on from ids
    assert db_rows(settings, "SELECT last_read_id FROM room_members") == [(1,)]  # old rooms: no badge
    assert db_rows(settings, "SELECT username_skeleton FROM users") == [(chat.name_skeleton("ada"),)]
    assert db_rows(settings, "PRAGMA user_version") == [(len(chat.MIGRATIONS),)]
    assert db_rows(settings, "SELECT name FROM sqlite_master WHERE name = 'messages_by_key'") == [("messages_by_key",)]
    with TestClient(chat.create_app(settings)):  # and starting again changes nothing
        pass
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(1,)]


def test_messages_waiting_for_the_writer_are_committed_together(alice, settings, monkeypatch):
    """While a commit is under way (here: held up on purpose), messages queue; then they go
    to the writer in one batch and one transaction, each still stored once and in order,
    and pushed only once committed."""
    batches = []
    real_add_messages = chat.add_messages
    monkeypatch.setattr(chat, "add_messages", lambda db, messages: batches.append(len(messages))
                        or real_add_messages(db, messages))
    store = alice.app.state.chat.store
    slug = create_room(alice, "group commit")
    release = threading.Event()
    alice.portal.call(lambda: store.write_soon(lambda db: release.wait(10)))  # the writer is busy
    tabs = [alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__() for _ in range(10)]
    try:
        for n, tab in enumerate(tabs):  # ten pages send at once (each waits for its own commit)
            send(tab, f"queued {n}")
        for _ in range(200):  # the first goes to the writer alone; the rest wait behind it
            if alice.portal.call(lambda: sum(map(len, store._waiting.values()))) == 9:
                break
            time.sleep(0.01)
        release.set()
        texts = []
        while len(texts) < 10:
            texts += re.findall(r"<div class=\"body\" dir=\"auto\"><p>(queued \d+)</p>", tabs[0].receive_text())
    finally:
        release.set()
        for tab in tabs:
            tab.__exit__(None, None, None)
    assert batches == [1, 9]  # a lone message at once, then the rest together
    assert texts == [f"queued {n}" for n in range(10)]
    assert db_rows(settings, "SELECT count(*), count(DISTINCT text) FROM messages") == [(10, 10)]


def test_a_database_from_the_release_before_is_upgraded_and_works(tmp_path):
    db_path = tmp_path / "chat.db"
    with sqlite3.connect(db_path) as db:
        db.executescript(frozen_schema("schema-v4.sql"))
        db.execute("PRAGMA user_version = 4")
        for uid, name in ((1, "Al"), (2, "AI"), (3, "bob")):  # look-alikes by case, from before the rule
            db.execute("INSERT INTO users (id, username, username_key, password_hash, created_at, username_skeleton) "
                       "VALUES (?, ?, ?, 'x', '2026-01-01T00:00:00Z', ?)", (uid, name, name.casefold(), name.casefold()))
        db.execute("INSERT INTO sessions VALUES ('s1', 1, '2026-11-29T00:00:00Z', '2026-11-29T00:00:00Z')")
        db.execute("INSERT INTO rooms VALUES (1, 'old-room-abc', 'Old room', 1, '2026-01-01T00:00:00Z', 2)")
        db.executemany("INSERT INTO room_members VALUES (1, ?, '', '', 0)", [(1,), (3,)])
        db.executemany("INSERT INTO messages VALUES (?, 1, ?, ?, '2026-01-01T00:00:00Z', NULL, ?, NULL)",
                       [(1, 1, "from before", 1), (2, 3, "also from before", 2)])
    settings = app_settings(db_path=db_path)
    with TestClient(chat.create_app(settings)) as client:
        client.cookies.set("session", "")
        register(client, "carol")
        post_form(client, "/", "/join/", code="old-room-abc")
        page = client.get("/room/old-room-abc/").text
        assert "from before" in page and "also from before" in page
        say_in(client, "old-room-abc", "after the upgrade")
        assert register(client, "al").status_code == 400  # the case-aware skeleton, recomputed
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(chat.MIGRATIONS)
        assert dict(db.execute("SELECT user_id, role FROM room_members WHERE user_id IN (1, 3)")) == {1: "owner", 3: "member"}
        assert db.execute("SELECT locked, slow_mode, deleted_at FROM rooms").fetchone() == (0, 0, None)
        skeletons = dict(db.execute("SELECT username, username_skeleton FROM users WHERE id < 3"))
        assert skeletons["Al"] == skeletons["AI"]
        assert [row[2] for row in db.execute("PRAGMA index_info(sessions_by_user)")] == ["user_id", "created_at"]
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_database_from_the_release_with_owners_gains_search(tmp_path):
    db_path = tmp_path / "chat.db"
    with sqlite3.connect(db_path) as db:
        db.executescript(frozen_schema("schema-v7.sql"))
        db.execute("PRAGMA user_version = 7")
        db.execute("INSERT INTO users (id, username, username_key, password_hash, created_at, username_skeleton) "
                   "VALUES (1, 'ada', 'ada', 'x', '2026-01-01T00:00:00Z', 'ada')")
        db.execute("INSERT INTO rooms (id, slug, name, created_by, created_at, revision) VALUES (1, 'old-abc', 'Old', 1, '', 2)")
        db.execute("INSERT INTO room_members (room_id, user_id, joined_at, last_visit_at, role) VALUES (1, 1, '', '', 'owner')")
        db.executemany("INSERT INTO messages (id, room_id, user_id, text, created_at, revision) VALUES (?, 1, 1, ?, '', ?)",
                       [(1, "the old archive", 1), (2, "more archived words", 2)])
    with TestClient(chat.create_app(app_settings(db_path=db_path)), base_url="http://testserver") as client:
        register(client, "bea")
        client.get("/room/old-abc/")
        assert "<mark>archive</mark>" in search_page(client, "archi").text  # built for the messages already there
        assert "<mark>archived</mark>" in search_page(client, "archi").text
        (new,) = say_in(client, "old-abc", "a new archive entry")
        react_post(client, "old-abc", new, give="🎉")
        assert search_page(client, "archive").text.count('class="hit"') == 3  # (the last word is a prefix)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(chat.MIGRATIONS)
        assert db.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'archive*'").fetchone() == (3,)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_workers_starting_together_on_a_new_file_each_find_it_whole(tmp_path):
    """uvicorn --workers N starts N processes at once: each migrates the same new chat.db."""
    for attempt in range(10):
        path = tmp_path / f"new{attempt}.db"
        problems: list[BaseException] = []
        start = threading.Barrier(6)

        def open_it() -> None:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            try:
                start.wait()
                chat.migrate(db)
            except BaseException as problem:  # noqa: BLE001 (reported below)
                problems.append(problem)
            finally:
                db.close()

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert problems == []
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(chat.MIGRATIONS)


def test_the_database_is_readable_by_its_owner_only(settings):
    """Issue 29, 14: chat.db (password hashes, session ids) was 0644; made 0600, and an older
    file is made so at start."""
    settings.db_path.touch(mode=0o644)
    settings.db_path.chmod(0o644)
    with TestClient(chat.create_app(settings)):
        pass
    assert settings.db_path.stat().st_mode & 0o777 == 0o600


def test_the_database_is_used_only_on_the_stores_threads(settings, monkeypatch):
    """House rule 5: every query runs on the Store's threads (sqlite-write, sqlite-read,
    sqlite-checkpoint), never on the event loop, through a whole session of use."""
    used_on = set()

    class Watched:
        def __init__(self, db):
            object.__setattr__(self, "db", db)

        def __getattr__(self, name):
            found = getattr(self.db, name)
            if not callable(found):
                return found

            def call(*args, **kwargs):
                used_on.add(threading.current_thread().name)
                return found(*args, **kwargs)
            return call

        def __setattr__(self, name, value):
            setattr(self.db, name, value)

    connect = chat.Store._connect
    monkeypatch.setattr(chat.Store, "_connect", lambda store, for_writing: Watched(connect(store, for_writing)))
    with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
        register(client, "alice")
        slug = create_room(client, "threads")
        (mid,) = say_in(client, slug, "hello @alice")
        htmx_post(client, f"/room/{slug}/messages/{mid}/edit", f"/room/{slug}/", message="hello again")
        htmx_post(client, f"/room/{slug}/messages/{mid}/react", f"/room/{slug}/", give="🎉")
        client.get(f"/room/{slug}/messages?before={mid + 1}")
        client.get("/search/?q=hello")
        client.get(f"/room/{slug}/transcript")
        post_form(client, f"/room/{slug}/manage", f"/room/{slug}/manage", step="lock")
        writes_done(client)
    assert used_on and all(name.startswith("sqlite-") for name in used_on), used_on


# --- accounts: registering, logging in and out, guests -------------------------------------------


def test_anonymous_user_is_sent_to_login_with_next(client):
    response = client.get("/room/anything/?wire=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/auth/login/?next=%2Froom%2Fanything%2F%3Fwire%3D1"
    login_page = client.get(response.headers["location"]).text
    assert '<input type="hidden" name="next" value="/room/anything/?wire=1">' in login_page


def test_register_logs_in_and_hashes_password(alice, settings):
    home = alice.get("/")
    assert home.status_code == 200 and "Signed in as <b><bdi>alice</bdi></b>" in home.text
    (stored,) = db_rows(settings, "SELECT password_hash FROM users WHERE username = 'alice'")[0]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$") and PASSWORD not in stored


@pytest.mark.parametrize("username, password1, password2, error", [
    ("", "long enough", "long enough", "Usernames are"),
    ("has space", "long enough", "long enough", "Usernames are"),
    ("x" * 151, "long enough", "long enough", "Usernames are"),
    ("dora", "short", "short", "at least 8"),
    ("dora", "long enough", "different!", "differ"),
])
def test_register_rejects_bad_input_keeping_the_username(client, settings, username, password1, password2, error):
    response = post_form(client, "/auth/register/", "/auth/register/",
                         username=username, password1=password1, password2=password2)
    assert response.status_code == 400
    assert re.search(r'role="alert">[^<]*' + error, response.text)
    assert f'value="{username}"' in response.text
    assert db_rows(settings, "SELECT count(*) FROM users") == [(0,)]


def test_usernames_are_unique_ignoring_case(alice):
    alice.cookies.clear()
    response = register(alice, "ALICE")
    assert response.status_code == 400 and "taken" in response.text


def test_login_logout_and_wrong_password(alice):
    assert post_form(alice, "/", "/auth/logout/").headers["location"] == "/auth/login/"
    assert alice.get("/", follow_redirects=False).status_code == 303
    wrong = post_form(alice, "/auth/login/", "/auth/login/", username="alice", password="wrong password")
    assert wrong.status_code == 400 and 'role="alert">Wrong username or password' in wrong.text
    assert 'value="alice"' in wrong.text
    right = post_form(alice, "/auth/login/", "/auth/login/", username="Alice", password=PASSWORD)
    assert right.status_code == 303 and right.headers["location"] == "/"


@pytest.mark.parametrize("next_url, expected", [
    ("/room/abc/", "/room/abc/"),
    ("//evil.example/", "/"),
    ("/\\evil.example/", "/"),
    ("https://evil.example/", "/"),
    ("javascript:alert(1)", "/"),
    ("", "/"),
])
def test_login_next_goes_only_to_same_site_paths(alice, next_url, expected):
    post_form(alice, "/", "/auth/logout/")
    response = post_form(alice, "/auth/login/", "/auth/login/", username="alice", password=PASSWORD, next=next_url)
    assert response.headers["location"] == expected


def test_logged_out_cookie_is_dead(alice):
    stolen = dict(alice.cookies)
    post_form(alice, "/", "/auth/logout/")
    alice.cookies = stolen
    assert alice.get("/", follow_redirects=False).status_code == 303


def test_log_out_everywhere_ends_every_session(client):
    register(client, "alice")
    first_device = client.cookies
    client.cookies = type(first_device)()
    post_form(client, "/auth/login/", "/auth/login/", username="alice", password=PASSWORD)
    assert client.get("/", follow_redirects=False).status_code == 200
    post_form(client, "/", "/auth/logout/", scope="everywhere")
    client.cookies = first_device
    assert client.get("/", follow_redirects=False).status_code == 303


def test_post_without_valid_csrf_token_is_refused_and_changes_nothing(alice, settings):
    for data in ({"room_name": "no token"}, {"room_name": "bad token", "csrf_token": "forged"}):
        response = alice.post("/create/", data=data, follow_redirects=False)
        assert response.status_code == 403 and 'role="alert"' in response.text
    assert db_rows(settings, "SELECT count(*) FROM rooms") == [(0,)]
    assert alice.post("/auth/logout/", data={}, follow_redirects=False).status_code == 403
    assert alice.get("/").status_code == 200  # still logged in


def test_failed_logins_are_limited_per_username(client):
    register(client, "alice")
    client.cookies.clear()
    for _ in range(10):
        assert post_form(client, "/auth/login/", "/auth/login/", username="alice", password="nope nope").status_code == 400
    blocked = post_form(client, "/auth/login/", "/auth/login/", username="alice", password=PASSWORD)
    assert blocked.status_code == 429 and "Try again in 15 minutes." in blocked.text


def test_failed_logins_are_limited_per_client_address(client):
    for n in range(10):
        post_form(client, "/auth/login/", "/auth/login/", username=f"guess{n}", password="nope nope")
    blocked = post_form(client, "/auth/login/", "/auth/login/", username="someone-else", password="whatever1")
    assert blocked.status_code == 429 and 'role="alert"' in blocked.text


def test_invite_link_survives_registration(client):
    room_url = "/room/some-code/?wire=1"
    login = client.get(room_url)  # a logged-out friend follows the invite link
    assert login.url.path == "/auth/login/"
    link = re.search(r'<a href="(/auth/register/[^"]*)">Create an account</a>', login.text).group(1)
    register_page = client.get(link.replace("&amp;", "&"))
    assert f'name="next" value="{room_url}"' in register_page.text.replace("&amp;", "&")
    response = client.post("/auth/register/", follow_redirects=False, data={
        "csrf_token": csrf(register_page.text), "username": "friend", "password1": PASSWORD,
        "password2": PASSWORD, "next": room_url})
    assert response.status_code == 303 and response.headers["location"] == room_url
    evil = client.get("/auth/register/?next=//evil.example/")
    assert 'name="next" value="/"' in evil.text


def test_guest_mode_is_off_unless_asked_for(client):
    assert "Join as a guest" not in client.get("/auth/login/").text
    assert join_as_guest(client, "visitor").status_code == 404
    assert db_rows(client.app.state.chat.settings, "SELECT count(*) FROM users") == [(0,)]


def test_a_guest_joins_by_link_with_a_name_and_is_marked_as_a_guest(classroom):
    register(classroom, "teacher")
    slug = create_room(classroom, "lesson")
    teacher = classroom.cookies
    classroom.cookies = type(teacher)()
    login_page = classroom.get(f"/room/{slug}/")  # the invite link, logged out
    assert "Join as a guest" in login_page.text and f'value="/room/{slug}/"' in login_page.text
    response = join_as_guest(classroom, "student", f"/room/{slug}/")
    assert response.status_code == 303 and response.headers["location"] == f"/room/{slug}/"
    page = classroom.get(f"/room/{slug}/").text
    assert '<bdi>student</bdi></b> <small class="guest">guest</small>' in page
    with classroom.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        presence = receive_until(ws, "<bdi>student</bdi>")
        send(ws, "hello from a guest")
        frame = receive_until(ws, "hello from a guest")
    assert '<bdi>student</bdi> <small class="guest">guest</small>' in presence
    assert '<bdi class="author">student</bdi> <small class="guest">guest</small>' in frame


def test_guests_cannot_take_taken_names_nor_log_in_with_a_password(classroom):
    register(classroom, "teacher")
    classroom.cookies.clear()
    for taken in ("teacher", "TEACHER", "tеacher"):  # the last with a Cyrillic е
        assert join_as_guest(classroom, taken).status_code == 400
    assert join_as_guest(classroom, "student").status_code == 303
    classroom.cookies.clear()
    assert join_as_guest(classroom, "Student").status_code == 400  # another guest's name
    for password in ("", "anything at all"):
        response = post_form(classroom, "/auth/login/", "/auth/login/", username="student", password=password)
        assert response.status_code == 400  # a guest's name is no way in


def test_a_guest_session_ends_after_twelve_idle_hours_a_users_does_not(classroom, tmp_path):
    register(classroom, "teacher")
    teacher = classroom.cookies
    classroom.cookies = type(teacher)()
    join_as_guest(classroom, "student")
    guest = classroom.cookies
    with sqlite3.connect(tmp_path / "chat.db") as db:
        db.execute("UPDATE sessions SET last_seen_at = ?", (chat.utc_ago(hours=chat.GUEST_IDLE_HOURS, minutes=1),))
    assert classroom.get("/", follow_redirects=False).status_code == 303  # the guest: ended
    classroom.cookies = teacher
    assert classroom.get("/", follow_redirects=False).status_code == 200  # the teacher: still in
    assert guest is not teacher


def test_guests_are_rate_limited_like_registrations(tmp_path):
    settings = app_settings(db_path=tmp_path / "chat.db", guests=True, register_rate=2)
    with TestClient(chat.create_app(settings)) as client:
        statuses = []
        for n in range(3):
            client.cookies.clear()
            statuses.append(join_as_guest(client, f"student{n}").status_code)
    assert statuses == [303, 303, 429]


@pytest.mark.parametrize("name", ["Maria Lopez", "José Álvarez", "李雷", "O'Brien", "Anne-Marie", "Ngozi Okonkwo-Adeyemi",
                                  "Д. Иванов", "x" * 40])
def test_a_guest_is_named_as_people_are_named(classroom, name):
    register(classroom, "teacher")
    slug = create_room(classroom, "lesson")
    classroom.cookies.clear()
    assert join_as_guest(classroom, f"  {name.replace(' ', '   ')} ", f"/room/{slug}/").status_code == 303
    page = classroom.get(f"/room/{slug}/").text
    assert f"Signed in as <b><bdi>{markupsafe.escape(name)}</bdi></b>" in page


def test_a_name_with_a_full_stop_or_a_space_at_its_end_is_taken_like_the_name(client, settings):
    """Issue 29, 15: "Maria Lopez." could join beside "Maria Lopez" (and "ada_" beside "ada"):
    punctuation at a name's ends changes nothing that shows, so the look-alike check sets it aside."""
    for username in ("ada", "Ada_", "ada."):
        client.cookies.clear()
        answer = register(client, username)
        assert (answer.status_code == 303) == (username == "ada"), username


@pytest.mark.parametrize("name, problem", [
    ("x" * 41, "Names are at most 40 characters; yours has 41."),
    ("   ", "Type the name the others should see."),
    ("Ma\u200bria", "characters that do not show"),
    ("Maria\u202e", "characters that do not show"),
    ("<b>Maria</b>", "Names are letters, digits and spaces"),
    ("Maria 🎉", "Names are letters, digits and spaces"),
    ("-Maria", "starting with a letter or digit"),
    ("maria lopez", "That name is taken on this server, or looks just like one that is; try adding an initial."),
    ("Maria Lоpez", "try adding an initial"),  # a Cyrillic о
])
def test_a_guest_name_that_will_not_do_is_told_in_plain_words(classroom, name, problem):
    assert join_as_guest(classroom, "Maria Lopez").status_code == 303
    classroom.cookies.clear()
    refused = join_as_guest(classroom, name)
    assert refused.status_code == 400 and problem in refused.text
    assert db_rows(classroom.app.state.chat.settings, "SELECT count(*) FROM users") == [(1,)]


def test_with_guests_on_the_invite_link_offers_the_guest_form_first(classroom):
    register(classroom, "teacher")
    slug = create_room(classroom, "lesson")
    classroom.cookies.clear()
    page = classroom.get(f"/room/{slug}/").text  # the invite link, logged out
    guest_form, login_form = page.index('action="/auth/guest/"'), page.index('action="/auth/login/"')
    assert guest_form < login_form and "Have an account? Log in" in page[login_form - 200:login_form + 300]
    assert re.search(r'<input id="guest_name"[^>]* autofocus>', page)
    assert not re.search(r'<input id="username"[^>]* autofocus', page)
    with TestClient(chat.create_app(app_settings(db_path=classroom.app.state.chat.settings.db_path.with_name("b.db")))) as plain:
        assert re.search(r'<input id="username"[^>]* autofocus>', plain.get("/auth/login/").text)  # guests off


def test_a_class_behind_one_address_is_told_what_to_do_at_the_registration_limit(tmp_path):
    settings = app_settings(db_path=tmp_path / "chat.db", guests=True, register_rate=1)
    with TestClient(chat.create_app(settings)) as client:
        assert join_as_guest(client, "first").status_code == 303
        client.cookies.clear()
        refused = join_as_guest(client, "second")
    assert refused.status_code == 429 and "Ask whoever runs it to raise CHAT_REGISTER_RATE" in refused.text


# --- rooms: creating, joining, the room page, history, unread, leaving ---------------------------


def test_create_room_gives_a_unique_slug_and_lists_it_at_home(alice):
    first, second = create_room(alice, "Study Group"), create_room(alice, "Study Group")
    assert first != second and re.fullmatch(r"study-group-[a-kmnp-z2-9]{13}", first)  # 65 random bits
    home = alice.get("/").text
    assert home.index(second) < home.index(first)  # most recent first
    page = alice.get(f"/room/{first}/")
    assert page.status_code == 200 and "<h1 dir=\"auto\">Study Group</h1>" in page.text
    assert f'value="http://testserver/room/{first}/"' in page.text  # invite link


@pytest.mark.parametrize("name", ["", "   ", "x" * 129])
def test_create_room_rejects_bad_names(alice, name):
    response = post_form(alice, "/", "/create/", room_name=name)
    assert response.status_code == 400 and 'role="alert"' in response.text


def test_unicode_room_name_gets_a_usable_slug(alice):
    slug = create_room(alice, "日本語のチャット")
    assert re.fullmatch(r"room-[a-kmnp-z2-9]{13}", slug)
    assert "日本語のチャット" in alice.get(f"/room/{slug}/").text


def test_join_by_code_or_pasted_link_ignoring_case_and_spaces(alice):
    slug = create_room(alice, "Book club")
    for typed in (slug, f"  {slug.upper()}  ", f"http://testserver/room/{slug}/", f" https://x.example/room/{slug.upper()}/?a=1 "):
        response = post_form(alice, "/", "/join/", code=typed)
        assert (response.status_code, response.headers.get("location")) == (303, f"/room/{slug}/"), typed


def test_join_unknown_code_is_404_with_the_form_again(alice):
    response = post_form(alice, "/", "/join/", code="nope-123456")
    assert response.status_code == 404
    assert 'role="alert"' in response.text and 'value="nope-123456"' in response.text


def test_unknown_room_page_is_a_friendly_404(alice):
    response = alice.get("/room/does-not-exist/")
    assert response.status_code == 404
    assert "There is no room with that code" in response.text and "Traceback" not in response.text


def test_history_pages_fifty_at_a_time_oldest_first(alice, settings):
    slug = create_room(alice, "history")
    with sqlite3.connect(settings.db_path) as db:
        room_id = db.execute("SELECT id FROM rooms WHERE code = ?", (slug,)).fetchone()[0]
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at) VALUES (?, 1, ?, '2026-01-01T00:00:00Z')",
                       [(room_id, f"message number {n}") for n in range(1, 121)])

    def ids(html):
        return [int(i) for i in re.findall(r'id="msg-(\d+)"', html)]

    page = alice.get(f"/room/{slug}/").text
    assert ids(page) == list(range(71, 121))
    assert f"/room/{slug}/messages?before=71" in page
    older = alice.get(f"/room/{slug}/messages?before=71").text
    assert ids(older) == list(range(21, 71)) and "before=21" in older
    oldest = alice.get(f"/room/{slug}/messages?before=21").text
    assert ids(oldest) == list(range(1, 21)) and "Load older" not in oldest
    assert alice.get(f"/room/{slug}/messages?before=abc").status_code == 400


def test_room_name_and_username_are_escaped(client):
    register(client, "<b>x</b>")  # not a valid username: refused, and the echo is escaped
    assert "<b>x</b>" not in client.get("/auth/register/").text
    response = register(client, "<script>")
    assert response.status_code == 400 and "&lt;script&gt;" in response.text and "<script>" not in response.text
    register(client, "mallory")
    slug = create_room(client, "<script>alert(1)</script>")
    page = client.get(f"/room/{slug}/").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page


def test_room_creation_is_rate_limited_per_user(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", room_rate=2)
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        create_room(client, "one"), create_room(client, "two")
        refused = post_form(client, "/", "/create/", room_name="three")
        assert refused.status_code == 429 and 'role="alert"' in refused.text and "Try again" in refused.text
        assert 'value="three"' in refused.text
    assert db_rows(settings, "SELECT count(*) FROM rooms") == [(2,)]


def test_unread_badges_and_the_new_divider(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "unread")
    room = f"/room/{slug}/"
    say_in(client, slug, "seen by alice")
    writes_done(client)  # the socket's close marked the room read
    assert 'class="badge"' not in client.get("/").text
    with as_user(client, bob):
        say_in(client, slug, *(f"unseen {n}" for n in range(3)))
    writes_done(client)
    home = client.get("/").text
    assert re.search(r'class="badge"[^>]*>3<span class="visually-hidden"> new</span>', home)
    page = client.get(room).text
    assert page.count("new-divider") == 1
    assert page.index("new-divider") < page.index("unseen 0") and page.index("seen by alice") < page.index("new-divider")
    writes_done(client)  # the visit's background write
    assert "new-divider" not in client.get(room).text  # once
    assert 'class="badge"' not in client.get("/").text


def test_counting_unread_walks_the_index_and_stops_at_99(alice, settings):
    create_room(alice, "busy")
    with sqlite3.connect(settings.db_path) as db:
        (room_id,) = db.execute("SELECT id FROM rooms").fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at, revision) VALUES (?, 1, 'm', '', 0)",
                       [(room_id,)] * 1000)
        db.execute("UPDATE room_members SET last_read_id = 0")
        db.row_factory = sqlite3.Row
        statements = []
        db.set_trace_callback(statements.append)
        (row,) = chat.rooms_of(db, 1)  # the home page's own query, as it runs
        db.set_trace_callback(None)
        plan = " ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + statements[-1]))
    assert row["unread"] == chat.UNREAD_SHOWN + 1  # counting stopped at 100, not 1,000
    assert "SEARCH x USING COVERING INDEX messages_by_room (room_id=? AND id>?)" in plan, plan
    assert "SCAN x" not in plan and "SCAN messages" not in plan
    assert ">99+<" in alice.get("/").text


def test_leaving_a_room_takes_it_off_the_list_and_out_of_presence(two_users):
    client, bob = two_users
    slug = create_room(client, "goodbye")
    with as_user(client, bob):
        client.get(f"/room/{slug}/")  # (the visit that makes a member is written just after the page)
        writes_done(client)
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        with socket_as(client, bob, slug) as bob_ws:
            receive_until(alice_ws, "<bdi>bob</bdi>")
            with as_user(client, bob):
                assert post_form(client, f"/room/{slug}/", f"/room/{slug}/leave").status_code == 303
                assert slug not in client.get("/").text
            code, frames = closed_with(bob_ws)
            assert code == 1008 and "You left this room" in frames
            assert "bob" not in receive_until(alice_ws, 'id="presence"')
    with as_user(client, bob):
        assert post_form(client, "/", "/join/", code=slug).status_code == 303  # back by its code
        client.get(f"/room/{slug}/")  # (the visit that makes a member is written just after the page)
        writes_done(client)
        assert slug in client.get("/").text
    assert slug in client.get("/").text  # the room stays for the others


def test_what_you_wrote_is_not_new_to_you(two_users):
    """Alone in a room, send, reload: no "New" above your own message. Another person
    writes, you answer, open a second tab: nothing is new. What came while you had no page
    open is. The home page's badge says the same as the divider."""
    client, bob = two_users
    slug = create_room(client, "mine")
    room = f"/room/{slug}/"
    client.get(room)
    say_in(client, slug, "mine 0")
    writes_done(client)
    assert "new-divider" not in client.get(room).text and 'class="badge"' not in client.get("/").text
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as first_tab:
        with as_user(client, bob):
            client.get(room)
            say_in(client, slug, "from bob")
        receive_until(first_tab, "from bob")  # seen live...
        send(first_tab, "my answer")  # ...and answered
        receive_until(first_tab, "my answer")
        assert "new-divider" not in client.get(room).text  # the second tab
        with as_user(client, bob):
            say_in(client, slug, "seen live in the first tab")
        receive_until(first_tab, "seen live in the first tab")
        assert "new-divider" not in client.get(room).text and 'class="badge"' not in client.get("/").text
    writes_done(client)
    with as_user(client, bob):
        say_in(client, slug, "while alice had no page open")
    writes_done(client)
    assert re.search(r'class="badge"[^>]*>1<', client.get("/").text)
    page = client.get(room).text
    assert page.count("new-divider") == 1 and page.index("new-divider") < page.index("while alice had no page open")


@pytest.mark.parametrize("zone, shown", [("Asia/Tokyo", "11:39"), ("America/New_York", "21:39"), ("UTC", "02:39")])
def test_times_are_shown_on_the_rooms_clock(tmp_path, zone, shown):
    settings = app_settings(db_path=tmp_path / "c.db", timezone=zone)
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "clock")
        (mid,) = say_in(client, slug, "now")
        with sqlite3.connect(settings.db_path) as db:
            db.execute("UPDATE messages SET created_at = '2026-11-30T02:39:10Z'")
        page = client.get(f"/room/{slug}/").text
    assert re.search(rf'<time datetime="2026-11-30T02:39:10Z" title="2026-11-\d\d {shown}:10 \w+">', page), page
    chat.room_clock.set_zone(None)


def test_with_no_setting_times_are_this_machines_local_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert chat.RoomClock(None).full("2026-11-30T02:39:10Z") == "2026-11-30 11:39:10 JST"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_message_from_another_day_shows_its_date():
    clock = chat.RoomClock(chat.time_zone("Asia/Tokyo"))
    now = datetime.now(timezone.utc)
    assert re.fullmatch(r"\d\d:\d\d", clock.short(now.strftime(chat.ISO_SECONDS)))
    last_week = now - timedelta(days=7)
    assert re.fullmatch(r"\d{1,2} [A-Z][a-z]{2}( \d{4})? \d\d:\d\d", clock.short(last_week.strftime(chat.ISO_SECONDS)))
    assert clock.short("2001-02-03T04:05:06Z") == "3 Feb 2001 13:05"
    assert clock.short("") == "" and clock.full("not a time") == "not a time"  # shown as it is, never a 500
    with pytest.raises(ValueError, match="no time zone called 'Mars/Olympus'"):
        chat.time_zone("Mars/Olympus")


# --- a message: the socket, frames, checks, catch-up, the plain form, links, mentions ------------


def test_two_clients_both_receive_a_message_and_it_is_stored(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "live")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        with socket_as(client, bob, slug) as bob_ws:
            receive_until(alice_ws, "<bdi>bob</bdi>")  # presence: bob came online
            bob_ws.send_text(keyed("  hello everyone  ", "k-1"))
            for ws in (alice_ws, bob_ws):
                frame = receive_until(ws, "hello everyone")
                assert 'hx-swap-oob="upsert:#messages"' in frame
                assert re.search(r'<article class="msg" id="msg-\d+"', frame)
                assert '<bdi class="author">bob</bdi>' in frame
                # and the page's catch-up cursor moves on to the message's revision
                assert re.search(r'<input type="hidden" id="room-revision" name="revision" value="1" hx-swap-oob="true">', frame)
            ack = receive_until(bob_ws, ACK)  # the sender alone is told it was taken, and which it was
            assert ack == str(chat.fragments.chat_error(key="k-1"))  # the pre-rendered answer is the macro's
            assert "message-input" not in ack  # nothing the server sends touches what is being typed
        receive_until(alice_ws, '<ul id="presence"')  # bob left
    assert db_rows(settings, "SELECT text FROM messages") == [("hello everyone",)]


def test_every_server_frame_holds_only_out_of_band_elements(alice):
    slug = create_room(alice, "oob")
    with alice.websocket_connect(f"/chat/{slug}/?wire=1", headers=ORIGIN) as ws:
        frames = [ws.receive_text()]  # presence
        send(ws, "hi")
        frames += [ws.receive_text(), ws.receive_text()]  # the message, the composer reset
        ws.send_bytes(b"\x00")
        frames.append(ws.receive_text())  # an error
    for frame in frames:
        tops = top_level_tags(frame)
        assert tops and all("hx-swap-oob" in tag for tag in tops), frame


def test_message_text_is_escaped(alice, settings):
    slug = create_room(alice, "xss")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, "<script>alert('x')</script>")
        frame = receive_until(ws, "msg-")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in frame and "<script>" not in frame
    assert "&lt;script&gt;" in alice.get(f"/room/{slug}/").text


def test_handshake_refusals(client):
    register(client, "alice")
    slug = create_room(client, "guarded")
    for origin in ("http://evil.example", "null"):
        refused_at_handshake(client, f"/chat/{slug}/", {"origin": origin})
    refused_at_handshake(client, "/chat/no-such-room/", ORIGIN)
    with client.websocket_connect(f"/chat/{slug}/") as ws:  # no Origin: a command-line client
        receive_until(ws, "<bdi>alice</bdi>")
    client.cookies.clear()
    refused_at_handshake(client, f"/chat/{slug}/", {"origin": "http://evil.example"})  # still, logged out


def test_a_page_without_a_session_is_told_to_log_in_and_not_retried(client):
    """A page whose session ended while it was away reconnects: it is told in place, with
    nothing of the room, and the socket closes with a code htmx does not retry."""
    register(client, "alice")
    slug = create_room(client, "secret room")
    post_form(client, "/", "/auth/logout/")
    with client.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN) as ws:
        notice = ws.receive_text()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1008  # not among htmx's reconnect codes
    assert "You were logged out" in notice and f"/auth/login/?next=/room/{slug}/" in notice
    assert "secret room" not in notice and "presence" not in notice


def test_allowed_origins_setting(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db",
                             allowed_origins=frozenset({"https://chat.example"}))
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "x")
        with client.websocket_connect(f"/chat/{slug}/", headers={"origin": "https://chat.example"}) as ws:
            receive_until(ws, "alice")


def test_empty_and_oversized_messages(alice, settings):
    slug = create_room(alice, "limits")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        receive_until(ws, "presence")
        send(ws, "   \n\t ")  # not stored; answered with no error, so the page has no text to give back
        assert receive_until(ws, ACK) == str(chat.fragments.chat_error(key=""))
        ws.send_text(keyed("x" * 4001, "long-1"))
        error = receive_until(ws, "chat-error")
        assert 'role="alert"' in error and "4,000" in error and "4,001" in error and 'data-key="long-1"' in error
        send(ws, "y" * 4000)
        assert receive_until(ws, "msg-").split("upsert:#announcer")[0].count("y" * 4000) == 1
    assert db_rows(settings, "SELECT length(text) FROM messages") == [(4000,)]


@pytest.mark.parametrize("bad_frame", ["not json", "[1, 2]", '{"message": 5}', '{"text": "hi"}', "null", b"\x00\xff"])
def test_malformed_frames_leave_everyone_working(two_users, settings, bad_frame):
    client, bob = two_users
    slug = create_room(client, "robust")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        with socket_as(client, bob, slug) as bob_ws:
            receive_until(alice_ws, "<bdi>bob</bdi>")
            receive_until(bob_ws, "<bdi>bob</bdi>")
            if isinstance(bad_frame, bytes):
                bob_ws.send_bytes(bad_frame)
            else:
                bob_ws.send_text(bad_frame)
            assert 'id="chat-error"' in bob_ws.receive_text()  # told, not disconnected
            send(bob_ws, "still here")
            assert "still here" in receive_until(bob_ws, "msg-")
            # alice's next frame is bob's message: she never saw his mistake
            assert "still here" in alice_ws.receive_text()
    assert db_rows(settings, "SELECT text FROM messages") == [("still here",)]


def test_reconnect_catches_up_with_missed_messages(two_users):
    client, bob = two_users
    slug = create_room(client, "catch-up")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        for n in range(3):
            send(ws, f"early {n}")
        last_seen = max(int(i) for i in re.findall(r"msg-(\d+)", "".join(ws.receive_text() for _ in range(7))))
    with as_user(client, bob), client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as bob_ws:
        for n in range(3):
            send(bob_ws, f"while away {n}")
            receive_until(bob_ws, ACK)  # stored and pushed before bob leaves
    with client.websocket_connect(f"/chat/{slug}/?revision={last_seen}", headers=ORIGIN) as ws:
        frame = receive_until(ws, "while away")
    assert 'hx-swap-oob="upsert:#messages"' in frame
    assert re.findall(r"(early|while away) (\d)", frame) == [("while away", "0"), ("while away", "1"), ("while away", "2")]


def test_a_page_too_far_behind_is_resynced_whole(alice, settings, monkeypatch):
    monkeypatch.setattr(chat, "CATCH_UP_LIMIT", 3)
    slug = create_room(alice, "resync")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        for n in range(5):
            send(ws, f"m{n}")
            receive_until(ws, ACK)
    with alice.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN) as ws:
        frame = receive_until(ws, 'id="messages"')
    assert 'hx-swap-oob="innerHTML"' in frame and all(f"m{n}" in frame for n in range(5))


def test_message_rate_limit_tells_only_the_sender(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=3)
    assert "too fast" in send_many(settings, 3)
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(3,)]


def test_rate_limits_can_be_turned_off(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=0)
    assert "one more" in send_many(settings, 60)
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(61,)]


def test_composer_without_javascript_posts_stores_pushes_and_redirects(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "plain html")
    with as_user(client, bob), client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as bob_ws:
        receive_until(bob_ws, "presence")
        fields = composer_fields(client.get(f"/room/{slug}/").text)
        assert (fields["method"], fields["action"]) == ("post", f"/room/{slug}/messages")
        response = client.post(fields["action"], follow_redirects=False, data={
            "csrf_token": fields["csrf_token"], "key": fields["key"], "message": "  sent without script  "})
        assert response.status_code == 303
        assert response.headers["location"] == f"/room/{slug}/#composer"  # the text is in no URL
        receive_until(bob_ws, "sent without script")  # pushed live to the others
    assert "sent without script" in client.get(f"/room/{slug}/").text
    assert db_rows(settings, "SELECT text FROM messages") == [("sent without script",)]


def test_composer_post_refusals_keep_the_text_and_store_nothing(alice, settings):
    slug = create_room(alice, "refusals")
    fields = composer_fields(alice.get(f"/room/{slug}/").text)
    response = alice.post(fields["action"], data={"csrf_token": fields["csrf_token"], "message": "y" * 4001})
    assert response.status_code == 400
    assert "at most 4,000" in response.text and 'data-enter-sends>' + "y" * 4001 + '</textarea>' in response.text
    assert alice.post(fields["action"], data={"message": "no token"}).status_code == 403
    assert alice.post(f"/room/nope-{slug}/messages", data={"csrf_token": fields["csrf_token"], "message": "x"}
                      ).status_code == 404
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(0,)]


def test_composer_post_obeys_the_message_rate(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=2)
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "fast")
        fields = composer_fields(client.get(f"/room/{slug}/").text)
        statuses = [client.post(fields["action"], follow_redirects=False, data={
            "csrf_token": fields["csrf_token"], "message": f"m{n}"}).status_code for n in range(3)]
    assert statuses == [303, 303, 429]
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(2,)]


def test_a_message_resent_with_its_key_is_stored_once(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "resends")
    key = composer_fields(client.get(f"/room/{slug}/").text)["key"]
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ws.send_text(keyed("pressed Enter twice while offline", key))
        ws.send_text(keyed("pressed Enter twice while offline", key))  # both frames sent on reconnect
        first, second = (receive_until(ws, ACK) for _ in range(2))  # both are answered as taken
        assert first == second == str(chat.fragments.chat_error(key=key))
        ws.send_text(keyed("pressed Enter twice while offline", "a-new-key"))  # the same words, later: new
        ws.send_text(keyed("no key at all", None))
        receive_until(ws, "no key at all")
    with as_user(client, bob), client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as bob_ws:
        bob_ws.send_text(keyed("bob's own key space", key))  # keys are per user
        receive_until(bob_ws, "bob&#39;s own key space")
    assert [text for (text,) in db_rows(settings, "SELECT text FROM messages ORDER BY id")] == [
        "pressed Enter twice while offline", "pressed Enter twice while offline", "no key at all", "bob's own key space"]


def test_a_post_resent_with_its_key_is_stored_once(alice, settings):
    slug = create_room(alice, "double submit")
    fields = composer_fields(alice.get(f"/room/{slug}/").text)
    data = {"csrf_token": fields["csrf_token"], "key": fields["key"], "message": "clicked twice"}
    assert [alice.post(fields["action"], data=data, follow_redirects=False).status_code for _ in range(2)] == [303, 303]
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(1,)]


@pytest.mark.parametrize("bad_key", [7, ["k"], "x" * 65, "no spaces", ""])
def test_a_broken_key_is_refused_with_a_message(alice, settings, bad_key):
    slug = create_room(alice, "keys")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ws.send_text(json.dumps({"message": "hi", "key": bad_key}))
        assert "broken `key`" in receive_until(ws, "chat-error")
        ws.send_text(keyed("still open", None))
        receive_until(ws, "still open")
    assert db_rows(settings, "SELECT text FROM messages") == [("still open",)]


def test_room_page_swaps_nothing_but_out_of_band_and_has_a_status(alice):
    slug = create_room(alice, "swaps")
    page = alice.get(f"/room/{slug}/").text
    assert re.search(r'<div class="room[^"]*" hx-swap="none"[^>]*hx-ws:connect=', page)
    assert re.search(r'<p id="connection" class="connection needs-js" role="status" data-stale-after="25.0">Connecting…</p>', page)
    # a page without a script (or before it runs) would say "Connecting…" for ever: it says nothing
    assert "Live updates need JavaScript" in page and ".needs-js { display: none" in page


def test_links_are_made_from_escaped_text(alice):
    slug = create_room(alice, "links")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, 'see https://example.org/a?b=1&c=2. and http://x.test/"><script>alert(1)</script> javascript:alert(1)')
        frame = receive_until(ws, "example.org")
    assert ('<a href="https://example.org/a?b=1&amp;c=2" rel="noopener noreferrer nofollow" target="_blank">'
            'https://example.org/a?b=1&amp;c=2</a>.') in frame
    assert '<a href="http://x.test/" rel="noopener noreferrer nofollow" target="_blank">http://x.test/</a>' in frame
    assert "<script>" not in frame and "&lt;script&gt;" in frame and 'href="javascript' not in frame


@pytest.mark.parametrize("text, link, after", [
    ("see https://en.wikipedia.org/wiki/Mercury_(planet) now", "https://en.wikipedia.org/wiki/Mercury_(planet)", " now"),
    ("(https://example.org/docs)", "https://example.org/docs", ")"),
    ("the end: https://example.org/a.", "https://example.org/a", "."),
    ("really? https://example.org/a?", "https://example.org/a", "?"),
    ("wow https://example.org/a!", "https://example.org/a", "!"),
    ("q https://example.org/s?q=a&b=c, then", "https://example.org/s?q=a&amp;b=c", ", then"),
    ("«https://example.org/fr»", "https://example.org/fr", "»"),
    ("“https://example.org/q”", "https://example.org/q", "”"),
    ("[https://example.org/x]", "https://example.org/x", "]"),
    ("'https://example.org/x'", "https://example.org/x", "&#39;"),
    ("wait https://example.org/more…", "https://example.org/more", "…"),
    ("https://bücher.example/straße ok", "https://bücher.example/straße", " ok"),
    ("https://en.wikipedia.org/wiki/A_(b)_(c) two", "https://en.wikipedia.org/wiki/A_(b)_(c)", " two"),
    ("HTTPS://EXAMPLE.ORG/UP", "HTTPS://EXAMPLE.ORG/UP", ""),
])
def test_links_are_cut_where_people_expect(text, link, after):
    html = str(chat.linkify(text))
    assert f'<a href="{link}" rel="noopener noreferrer nofollow" target="_blank">{link}</a>{after}' in html, html
    assert "real-host" not in html


@pytest.mark.parametrize("text", ["www.example.org", "mail me: ada@example.org", "ftp://example.org/x",
                                  "//example.org/x", "javascript:alert(1)", "mailto:ada@example.org",
                                  "data:text/html,<b>x</b>", "no link at all"])
def test_only_http_links_that_say_so_are_links(text):
    assert "<a " not in str(chat.linkify(text))


@pytest.mark.parametrize("text, real", [
    ("https://аpple.com/login", "xn--pple-43d.com"),  # a Cyrillic "а" among Latin letters
    ("https://bank.example@evil.example/x", "evil.example"),  # the part before @ is a user name
    ("https://exa\u202emple.org/", "xn--example-276c.org"),  # a right-to-left override
    ("https://ex\u200bample.org/", "xn--" + "ex\u200bample".encode("punycode").decode() + ".org"),  # zero width
])
def test_a_link_that_hides_where_it_goes_shows_its_real_host(text, real):
    html = str(chat.linkify(text))
    assert f'<small class="real-host">(goes to {real})</small>' in html, html
    assert "<bdi>" in html  # its text isolated: no direction control reaches past it


def test_link_detection_is_bounded_on_long_hostile_text():
    """4,000 characters shaped to make a linkifier backtrack still come back at once
    (pytest-timeout would stop a hang), escaped, each link found once."""
    for text in ("http://" * 570, "(" * 3990 + "http://x", "https://x.org/" + "a(" * 1990,
                 " https://e.org" * 285, "https://" + "a." * 1995, "https://x.org/?" + "&<" * 1990):
        html = str(chat.linkify(text[:4000]))
        assert "<" not in html.replace("<a ", "").replace("</a>", "").replace("<small", "").replace("</small>", "")\
            .replace("<bdi>", "").replace("</bdi>", "")


def test_every_limit_the_page_enforces_is_the_servers_counted_the_same_way(tmp_path):
    """The browser counts maxlength in UTF-16 units (an emoji is two) and cuts a paste short
    without a word; the server counts characters. So the pages set no length limits of
    their own: the server's rule, and its message, are the only ones."""
    settings = app_settings(db_path=tmp_path / "c.db", guests=True)
    with TestClient(chat.create_app(settings)) as client:
        pages = [client.get("/auth/login/").text, client.get("/auth/register/").text]
        register(client, "alice")
        slug = create_room(client, "counting")
        (mid,) = say_in(client, slug, "🎉" * 2500)  # 2,500 characters, 5,000 UTF-16 units: all stored
        pages += [client.get("/").text, client.get("/create/").text, client.get(f"/room/{slug}/").text,
                  client.get(f"/room/{slug}/messages/{mid}/edit").text]
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            send(ws, "🎉" * 4001)
            assert "at most 4,000 characters; yours has 4,001" in receive_until(ws, "chat-error")
        too_long_room = post_form(client, "/", "/create/", room_name="r" * 129)
        assert too_long_room.status_code == 400 and "at most 128 characters; yours has 129" in too_long_room.text
    for page in pages:
        assert not re.search(r"maxlength|minlength", page)
    assert db_rows(settings, "SELECT length(text) FROM messages") == [(2500,)]


def test_a_page_catches_up_from_the_revision_it_has_once_per_socket(alice):
    slug = create_room(alice, "cursor")
    room = f"/room/{slug}/"
    first, second, third = say_in(alice, slug, "one", "two", "three")
    assert page_revision(alice.get(room).text) == 3
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ws.send_text(json.dumps({"revision": "2", "headers": {"HX-Request": "true"}}))  # the catch-up form
        frame = receive_until(ws, "msg-")
        assert message_ids(frame) == [third] and 'id="room-revision" name="revision" value="3"' in frame
        ws.send_text(json.dumps({"revision": "0"}))  # asked again on the same socket: not answered
        send(ws, "four")
        assert message_ids(receive_until(ws, "msg-")) == [third + 1]  # the next frame is the new message
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ws.send_text(json.dumps({"revision": "4"}))  # a page that missed nothing is sent nothing
        send(ws, "five")
        assert message_ids(receive_until(ws, "msg-")) == [third + 2]


def test_every_frame_that_changes_the_room_moves_the_pages_revision_on(two_users):
    client, bob = two_users
    slug = create_room(client, "moving on")
    room = f"/room/{slug}/"
    (mid,) = say_in(client, slug, "hello")
    with as_user(client, bob):
        client.get(room)
    with socket_as(client, bob, slug) as bob_ws:
        htmx_post(client, f"{room}messages/{mid}/edit", room, message="hello again")
        assert 'id="room-revision" name="revision" value="2" hx-swap-oob="true"' in receive_until(bob_ws, "hello again")
        htmx_post(client, f"{room}messages/{mid}/delete", room)
        assert 'id="room-revision" name="revision" value="3" hx-swap-oob="true"' in receive_until(bob_ws, "delete")
    assert 'id="room-revision"' not in client.get(f"{room}messages?before=99").text  # older pages: no


def test_a_mention_with_a_dotless_or_dotted_i_is_stored_and_a_bad_message_fails_alone(client, settings,
                                                                                    monkeypatch):
    """Issue 29, 1: "@Asli" for a member "Aslı", "@İrem" for "irem": the regular expression
    took i, I, ı and İ alike and the lookup by casefolded text found nobody (a KeyError in the
    writer's transaction: the form 500ed, the socket was cut, an edit 500ed, and every message
    committed with it failed). Now a mention always has its person, or is plain text; and one
    message that fails for any reason fails alone, its batch-mates stored."""
    assert register(client, "irem").status_code == 303
    irem = client.cookies
    client.cookies = type(irem)()
    assert register(client, "Aslı").status_code == 303
    slug = create_room(client, "türkçe")
    with as_user(client, irem):
        client.get(f"/room/{slug}/")  # (the visit that makes a member is written just after the page)
        writes_done(client)
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        for text in ("@Asli bakar mısın", "@İrem selam", "@IREM again", "@aslı hello"):
            send(ws, text)
            assert text in receive_until(ws, text)
        assert post_form(client, f"/room/{slug}/", f"/room/{slug}/messages", message="@Asli by form").status_code == 303
        (mid,) = message_ids(receive_until(ws, "by form"))
        assert htmx_post(client, f"/room/{slug}/messages/{mid}/edit", f"/room/{slug}/", message="@İrem edited").status_code == 200
    mentioned = dict(db_rows(settings, "SELECT m.text, group_concat(u.username) FROM messages m LEFT JOIN mentions x "
                                       "ON x.message_id = m.id LEFT JOIN users u ON u.id = x.user_id GROUP BY m.id"))
    assert mentioned["@IREM again"] == "irem" and mentioned["@aslı hello"] == "Aslı"
    # One poisoned message among ten committed together: the other nine are stored and acknowledged.
    real = chat.add_message
    monkeypatch.setattr(chat, "add_message", lambda db, m: (_ for _ in ()).throw(RuntimeError("poisoned"))
                        if m.text == "poison 3" else real(db, m))
    store = client.app.state.chat.store
    release = threading.Event()
    client.portal.call(lambda: store.write_soon(lambda db: release.wait(10)))  # the writer is busy
    tabs = [client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__() for _ in range(10)]
    try:
        for n, tab in enumerate(tabs):
            tab.send_text(json.dumps({"message": f"poison {n}", "key": f"key-{n}", "headers": {}}))
        for _ in range(200):  # the first goes to the writer alone; the rest wait behind it
            if client.portal.call(lambda: sum(map(len, store._waiting.values()))) == 9:
                break
            time.sleep(0.01)
        release.set()
        answers = [receive_until(tab, 'data-key="key-') for tab in tabs]
        assert "could not be saved" in answers[3] and all('role="alert" data-key' in a for a in answers)
        assert [n for n, a in enumerate(answers) if "could not be saved" not in a] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        send(tabs[3], "still connected")
        assert "still connected" in receive_until(tabs[3], "still connected")
    finally:
        release.set()
        for tab in tabs:
            tab.__exit__(None, None, None)
    stored = {text for (text,) in db_rows(settings, "SELECT text FROM messages WHERE text LIKE 'poison %'")}
    assert stored == {f"poison {n}" for n in range(10) if n != 3}


def test_a_send_racing_the_rooms_deletion_is_told_the_room_is_gone(settings, tmp_path):
    """Issue 29, 8: a message for a room whose row is already gone (deleted and purged) was a
    TypeError in why_not_stored, which failed its whole batch."""
    db = chat.Store(settings.db_path)._connect(for_writing=True)
    try:
        db.execute("INSERT INTO users (id, username, username_key, password_hash, created_at) "
                   "VALUES (1, 'ada', 'ada', '', '')")
        assert chat.add_messages(db, [chat.NewMessage(404, 1, "into the void", None, None)]) == ["deleted"]
    finally:
        db.close()


def test_a_mention_marks_the_copy_of_the_one_mentioned_and_their_home_page(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "mentions")
    with as_user(client, bob):
        client.get(f"/room/{slug}/")  # (the visit that makes a member is written just after the page)
        writes_done(client)
    bob_id = user_id_of(settings, "bob")
    say_in(client, slug, "hey @BOB, and @bobby and email@bob.example and @nobody")  # while bob is away
    with as_user(client, bob):
        assert "you were mentioned" in client.get("/").text
        page = client.get(f"/room/{slug}/").text  # its own style marks bob's copy; reading clears the "@"
        assert f'.msg[data-mentions~="{bob_id}"]' in page
        assert f'data-mentions="{bob_id}"' in page  # by id: rendered once for everybody
        assert page.count('class="mention"') == 1 and f'<span class="mention" data-user="{bob_id}">@BOB</span>' in page
        writes_done(client)
        assert "you were mentioned" not in client.get("/").text
    with socket_as(client, bob, slug) as bob_ws:  # live too
        say_in(client, slug, "again @bob")
        assert f'<span class="mention" data-user="{bob_id}">@bob</span>' in receive_until(bob_ws, "again")
    assert "you were mentioned" not in client.get("/").text  # alice was not mentioned


# --- a message's Markdown (issue 30) -------------------------------------------------------------

CODE = "Here:\n```python\ndef hello(name):\n    return 'Hello ' + name  # @bob https://example.org\n```\nand `inline @bob`"


def test_a_message_is_markdown_rendered_once_and_every_copy_shows_it(two_users, settings):
    """A pasted function arrives whole: its lines, its indentation, highlighted, in every copy
    (live frame, room page, history page, catch-up, ?around=), the same HTML; the editor and
    the transcript keep the text as written; search finds a word inside the code."""
    client, bob = two_users
    slug = create_room(client, "code")
    with as_user(client, bob):
        client.get(f"/room/{slug}/")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, CODE)
        live = receive_until(ws, "hello")
    (mid,) = message_ids(live)
    rendered = re.search(r'<div class="body" dir="auto">(.*?)</div>\n', live, re.S).group(1)
    assert '<pre class="code" data-language="python"><code><span class="hl-k">def</span>' in rendered
    assert "\n    <span" in rendered  # the indentation kept, inside the block
    assert "@bob</span> <span" not in rendered and "<a " not in rendered  # no mention, no link in code
    assert '<code>inline @bob</code>' in rendered
    page = client.get(f"/room/{slug}/").text
    history = client.get(f"/room/{slug}/messages?before={mid + 1}").text
    around = client.get(f"/room/{slug}/?around={mid}").text
    with client.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN) as ws:
        caught_up = receive_until(ws, "hello")
    for copy in (page, history, around, caught_up):
        assert rendered in copy
    editor = client.get(f"/room/{slug}/messages/{mid}/edit").text
    assert html.unescape(re.search(r"data-enter-sends>(.*?)</textarea>", editor, re.S).group(1)) == CODE
    assert CODE in client.get(f"/room/{slug}/transcript").text
    with as_user(client, bob):
        assert search_page(client, "hello").text.count('class="hit"') == 1
    assert db_rows(settings, "SELECT text FROM messages") == [(CODE,)]  # stored as written
    assert db_rows(settings, "SELECT count(*) FROM mentions") == [(0,)]  # an @name in code is no mention


def test_markdown_is_chat_markdown(alice):
    """Line breaks, emphasis, strikethrough, quotes, lists, links; no images (a link), no raw
    HTML (text), no headings (text); code only highlighted for a known language; a long
    message folded; the screen reader's line says what the code is."""
    render = lambda text: chat.render_text(text).html
    assert render("one\ntwo") == "<p>one<br />\ntwo</p>\n"
    assert render("**b** _i_ ~~s~~") == "<p><strong>b</strong> <em>i</em> <s>s</s></p>\n"
    assert "<blockquote>" in render("> said") and "<li>a</li>" in render("- a\n- b")
    assert render("# not a heading") == "<p># not a heading</p>\n"
    assert render("<b>raw</b>") == "<p>&lt;b&gt;raw&lt;/b&gt;</p>\n"
    assert render("![pixel](https://t.example/p.gif)").startswith('<p>!<a href="https://t.example/p.gif"')
    assert 'class="link-host">(docs.python.org)' in render("[docs](https://docs.python.org/3/)")
    assert 'class="real-host">(goes to evil.example)' in render("[bank](https://bank.example@evil.example/)")
    assert 'data-language' not in render("```\nplain\n```") and 'data-language' not in render("```cobol\nX\n```")
    assert render("```brainfuck\n+[-]\n```") == '<pre class="code"><code>+[-]\n</code></pre>\n'
    slug = create_room(alice, "long")
    say_in(alice, slug, "\n".join(f"line {n}" for n in range(16)), "just\nthree\nlines")
    page = alice.get(f"/room/{slug}/").text
    assert page.count('<details class="fold">') == 1 and "Show all 16 lines" in page
    assert chat.spoken("look:\n```python\na\nb\n```") == "look:\n(code block, python, 2 lines)"
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, "see:\n```js\nlet a = 1\n```")
        assert "alice</bdi>: see:\n(code block, javascript, 1 line)</p>" in receive_until(ws, "announcer")


XSS = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))", "[x](&#106;avascript:alert(1))", "[x](java\tscript:alert(1))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)", "<javascript:alert(1)>",
    "[x](vbscript:msgbox(1))", "[x](file:///etc/passwd)", "[x](//evil.example)",
    '[x](https://ok.example "title\\" onmouseover=\\"alert(1))', '[x](https://ok.example "a" onclick="b")',
    "```\"><script>alert(1)</script>\nx\n```", "```python onload=alert(1)\nx\n```",
    "`<script>`", "<a href=\"javascript:alert(1)\">x</a>", "[<img src=x onerror=alert(1)>](https://ok.example)",
    "https://ok.example/\"><script>alert(1)</script>", "**<svg onload=alert(1)>**", "<!-- x --><style>x</style>",
    "[x](https://ok.example/\" onmouseover=\"alert(1))", "@<script>", "&lt;script&gt;", "\\<script\\>",
    "[![x](javascript:alert(1))](https://ok.example)", "<https://ok.example/<script>>",
]
ALLOWED = {"p": set(), "br": set(), "strong": set(), "em": set(), "s": set(), "code": set(), "blockquote": set(),
           "ul": set(), "ol": {"start"}, "li": set(), "pre": {"class", "data-language"}, "span": {"class", "data-user"},
           "small": {"class"}, "bdi": set(), "a": {"href", "rel", "target"}}


def test_no_markup_the_renderer_did_not_mean(alice):
    """An XSS corpus: whatever a message holds, its HTML has only the elements and attributes
    the renderer makes, every link goes to http(s), and nothing runs."""
    from html.parser import HTMLParser

    class Check(HTMLParser):
        def handle_starttag(self, tag, attrs):
            assert tag in ALLOWED and {name for name, _ in attrs} <= ALLOWED[tag], (tag, attrs)
            for name, value in attrs:
                if name == "href":
                    assert value.lower().startswith(("http://", "https://")), value
    for text in XSS + [text.upper() for text in XSS]:
        Check().feed(chat.render_text(text, ((1, "script"),)).html)


PATHOLOGICAL = {"[" * 4000, "]" * 4000, "[a](" * 1000, ">" * 4000, "*a" * 2000, "_a" * 2000, "**a" * 1333,
                "*_" * 2000, "```\n" + "x\n" * 1998, "- " * 2000, "`" * 4000, "`a" * 2000, "<a" * 2000,
                "<http://a" * 444, "&amp;" * 800, "~~a" * 1333, "![a" * 1333, "@a " * 1333,
                "".join("  " * n + "- x\n" for n in range(300)), "```rust\n" + 'r#"' * 1300,
                "```bash\n" + "$(" * 1990, "```css\n" + "{" * 3990, "[a](http://b) " * 280}


PLAIN_PIECES = list("ab1 !&~|>#;.x:/-+)(é\t@=?'\"%$^{}") + [
    "&amp;", "&copy", "&#", "http://x.org", "www.a.com", "a@b.org", "1.", "  ", "x#", "!!", "a|b",
    "@ada", "@ada!", "Thanks! ", "Q&A"]


@hypothesis.settings(max_examples=1500, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(hypothesis.strategies.lists(hypothesis.strategies.sampled_from(PLAIN_PIECES),
                                              min_size=1, max_size=10))
def test_plain_text_skips_the_parser_and_renders_as_the_parser_would(pieces):
    """A text with none of MARKDOWN_SIGNS takes the short path (linkify alone); it must give
    the parser's own HTML, for text with "!", "&", "~", "|", "#" and ">" inside, and mentions."""
    text = "".join(pieces).strip()
    hypothesis.assume(text and not chat.MARKDOWN_SIGNS.search(text))
    people = ((7, "ada"),)
    parsed = chat.MARKDOWN[True, True].render(text, {"people": people})
    assert chat.render_text(text, people).html == parsed


def test_pathological_markdown_renders_whole_and_well_formed():
    """Input that makes Markdown parsers slow or confused: each renders (their time, at most
    about 25 ms of CPU here, is measured in docs/performance.md, not asserted), and its HTML
    is well formed and holds nothing but what the renderer makes."""
    from html.parser import HTMLParser

    class Balanced(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open = []

        def handle_starttag(self, tag, attrs):
            assert tag in ALLOWED, tag
            if tag != "br":
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open.pop() == tag
    for text in PATHOLOGICAL:
        checker = Balanced()
        checker.feed(chat.render_text(text[:4000]).html)
        assert checker.open == [], text[:20]


def test_messages_from_before_markdown_are_rendered_in_the_background(tmp_path):
    """A chat.db of the release before (schema v8: no stored renderings): its messages show at
    once (rendered as a page shows them) and are rendered once and for all in the background."""
    db_path = tmp_path / "chat.db"
    with sqlite3.connect(db_path) as db:
        db.executescript(frozen_schema("schema-v8.sql"))
        db.execute("PRAGMA user_version = 8")
        db.execute("INSERT INTO users (id, username, username_key, password_hash, created_at, username_skeleton) "
                   "VALUES (1, 'ada', 'ada', 'x', '2026-01-01T00:00:00Z', 'ada')")
        db.execute("INSERT INTO rooms (id, slug, name, created_by, created_at, revision) VALUES (1, 'old-abc', 'Old', 1, '', 2)")
        db.execute("INSERT INTO room_members (room_id, user_id, joined_at, last_visit_at, role) VALUES (1, 1, '', '', 'owner')")
        db.executemany("INSERT INTO messages (id, room_id, user_id, text, created_at, revision) VALUES (?, 1, 1, ?, '', ?)",
                       [(1, "an **old** one", 1), (2, "```python\nprint(1)\n```", 2)])
        db.execute("INSERT INTO sessions VALUES ('s1', 1, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), "
                   "strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))")
    settings = app_settings(db_path=db_path)
    with TestClient(chat.create_app(settings)) as client:
        for _ in range(100):
            if db_rows(settings, "SELECT count(*) FROM messages WHERE html IS NULL") == [(0,)]:
                break
            time.sleep(0.05)
    assert db_rows(settings, "SELECT html FROM messages ORDER BY id") == [
        ("<p>an <strong>old</strong> one</p>\n",), (chat.render_text("```python\nprint(1)\n```").html,)]
    assert db_rows(settings, "SELECT version, rendered_up_to FROM render_state") == [(chat.RENDERER_VERSION, 2)]
    # And the rest of this release's upgrade: one word for the code, ids counted, state revisions.
    assert db_rows(settings, "SELECT code, state_revision FROM rooms") == [("old-abc", 2)]
    assert dict(db_rows(settings, "SELECT name, value FROM counters")) == {"message": 2, "room": 1}
    assert db_rows(settings, "PRAGMA user_version") == [(len(chat.MIGRATIONS),)]


# --- changing a message: edit, delete, react, reply ----------------------------------------------


def test_authors_edit_and_delete_their_messages_and_every_page_sees_it(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "edits")
    room = f"/room/{slug}/"
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        for text in ("before it", "first draft", "after it"):  # neighbours on the same page of the file
            send(alice_ws, text)
            receive_until(alice_ws, text)
        (mid,) = message_ids(client.get(room).text)[1:2]
        checkpointed(settings.db_path)  # the text is in chat.db itself now
        with socket_as(client, bob, slug) as bob_ws:
            receive_until(bob_ws, 'id="presence"')
            editor = client.get(f"{room}messages/{mid}/edit")
            assert editor.status_code == 200 and 'data-enter-sends>first draft</textarea>' in editor.text
            saved = htmx_post(client, f"{room}messages/{mid}/edit", room, message="  second draft <b>  ")
            assert saved.status_code == 200 and 'id="editor"' in saved.text  # the editor closes
            for ws in (alice_ws, bob_ws):
                frame = receive_until(ws, "second draft")
                assert message_ids(frame) == [mid] and "(edited)" in frame and "&lt;b&gt;" in frame
            assert htmx_post(client, f"{room}messages/{mid}/delete", room).status_code == 200
            for ws in (alice_ws, bob_ws):
                assert f'<div id="msg-{mid}" hx-swap-oob="delete"></div>' in receive_until(ws, "hx-swap-oob=\"delete\"")
    assert db_rows(settings, "SELECT text FROM messages ORDER BY id") == [("before it",), ("after it",)]
    checkpointed(settings.db_path)
    stored = b"".join(p.read_bytes() for p in settings.db_path.parent.glob("chat.db*") if p.is_file())
    assert b"second draft" not in stored and b"first draft" not in stored  # overwritten, not just unlinked


def test_only_the_author_may_edit_or_delete(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "mine")
    room = f"/room/{slug}/"
    (mid,) = say_in(client, slug, "alice wrote this")
    with as_user(client, bob):
        client.get(room)  # bob joins the room
        assert client.get(f"{room}messages/{mid}/edit").status_code == 403
        assert htmx_post(client, f"{room}messages/{mid}/edit", room, message="bob's now").status_code == 403
        assert htmx_post(client, f"{room}messages/{mid}/delete", room).status_code == 403
    assert client.post(f"{room}messages/{mid}/delete").status_code == 403  # no CSRF token: refused too
    other_room = create_room(client, "elsewhere")
    assert htmx_post(client, f"/room/{other_room}/messages/{mid}/delete", room).status_code == 404
    assert htmx_post(client, f"{room}messages/{2**64}/delete", room).status_code == 404
    assert db_rows(settings, "SELECT text FROM messages") == [("alice wrote this",)]


def test_edits_obey_the_rules_for_new_messages(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=3)
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "rules")
        room = f"/room/{slug}/"
        (mid,) = say_in(client, slug, "original")
        too_long = htmx_post(client, f"{room}messages/{mid}/edit", room, message="x" * 4001)
        assert too_long.status_code == 400 and "at most 4,000" in too_long.text
        assert htmx_post(client, f"{room}messages/{mid}/edit", room, message="  \x00 ").status_code == 400
        statuses = [htmx_post(client, f"{room}messages/{mid}/edit", room, message=f"v{n}").status_code for n in range(3)]
        assert statuses == [200, 200, 429]  # one message sent plus two edits: the rate is 3 per 10 s
    assert db_rows(settings, "SELECT text FROM messages") == [("v1",)]


def test_a_page_that_was_away_catches_up_on_edits_and_deletes(two_users):
    client, bob = two_users
    slug = create_room(client, "away")
    room = f"/room/{slug}/"
    say_in(client, slug, "keep", "edit me", "delete me")
    with as_user(client, bob):
        page = client.get(room).text  # bob's page, rendered now; then bob goes offline
        cursor = page_revision(page)
        kept, edited, deleted = message_ids(page)
    htmx_post(client, f"{room}messages/{edited}/edit", room, message="edited while bob was away")
    htmx_post(client, f"{room}messages/{deleted}/delete", room)
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, "new while away")
        receive_until(ws, "new while away")
    with as_user(client, bob), client.websocket_connect(f"/chat/{slug}/?revision={cursor}", headers=ORIGIN) as bob_ws:
        frame = receive_until(bob_ws, "edited while bob was away")
    assert kept not in message_ids(frame.split("hx-swap-oob=\"delete\"")[0])  # unchanged: not sent again
    assert re.findall(r'<article class="msg" id="msg-(\d+)"', frame) == [str(edited), str(edited + 2)]  # id order
    assert f'<div id="msg-{deleted}" hx-swap-oob="delete">' in frame


def test_every_new_edited_or_deleted_message_moves_the_room_on(alice):
    """A page carries the room's revision; each change must advance it, or every page
    rendered after the change would be sent it again at its next catch-up."""
    slug = create_room(alice, "revisions")
    room = f"/room/{slug}/"

    def page_cursor() -> int:
        return page_revision(alice.get(room).text)

    cursors = [page_cursor()]
    first, second = say_in(alice, slug, "one", "two")
    cursors.append(page_cursor())
    htmx_post(alice, f"{room}messages/{first}/edit", room, message="one, edited")
    cursors.append(page_cursor())
    htmx_post(alice, f"{room}messages/{second}/delete", room)
    cursors.append(page_cursor())
    assert cursors == [0, 2, 3, 4]


def test_reactions_toggle_live_and_caught_up_one_per_person_and_emoji(owned_room, settings):
    client, bob, slug = owned_room
    (said,) = say_in(client, slug, "react to me")
    picker = client.get(f"/room/{slug}/messages/{said}/react").text
    assert all(f'value="{emoji}"' in picker for emoji in chat.REACTIONS)
    with socket_as(client, bob, slug) as bob_ws:
        assert react_post(client, slug, said, give="👍").status_code == 200
        frame = receive_until(bob_ws, "reactions")
        assert re.search(r'<span class="reaction" data-by="\d+" title="thumbs up">', frame)
        assert 'aria-pressed="false" hx-post="messages/%d/react" hx-swap="none">👍 1</button>' % said in frame
        assert 'aria-pressed="true"' in frame  # (the "take back" twin; the page's style shows one)
        assert 'id="room-revision"' in frame
        assert react_post(client, slug, said, give="👍").status_code == 200  # twice: still one
    with as_user(client, bob):
        page = client.get(f"/room/{slug}/").text
        after = page_revision(page)
        react_post(client, slug, said, give="🎉")
        react_post(client, slug, said, give="👍")
    assert db_rows(settings, "SELECT emoji, count(*) FROM reactions GROUP BY emoji ORDER BY emoji") == [("🎉", 1), ("👍", 2)]
    with as_user(client, bob):  # an offline page catches up on reactions by revision
        with client.websocket_connect(f"/chat/{slug}/?revision={after - 1}", headers=ORIGIN) as ws:
            caught = receive_until(ws, "reactions")
        assert "👍 2" in caught and "🎉 1" in caught
        react_post(client, slug, said, take_back="👍")
        react_post(client, slug, said, take_back="👍")  # taking back twice: nothing more
    assert db_rows(settings, "SELECT count(*) FROM reactions") == [(2,)]
    assert htmx_post(client, f"/room/{slug}/messages/{said}/delete", f"/room/{slug}/").status_code == 200
    assert db_rows(settings, "SELECT count(*) FROM reactions") == [(0,)]  # its reactions went with it


def test_who_reacted_is_in_the_picker_not_in_every_copy(client, settings):
    """Issue 29, 15: a message's frame grew to 21 KB with 20 people x 6 reactions (every name
    in every emoji's title, in every copy). Counts and ids travel; names are in the React
    popover, loaded when asked for."""
    register(client, "host")
    slug = create_room(client, "popular")
    (mid,) = say_in(client, slug, "react to me")
    with sqlite3.connect(settings.db_path) as db:
        db.executemany("INSERT INTO users (id, username, username_key, password_hash, created_at) "
                       "VALUES (?, ?, ?, '', '')", [(100 + n, f"person{n:02}", f"person{n:02}") for n in range(20)])
        db.executemany("INSERT INTO reactions (message_id, user_id, emoji) VALUES (?, ?, ?)",
                       [(mid, 100 + n, emoji) for n in range(20) for emoji in chat.REACTIONS])
    htmx_post(client, f"/room/{slug}/messages/{mid}/react", f"/room/{slug}/", give="👍")  # a live frame
    with client.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN) as ws:
        frame = receive_until(ws, "react to me")
    copy = re.search(r'<article class="msg" id="msg-\d+".*?</article>', frame, re.S).group(0)
    assert len(copy) < 8_000 and "person07" not in copy, len(copy)
    picker = client.get(f"/room/{slug}/messages/{mid}/react").text
    assert "<bdi>person07</bdi>" in picker and picker.count("<li>") == 6


def test_reactions_are_attacked(owned_room, settings, tmp_path):
    client, bob, slug = owned_room
    (said,) = say_in(client, slug, "target")
    for fields in ({"give": "💩"}, {"give": ""}, {}, {"give": "👍" * 1000}, {"take_back": "x" * 100_000}):
        response = react_post(client, slug, said, **fields)
        assert response.status_code in (400, 413) and response.status_code != 500
    assert react_post(client, slug, 999_999, give="👍").status_code == 404
    assert client.post(f"/room/{slug}/messages/{said}/react", data={"give": "👍"}).status_code == 403  # no CSRF token
    with as_user(client, type(client.cookies)()):
        register(client, "carol")
        elsewhere = create_room(client, "elsewhere")
        (hers,) = say_in(client, elsewhere, "from carol")
        assert react_post(client, slug, said, give="👍").status_code == 403  # not a member
    assert react_post(client, slug, hers, give="👍").status_code == 404  # another room's message, by this room
    assert react_post(client, elsewhere, hers, give="👍").status_code == 403  # ... or by that room: not a member
    assert moderate(client, slug, "lock").status_code == 303
    with as_user(client, bob):
        assert react_post(client, slug, said, give="👍").status_code == 403  # locked: members wait
    assert react_post(client, slug, said, give="👍").status_code == 200  # owners do not
    assert db_rows(settings, "SELECT count(*) FROM reactions") == [(1,)]
    limited = TestClient(chat.create_app(app_settings(db_path=tmp_path / "limited.db", message_rate=5)),
                         base_url="http://testserver")
    with limited:
        register(limited, "dora")
        room = create_room(limited, "fast")
        (one,) = say_in(limited, room, "one")
        token = csrf(limited.get(f"/room/{room}/").text)
        codes = [limited.post(f"/room/{room}/messages/{one}/react", headers={"x-csrf-token": token},
                              data={"give": "👍"} if n % 2 else {"take_back": "👍"}).status_code for n in range(1000)]
    assert codes.count(429) > 900 and 500 not in codes  # reactions share the message rate


def test_a_reply_quotes_the_original_as_it_is_now(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    (question,) = say_in(client, slug, "what time is the exam?\nsecond line")
    with socket_as(client, bob, slug) as bob_ws, as_user(client, bob):
        armed = client.get(f"{room}messages/{question}/reply").text
        assert f'name="reply_to" value="{question}" checked' in armed and "what time is the exam?</q>" in armed
        ws = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        ws.send_text(json.dumps({"message": "at nine", "reply_to": str(question)}))
        frame = receive_until(ws, "at nine")
        ws.__exit__(None, None, None)
    assert f'<a class="quote" href="#msg-{question}"><bdi>alice</bdi>: <q dir="auto">what time is the exam?</q></a>' in frame
    (answer,) = message_ids(frame)
    with socket_as(client, bob, slug) as bob_ws:
        assert htmx_post(client, f"{room}messages/{question}/edit", room, message="when is the exam?").status_code == 200
        edited = receive_until(bob_ws, "when is")
        assert message_ids(edited) == [question, answer] and "<q dir=\"auto\">when is the exam?</q>" in edited
        assert htmx_post(client, f"{room}messages/{question}/delete", room).status_code == 200
        gone = receive_until(bob_ws, "deleted message")
        assert f'id="msg-{answer}"' in gone and f'<div id="msg-{question}" hx-swap-oob="delete">' in gone
    assert "<i>deleted message</i>" in client.get(room).text


def test_replies_without_javascript_and_replies_to_other_rooms(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    (question,) = say_in(client, slug, "a plain question")
    with as_user(client, bob):
        page = client.get(f"{room}?reply={question}").text  # the Reply link, followed without htmx
        assert f'name="reply_to" value="{question}" checked' in page
        fields = composer_fields(page)
        response = client.post(f"{room}messages", data={**fields, "message": "a plain answer", "reply_to": str(question)},
                               follow_redirects=False)
        assert response.status_code == 303
        other = create_room(client, "bob's other")
        (foreign,) = say_in(client, other, "in another room")
        for bad in (str(foreign), "999999", "abc", "-1", "9" * 40, ""):
            ws = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
            ws.send_text(json.dumps({"message": f"reply to {bad[:5]}", "reply_to": bad}))
            frame = receive_until(ws, "chat-error")
            ws.__exit__(None, None, None)
            assert "Internal" not in frame
        for bad in (None, 7, [1], {"a": 1}):
            ws = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
            ws.send_text(json.dumps({"message": "typed", "reply_to": bad}))
            frame = receive_until(ws, "chat-error")
            ws.__exit__(None, None, None)
            assert bad is None or "`reply_to` must be the id" in frame
    rows = dict(db_rows(settings, "SELECT text, reply_to FROM messages"))
    assert rows["a plain answer"] == question
    assert rows["reply to " + str(foreign)[:5]] is None  # another room's message is never quoted
    assert "in another room" not in client.get(room).text


def test_edits_and_reactions_obey_the_lock_and_edits_slow_mode_as_messages_do(owned_room, settings):
    """Issue 29, 5: an edit in a locked room was taken and pushed live, and ten edits went
    through in a second under 60 s slow mode. Every way of changing what others see passes
    the same checks (check_turn): a lock holds back edits and reactions, slow mode edits."""
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    with as_user(client, bob):
        (mid,) = say_in(client, slug, "bob writes first")
    assert moderate(client, slug, "lock").status_code == 303
    with as_user(client, bob):
        refused = htmx_post(client, f"{room}messages/{mid}/edit", room, message="edited while locked")
        assert refused.status_code == 403 and "locked" in refused.text
        assert htmx_post(client, f"{room}messages/{mid}/react", room, give="👍").status_code == 403
    assert moderate(client, slug, "unlock").status_code == 303
    assert moderate(client, slug, "slow_mode", slow_mode="60").status_code == 303
    with as_user(client, bob):
        edits = [htmx_post(client, f"{room}messages/{mid}/edit", room, message=f"edit {n}").status_code
                 for n in range(10)]
        assert edits[0] == 200 and set(edits[1:]) == {429}
        assert htmx_post(client, f"{room}messages/{mid}/react", room, give="👍").status_code == 200  # not pace
    assert db_rows(settings, "SELECT text FROM messages") == [("edit 0",)]
    assert moderate(client, slug, "slow_mode", slow_mode="²").status_code == 400  # (issue 29, 11)
    assert moderate(client, slug, "slow_mode", slow_mode="٣٠").status_code == 400


def test_a_catch_up_read_before_an_edit_never_shows_the_old_text_after_it(two_users, settings, monkeypatch):
    """Issue 29, 10: a catch-up read just before an edit, sent just after it, set the page back
    to the old text and its cursor back. Now what is broadcast while a catch-up is read waits
    for it, and goes only if newer; the page's revision only moves on."""
    client, bob = two_users
    slug = create_room(client, "racing")
    (mid,) = say_in(client, slug, "first words")
    read, release = threading.Event(), threading.Event()
    store = client.app.state.chat.store
    real_read = store.read

    async def held_read(method, *args):
        """The catch-up from revision 0 is read, then held back until the edit has gone out."""
        found = await real_read(method, *args)
        if method is chat.catch_up_frame and 0 in args[1:]:
            read.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return found
    monkeypatch.setattr(store, "read", held_read)
    with socket_as(client, bob, slug) as bob_ws:
        receive_until(bob_ws, "presence")
        bob_ws.send_text(json.dumps({"revision": "0"}))  # a page that has nothing yet
        assert read.wait(10)
        htmx_post(client, f"/room/{slug}/messages/{mid}/edit", f"/room/{slug}/", message="second thoughts")
        release.set()
        frames = []
        while not any("second thoughts" in frame for frame in frames):
            frames.append(bob_ws.receive_text())
        frames.append(bob_ws.receive_text()) if "first words" not in "".join(frames) else None
    shown = [text for frame in frames for text in re.findall(r"(first words|second thoughts)", frame)]
    cursors = [int(n) for frame in frames for n in re.findall(r'id="room-revision" name="revision" value="(\d+)"', frame)]
    assert shown[-1] == "second thoughts" and cursors == sorted(cursors)


# --- the live room: presence, heartbeats, the wire view, the announcer, logging out --------------


def test_a_broadcast_is_rendered_once_and_the_same_for_everyone(two_users, monkeypatch):
    """House rule 2: a new message is rendered once, whoever and however many are in the room,
    and every socket gets the very same frame (what differs per viewer is the page's style)."""
    client, bob = two_users
    slug = create_room(client, "rendered once")
    renders = []
    real = chat.fragments.new_message_frame  # (compiles the fragments first)
    monkeypatch.setattr(chat.fragments, "new_message_frame", lambda m: renders.append(m["id"]) or real(m))
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws, \
            client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_again, \
            socket_as(client, bob, slug) as bob_ws:
        send(bob_ws, "once for all")
        frames = [receive_until(ws, "once for all") for ws in (alice_ws, alice_again, bob_ws)]
    assert len(renders) == 1 and frames[0] == frames[1] == frames[2]



def test_presence_counts_a_user_with_two_tabs_once(two_users):
    client, bob = two_users
    slug = create_room(client, "tabs")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        receive_until(alice_ws, "<bdi>alice</bdi>")
        with as_user(client, bob):
            tab1 = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
            tab2 = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        assert receive_until(alice_ws, "bob").count("<bdi>bob</bdi>") == 1
        tab1.__exit__(None, None, None)  # one tab closed: bob is still online, nothing is said
        send(tab2, "ping")
        assert "ping" in alice_ws.receive_text()
        tab2.__exit__(None, None, None)
        frame = receive_until(alice_ws, 'id="presence"')
        assert "bob" not in frame and "<bdi>alice</bdi>" in frame
        page = client.get(f"/room/{slug}/").text
        assert "<bdi>alice</bdi>" in page


def test_wire_mode_shows_both_directions_labelled_and_escaped(two_users):
    client, bob = two_users
    slug = create_room(client, "teaching")
    assert 'id="wire-log"' in client.get(f"/room/{slug}/?wire=1").text
    assert 'id="wire-log"' not in client.get(f"/room/{slug}/").text
    with client.websocket_connect(f"/chat/{slug}/?wire=1", headers=ORIGIN) as ws:
        receive_until(ws, "presence")
        raw = json.dumps({"message": "<i>hi</i>", "headers": {"HX-Request": "true", "HX-Trigger": "composer"}})
        ws.send_text(raw)
        sent = receive_until(ws, "Sent by this page")  # what the page sent, as the server got it
        broadcast = receive_until(ws, "msg-")
        reset = receive_until(ws, ACK)
        with as_user(client, bob), client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as bob_ws:
            plain = receive_until(bob_ws, 'id="presence"')
    assert str(markupsafe.escape(raw)) in sent and '"headers"' in raw and "<i>" not in sent
    live, echo = broadcast.split('<div hx-swap-oob="afterbegin:#wire-log">')
    assert "Received, to everyone in the room" in echo
    assert "&lt;article class=&#34;msg&#34;" in echo and "&amp;lt;i&amp;gt;hi" in echo
    assert "<article" in live and "<article" not in echo
    assert "Received, only to you" in reset  # the answer went to the sender alone
    assert "wire-log" not in plain  # pages not in teaching mode get the frames alone


@pytest.mark.parametrize("scope", ["this session", "everywhere"])
def test_logging_out_closes_open_room_sockets_at_once(alice, settings, scope):
    slug = create_room(alice, "shared computer")
    phone = second_session(alice, "alice")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as here:
        with socket_as(alice, phone, slug) as there:
            receive_until(here, "presence")  # (the same user on the phone: presence does not change)
            fields = {"scope": "everywhere"} if scope == "everywhere" else {}
            assert post_form(alice, "/", "/auth/logout/", **fields).status_code == 303
            code, frames = closed_with(here)
            assert code == 1008 and "You were logged out" in frames  # told in place; not retried
            if scope == "everywhere":
                assert closed_with(there)[0] == 1008
            else:  # the phone's session lives on
                send(there, "phone still works")
                receive_until(there, "phone still works")


def test_heartbeat_keeps_telling_every_page_it_is_live(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", heartbeat=0.05)
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "beats")
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            frames = [ws.receive_text() for _ in range(6)]
    beats = [f for f in frames if f == chat.HEARTBEAT_FRAME]
    assert len(beats) >= 4


def test_the_online_list_counts_and_marks_the_owner_first(two_users):
    client, bob = two_users
    slug = create_room(client, "marked")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws, socket_as(client, bob, slug):
        frame = receive_until(alice_ws, "<bdi>bob</bdi>")
        page = client.get(f"/room/{slug}/").text
    assert '<span id="online-count" hx-swap-oob="true">2</span>' in frame
    assert re.search(r'<li><bdi>alice</bdi> <small class="owner">owner</small></li>\s*<li><bdi>bob</bdi></li>', frame)
    assert re.search(r'<summary><h2>Online · <span id="online-count">2</span></h2></summary>', page)
    assert re.search(r'<details class="online" open>', page)
    phone = client.get(f"/room/{slug}/", headers={"user-agent": "Mozilla/5.0 (Linux; Android 14) Mobile Safari"}).text
    assert '<details class="online">' in phone  # folded behind its count on a phone


def test_the_wire_view_folds_the_online_list_into_one_line(alice):
    slug = create_room(alice, "projected")
    with alice.websocket_connect(f"/chat/{slug}/?wire=1", headers=ORIGIN) as ws:
        frame = receive_until(ws, 'id="presence"')
    echo = frame.split('<div hx-swap-oob="afterbegin:#wire-log">', 1)[1]
    assert "<details><summary>↓ Online list (1), to everyone in the room</summary>" in echo
    assert "&lt;ul id=&#34;presence&#34;" in echo  # the frame itself, folded under it


def test_new_messages_are_announced_once_and_history_never(alice):
    slug = create_room(alice, "heard")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, "read me out")
        live = receive_until(ws, "read me out")
    assert 'hx-swap-oob="upsert:#announcer"' in live and "<bdi>alice</bdi>: read me out" in live
    page = alice.get(f"/room/{slug}/").text
    assert 'id="announcer" class="visually-hidden" aria-live="polite"' in page
    assert 'role="log"' not in page and 'id="messages" aria-live' not in page  # the log itself is not read out
    with alice.websocket_connect(f"/chat/{slug}/?revision=0", headers=ORIGIN) as ws:  # a catch-up
        caught_up = receive_until(ws, "read me out")
    assert "announcer" not in caught_up and "announcer" not in alice.get(f"/room/{slug}/messages?before=99").text


# --- moderation: the owners' tools and the transcript --------------------------------------------


def test_an_owner_deletes_any_message_a_member_only_their_own(owned_room, settings, caplog):
    caplog.set_level(logging.INFO, logger="backchat")
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    (alices,) = say_in(client, slug, "alice says")
    with as_user(client, bob):
        (bobs,) = say_in(client, slug, "bob says something rude")
        assert htmx_post(client, f"{room}messages/{alices}/delete", room).status_code == 403  # a member: not others'
    with socket_as(client, bob, slug) as bob_ws:
        assert htmx_post(client, f"{room}messages/{bobs}/delete", room).status_code == 200  # the owner: anyone's
        assert f'<div id="msg-{bobs}" hx-swap-oob="delete">' in receive_until(bob_ws, "delete")
    assert db_rows(settings, "SELECT text FROM messages") == [("alice says",)]
    assert f"moderation: alice deleted bob's message {bobs}" in caplog.text
    page = client.get(room).text  # an owner's page shows Delete on every message (its own style)
    assert re.search(r'\.room:has\(#room-state\[data-owners~="\d+"\]\) :is\(\.msg \.actions, \.msg \.delete', page)
    assert re.search(r'<div id="room-state" class="room-state" data-owners="\d+">', page)


def test_an_owner_removes_a_person_and_lets_them_back_in(owned_room, settings, caplog):
    caplog.set_level(logging.INFO, logger="backchat")
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    bob_id = user_id_of(settings, "bob")
    with socket_as(client, bob, slug) as bob_ws:
        assert moderate(client, slug, "remove", user_id=str(bob_id)).status_code == 303
        code, frames = closed_with(bob_ws)
    assert code == chat.SESSION_ENDED and "You were removed from this room." in frames  # told in place, not retried
    assert "moderation: alice removed bob from" in caplog.text
    with as_user(client, bob):
        for response in (client.get(room), client.get(f"{room}messages?before=9"),
                         post_form(client, "/", "/join/", code=slug), post_form(client, room, f"{room}messages", message="hi")):
            assert response.status_code == 403 and "You were removed from this room." in response.text
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            assert "You were removed from this room." in ws.receive_text()
        assert slug not in client.get("/").text  # gone from bob's list
    manage = client.get(f"{room}manage").text
    assert re.search(r"Let bob back in", manage) and "Remove bob" not in manage
    assert moderate(client, slug, "let_back_in", user_id=str(bob_id)).status_code == 303
    with as_user(client, bob):
        assert post_form(client, "/", "/join/", code=slug).status_code == 303  # in again, by the code
        say_in(client, slug, "back")
    assert db_rows(settings, "SELECT text FROM messages") == [("back",)]


def test_a_removed_person_racing_their_removal_with_a_send_stores_nothing(owned_room, settings):
    client, bob, slug = owned_room
    bob_id = user_id_of(settings, "bob")
    with socket_as(client, bob, slug) as bob_ws:
        with sqlite3.connect(settings.db_path) as db:  # the removal commits just before bob's frame is stored
            db.execute("INSERT INTO removals VALUES ((SELECT id FROM rooms), ?, 1, '')", (bob_id,))
        send(bob_ws, "slipped in?")
        assert "You were removed from this room." in receive_until(bob_ws, "chat-error")
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(0,)]


def test_a_locked_room_takes_messages_from_its_owners_only(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    with socket_as(client, bob, slug) as bob_ws:
        assert moderate(client, slug, "lock").status_code == 303
        state = receive_until(bob_ws, "room-state")
        assert "data-locked" in state and "This room is locked by its owner" in state  # at once, on every page
        send(bob_ws, "can I?")
        assert "This room is locked by its owner" in receive_until(bob_ws, "chat-error")
    with as_user(client, bob):
        refused = post_form(client, room, f"{room}messages", message="the plain form?")
        assert refused.status_code == 403 and "locked by its owner" in refused.text and 'data-enter-sends>the plain form?</textarea>' in refused.text
    say_in(client, slug, "the owner may")
    moderate(client, slug, "unlock")
    with as_user(client, bob):
        say_in(client, slug, "now I may")
    assert [t for (t,) in db_rows(settings, "SELECT text FROM messages ORDER BY id")] == ["the owner may", "now I may"]


def test_slow_mode_holds_members_to_one_message_per_interval(owned_room, settings):
    client, bob, slug = owned_room
    for bad in ("7", "abc", "", "-5", "9" * 100):
        assert moderate(client, slug, "slow_mode", slow_mode=bad).status_code == 400
    assert moderate(client, slug, "slow_mode", slow_mode="30").status_code == 303
    with as_user(client, bob):
        assert "Slow mode: one message every 30 s." in client.get(f"/room/{slug}/").text
    with socket_as(client, bob, slug) as bob_ws:
        send(bob_ws, "first")
        receive_until(bob_ws, ACK)
        send(bob_ws, "second")
        refusal = receive_until(bob_ws, "Slow mode")
        assert re.search(r"Slow mode: one message every 30 s. Wait (2\d|30) s more.", refusal), refusal
    say_in(client, slug, "owner one", "owner two")  # owners are exempt
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(3,)]


def test_a_new_invite_link_admits_nobody_by_the_old_one_but_members(owned_room, settings):
    client, bob, slug = owned_room
    with socket_as(client, bob, slug) as bob_ws:
        assert moderate(client, slug, "new_code").status_code == 303
        frame = receive_until(bob_ws, "room-code")
    new = re.search(r"<code>([^<]+)</code>", frame).group(1)
    assert new != slug and new.startswith("run-by-alice-") and f"/room/{new}/" in frame
    with as_user(client, bob):  # a member's old link leads them in
        moved = client.get(f"/room/{slug}/", follow_redirects=False)
        assert moved.status_code == 303 and moved.headers["location"] == f"/room/{new}/"
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:  # an open page's socket too
            send(ws, "still here")
            receive_until(ws, "still here")
    client.cookies.clear()
    register(client, "carol")
    assert client.get(f"/room/{slug}/").status_code == 404  # a stranger: the same 404 as any wrong code
    assert post_form(client, "/", "/join/", code=slug).status_code == 404
    assert client.get(f"/room/{new}/").status_code == 200


def test_clearing_the_history_empties_every_page_and_removes_the_rows(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    say_in(client, slug, *(f"old {n}" for n in range(3)))
    cursor = page_revision(client.get(room).text)
    assert "Clear the history" in client.get(f"{room}clear").text  # the confirm step
    with socket_as(client, bob, slug) as bob_ws:
        assert post_form(client, f"{room}clear", f"{room}clear").status_code == 303
        emptied = receive_until(bob_ws, 'id="messages"')
    assert 'hx-swap-oob="innerHTML"' in emptied and "old 0" not in emptied
    writes_done(client)
    for _ in range(50):  # the purge runs in batches behind the page
        if db_rows(settings, "SELECT count(*) FROM messages") == [(0,)]:
            break
        writes_done(client)
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(0,)]
    say_in(client, slug, "after the clear")
    with as_user(client, bob), client.websocket_connect(f"/chat/{slug}/?revision={cursor}", headers=ORIGIN) as ws:
        caught_up = receive_until(ws, "after the clear")  # a page from before the clear: the room afresh
    assert 'hx-swap-oob="innerHTML"' in caught_up and "old 1" not in caught_up


def test_deleting_the_room_ends_every_page_and_every_way_in(owned_room, settings, caplog):
    caplog.set_level(logging.INFO, logger="backchat")
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    say_in(client, slug, "soon gone")
    assert "Delete " in client.get(f"{room}delete-room").text
    with socket_as(client, bob, slug) as bob_ws:
        assert post_form(client, f"{room}delete-room", f"{room}delete-room").status_code == 303
        code, frames = closed_with(bob_ws)
    assert code == chat.SESSION_ENDED and "This room was deleted." in frames
    assert client.get(room).status_code == 404 and slug not in client.get("/").text
    with as_user(client, bob):
        assert client.get(room).status_code == 404 and slug not in client.get("/").text
    for _ in range(50):
        if db_rows(settings, "SELECT count(*) FROM rooms") == [(0,)]:
            break
        writes_done(client)
    assert db_rows(settings, "SELECT (SELECT count(*) FROM rooms) + (SELECT count(*) FROM messages) "
                             "+ (SELECT count(*) FROM room_members)") == [(0,)]
    assert "moderation: alice deleted the room" in caplog.text


def test_owners_make_owners_and_a_room_always_keeps_one(owned_room, settings):
    client, bob, slug = owned_room
    alice_id, bob_id = user_id_of(settings, "alice"), user_id_of(settings, "bob")
    stuck = moderate(client, slug, "step_down")  # the only owner: the manage page says why
    assert stuck.status_code == 409 and "only owner" in stuck.text
    assert post_form(client, f"/room/{slug}/", f"/room/{slug}/leave").status_code == 409  # nor may it leave
    assert "cannot be removed" in moderate(client, slug, "remove", user_id=str(alice_id)).text
    assert moderate(client, slug, "make_owner", user_id=str(bob_id)).status_code == 303
    with as_user(client, bob):
        assert client.get(f"/room/{slug}/manage").status_code == 200  # bob runs it too now
        assert "cannot be removed" in moderate(client, slug, "remove", user_id=str(alice_id)).text
    assert moderate(client, slug, "step_down").headers["location"] == f"/room/{slug}/"
    assert dict(db_rows(settings, "SELECT user_id, role FROM room_members")) == {alice_id: "member", bob_id: "owner"}


def test_every_owners_step_is_refused_to_a_member_and_to_other_rooms_owners(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    (mid,) = say_in(client, slug, "by alice")
    alice_id = user_id_of(settings, "alice")
    with as_user(client, bob):
        other = create_room(client, "bob's own room")  # bob owns a room, just not this one
        assert client.get(f"{room}manage").status_code == 403
        for step in chat.MODERATION_STEPS:
            assert moderate(client, slug, step, user_id=str(alice_id), slow_mode="5").status_code == 403, step
        for url in (f"{room}clear", f"{room}delete-room"):
            assert client.get(url).status_code == 403
            assert post_form(client, room, url).status_code == 403
        assert htmx_post(client, f"/room/{other}/messages/{mid}/delete", f"/room/{other}/").status_code == 404
    assert client.post(f"{room}manage", data={"step": "lock"}).status_code == 403  # no CSRF token
    for fields in ({"step": "nope"}, {"step": "x" * 10_000}, {"step": "remove"}, {"step": "remove", "user_id": "x"},
                   {"step": "make_owner", "user_id": str(2**70)}):
        assert moderate(client, slug, **fields).status_code == 400, fields
    assert moderate(client, slug, "make_owner", user_id="999999").status_code == 409  # nobody: told, nothing done
    assert db_rows(settings, "SELECT locked, slow_mode FROM rooms WHERE code = ?", slug) == [(0, 0)]
    assert db_rows(settings, "SELECT text FROM messages") == [("by alice",)]


def test_removing_somebody_who_is_not_a_member_is_refused_not_a_silent_ban(owned_room, settings):
    """Issue 29, 15: "remove" of somebody who had never joined quietly banned them ahead of
    time; now it says they are not a member, and nothing is recorded."""
    client, bob, slug = owned_room
    client.cookies.clear()
    register(client, "carol")
    carol_id = user_id_of(settings, "carol")
    client.cookies.clear()
    assert post_form(client, "/auth/login/", "/auth/login/", username="alice", password=PASSWORD).status_code == 303
    refused = moderate(client, slug, "remove", user_id=str(carol_id))
    assert refused.status_code == 409 and "not a member" in refused.text
    assert db_rows(settings, "SELECT count(*) FROM removals") == [(0,)]


def test_every_member_can_take_the_transcript_home(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, "hello <b>class</b>\n# not a heading")
        receive_until(ws, "not a heading")
    with as_user(client, bob):
        (reply,) = say_in(client, slug, "a reply")
        htmx_post(client, f"{room}messages/{reply}/edit", room, message="a reply, edited")
        markdown = client.get(f"{room}transcript")
        as_json = client.get(f"{room}transcript?format=json")
    assert markdown.headers["content-disposition"] == f'attachment; filename="{slug}-transcript.md"'
    assert markdown.headers["content-type"].startswith("text/markdown")
    text = markdown.text
    assert text.startswith("# run by alice\n") and text.index("**alice**") < text.index("**bob**")
    assert "```text\nhello <b>class</b>\n# not a heading\n```" in text and "(edited)" in text
    data = json.loads(as_json.text)
    assert [m["text"] for m in data["messages"]] == ["hello <b>class</b>\n# not a heading", "a reply, edited"]
    assert data["messages"][1]["edited_at"] and data["messages"][0]["author"] == "alice"
    client.cookies.clear()
    register(client, "stranger")
    assert client.get(f"{room}transcript").status_code == 403



def test_the_transcript_is_the_text_as_written_and_inert_in_any_markdown_viewer(owned_room, settings):
    """Issue 29, 9 and 31, 4: the Markdown transcript was HTML-escaped (`&#39;` and `&amp;` in a
    text editor, a copied URL broken) and yet a viewer showed images (a tracking pixel) and
    links. Now each message is its text as written in a fence longer than any run of backticks
    in it, names are escaped the Markdown way, and a reply says whom it answers."""
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    texts = ["it's 5 > 3 & https://example.org/?a=1&b=2", "![pixel](https://tracker.example/p.gif) [x](javascript:alert(1))",
             "a fence ``` inside\n```\nand out"]
    for text in texts:
        assert post_form(client, room, f"{room}messages", message=text).status_code == 303
    first = db_rows(settings, "SELECT min(id) FROM messages")[0][0]
    with as_user(client, bob):
        post_form(client, room, f"{room}messages", message="an answer", reply_to=str(first))
    markdown = client.get(f"{room}transcript").text
    for text in texts:
        assert text in markdown
    assert "&#39;" not in markdown and "&amp;" not in markdown and "&gt;" not in markdown
    assert "````text\na fence ``` inside\n```\nand out\n````" in markdown
    assert "**bob** · " in markdown and "· replying to alice\n" in markdown
    outside = re.sub(r"(?ms)^(`{3,})text\n.*?\n\1$", "", markdown)  # what a viewer would render
    assert "![" not in outside and "](" not in outside and "<" not in outside
    page = client.get(room).text
    assert re.search(r'<a href="/room/[^"]+/transcript">Download transcript</a>', page)  # no `download`:
    client.cookies.clear()  # a tab whose session ended gets the login page, not a file called download.html
    ended = client.get(f"{room}transcript", follow_redirects=False)
    assert ended.status_code == 303 and "content-disposition" not in ended.headers

# --- search --------------------------------------------------------------------------------------


def test_search_finds_words_in_your_rooms_only_newest_first_with_marks(two_users, settings):
    client, bob = two_users
    mine = create_room(client, "mine")
    say_in(client, mine, "the Zebra crossing", "zebras everywhere", "nothing here")
    with as_user(client, bob):
        theirs = create_room(client, "theirs")
        say_in(client, theirs, "the secret zebra of bob")
    page = search_page(client, "zeb").text  # the last word is a prefix; case does not matter
    hits = re.findall(r'<li class="hit"><a href="/room/([^/]+)/\?around=(\d+)#msg-(\d+)">', page)
    assert [slug for slug, _, _ in hits] == [mine, mine] and hits[0][1] > hits[1][1]  # newest first
    assert all(around == anchor for _, around, anchor in hits)
    assert "<mark>zebras</mark> everywhere" in page and "the <mark>Zebra</mark> crossing" in page
    assert "secret" not in page  # another room's words stay there
    with as_user(client, bob):
        assert "secret" in search_page(client, "zebra").text
        post_form(client, f"/room/{theirs}/", f"/room/{theirs}/leave")  # (bob owns it alone: refused)
        client.get(f"/room/{mine}/")  # (opening the room makes a member of you)
        assert "the <mark>Zebra</mark> crossing" in search_page(client, "zebra").text
        post_form(client, f"/room/{mine}/", f"/room/{mine}/leave")
        assert "Zebra" not in search_page(client, "zebra").text  # a room left is not searched


def test_any_text_is_a_valid_search_and_none_is_a_500(alice):
    slug = create_room(alice, "odd")
    say_in(alice, slug, 'quotes inside and NEAR(things) AND (more) col:on *star*')
    for query in ['"', '""', 'AND (', 'NEAR(', 'NEAR(a b', '*', ':', 'col:on', '"inside', 'x' * 10_000, "\x00",
                  "OR", "NOT", "(", ")", "^", "-", "+", "a" * 50 + " " + "b " * 500, "日本語", "🎉", "%", "\\"]:
        response = search_page(alice, query)
        assert response.status_code == 200, query
    assert "<mark>inside</mark>" in search_page(alice, '"inside').text
    assert "<mark>NEAR(things</mark>)" in search_page(alice, "NEAR(things)").text  # (a phrase, marked whole)
    empty = search_page(alice, "")
    assert empty.status_code == 200 and 'id="search-q"' in empty.text and "Nothing found" not in empty.text
    assert "Type a word with a letter or a digit" in search_page(alice, "* :").text
    assert alice.get("/search/", params={"q": "x", "before": "-1"}).status_code == 200
    alice.cookies.clear()
    assert alice.get("/search/?q=x", follow_redirects=False).status_code in (302, 303)  # logged in only


def test_search_pages_fifty_at_a_time_and_a_hit_opens_its_room_around_it(tmp_path):
    alice = TestClient(chat.create_app(app_settings(db_path=tmp_path / "chat.db", message_rate=0)),
                       base_url="http://testserver").__enter__()
    register(alice, "alice")
    slug = create_room(alice, "many")
    ids = say_in(alice, slug, *[f"needle {n}" for n in range(120)])
    first = search_page(alice, "needle").text
    assert first.count('class="hit"') == 50 and "</mark> 119<" in first
    more = re.search(r'href="/search/\?q=needle&amp;before=(\d+)">More</a>', first).group(1)
    second = search_page(alice, "needle", before=more).text
    assert second.count('class="hit"') == 50 and "</mark> 69<" in second and "</mark> 70<" not in second
    third = search_page(alice, "needle", before=re.search(r"before=(\d+)\">More", second).group(1)).text
    assert third.count('class="hit"') == 20 and ">More<" not in third
    page = alice.get(f"/room/{slug}/?around={ids[10]}").text  # 25 older at most, 25 newer, both loadable
    shown = message_ids(page)
    assert shown == ids[:36] and ids[10] in shown
    assert f'id="msg-{ids[35]}-newer"' in page and "Load newer messages" in page and "Load older" not in page
    newer = alice.get(f"/room/{slug}/messages?after={ids[35]}").text
    assert message_ids(newer) == ids[36:86] and f'<div id="msg-{ids[35]}-newer" hx-swap-oob="delete">' in newer
    assert 'hx-swap-oob="upsert:#messages"' in newer and f'id="msg-{ids[85]}-newer"' in newer
    for around in ("999999", "abc", "-1", "9" * 40):  # not a message of this room: the room as usual
        assert message_ids(alice.get(f"/room/{slug}/?around={around}").text) == ids[-50:]
    alice.__exit__(None, None, None)


def test_the_search_index_follows_edits_deletes_and_clearing(alice, settings):
    slug = create_room(alice, "follow")
    room = f"/room/{slug}/"
    first, second = say_in(alice, slug, "original wording", "another wording")
    assert htmx_post(alice, f"{room}messages/{first}/edit", room, message="changed phrasing").status_code == 200
    assert "Nothing found" in search_page(alice, "original").text
    assert "<mark>phrasing</mark>" in search_page(alice, "phrasing").text
    assert htmx_post(alice, f"{room}messages/{second}/delete", room).status_code == 200
    assert "Nothing found" in search_page(alice, "another").text
    assert post_form(alice, f"/room/{slug}/clear", f"/room/{slug}/clear").status_code == 303
    assert "Nothing found" in search_page(alice, "phrasing").text
    writes_done(alice)
    with sqlite3.connect(settings.db_path) as db:  # the index holds no row of a message that is gone
        assert db.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'phrasing OR another'").fetchone() == (0,)
        assert db.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)")


def test_a_search_index_that_cannot_write_says_so_once_and_once_when_it_can_again(caplog):
    """A full disk stops the indexer: one warning, not one a second, and one when it is over."""
    calls = []

    class Store:
        async def write(self, work):
            calls.append(work)
            if len(calls) <= 5:
                raise sqlite3.OperationalError("database or disk is full")
            return False

    async def run() -> None:
        task = asyncio.create_task(chat.index_search(SimpleNamespace(store=Store()), every=0))
        while len(calls) < 8:
            await asyncio.sleep(0)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="backchat"):
        asyncio.run(run())
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2 and "disk is full" in said[0] and "again" in said[1], said


def test_ids_are_never_handed_out_twice_and_the_search_index_skips_none(client, settings):
    """Issue 29, 6: deleting the newest room handed its message ids (and its room id) out
    again, and the search index, which indexes above its high-water mark, never picked those
    messages up: the next N messages on the server were unsearchable."""
    register(client, "alice")
    keep = create_room(client, "kept")
    say_in(client, keep, "an early word")
    doomed = create_room(client, "doomed")
    doomed_ids = say_in(client, doomed, *[f"doomed {n}" for n in range(5)])
    search_page(client, "doomed")  # indexed up to the newest
    assert post_form(client, f"/room/{doomed}/delete-room", f"/room/{doomed}/delete-room").status_code == 303
    for _ in range(100):  # its rows go in batches behind the deletion
        if db_rows(settings, "SELECT count(*) FROM rooms WHERE code = ?", doomed) == [(0,)]:
            break
        time.sleep(0.05)
    assert db_rows(settings, "SELECT count(*) FROM messages WHERE id > ?", max(doomed_ids) - 5) == [(0,)]
    new_ids = say_in(client, keep, *[f"afterwards {n}" for n in range(5)])
    assert min(new_ids) > max(doomed_ids)
    assert search_page(client, "afterwards").text.count('class="hit"') == 5
    again = create_room(client, "again")
    assert db_rows(settings, "SELECT id FROM rooms WHERE code = ?", again)[0][0] > 2



def test_a_search_looks_at_a_bounded_number_of_matches_whoever_is_asking(two_users, settings):
    """Issue 29, 4: a searcher whose rooms hold none of a word's matches walked every match on
    the server (0.5 s a query at a million messages), on the thread page loads share. Now a
    page looks at SEARCH_SCAN matches at most, newest first, and offers to look further back;
    searches run on a thread of their own, a few a minute per person, and a query is cleaned
    (a NUL was a 400 and a warning per request)."""
    client, bob = two_users
    with as_user(client, bob):
        bobs = create_room(client, "bob's")
        say_in(client, bobs, "an old needle")
    busy = create_room(client, "busy")
    with sqlite3.connect(settings.db_path) as db:
        room_id, user_id = db.execute("SELECT id, created_by FROM rooms WHERE code = ?", (busy,)).fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at, revision) VALUES (?, ?, ?, ?, ?)",
                       ((room_id, user_id, f"needle {n}", "2026-12-01T10:00:00Z", n + 10)
                        for n in range(chat.SEARCH_SCAN + 500)))
    with as_user(client, bob):
        first = search_page(client, "needle").text
        assert 'class="hit"' not in first and "Look further back" in first
        further = re.search(r'href="(/search/\?q=needle&amp;before=\d+)"', first).group(1).replace("&amp;", "&")
        assert client.get(further).text.count('class="hit"') == 1
        assert client.get("/search/", params={"q": "nee\x00dle"}).status_code == 200
        answers = [client.get("/search/?q=needle").status_code for _ in range(settings.search_rate)]
        assert answers[-1] == 429 and "searched a lot" in client.get("/search/?q=needle").text
    assert client.get("/search/?q=needle").status_code == 200  # (somebody else's searches count apart)

# --- the lesson beside chat.py -------------------------------------------------------------------


def test_the_lesson_and_chat_py_send_the_same_frames(alice):
    lesson = lesson_app()
    with TestClient(lesson.app) as client:
        page = client.get("/").text
        with client.websocket_connect("/chat/") as ws:
            ws.send_text(json.dumps({"message": "hello <class>", "headers": {"HX-Request": "true"}}))
            lesson_frame, reset = ws.receive_text(), ws.receive_text()
    slug = create_room(alice, "the real thing")
    real_page = alice.get(f"/room/{slug}/").text
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        send(ws, "hello <class>")
        real_frame = receive_until(ws, "hello &lt;class&gt;").split("<div hx-swap-oob=\"upsert:#announcer\">")[0]
    assert frame_shape(lesson_frame) == frame_shape(real_frame) == [
        (0, "div", "upsert:#messages"), ("article", "msg", "msg-N"), ("bdi", "author"), ("div", "body", "auto")]
    assert "hello &lt;class&gt;" in lesson_frame  # escaped, as chat.py does
    assert reset.startswith('<input id="message-input" name="message"') and 'hx-swap-oob="true"' in reset
    for html in (page, real_page):  # the same attributes and the same form field, so the same JSON frame
        assert re.search(r'<div [^>]*hx-ws:connect="/chat/[^"]*"', html) and 'hx-swap="none"' in html
        assert re.search(r'<form id="composer"[^>]* hx-ws:send', html)
        assert re.search(r'<(input|textarea) id="message-input" name="message"', html)
        assert all(f"/static/vendor/htmx-4.0.1/{name}" in html for name in HTMX_FILES)
    assert len((Path(__file__).parent / "lesson" / "minimal_chat.py").read_text().splitlines()) <= 60
