"""Backchat's tests through Starlette's TestClient: pages, forms, the WebSocket.

Tests that need a real server process or a real browser live in test_server.py and
test_browser.py.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

import chat

ORIGIN = {"origin": "http://testserver"}
PASSWORD = "correct horse"


# --- helpers -----------------------------------------------------------------


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


def db_rows(app_settings: chat.Settings, sql: str, *args):
    with sqlite3.connect(app_settings.db_path) as db:
        return db.execute(sql, args).fetchall()


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> chat.Settings:
    return chat.Settings(db_path=tmp_path / "chat.db", secret_key="test-secret")


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


# --- accounts ------------------------------------------------------------------


def test_anonymous_user_is_sent_to_login_with_next(client):
    response = client.get("/room/anything/?wire=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/auth/login/?next=%2Froom%2Fanything%2F%3Fwire%3D1"
    login_page = client.get(response.headers["location"]).text
    assert '<input type="hidden" name="next" value="/room/anything/?wire=1">' in login_page


def test_register_logs_in_and_hashes_password(alice, settings):
    home = alice.get("/")
    assert home.status_code == 200 and "Signed in as <b>alice</b>" in home.text
    (stored,) = db_rows(settings, "SELECT password_hash FROM users WHERE username = 'alice'")[0]
    assert stored.startswith("scrypt$") and PASSWORD not in stored


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
    assert blocked.status_code == 429 and "Try again later" in blocked.text


# --- rooms ---------------------------------------------------------------------


def test_create_room_gives_a_unique_slug_and_lists_it_at_home(alice):
    first, second = create_room(alice, "Study Group"), create_room(alice, "Study Group")
    assert first != second and re.fullmatch(r"study-group-[0-9a-f]{6}", first)
    home = alice.get("/").text
    assert home.index(second) < home.index(first)  # most recent first
    page = alice.get(f"/room/{first}/")
    assert page.status_code == 200 and "<h1>Study Group</h1>" in page.text
    assert f'value="http://testserver/room/{first}/"' in page.text  # invite link


@pytest.mark.parametrize("name", ["", "   ", "x" * 129])
def test_create_room_rejects_bad_names(alice, name):
    response = post_form(alice, "/", "/create/", room_name=name)
    assert response.status_code == 400 and 'role="alert"' in response.text


def test_unicode_room_name_gets_a_usable_slug(alice):
    slug = create_room(alice, "日本語のチャット")
    assert re.fullmatch(r"room-[0-9a-f]{6}", slug)
    assert "日本語のチャット" in alice.get(f"/room/{slug}/").text


def test_join_by_code_or_pasted_link_ignoring_case_and_spaces(alice):
    slug = create_room(alice, "Book club")
    for typed in (slug, f"  {slug.upper()}  ", f"http://testserver/room/{slug}/", f" https://x.example/room/{slug.upper()}/?a=1 "):
        response = post_form(alice, "/", "/join/", room_slug=typed)
        assert (response.status_code, response.headers.get("location")) == (303, f"/room/{slug}/"), typed


def test_join_unknown_code_is_404_with_the_form_again(alice):
    response = post_form(alice, "/", "/join/", room_slug="nope-123456")
    assert response.status_code == 404
    assert 'role="alert"' in response.text and 'value="nope-123456"' in response.text


def test_unknown_room_page_is_a_friendly_404(alice):
    response = alice.get("/room/does-not-exist/")
    assert response.status_code == 404
    assert "There is no room with that code" in response.text and "Traceback" not in response.text


def test_unknown_route_is_a_friendly_404(client):
    response = client.get("/no/such/page")
    assert response.status_code == 404 and "Not found" in response.text


def test_history_pages_fifty_at_a_time_oldest_first(alice, settings):
    slug = create_room(alice, "history")
    with sqlite3.connect(settings.db_path) as db:
        room_id = db.execute("SELECT id FROM rooms WHERE slug = ?", (slug,)).fetchone()[0]
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
    settings = chat.Settings(db_path=tmp_path / "c.db", secret_key="k", https_only=True)
    with TestClient(chat.create_app(settings), base_url="https://testserver") as client:
        assert "secure" in client.get("/auth/login/").headers["set-cookie"].lower()


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_static_htmx_is_vendored_with_its_licence(client):
    assert "version = '4.0.1'" in client.get("/static/vendor/htmx/htmx.js").text
    assert "Zero-Clause BSD" in client.get("/static/vendor/htmx/LICENSE").text


def test_oversized_form_body_is_refused(alice):
    response = post_form(alice, "/", "/create/", room_name="x" * (70 * 1024))
    assert response.status_code == 413


def test_secret_key_is_generated_once_beside_the_database(tmp_path):
    settings = chat.Settings(db_path=tmp_path / "data" / "chat.db")
    first = chat.load_secret_key(settings)
    key_file = tmp_path / "data" / "chat.db.secret"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert chat.load_secret_key(settings) == first and len(first) > 40


# --- the WebSocket -------------------------------------------------------------


def test_two_clients_both_receive_a_message_and_it_is_stored(two_users, settings):
    client, bob = two_users
    slug = create_room(client, "live")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        with as_user(client, bob):
            bob_ws = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        try:
            receive_until(alice_ws, "<li>bob</li>")  # presence: bob came online
            send(bob_ws, "  hello everyone  ")
            for ws in (alice_ws, bob_ws):
                frame = receive_until(ws, "hello everyone")
                assert 'hx-swap-oob="upsert:#messages"' in frame
                assert re.search(r'<article class="msg" id="msg-\d+"', frame)
                assert '<span class="author">bob</span>' in frame
            reset = receive_until(bob_ws, 'id="message-input"')  # the sender's input is cleared
            assert 'hx-swap-oob="true"' in reset and "value=" not in reset
        finally:
            bob_ws.__exit__(None, None, None)
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
    for headers, status in (({"origin": "http://evil.example"}, 403), ({"origin": "null"}, 403)):
        with pytest.raises(WebSocketDenialResponse) as refused:
            client.websocket_connect(f"/chat/{slug}/", headers=headers).__enter__()
        assert refused.value.status_code == status
    with pytest.raises(WebSocketDenialResponse) as refused:
        client.websocket_connect("/chat/no-such-room/", headers=ORIGIN).__enter__()
    assert refused.value.status_code == 404
    with client.websocket_connect(f"/chat/{slug}/") as ws:  # no Origin: a command-line client
        assert "<li>alice</li>" in ws.receive_text()
    client.cookies.clear()
    with pytest.raises(WebSocketDenialResponse) as refused:
        client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
    assert refused.value.status_code == 403


def test_allowed_origins_setting(tmp_path):
    settings = chat.Settings(db_path=tmp_path / "c.db", secret_key="k",
                             allowed_origins=frozenset({"https://chat.example"}))
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "x")
        with client.websocket_connect(f"/chat/{slug}/", headers={"origin": "https://chat.example"}) as ws:
            assert "alice" in ws.receive_text()


def test_empty_and_oversized_messages(alice, settings):
    slug = create_room(alice, "limits")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        receive_until(ws, "presence")
        send(ws, "   \n\t ")  # ignored: nothing comes back for it
        send(ws, "x" * 4001)
        error = receive_until(ws, "chat-error")
        assert 'role="alert"' in error and "4,000" in error and "4,001" in error
        send(ws, "y" * 4000)
        assert receive_until(ws, "msg-").count("y" * 4000) == 1
    assert db_rows(settings, "SELECT length(text) FROM messages") == [(4000,)]


@pytest.mark.parametrize("bad_frame", ["not json", "[1, 2]", '{"message": 5}', '{"text": "hi"}', "null", b"\x00\xff"])
def test_malformed_frames_leave_everyone_working(two_users, settings, bad_frame):
    client, bob = two_users
    slug = create_room(client, "robust")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        with as_user(client, bob):
            bob_ws = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        try:
            receive_until(alice_ws, "<li>bob</li>")
            receive_until(bob_ws, "<li>bob</li>")
            if isinstance(bad_frame, bytes):
                bob_ws.send_bytes(bad_frame)
            else:
                bob_ws.send_text(bad_frame)
            assert 'id="chat-error"' in bob_ws.receive_text()  # told, not disconnected
            send(bob_ws, "still here")
            assert "still here" in receive_until(bob_ws, "msg-")
            # alice's next frame is bob's message: she never saw his mistake
            assert "still here" in alice_ws.receive_text()
        finally:
            bob_ws.__exit__(None, None, None)
    assert db_rows(settings, "SELECT text FROM messages") == [("still here",)]


def test_fields_nested_under_body_are_accepted(alice):
    slug = create_room(alice, "compat")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ws.send_text(json.dumps({"body": {"message": "from an early htmx 4"}, "headers": {}}))
        assert "from an early htmx 4" in receive_until(ws, "msg-")


def test_presence_counts_a_user_with_two_tabs_once(two_users):
    client, bob = two_users
    slug = create_room(client, "tabs")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as alice_ws:
        receive_until(alice_ws, "<li>alice</li>")
        with as_user(client, bob):
            tab1 = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
            tab2 = client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN).__enter__()
        assert receive_until(alice_ws, "bob").count("<li>bob</li>") == 1
        tab1.__exit__(None, None, None)  # one tab closed: bob is still online, nothing is said
        send(tab2, "ping")
        assert "ping" in alice_ws.receive_text()
        tab2.__exit__(None, None, None)
        frame = receive_until(alice_ws, 'id="presence"')
        assert "bob" not in frame and "<li>alice</li>" in frame
        page = client.get(f"/room/{slug}/").text
        assert "<li>alice</li>" in page


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
            receive_until(bob_ws, "message-input")  # stored and pushed before bob leaves
    with client.websocket_connect(f"/chat/{slug}/?after={last_seen}", headers=ORIGIN) as ws:
        frame = receive_until(ws, "while away")
    assert 'hx-swap-oob="upsert:#messages"' in frame
    assert re.findall(r"(early|while away) (\d)", frame) == [("while away", "0"), ("while away", "1"), ("while away", "2")]


def test_a_page_too_far_behind_is_resynced_whole(alice, settings, monkeypatch):
    monkeypatch.setattr(chat, "CATCH_UP_LIMIT", 3)
    slug = create_room(alice, "resync")
    with alice.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        for n in range(5):
            send(ws, f"m{n}")
            receive_until(ws, "message-input")
    with alice.websocket_connect(f"/chat/{slug}/?after=0", headers=ORIGIN) as ws:
        frame = receive_until(ws, 'id="messages"')
    assert 'hx-swap-oob="innerHTML"' in frame and all(f"m{n}" in frame for n in range(5))


def send_many(settings: chat.Settings, count: int) -> str:
    """Send `count` messages one after another as alice; return the reply to one more."""
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        slug = create_room(client, "rates")
        with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
            for n in range(count):
                send(ws, f"m{n}")
                receive_until(ws, "message-input")
            send(ws, "one more")
            return receive_until(ws, "one more" if not settings.message_rate else "chat-error")


def test_message_rate_limit_tells_only_the_sender(tmp_path):
    settings = chat.Settings(db_path=tmp_path / "c.db", secret_key="k", message_rate=3)
    assert "too fast" in send_many(settings, 3)
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(3,)]


def test_wire_mode_echoes_each_frame_as_escaped_text(alice):
    slug = create_room(alice, "teaching")
    assert 'id="wire-log"' in alice.get(f"/room/{slug}/?wire=1").text
    assert 'id="wire-log"' not in alice.get(f"/room/{slug}/").text
    with alice.websocket_connect(f"/chat/{slug}/?wire=1", headers=ORIGIN) as ws:
        send(ws, "<i>hi</i>")
        frame = receive_until(ws, "msg-")
    live, echo = frame.split('<div hx-swap-oob="afterbegin:#wire-log">')
    assert "&lt;article class=&#34;msg&#34;" in echo and "&amp;lt;i&amp;gt;hi" in echo
    assert "<article" in live and "<article" not in echo


def test_room_creation_is_rate_limited_per_user(tmp_path):
    settings = chat.Settings(db_path=tmp_path / "c.db", secret_key="k", room_rate=2)
    with TestClient(chat.create_app(settings)) as client:
        register(client, "alice")
        create_room(client, "one"), create_room(client, "two")
        refused = post_form(client, "/", "/create/", room_name="three")
        assert refused.status_code == 429 and 'role="alert"' in refused.text and "Try again" in refused.text
        assert 'value="three"' in refused.text
    assert db_rows(settings, "SELECT count(*) FROM rooms") == [(2,)]


def test_rate_limits_can_be_turned_off(tmp_path):
    settings = chat.Settings(db_path=tmp_path / "c.db", secret_key="k", message_rate=0)
    assert "one more" in send_many(settings, 60)
    assert db_rows(settings, "SELECT count(*) FROM messages") == [(61,)]


def test_failed_logins_are_limited_per_client_address(client):
    for n in range(10):
        post_form(client, "/auth/login/", "/auth/login/", username=f"guess{n}", password="nope nope")
    blocked = post_form(client, "/auth/login/", "/auth/login/", username="someone-else", password="whatever1")
    assert blocked.status_code == 429 and 'role="alert"' in blocked.text
