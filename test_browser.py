"""Backchat in a real browser: two people, two browser contexts, one room."""

from __future__ import annotations

import re
import sqlite3

import pytest

from conftest import ARTIFACTS, LiveServer

expect = pytest.importorskip("playwright.sync_api").expect

PASSWORD = "password123"


class Person:
    """One browser context (its own cookies) with a page and every console error it logged."""

    def __init__(self, browser, base_url: str, name: str) -> None:
        self.name = name
        self.context = browser.new_context(base_url=base_url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def register(self) -> None:
        self.page.goto("/auth/register/")
        self.page.fill("#username", self.name)
        self.page.fill("#password1", PASSWORD)
        self.page.fill("#password2", PASSWORD)
        self.page.click("button:has-text('Register')")
        self.page.wait_for_url(re.compile(r"/$"))

    def create_room(self, name: str) -> None:
        self.page.fill("#room_name", name)
        self.page.click("button:has-text('Create room')")
        self.page.wait_for_url(re.compile(r"/room/[^/]+/$"))

    def say(self, text: str, accepted: bool = True) -> None:
        self.page.fill("#message-input", text)
        self.page.press("#message-input", "Enter")
        if accepted:  # the server empties the input once the message is stored
            expect(self.page.locator("#message-input")).to_have_value("")

    def sees_message(self, text: str) -> None:
        self.page.locator("#messages .msg p", has_text=text).wait_for()

    def screenshot(self, label: str) -> str:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{label}-{self.name}.png"
        self.page.screenshot(path=path, full_page=True)
        print(f"screenshot: {path}")
        return str(path)


@pytest.fixture
def chat_server(tmp_path):
    # The tests type faster than people do: the per-user message rate limit is off.
    server = LiveServer(tmp_path / "chat.db", CHAT_MESSAGE_RATE="0").start()
    yield server
    server.stop()


@pytest.fixture
def people(browser, chat_server):
    everyone = [Person(browser, chat_server.url, name) for name in ("ada", "grace")]
    yield everyone
    for person in everyone:
        person.context.close()


def test_two_people_chat_in_real_time(people):
    ada, grace = people
    for person in people:
        person.register()

    ada.create_room("Study <group>")
    code = ada.page.locator(".room-head code").inner_text()
    assert ada.page.locator("h1").inner_text() == "Study <group>"

    grace.page.fill("#room_slug", f"  {code.upper()} ")
    grace.page.click("button:has-text('Join room')")
    grace.page.wait_for_url(re.compile(rf"/room/{code}/$"))

    for person in people:  # presence shows both, live, without a reload
        person.page.locator("#presence li", has_text="ada").wait_for()
        person.page.locator("#presence li", has_text="grace").wait_for()

    ada.say("hello <b>grace</b>")
    grace.sees_message("hello <b>grace</b>")  # shown as text, not markup
    ada.sees_message("hello <b>grace</b>")
    assert ada.page.input_value("#message-input") == ""  # cleared by the server's OOB swap

    grace.say("hi ada")
    ada.sees_message("hi ada")
    assert grace.page.input_value("#message-input") == ""
    assert grace.page.evaluate("document.activeElement.id") == "message-input"  # keep typing

    # own messages are told apart from others'
    own = grace.page.locator(".msg", has_text="hi ada")
    other = grace.page.locator(".msg", has_text="hello")
    assert own.evaluate("e => getComputedStyle(e).backgroundColor") != other.evaluate(
        "e => getComputedStyle(e).backgroundColor")

    # the newest message is in view without scrolling
    for n in range(30):
        ada.say(f"filler {n}")
    grace.sees_message("filler 29")
    assert grace.page.locator(".msg", has_text="filler 29").is_visible()
    box = grace.page.locator(".msg", has_text="filler 29").bounding_box()
    log = grace.page.locator(".log").bounding_box()
    assert log["y"] <= box["y"] and box["y"] + box["height"] <= log["y"] + log["height"] + 1

    # an oversized message is refused with an alert, the text stays in the input
    grace.page.evaluate("document.querySelector('#message-input').removeAttribute('maxlength')")
    grace.say("z" * 4001, accepted=False)
    grace.page.locator("#chat-error", has_text="at most 4,000").wait_for()
    assert grace.page.input_value("#message-input") == "z" * 4001

    for person in people:
        person.screenshot("chat")
    assert ada.errors == [] and grace.errors == []  # no CSP violations, no script errors

    # grace leaves: ada's presence list updates
    grace.page.goto("/")
    ada.page.locator("#presence li", has_text="grace").wait_for(state="detached")


def test_history_and_load_older_in_the_browser(people):
    ada, _ = people
    ada.register()
    ada.create_room("long history")
    for n in range(55):
        ada.say(f"old message {n}")
    ada.sees_message("old message 54")
    ada.page.reload()
    assert ada.page.locator("#messages .msg").count() == 50
    ada.page.click("button.older")
    ada.sees_message("old message 0")
    texts = ada.page.locator("#messages .msg p").all_inner_texts()
    assert texts == [f"old message {n}" for n in range(55)]
    ada.page.goto(ada.page.url + "?wire=1")
    ada.say("on the wire")
    ada.page.locator("#wire-log pre", has_text='hx-swap-oob="upsert:#messages"').first.wait_for()
    ada.screenshot("wire")
    assert ada.errors == []


def test_pages_reconnect_after_a_restart_and_catch_up(people, chat_server):
    ada, grace = people
    for person in people:
        person.register()
    ada.create_room("restart")
    grace.page.goto(ada.page.url)
    ada.page.locator("#presence li", has_text="grace").wait_for()
    ada.say("before the restart")
    grace.sees_message("before the restart")

    chat_server.stop()  # SIGTERM: sockets close with 1012, and htmx starts retrying
    with sqlite3.connect(chat_server.db_path) as db:  # what others said while these pages were away
        room_id, user_id = db.execute("SELECT id, created_by FROM rooms").fetchone()
        db.executemany("INSERT INTO messages (room_id, user_id, text, created_at) VALUES (?, ?, ?, ?)",
                       [(room_id, user_id, f"while away {n}", "2026-01-01T00:00:00Z") for n in range(3)])
    chat_server.start()

    for person in people:  # back within about 10 s of the server's return, without a reload
        person.page.locator("#messages .msg p", has_text="while away 2").wait_for(timeout=12_000)
    grace.say("after the restart")
    ada.sees_message("after the restart")
    expected = ["before the restart", "while away 0", "while away 1", "while away 2", "after the restart"]
    for person in people:  # everything, in order, nothing twice
        assert person.page.locator("#messages .msg p").all_inner_texts() == expected
    ada.screenshot("after-restart")
