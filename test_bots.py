"""Issue 33: a room's bots (chat.py section 14), through Starlette's TestClient: adding them, the
JSON API, webhooks on @mention, and what an attacker tries against each (SSRF included).

A bot in the browser is in test_browser.py; two workers through Redis in test_redis.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.testclient import TestClient

import chat
from conftest import app_settings
from test_chat import (ORIGIN, as_user, create_room, db_rows, moderate, post_form, receive_until, register,
                       say_in, send, socket_as, user_id_of)
from test_chat import client, owned_room, settings, two_users  # noqa: F401 (fixtures)


class Webhook:
    """A bot's webhook on 127.0.0.1: records each call and answers as `answer` says (a dict is
    sent as JSON; "hang", "huge", "redirect", "500", "not json" misbehave)."""

    def __init__(self, answer: object = None) -> None:
        self.answer, self.calls, self.in_flight, self.most_in_flight = answer, [], 0, 0
        self.lock, self.release = threading.Lock(), threading.Event()
        self.gate: threading.Event | None = None  # set: each answer waits for it (up to 10 s)
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with hook.lock:
                    hook.in_flight += 1
                    hook.most_in_flight = max(hook.most_in_flight, hook.in_flight)
                try:
                    hook.calls.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                    self.respond()
                finally:
                    with hook.lock:
                        hook.in_flight -= 1

            def respond(self) -> None:
                if hook.gate is not None:
                    hook.gate.wait(10)
                answer = hook.answer
                if answer == "hang":
                    hook.release.wait(30)
                    return
                status, body, headers = 200, b"", {}
                if answer == "huge":
                    body = b'{"text": "' + b"x" * 1_000_000 + b'"}'
                elif answer == "redirect":
                    status, headers = 302, {"Location": "http://169.254.169.254/latest/meta-data/"}
                elif answer == "500":
                    status = 500
                elif answer == "not json":
                    body = b"<html>hello</html>"
                elif answer is not None:
                    body = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def add_bot(client: TestClient, slug: str, name: str = "clock", webhook_url: str = ""):
    """The Manage page's "Add bot": the response, and the token it shows once (None if refused)."""
    answer = moderate(client, slug, "add_bot", bot_name=name, webhook_url=webhook_url)
    found = re.search(r'<code id="bot-token">([^<]+)</code>', answer.text)
    return answer, found and found.group(1)


def api(client: TestClient, slug: str, token: str | None, body: object = None, raw: bytes | None = None, **headers):
    """POST /api/rooms/<slug>/messages as a script does: no cookie, the token as a Bearer header."""
    auth = {"authorization": f"Bearer {token}"} if token is not None else {}
    content = raw if raw is not None else json.dumps(body).encode()
    saved, client.cookies = client.cookies, type(client.cookies)()
    try:
        return client.post(f"/api/rooms/{slug}/messages", content=content, headers={**auth, **headers})
    finally:
        client.cookies = saved


def api_read(client: TestClient, slug: str, token: str, query: str = ""):
    saved, client.cookies = client.cookies, type(client.cookies)()
    try:
        return client.get(f"/api/rooms/{slug}/messages{query}", headers={"authorization": f"Bearer {token}"})
    finally:
        client.cookies = saved


def until(condition, what: str, seconds: float = 10):
    """Wait for something another thread does (a webhook's call), up to `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {seconds} s")


def last_call(settings: chat.Settings) -> str | None:
    return db_rows(settings, "SELECT last_call FROM bots")[0][0]


@pytest.fixture
def bot_room(owned_room):
    """alice's room with bob a member and a bot "clock": (client as alice, bob, code, token)."""
    client, bob, slug = owned_room
    answer, token = add_bot(client, slug)
    assert answer.status_code == 200 and token
    return client, bob, slug, token


# --- adding bots ---------------------------------------------------------------------------------


def test_an_owner_adds_a_bot_whose_token_is_shown_once_and_kept_only_as_a_hash(owned_room, settings):
    client, _, slug = owned_room
    answer, token = add_bot(client, slug, "Build Bot")
    assert len(token) >= 40 and f'-H "Authorization: Bearer {token}"' in answer.text
    assert f"curl -X POST http://testserver/api/rooms/{slug}/messages" in answer.text
    with sqlite3.connect(settings.db_path) as db:
        dump = "\n".join(db.iterdump())
    assert token not in dump and chat.token_digest(token) in dump
    page = client.get(f"/room/{slug}/manage").text
    assert token not in page and "Build Bot</bdi> <small class=\"guest\">bot</small>" in page
    assert "Members (2)" in page  # (alice and bob: the bot is listed under Bots)


@pytest.mark.parametrize("name, refusal", [
    ("", "Type the name the bot should go by."),
    ("x" * 41, "at most 40 characters"),
    ("clock\u200b", "characters that do not show"),
    ("<script>", "Names are letters, digits and spaces"),
    ("bob", "looks like the name of somebody in this room"),
    ("B0B", "looks like the name of somebody in this room"),  # (0 for o)
    ("Bobby", None),
    ("ALICE", "looks like the name of somebody in this room"),
])
def test_a_bots_name_is_checked_like_a_guests_and_may_not_pass_for_somebody_in_the_room(owned_room, settings,
                                                                                       name, refusal):
    client, _, slug = owned_room
    answer, token = add_bot(client, slug, name)
    if refusal is None:
        assert token
        return
    assert answer.status_code in (400, 409) and refusal in answer.text.replace("&#39;", "'") and token is None
    assert db_rows(settings, "SELECT count(*) FROM bots")[0][0] == 0


def test_bot_names_are_the_rooms_own_and_no_bot_can_log_in(owned_room, settings):
    client, _, slug = owned_room
    assert add_bot(client, slug, "helper")[1]
    assert add_bot(client, slug, "Helper")[0].status_code == 409  # unique in the room, case aside
    other = create_room(client, "another")
    assert add_bot(client, other, "helper")[1]  # the same name in another room
    client.cookies.clear()
    assert register(client, "helper").status_code == 303  # and a person may still be called so
    for name in ("helper", "bot:1:helper", "bot:2:helper"):
        refused = post_form(client, "/auth/login/", "/auth/login/", username=name, password="!")
        assert refused.status_code in (400, 401, 403) and "Log out" not in refused.text, name


def test_only_the_rooms_owners_add_see_renew_or_remove_its_bots(owned_room, settings):
    client, bob, slug = owned_room
    answer, token = add_bot(client, slug)
    bot_id = db_rows(settings, "SELECT user_id FROM bots")[0][0]
    with as_user(client, bob):
        assert client.get(f"/room/{slug}/manage").status_code == 403
        for step, fields in (("add_bot", {"bot_name": "mine"}), ("remove_bot", {"user_id": str(bot_id)}),
                             ("bot_token", {"user_id": str(bot_id)}), ("make_owner", {"user_id": str(bot_id)})):
            assert moderate(client, slug, step, **fields).status_code == 403, step
    other = create_room(client, "alice's other room")  # an owner, but of another room
    for step in ("remove_bot", "bot_token"):
        assert moderate(client, other, step, user_id=str(bot_id)).status_code == 409
    assert moderate(client, slug, "make_owner", user_id=str(bot_id)).status_code == 409  # never an owner
    no_token = client.post(f"/room/{slug}/manage", data={"step": "add_bot", "bot_name": "sneaky"})
    assert no_token.status_code == 403
    assert db_rows(settings, "SELECT count(*), max(removed_at) FROM bots") == [(1, None)]
    assert api(client, slug, token, {"text": "still here"}).status_code == 201


# --- the API ---------------------------------------------------------------------------------------


def test_a_bots_post_takes_the_message_path_and_reaches_every_page_marked_bot(bot_room, settings):
    client, bob, slug, token = bot_room
    (first,) = say_in(client, slug, "the build starts")
    with socket_as(client, bob, slug) as bob_ws:
        answer = api(client, slug, token, {"text": "Build **passed** @bob", "reply_to": first})
        assert answer.status_code == 201, answer.text
        posted = answer.json()
        assert set(posted) == {"id", "revision", "url"}
        assert posted["url"] == f"http://testserver/room/{slug}/?around={posted['id']}#msg-{posted['id']}"
        frame = receive_until(bob_ws, "passed")
    assert '<bdi class="author">clock</bdi> <small class="guest">bot</small>' in frame
    assert "<strong>passed</strong>" in frame and 'class="quote"' in frame  # Markdown, the reply's quote
    assert f'data-mentions="{user_id_of(settings, "bob")}"' in frame  # mentions as anybody's
    assert f'value="{posted["revision"]}"' in frame
    messages = api_read(client, slug, token).json()["messages"]
    assert [(m["author"], m["author_is_bot"], m["reply_to"]) for m in messages] == [
        ("alice", False, None), ("clock", True, first)]
    assert set(messages[1]) == {"id", "author", "author_is_bot", "text", "sent_at", "edited_at", "reply_to", "kind"}
    assert api_read(client, slug, token, f"?after={first}&limit=1").json()["messages"][0]["id"] == posted["id"]
    transcript = client.get(f"/room/{slug}/transcript").text
    assert "**clock (bot)**" in transcript


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer"}, {"authorization": "Bearer "},
                                     {"authorization": "Token abc"}, {"authorization": "Bearer wrong-token"},
                                     {"authorization": "Bearer " + "x" * 5000}, {"authorization": "bearer\x00x"}],
                         ids=["none", "empty", "blank", "other scheme", "wrong", "huge", "odd"])
def test_every_bad_token_gets_the_same_401(bot_room, headers):
    client, _, slug, _ = bot_room
    saved, client.cookies = client.cookies, type(client.cookies)()
    try:
        answers = [client.post(f"/api/rooms/{slug}/messages", json={"text": "x"}, headers=headers),
                   client.get(f"/api/rooms/{slug}/messages", headers=headers)]
    finally:
        client.cookies = saved
    for answer in answers:
        assert answer.status_code == 401 and answer.json() == {"error": chat.NO_TOKEN}
        assert answer.headers["www-authenticate"] == "Bearer"


def test_the_api_takes_no_cookie_and_a_token_opens_nothing_else(bot_room, settings):
    client, _, slug, token = bot_room
    # alice's session cookie, without a token: 401 (and no CSRF could matter: no cookie is read)
    assert client.post(f"/api/rooms/{slug}/messages", json={"text": "as alice?"}).status_code == 401
    saved, client.cookies = client.cookies, type(client.cookies)()
    try:
        bearer = {"authorization": f"Bearer {token}"}
        assert client.get(f"/room/{slug}/", headers=bearer, follow_redirects=False).status_code == 303  # login
        assert client.post(f"/room/{slug}/messages", data={"message": "via the form?"}, headers=bearer,
                           follow_redirects=False).status_code in (303, 403)
        assert client.get("/search/?q=x", headers=bearer, follow_redirects=False).status_code == 303
    finally:
        client.cookies = saved
    assert db_rows(settings, "SELECT count(*) FROM messages")[0][0] == 0


@pytest.mark.parametrize("body, refusal", [
    (b"", "must be JSON"), (b"{", "must be JSON"), (b"\xff\xfe", "must be JSON"), (b"[1, 2]", "JSON object"),
    (b'"hello"', "JSON object"), (b"{}", '"text" must be'), (b'{"text": ""}', '"text" must be'),
    (b'{"text": "   "}', '"text" must be'), (b'{"text": 42}', '"text" must be'), (b'{"text": null}', '"text" must be'),
    (b'{"text": ["a"]}', '"text" must be'), (b'{"text": "\\u0000\\u0001"}', '"text" must be'),
    (b'{"text": "hi", "reply_to": "1"}', '"reply_to"'), (b'{"text": "hi", "reply_to": true}', '"reply_to"'),
    (b'{"text": "hi", "reply_to": 1.5}', '"reply_to"'), (b'{"text": "hi", "reply_to": -1}', '"reply_to"'),
    (b'{"text": "hi", "reply_to": 18446744073709551616}', '"reply_to"'),
    (b"[" * 30000 + b"]" * 30000, "must be JSON"),
    (json.dumps({"text": "x" * 4001}).encode(), "at most 4,000 characters"),
], ids=lambda value: repr(value)[:40])
def test_a_body_that_is_not_a_message_is_a_400_in_words(bot_room, settings, body, refusal):
    client, _, slug, token = bot_room
    answer = api(client, slug, token, raw=body)
    assert answer.status_code == 400 and refusal in answer.json()["error"]
    assert db_rows(settings, "SELECT count(*) FROM messages")[0][0] == 0


def test_too_large_another_rooms_code_and_an_unknown_one(bot_room, settings):
    client, _, slug, token = bot_room
    assert api(client, slug, token, raw=b'{"text": "' + b"x" * 70_000 + b'"}').status_code == 413
    other = create_room(client, "not the bot's")
    assert api(client, other, token, {"text": "x"}).status_code == 403
    assert api_read(client, other, token).status_code == 403
    assert api(client, "no-such-room", token, {"text": "x"}).status_code == 404
    for query in ("?after=abc", "?limit=0", "?limit=-1", "?after=1e3", "?after=99999999999999999999"):
        assert api_read(client, slug, token, query).status_code == 400, query
    say_in(client, slug, *[f"message {n}" for n in range(3)])
    assert len(api_read(client, slug, token, "?limit=100000").json()["messages"]) == 3
    post_form(client, f"/room/{slug}/clear", f"/room/{slug}/clear")
    assert api_read(client, slug, token).json() == {"messages": []}  # nothing before a clear


def test_a_bot_keeps_the_rooms_rules(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=5)
    with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
        register(client, "alice")
        slug = create_room(client, "rules")
        _, token = add_bot(client, slug)
        moderate(client, slug, "lock")
        locked = api(client, slug, token, {"text": "while locked"})
        assert locked.status_code == 403 and "locked" in locked.json()["error"]
        moderate(client, slug, "unlock")
        moderate(client, slug, "slow_mode", slow_mode="30")
        assert api(client, slug, token, {"text": "first"}).status_code == 201
        slowed = api(client, slug, token, {"text": "too soon"})
        assert slowed.status_code == 429 and 25 <= int(slowed.headers["retry-after"]) <= 30
        moderate(client, slug, "slow_mode", slow_mode="0")
        started = time.monotonic()
        statuses = [api(client, slug, token, {"text": f"loop {n}"}).status_code for n in range(10_000)]
        windows = 1 + (time.monotonic() - started) // 10  # (5 per 10 s, a sliding window)
        assert set(statuses) == {201, 429} and statuses.count(201) <= 5 * (windows + 1)
        # (the loop may outlast the window: six more at once, and the sixth at the latest is refused)
        more = [api(client, slug, token, {"text": f"one more {n}"}) for n in range(6)]
        limited = next(answer for answer in more if answer.status_code == 429)
        assert 1 <= int(limited.headers["retry-after"]) <= 10
        _, other_token = add_bot(client, slug, "second")  # (its own rate: limits are per bot)
        second = db_rows(settings, "SELECT id FROM users WHERE username = 'second'")[0][0]
        moderate(client, slug, "remove", user_id=str(second))  # removed like anyone
        removed = api(client, slug, other_token, {"text": "after removal"})
        assert removed.status_code == 403 and "removed" in removed.json()["error"]


def test_a_removed_bot_stops_at_once_its_messages_stay_and_a_new_token_replaces_the_old(bot_room, settings):
    client, bob, slug, token = bot_room
    assert api(client, slug, token, {"text": "before"}).status_code == 201
    bot_id = db_rows(settings, "SELECT user_id FROM bots")[0][0]
    renewed = moderate(client, slug, "bot_token", user_id=str(bot_id))
    new_token = re.search(r'<code id="bot-token">([^<]+)</code>', renewed.text).group(1)
    assert api(client, slug, token, {"text": "old token"}).status_code == 401
    assert api(client, slug, new_token, {"text": "new token"}).status_code == 201
    assert moderate(client, slug, "remove_bot", user_id=str(bot_id)).status_code == 303
    assert api(client, slug, new_token, {"text": "after"}).status_code == 401
    page = client.get(f"/room/{slug}/").text
    assert page.count('clock</bdi> <small class="guest">bot</small>') == 2  # still the bot's, marked
    assert "Bots (0)" in client.get(f"/room/{slug}/manage").text
    assert add_bot(client, slug)[1]  # and its name may be given to a new bot


# --- webhooks ------------------------------------------------------------------------------------


def test_a_mention_calls_the_webhook_once_and_its_answer_is_posted_as_a_reply(owned_room, settings, webhook):
    client, bob, slug = owned_room
    webhook.answer = {"text": "It is noon. @clock (a bot never calls itself)"}
    _, token = add_bot(client, slug, "clock", webhook.url)
    with socket_as(client, bob, slug) as bob_ws:
        send(bob_ws, "@clock what time is it?")
        asked = int(re.search(r'id="msg-(\d+)"', receive_until(bob_ws, "what time")).group(1))
        frame = receive_until(bob_ws, "It is noon")
    assert f'<a class="quote" href="#msg-{asked}"><bdi>bob</bdi>' in frame and ">bot</small>" in frame
    headers, called = webhook.calls[0]
    assert called == {"room": {"code": slug, "name": "run by alice"},
                      "message": {"id": asked, "author": "bob", "text": "@clock what time is it?",
                                  "sent_at": called["message"]["sent_at"]},
                      "bot": {"name": "clock"}}
    assert headers["host"] == webhook.url.split("/")[2] and headers["content-type"] == "application/json"
    api(client, slug, token, {"text": "@clock from the bot itself"})  # a bot's own post: no call
    say_in(client, slug, "no mention here", "@bob a person, not the bot", "@clock once more")
    until(lambda: len(webhook.calls) >= 2, "the second call")  # (queued after all of the above)
    until(lambda: db_rows(settings, "SELECT count(*) FROM messages WHERE text LIKE 'It is noon%'")[0][0] == 2,
          "the second answer")
    assert [called["message"]["text"] for _, called in webhook.calls] == ["@clock what time is it?",
                                                                         "@clock once more"]
    assert "answered 200, its answer posted" in client.get(f"/room/{slug}/manage").text


@pytest.mark.parametrize("behaviour, said", [
    ("hang", "timeout after 0.5 s"), ("huge", "its answer was over 64 KiB"),
    ("redirect", "answered 302: a redirect, which is not followed"), ("500", "answered 500"),
    ("not json", "answered 200, but not with JSON"), ([1, 2], 'answered 200, but not with {"text": "..."}'),
    ({"text": 7}, 'answered 200, but not with {"text": "..."}'),
    ({"text": "y" * 5000}, "its answer was refused: Messages are at most 4,000 characters"),
])
def test_a_failing_webhook_is_noted_for_the_owners_logged_once_and_never_told_to_the_room(
        tmp_path, caplog, behaviour, said):
    # Only the hanging webhook is meant to time out: the others get time to answer on a busy
    # CI core (at 0.5 s, a "not json" answer once came too late and was logged as a timeout).
    settings = app_settings(db_path=tmp_path / "c.db",
                            webhook_seconds=0.5 if behaviour == "hang" else 10)
    hook = Webhook(behaviour)
    try:
        with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
            register(client, "alice")
            slug = create_room(client, "failing")
            add_bot(client, slug, "helper", hook.url)
            caplog.set_level(logging.WARNING, logger="backchat")
            with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
                for n in range(2):
                    send(ws, f"@helper please {n}")
                    receive_until(ws, f"please {n}")
                until(lambda: len(hook.calls) == 2 and said in (last_call(settings) or ""), said)
                send(ws, "marker")
                assert "helper" not in receive_until(ws, "marker").split("marker")[0][-300:]
            manage = client.get(f"/room/{slug}/manage").text
            shown = said.replace('"', "&#34;")
            assert f"last call: {shown}" in manage and ", just now</small>" in manage
        logged = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
        assert len(logged) == 1 and logged[0].startswith(f"webhook of the bot helper in {slug}: {said}")
        assert db_rows(settings, "SELECT count(*) FROM messages")[0][0] == 3  # (two asked, the marker)
        if behaviour == "redirect":  # (and nothing asked 169.254.169.254: the redirect was not followed)
            assert len(hook.calls) == 2
    finally:
        hook.close()


def test_webhooks_run_eight_at_a_time_the_rest_wait_or_are_dropped_and_no_message_waits(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=0, webhook_seconds=2)
    hook = Webhook("hang")
    try:
        with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
            register(client, "alice")
            started = time.monotonic()
            for room in range(3):  # (a room has four calls at once: three rooms to fill eight)
                slug = create_room(client, f"busy {room}")
                add_bot(client, slug, "slow", hook.url)
                with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
                    for n in range(60):
                        send(ws, f"@slow number {n}")
                        receive_until(ws, f"number {n}<")
            assert time.monotonic() - started < 15  # the senders never waited for the webhook
            until(lambda: hook.in_flight == chat.WEBHOOK_CALLS, "eight calls at once")
            assert hook.most_in_flight == chat.WEBHOOK_CALLS
            dropped = client.app.state.chat.webhooks_dropped  # (each room: 25 wait at most)
            assert 3 * (60 - chat.WEBHOOK_ROOM_CALLS - chat.WEBHOOK_ROOM_QUEUE) <= dropped < 3 * 60 - chat.WEBHOOK_CALLS
    finally:
        hook.close()


REFUSED_URLS = [
    ("ftp://127.0.0.1/", "starts with http:// or https://"),
    ("javascript:alert(1)", "starts with http:// or https://"),
    ("http://", "starts with http:// or https://"),
    ("http://user:pw@127.0.0.1:9999/", "user name or password"),
    ("http://127.0.0.1:9999@169.254.169.254/", "user name or password"),
    ("http://127.0.0.1\\@169.254.169.254/", "user name or password"),
    ("http://127.0.0.1:9999/ x", "no spaces"),
    ("http://127.0.0.1:99999/", "not a port number"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://0xa9fea9fe/", "link-local"),
    ("http://0251.0376.0251.0376/", "link-local"),
    ("http://2852039166/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.0.0.1/", "private address"),
    ("http://172.16.5.4/", "private address"),
    ("http://192.168.1.20:8002/", "private address"),
    ("http://[fc00::1]/", "private address"),
    ("http://[fec0::1]/", "private address"),  # (site-local: deprecated, and not global either)
    ("http://100.64.0.1/", "private address"),
    ("http://0.0.0.0:9999/", "unspecified"),
    ("http://[::]:9999/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://127.0.0.1:8000/", "this server's own port"),
    ("http://0x7f000001:8000/", "this server's own port"),
    ("http://017700000001:8000/", "this server's own port"),
    ("http://2130706433:8000/", "this server's own port"),
    ("http://127.1:8000/", "this server's own port"),
    ("http://[::1]:8000/", "this server's own port"),
    ("http://[::ffff:127.0.0.1]:8000/", "this server's own port"),
    ("http://localhost:6379/", "Redis's port"),
    ("http://no-such-host.invalid/", "could not be found"),
]


@pytest.mark.parametrize("url, refusal", REFUSED_URLS, ids=[url for url, _ in REFUSED_URLS])
def test_a_webhook_may_not_turn_the_server_against_its_own_network(url, refusal):
    settings = app_settings(redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(chat.Refused) as refused:
        asyncio.run(chat.webhook_target(url, settings))
    assert refusal in str(refused.value) and refused.value.status_code == 400


def test_where_a_webhook_may_go_depends_on_where_the_server_listens(monkeypatch):
    on_loopback = app_settings()
    target = asyncio.run(chat.webhook_target("http://127.0.0.1:9999/hook?x=1#frag", on_loopback))
    assert target == chat.WebhookTarget("http://127.0.0.1:9999/hook?x=1", "127.0.0.1:9999", None)
    on_lan = app_settings(host="0.0.0.0")
    with pytest.raises(chat.Refused, match="CHAT_WEBHOOK_HOSTS, and 127.0.0.1 is not one of them"):
        asyncio.run(chat.webhook_target("http://127.0.0.1:9999/", on_lan))
    listed = app_settings(host="0.0.0.0", webhook_hosts=frozenset({"127.0.0.1:9999", "192.168.1.5",
                                                                   "169.254.169.254"}))
    assert asyncio.run(chat.webhook_target("http://127.0.0.1:9999/", listed))
    assert asyncio.run(chat.webhook_target("http://192.168.1.5:8002/", listed))  # listed: a LAN bot
    with pytest.raises(chat.Refused, match="link-local"):  # listed or not
        asyncio.run(chat.webhook_target("http://169.254.169.254/", listed))
    with pytest.raises(chat.Refused, match="this server's own port"):  # its LAN address, say
        asyncio.run(chat.webhook_target("http://192.168.1.5:8000/", listed))

    # A name is resolved once, and the call goes to the address checked (no DNS rebinding);
    # every address a name has must pass.
    answers = iter([[("127.0.0.1",)], [("10.0.0.7",)], [("127.0.0.1",), ("169.254.169.254",)]])

    async def resolve(self, host, port, **kwargs):
        return [(2, 1, 6, "", (address[0], port)) for address in next(answers)]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", resolve)
    target = asyncio.run(chat.webhook_target("https://bot.example:9443/hook", on_loopback))
    assert target == chat.WebhookTarget("https://127.0.0.1:9443/hook", "bot.example:9443", "bot.example")
    for _ in range(2):
        with pytest.raises(chat.Refused):
            asyncio.run(chat.webhook_target("https://bot.example:9443/hook", on_loopback))


def test_adding_a_bot_with_a_webhook_that_may_not_be_called_is_refused_in_words(owned_room, settings):
    client, _, slug = owned_room
    answer, token = add_bot(client, slug, "snoop", "http://169.254.169.254/latest/meta-data/")
    assert answer.status_code == 400 and token is None and "link-local" in answer.text
    assert db_rows(settings, "SELECT count(*) FROM bots")[0][0] == 0


def test_a_database_from_the_release_before_gains_bots(tmp_path):
    from test_chat import frozen_schema

    path = tmp_path / "chat.db"
    with sqlite3.connect(path) as db:
        db.executescript(frozen_schema("schema-v8.sql"))
        db.execute("PRAGMA user_version = 8")
        db.execute("INSERT INTO users (id, username, username_key, username_skeleton, password_hash, created_at) "
                   "VALUES (1, 'ada', 'ada', 'ada', 'x', '2026-01-01T00:00:00Z')")
    with TestClient(chat.create_app(app_settings(db_path=path))):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT is_bot FROM users").fetchall() == [(0,)]
        assert db.execute("SELECT count(*) FROM bots").fetchone() == (0,)


def test_python_chat_py_checks_webhooks_against_the_port_and_host_its_flags_gave(tmp_path):
    """`python chat.py --port N` (and --host): the webhook rules see where the server really
    listens. They once kept the defaults (127.0.0.1:8000): its own port was allowed, 8000 was
    refused as "this server's own port", and --host 0.0.0.0 still allowed loopback."""
    import httpx

    from conftest import LiveServer
    from test_server import login_cookie, make_room

    server = LiveServer(tmp_path / "chat.db").start()
    try:
        client, _ = login_cookie(server, "alice")
        slug = make_room(client, "flags")
        page = client.get(f"/room/{slug}/manage").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)

        def add(name: str, url: str) -> httpx.Response:
            return client.post(f"/room/{slug}/manage", data={"csrf_token": csrf, "step": "add_bot",
                                                              "bot_name": name, "webhook_url": url})

        own = add("own", f"http://127.0.0.1:{server.port}/")
        assert own.status_code == 400 and "this server&#39;s own port" in own.text
        other = add("other", "http://127.0.0.1:8000/" if server.port != 8000 else "http://127.0.0.1:8001/")
        assert other.status_code == 200 and 'id="bot-token"' in other.text
    finally:
        server.stop()


def test_a_bot_removed_while_its_webhook_answers_posts_nothing(owned_room, settings, webhook):
    client, bob, slug = owned_room
    webhook.answer, webhook.gate = {"text": "a late answer"}, threading.Event()
    add_bot(client, slug, "sleeper", webhook.url)
    bot_id = str(db_rows(settings, "SELECT user_id FROM bots")[0][0])
    with socket_as(client, bob, slug) as bob_ws:
        send(bob_ws, "@sleeper wake up")
        receive_until(bob_ws, "wake up")
    until(lambda: webhook.calls, "the call")
    assert moderate(client, slug, "remove_bot", user_id=bot_id).status_code == 303
    webhook.gate.set()  # its answer comes after the removal...
    until(lambda: "answer was refused" in (last_call(settings) or ""), "the refused answer")
    assert db_rows(settings, "SELECT count(*) FROM messages WHERE text = 'a late answer'") == [(0,)]
    manage = client.get(f"/room/{slug}/manage").text  # ...and an ended bot is in no list to let back in
    assert "Removed (0)" in manage and "Bots (0)" in manage
    assert moderate(client, slug, "let_back_in", user_id=bot_id).status_code == 303
    assert db_rows(settings, "SELECT count(*) FROM room_members WHERE user_id = ?", int(bot_id)) == [(0,)]


def test_a_bot_removed_like_anybody_reads_nothing_and_let_back_in_is_a_member_again(bot_room, settings):
    client, _, slug, token = bot_room
    bot_id = str(db_rows(settings, "SELECT user_id FROM bots")[0][0])
    assert moderate(client, slug, "remove", user_id=bot_id).status_code == 303
    read = api_read(client, slug, token)
    assert read.status_code == 403 and "removed" in read.json()["error"]
    assert api(client, slug, token, {"text": "while removed"}).status_code == 403
    assert "Let clock back in" in client.get(f"/room/{slug}/manage").text
    assert moderate(client, slug, "let_back_in", user_id=bot_id).status_code == 303
    assert api(client, slug, token, {"text": "back"}).status_code == 201
    assert api_read(client, slug, token).status_code == 200
    assert "Bots (1)" in client.get(f"/room/{slug}/manage").text  # a member again: mentions reach it


def test_a_room_has_at_most_ten_bots_and_nobody_is_called_anonymous(owned_room, settings, client):
    owner, _, slug = owned_room
    for n in range(chat.BOTS_PER_ROOM):
        assert add_bot(owner, slug, f"bot {n}")[1]
    refused, token = add_bot(owner, slug, "one too many")
    assert refused.status_code == 409 and token is None and "at most 10 bots" in refused.text
    bot_id = str(db_rows(settings, "SELECT user_id FROM bots WHERE room_id = "
                                   "(SELECT id FROM rooms WHERE code = ?) LIMIT 1", slug)[0][0])
    moderate(owner, slug, "remove_bot", user_id=bot_id)
    assert add_bot(owner, slug, "one more")[1]  # (ended bots do not count)
    moderate(owner, slug, "remove_bot", user_id=str(db_rows(
        settings, "SELECT user_id FROM bots WHERE removed_at IS NULL LIMIT 1")[0][0]))
    for name in ("Anonymous", "anonymous", "ANONYM0US"):
        answer, token = add_bot(owner, slug, name)
        assert token is None and "kept for anonymous questions" in answer.text, name
        assert "kept for anonymous questions" in register(client, name).text, name


def test_one_rooms_slow_webhooks_leave_the_other_rooms_theirs(tmp_path):
    """Four calls at once for one room, eight in all, the rooms taking turns: a room whose
    bots hang never holds up another room's bot."""
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=0, webhook_seconds=5)
    slow, quick = Webhook("hang"), Webhook({"text": "on it"})
    try:
        with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
            register(client, "alice")
            busy, other = create_room(client, "busy"), create_room(client, "other")
            for name in ("slowa", "slowb", "slowc"):
                add_bot(client, busy, name, slow.url)
            add_bot(client, other, "helper", quick.url)
            with client.websocket_connect(f"/chat/{busy}/", headers=ORIGIN) as ws:
                for n in range(20):  # 60 calls that hang: 4 run, 25 wait, the rest are dropped
                    send(ws, f"@slowa @slowb @slowc number {n}")
                    receive_until(ws, f"number {n}<")
            until(lambda: slow.in_flight == chat.WEBHOOK_ROOM_CALLS, "four calls for the busy room")
            with client.websocket_connect(f"/chat/{other}/", headers=ORIGIN) as ws:
                send(ws, "@helper are you there?")
                receive_until(ws, "on it")  # at once, while the busy room's calls still hang
            assert slow.most_in_flight == chat.WEBHOOK_ROOM_CALLS
            dropped = client.app.state.chat.webhooks_dropped
            assert 60 - chat.WEBHOOK_ROOM_CALLS - chat.WEBHOOK_ROOM_QUEUE <= dropped < 60 - chat.WEBHOOK_ROOM_CALLS
    finally:
        slow.close()
        quick.close()


def test_httpx_does_not_log_webhook_urls(owned_room, settings, webhook, caplog):
    """httpx logs each request's URL, query and all, at INFO: a webhook's may hold its secret."""
    client, bob, slug = owned_room
    caplog.set_level(logging.INFO)
    add_bot(client, slug, "keyed", webhook.url + "?key=SECRET123")
    with socket_as(client, bob, slug) as bob_ws:
        send(bob_ws, "@keyed hello")
        receive_until(bob_ws, "hello")
    until(lambda: "answered 200" in (last_call(settings) or ""), "the call")
    assert webhook.calls and not [r for r in caplog.records if "SECRET123" in r.getMessage()]
