"""Issue 32: a live class's tools (chat.py section 13), through Starlette's TestClient: polls,
the pinned message, the question queue, and what an attacker tries against each.

The browser's view of them (three people, the projector, a phone) is in test_browser.py; two
workers through Redis in test_redis.py.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import sqlite3

import httpx
import pytest
from starlette.testclient import TestClient

import chat
from conftest import app_settings
from test_chat import (ORIGIN, as_user, create_room, csrf, db_rows, frozen_schema, htmx_post, moderate,
                       page_revision, post_form, receive_until, register, say_in, send, socket_as,
                       user_id_of, writes_done)
from test_chat import client, owned_room, settings, two_users  # noqa: F401 (fixtures)


def start_poll(client: TestClient, slug: str, question: str = "Which language?",
               options: str = "Python\nRust\nGo", page: str | None = None):
    """The Poll form submitted by htmx (the CSRF token from `page`: the home page by default)."""
    return htmx_post(client, f"/room/{slug}/polls", page or "/", question=question, options=options)


def vote(client: TestClient, slug: str, poll: int, option: str):
    return htmx_post(client, f"/room/{slug}/polls/{poll}/vote", "/", option=option)


def tool(client: TestClient, slug: str, path: str, **fields: str):
    """One of the class tools' buttons, pressed with htmx."""
    return htmx_post(client, f"/room/{slug}/{path}", "/", **fields)


def ask(ws, text: str, anonymous: bool = False) -> None:
    """The composer with "Ask as a question" ticked (and "Ask without my name")."""
    fields = {"message": text, "question": "1", **({"anonymous": "1"} if anonymous else {}), "headers": {}}
    ws.send_text(json.dumps(fields))


def first_id(frame: str) -> int:
    return int(re.search(r'<article class="msg[^"]*" id="msg-(\d+)"', frame).group(1))


def option_counts(frame: str) -> list[str]:
    """Each option's count as a poll in `frame` shows it, in order."""
    poll = frame[frame.index('<form class="poll'):]
    return re.findall(r'<span class="count">([^<]+)</span>', poll[:poll.index("</form>")])


def pressed_for(frame: str, pseudonym: str) -> list[bool]:
    """Which options (or questions) a page whose viewer is `pseudonym` shows pressed."""
    return [pseudonym in by.split() for by in re.findall(r'class="(?:option|question)[^"]*"(?: id="[^"]*")? data-by="([^"]*)"', frame)]


def pseudonym(client: TestClient, purpose: str, slug: str, name: str) -> str:
    store = client.app.state.chat.store
    room_id = db_rows(store_settings(client), "SELECT id FROM rooms WHERE code = ?", slug)[0][0]
    return store.pseudonym(purpose, room_id, user_id_of(store_settings(client), name))


def store_settings(client: TestClient) -> chat.Settings:
    return client.app.state.chat.settings


# --- polls ---------------------------------------------------------------------------------------


def test_an_owners_poll_reaches_every_page_and_votes_move_live_under_pseudonyms(owned_room, settings):
    client, bob, slug = owned_room
    with socket_as(client, bob, slug) as bob_ws, client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        answer = start_poll(client, slug, question="Best **language**?", options="Python\n\n  Rust  \r\nGo\n")
        assert answer.status_code == 200 and 'id="poll-maker"' in answer.text  # (a fresh, closed form)
        frame = receive_until(bob_ws, "Poll")
        assert receive_until(ws, "Poll") == frame  # (rendered once, the same for everybody)
        poll = first_id(frame)
        assert "<strong>language</strong>" in frame and option_counts(frame) == ["0 votes"] * 3
        assert re.findall(r'name="option" value="(\d)" aria-pressed="false">([^<]+)<', frame) == [
            ("1", "Python"), ("2", "Rust"), ("3", "Go")]  # blank lines left out, each trimmed
        assert "asks the room: Best **language**?" in frame  # (said once to screen readers)
        with as_user(client, bob):
            assert vote(client, slug, poll, "2").status_code == 200
        frame = receive_until(ws, 'class="poll')
        bob_votes = pseudonym(client, "vote", slug, "bob")
        assert option_counts(frame) == ["0 votes", "1 vote", "0 votes"]
        assert pressed_for(frame, bob_votes) == [False, True, False]
        # Who voted is never on the page: no user id, no name, only the pseudonym.
        bob_id = user_id_of(settings, "bob")
        assert f'data-by="{bob_id}"' not in frame and re.search(r'data-by="[0-9a-f]{12}"', frame)
        with as_user(client, bob):  # another option moves the vote; 0 takes it back
            vote(client, slug, poll, "3")
            assert option_counts(receive_until(ws, 'class="poll')) == ["0 votes", "0 votes", "1 vote"]
            assert vote(client, slug, poll, "3").status_code == 200  # the same again: nothing sent
            vote(client, slug, poll, "0")
            frame = receive_until(ws, 'class="poll')
            assert option_counts(frame) == ["0 votes"] * 3 and 'vote" value="' not in frame
            vote(client, slug, poll, "1")
        vote(client, slug, poll, "1")  # the owner votes too
        frame = receive_until(ws, "2 votes")
    # A reload shows the same counts, and the page's own style presses its viewer's vote.
    page = client.get(f"/room/{slug}/").text
    assert option_counts(page) == ["2 votes", "0 votes", "0 votes"]
    alice_votes = pseudonym(client, "vote", slug, "alice")
    assert f':is(.option, .question)[data-by~="{alice_votes}"] .given' in page and alice_votes != bob_votes
    assert db_rows(settings, "SELECT count(*) FROM poll_votes")[0][0] == 2


def test_pseudonyms_are_per_room_and_purpose_and_outlive_a_restart(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db")
    with TestClient(chat.create_app(settings)) as client:
        store = client.app.state.chat.store
        names = {(purpose, room): store.pseudonym(purpose, room, 7) for purpose in ("vote", "ask") for room in (1, 2)}
    assert len(set(names.values())) == 4 and all(re.fullmatch(r"[0-9a-f]{12}", name) for name in names.values())
    with TestClient(chat.create_app(settings)) as client:  # the key is the database's own
        assert client.app.state.chat.store.pseudonym("vote", 1, 7) == names["vote", 1]
    with TestClient(chat.create_app(app_settings(db_path=tmp_path / "other.db"))) as client:
        assert client.app.state.chat.store.pseudonym("vote", 1, 7) != names["vote", 1]


@pytest.mark.parametrize("question, options, refusal", [
    ("", "a\nb", "A poll needs a question."),
    ("Which?", "only one", "A poll has 2 to 6 options, one per line; this one has 1."),
    ("Which?", "\n".join("abcdefg"), "A poll has 2 to 6 options, one per line; this one has 7."),
    ("Which?", "\n \n\n", "this one has 0."),
    ("Which?", "yes\nYES", "Each option once"),
    ("Which?", "a\n" + "b" * 4000, "Poll options are at most 200 characters; yours has 4,000."),
    ("q" * 4000, "a\nb", "Poll questions are at most 300 characters; yours has 4,000."),
    ("Which?", "a\nb\n" * 20000, "Content Too Large"),
], ids=["no question", "one option", "seven", "blank lines only", "twice", "long option", "long question",
        "huge form"])
def test_a_poll_that_will_not_do_is_refused_in_words_and_nothing_is_stored(owned_room, settings, question,
                                                                          options, refusal):
    client, _, slug = owned_room
    answer = start_poll(client, slug, question=question, options=options)
    assert answer.status_code in (400, 413) and html.escape(refusal, quote=False) in answer.text.replace("&#39;", "'")
    if answer.status_code == 400:
        assert 'id="poll-error"' in answer.text  # (said in the form, which keeps what was typed)
    assert db_rows(settings, "SELECT count(*) FROM messages")[0][0] == 0


def test_only_owners_start_close_or_pin_and_without_a_token_nobody_does(owned_room, settings):
    client, bob, slug = owned_room
    start_poll(client, slug)
    poll = db_rows(settings, "SELECT id FROM messages WHERE kind = 'poll'")[0][0]
    with as_user(client, bob):
        for path, fields in [("polls", {"question": "mine?", "options": "a\nb"}), (f"polls/{poll}/close", {}),
                             (f"messages/{poll}/pin", {}), ("unpin", {})]:
            assert tool(client, slug, path, **fields).status_code == 403, path
        assert client.get(f"/room/{slug}/questions/{poll}/asker").status_code == 403
    for path in ("polls", f"polls/{poll}/vote", f"polls/{poll}/close", f"messages/{poll}/pin", "unpin",
                 f"questions/{poll}/vote", f"questions/{poll}/answered"):
        assert client.post(f"/room/{slug}/{path}", data={"option": "1", "vote": "1"}).status_code == 403, path
    assert db_rows(settings, "SELECT count(*), (SELECT closed_at FROM polls), (SELECT pinned_id FROM rooms), "
                             "(SELECT count(*) FROM poll_votes) FROM messages") == [(1, None, None, 0)]
    # And past the request's check, the database's own: a member's poll is not stored.
    room_id, bob_id = db_rows(settings, "SELECT id FROM rooms")[0][0], user_id_of(settings, "bob")
    poll_by_bob = chat.NewMessage(room_id, bob_id, "mine?", None, None, kind="poll", options=("a", "b"))
    assert client.portal.call(client.app.state.chat.store.write, chat.add_messages, [poll_by_bob]) == ["owners"]


def test_votes_for_what_is_not_there_are_refused_in_words(owned_room, settings):
    client, bob, slug = owned_room
    other = create_room(client, "another class")
    start_poll(client, other)
    foreign = db_rows(settings, "SELECT id FROM messages WHERE kind = 'poll'")[0][0]
    start_poll(client, slug)
    poll = foreign + 1
    (plain,) = say_in(client, slug, "not a poll")
    with as_user(client, bob):
        cases = [(foreign, "1", 404), (plain, "1", 404), (poll, "4", 400), (poll, "-1", 400), (poll, "x", 400),
                 (poll, "9" * 18, 400), (poll, "9" * 19, 400), (poll, "", 400), (987654, "1", 404)]
        for target, option, status in cases:
            answer = vote(client, slug, target, option)
            assert answer.status_code == status and 'id="chat-error"' in answer.text, (target, option)
        assert tool(client, slug, "polls/abc/vote", option="1").status_code == 404
    with as_user(client, bob):  # bob is no member of the other room: its code is its only secret
        assert vote(client, other, foreign, "1").status_code == 403
    assert db_rows(settings, "SELECT count(*) FROM poll_votes")[0][0] == 0


def test_a_closed_poll_keeps_its_result_and_takes_no_more_votes(owned_room, settings):
    client, bob, slug = owned_room
    start_poll(client, slug, options="Tabs\nSpaces")
    poll = db_rows(settings, "SELECT id FROM messages")[0][0]
    with as_user(client, bob):
        vote(client, slug, poll, "2")
    with socket_as(client, bob, slug) as bob_ws:
        assert tool(client, slug, f"polls/{poll}/close").status_code == 200
        frame = receive_until(bob_ws, "closed")
        assert 'class="option won"' in frame and "1 vote · most votes" in frame
        assert 'name="option"' not in frame and "Close poll" not in frame  # no buttons left
        assert "Poll closed: Which language? Most votes: Spaces." in frame  # said once, politely
        with as_user(client, bob):
            answer = vote(client, slug, poll, "1")
        assert answer.status_code == 409 and "closed" in answer.text
    # Two owners closing at once: one closes it, the other changes nothing; neither fails.
    start_poll(client, slug)
    second = db_rows(settings, "SELECT max(id) FROM messages")[0][0]
    moderate(client, slug, "make_owner", user_id=str(user_id_of(settings, "bob")))
    tokens = {}
    for name, cookies in (("alice", client.cookies), ("bob", bob)):
        with as_user(client, cookies):
            token = csrf(client.get("/").text)
            tokens[name] = (httpx.Cookies(client.cookies), token)  # (as the page left them)

    async def both_close() -> list[int]:
        """Both presses in the app's one event loop at once, as a server takes them. (Two
        TestClients in threads each ran the app's start-up and shut-down: one's shut-down
        closed the database under the other's request, a 503 in CI.)"""
        async def close_as(cookies, token: str) -> int:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app),
                                         base_url="http://testserver", cookies=cookies) as other:
                return (await other.post(f"/room/{slug}/polls/{second}/close",
                                         headers={"x-csrf-token": token, "hx-request": "true"})).status_code
        return list(await asyncio.gather(*(close_as(*pair) for pair in tokens.values())))

    answers = client.portal.call(both_close)
    assert answers == [200, 200] and db_rows(settings, "SELECT count(closed_at) FROM polls")[0][0] == 2


def test_a_thousand_votes_in_a_loop_meet_the_rate_limit_and_nothing_breaks(tmp_path):
    settings = app_settings(db_path=tmp_path / "c.db", message_rate=20)
    with TestClient(chat.create_app(settings), base_url="http://testserver") as client:
        register(client, "teacher")
        slug = create_room(client, "busy")
        start_poll(client, slug)
        poll = db_rows(settings, "SELECT id FROM messages")[0][0]
        token = csrf(client.get("/").text)
        limit = client.app.state.chat.message_limit
        now = limit.clock()
        limit.clock = lambda: now  # one 10 s window, however long a busy CI core takes for the loop
        statuses = [client.post(f"/room/{slug}/polls/{poll}/vote", data={"option": str(1 + n % 3)},
                                headers={"x-csrf-token": token, "hx-request": "true"}).status_code
                    for n in range(1000)]
    assert set(statuses) == {200, 429} and statuses.count(200) <= 20
    assert db_rows(settings, "SELECT count(*) FROM poll_votes")[0][0] == 1


def test_without_javascript_a_poll_is_started_and_voted_for_by_plain_forms(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    answer = post_form(client, room, f"{room}polls", question="Lunch?", options="Pizza\nSoup")
    assert answer.status_code == 303 and answer.headers["location"] == room
    with as_user(client, bob):
        page = client.get(room).text
        form = page[page.index('<form class="poll'):]
        assert 'name="csrf_token"' in form[:form.index("</form>")]  # (the page's own copy has the token)
        poll = db_rows(settings, "SELECT id FROM messages")[0][0]
        answer = post_form(client, room, f"{room}polls/{poll}/vote", option="2")
        assert answer.status_code == 303
        refused = post_form(client, room, f"{room}polls/{poll}/vote", option="7")
        assert refused.status_code == 400 and "That poll has no option 7." in refused.text
        assert option_counts(client.get(room).text) == ["0 votes", "1 vote"]
    assert post_form(client, room, f"{room}polls", question="", options="a\nb").status_code == 400


# --- the pinned message ----------------------------------------------------------------------------


def pinned_text(frame: str) -> str | None:
    """What the Pinned region in `frame` shows (None: hidden)."""
    found = re.search(r'<section id="pinned"[^>]*>(.*?)</section>', frame, re.S)
    assert found, "no Pinned region"
    return None if "hidden" in found.group(0)[:120] else re.sub(r"<[^>]+>", "", found.group(1))


def test_a_pin_shows_above_the_log_on_every_page_follows_edits_and_leaves_with_a_delete(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    first, second = say_in(client, slug, "Exercise 1: reverse a list", "Exercise 2: sort it")
    assert pinned_text(client.get(room).text) is None
    with socket_as(client, bob, slug) as bob_ws:
        revision = page_revision(client.get(room).text)
        assert tool(client, slug, f"messages/{first}/pin").status_code == 200
        frame = receive_until(bob_ws, 'id="pinned"')
        assert "Exercise 1" in pinned_text(frame) and f'value="{revision + 1}"' in frame
        assert tool(client, slug, f"messages/{first}/pin").status_code == 200  # again: nothing new
        htmx_post(client, f"{room}messages/{first}/edit", room, message="Exercise 1: reverse a *string*")
        frame = receive_until(bob_ws, 'id="pinned"')  # an edit of the pinned message changes the pin
        assert "reverse a string" in pinned_text(frame) and "<em>string</em>" in frame
        tool(client, slug, f"messages/{second}/pin")  # one pin per room: the new one replaces it
        assert "Exercise 2" in pinned_text(receive_until(bob_ws, 'id="pinned"'))
        with as_user(client, bob):  # bob's page, reloaded, shows it too
            assert "Exercise 2" in pinned_text(client.get(room).text)
        htmx_post(client, f"{room}messages/{second}/delete", room)
        frame = receive_until(bob_ws, 'id="pinned"')
        assert pinned_text(frame) is None and 'hx-swap-oob="delete"' in frame
        tool(client, slug, f"messages/{first}/pin")
        receive_until(bob_ws, 'id="pinned"')
        tool(client, slug, "unpin")
        assert pinned_text(receive_until(bob_ws, 'id="pinned"')) is None
    other = create_room(client, "elsewhere")
    (foreign,) = say_in(client, other, "not yours")
    assert tool(client, slug, f"messages/{foreign}/pin").status_code == 404
    assert tool(client, slug, f"messages/{second}/pin").status_code == 404  # deleted
    assert db_rows(settings, "SELECT pinned_id FROM rooms WHERE code = ?", slug) == [(None,)]


def test_a_pin_racing_a_delete_never_leaves_a_pin_to_nothing(owned_room, settings):
    client, _, slug = owned_room
    store = client.app.state.chat.store
    room_id = db_rows(settings, "SELECT id FROM rooms")[0][0]
    first, second = say_in(client, slug, "one", "two")
    # The delete first: the pin finds nothing (404). The pin first: the delete unpins.
    client.portal.call(store.write, chat.delete_message, first, room_id, None)
    with pytest.raises(chat.Refused) as refused:
        client.portal.call(store.write, chat.pin_message, first, room_id)
    assert refused.value.status_code == 404
    client.portal.call(store.write, chat.pin_message, second, room_id)
    assert client.portal.call(store.write, chat.delete_message, second, room_id, None)[2] is True
    assert db_rows(settings, "SELECT pinned_id FROM rooms") == [(None,)]


def test_clearing_the_history_takes_the_pin_and_the_questions_with_it(owned_room, settings):
    client, bob, slug = owned_room
    (mid,) = say_in(client, slug, "pin me")
    tool(client, slug, f"messages/{mid}/pin")
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ask(ws, "a question")
        receive_until(ws, "a question")
    with socket_as(client, bob, slug) as bob_ws:
        post_form(client, f"/room/{slug}/clear", f"/room/{slug}/clear")
        frame = receive_until(bob_ws, 'id="pinned"')
        assert pinned_text(frame) is None and 'id="questions-count" hx-swap-oob="true">0<' in frame
    assert db_rows(settings, "SELECT pinned_id FROM rooms") == [(None,)]


# --- questions -----------------------------------------------------------------------------------


def open_questions(frame: str) -> list[tuple[str, str]]:
    """The open questions a Questions list in `frame` shows, in order: (text, count)."""
    found = re.search(r'<div id="questions".*?</div>', frame, re.S).group(0)
    listed = found.split("<h3>Answered</h3>")[0]
    return re.findall(r'<q dir="auto" id="question-\d+">([^<]*)</q>.*?<span class="count">([^<]*)</span>', listed, re.S)


def answered_questions(frame: str) -> list[str]:
    found = re.search(r'<div id="questions".*?</div>', frame, re.S).group(0)
    return re.findall(r"<q dir=\"auto\">([^<]*)</q>", found.split("<h3>Answered</h3>")[1]) if "<h3>" in found else []


def test_questions_are_listed_by_votes_then_age_and_answered_ones_move_down(owned_room, settings):
    client, bob, slug = owned_room
    with socket_as(client, bob, slug) as bob_ws, client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ask(bob_ws, "Why tabs?")
        frame = receive_until(ws, "Why tabs?")
        first = first_id(frame)
        assert '<small class="tag">Question</small>' in frame and "bob</bdi> asks: Why tabs?" in frame
        assert open_questions(frame) == [("Why tabs?", "0 votes")]
        assert 'id="questions-count" hx-swap-oob="true">1<' in frame
        ask(bob_ws, "Why spaces?")
        second = first_id(receive_until(ws, "Why spaces?"))
        send(bob_ws, "just a message")  # (not a question: not listed)
        receive_until(ws, "just a message")
        assert tool(client, slug, f"questions/{second}/vote", vote="1").status_code == 200
        frame = receive_until(bob_ws, "1 vote")
        assert open_questions(frame) == [("Why spaces?", "1 vote"), ("Why tabs?", "0 votes")]
        assert pressed_for(frame, pseudonym(client, "vote", slug, "alice")) == [True, False]
        tool(client, slug, f"questions/{second}/vote", vote="1")  # twice is once
        with as_user(client, bob):
            tool(client, slug, f"questions/{first}/vote", vote="1")
        receive_until(ws, "1 vote")
        receive_until(ws, "1 vote")
        tool(client, slug, f"questions/{second}/vote", vote="0")  # taken back: tied, the older first
        frame = receive_until(ws, 'id="questions"')
        assert open_questions(frame) == [("Why tabs?", "1 vote"), ("Why spaces?", "0 votes")]
        assert tool(client, slug, f"questions/{first}/answered").status_code == 200
        frame = receive_until(bob_ws, "Answered")
        assert '<small class="tag answered">Answered</small>' in frame  # in the log too
        assert open_questions(frame) == [("Why spaces?", "0 votes")] and answered_questions(frame) == ["Why tabs?"]
        with as_user(client, bob):
            assert tool(client, slug, f"questions/{first}/vote", vote="0").status_code == 409
            assert tool(client, slug, f"questions/{second}/answered").status_code == 403
    page = client.get(f"/room/{slug}/").text
    assert open_questions(page) == [("Why spaces?", "0 votes")] and answered_questions(page) == ["Why tabs?"]
    assert '<span id="questions-count">1</span>' in page


def test_question_votes_for_what_is_not_a_question_here_are_refused(owned_room, settings):
    client, bob, slug = owned_room
    other = create_room(client, "other")
    with client.websocket_connect(f"/chat/{other}/", headers=ORIGIN) as ws:
        ask(ws, "elsewhere?")
        foreign = first_id(receive_until(ws, "elsewhere?"))
    (plain,) = say_in(client, slug, "a plain message")
    for target, fields, status in [(foreign, {"vote": "1"}, 404), (plain, {"vote": "1"}, 404),
                                   (plain, {"vote": "2"}, 400), (plain, {}, 400), (10**6, {"vote": "1"}, 404)]:
        assert tool(client, slug, f"questions/{target}/vote", **fields).status_code == status, (target, fields)
    assert tool(client, slug, f"questions/{foreign}/answered").status_code == 404
    assert db_rows(settings, "SELECT count(*) FROM question_votes")[0][0] == 0


def test_a_removed_member_cannot_vote_even_when_the_removal_lands_first(owned_room, settings):
    client, bob, slug = owned_room
    start_poll(client, slug)
    poll = db_rows(settings, "SELECT id FROM messages")[0][0]
    room_id = db_rows(settings, "SELECT id FROM rooms")[0][0]
    bob_id = user_id_of(settings, "bob")
    moderate(client, slug, "remove", user_id=str(bob_id))
    with as_user(client, bob):
        assert vote(client, slug, poll, "1").status_code == 403
    with pytest.raises(chat.Refused) as refused:  # (past the request's check: the transaction's)
        client.portal.call(client.app.state.chat.store.write, chat.cast_vote, poll, room_id, bob_id, 1)
    assert refused.value.status_code == 403


def test_a_locked_room_still_takes_votes_but_not_questions(owned_room, settings):
    client, bob, slug = owned_room
    start_poll(client, slug)
    poll = db_rows(settings, "SELECT id FROM messages")[0][0]
    moderate(client, slug, "lock")
    with as_user(client, bob):
        assert vote(client, slug, poll, "1").status_code == 200  # (a class votes while its chat is quiet)
    with socket_as(client, bob, slug) as bob_ws:
        ask(bob_ws, "may I?")
        assert "locked" in receive_until(bob_ws, "chat-error")
    assert db_rows(settings, "SELECT count(*) FROM messages WHERE kind = 'question'")[0][0] == 0


# --- anonymous questions -------------------------------------------------------------------------


def test_anonymous_questions_hide_the_asker_from_classmates_but_not_from_owners(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    bob_id = user_id_of(settings, "bob")
    with socket_as(client, bob, slug) as bob_ws:
        ask(bob_ws, "not allowed yet", anonymous=True)  # off by default: asked with the name
        assert "bob</bdi> <small class=\"tag\">Question" in receive_until(bob_ws, "not allowed yet")
        assert moderate(client, slug, "questions_anonymous", allow="1").status_code == 303
        assert "data-anonymous" in receive_until(bob_ws, "room-state")
        ask(bob_ws, "Is this a silly question?", anonymous=True)
        frame = receive_until(bob_ws, "silly")
    anonymous_id = first_id(frame)
    mine = pseudonym(client, "ask", slug, "bob")
    for shown in (frame, client.get(room).text, client.get(f"{room}messages?before=99").text):
        article = re.search(rf'<article[^>]*id="msg-{anonymous_id}".*?</article>', shown, re.S).group(0)
        assert "Anonymous" in article and "bob" not in article and f'data-author="{bob_id}"' not in article
        assert f'data-author="{mine}"' in article  # (so bob's own page marks it his: room.html)
    assert "Anonymous</bdi> asks: Is this a silly question?" in frame and "bob</bdi>: Is this" not in frame
    with as_user(client, bob):
        assert f'.msg:is([data-author="{bob_id}"], [data-author="{mine}"])' in client.get(room).text
        assert client.get(f"{room}questions/{anonymous_id}/asker").status_code == 403
        member_copy = client.get(f"{room}transcript").text
        member_json = client.get(f"{room}transcript?format=json").json()
    asker = client.get(f"{room}questions/{anonymous_id}/asker")
    assert asker.status_code == 200 and "asked by <bdi>bob</bdi>" in asker.text
    assert "**Anonymous** ·" in member_copy and "asked by" not in member_copy
    assert [m.get("asked_by") for m in member_json["messages"]] == [None, None]
    owner_copy = client.get(f"{room}transcript").text
    assert "**Anonymous (asked by bob)** ·" in owner_copy
    assert client.get(f"{room}transcript?format=json").json()["messages"][1]["asked_by"] == "bob"
    # Searching finds the question, not its asker; a reply quotes "Anonymous".
    while client.portal.call(client.app.state.chat.store.write, chat.index_new_messages):
        pass
    hits = client.get("/search/", params={"q": "silly"}).text
    assert "Anonymous" in hits and "bob" not in hits.split("<main")[1].split("</main>")[0]
    with client.websocket_connect(f"/chat/{slug}/", headers=ORIGIN) as ws:
        ws.send_text(json.dumps({"message": "No, it is not", "reply_to": str(anonymous_id), "headers": {}}))
        assert "<bdi>Anonymous</bdi>: <q" in receive_until(ws, "No, it is not")


def test_the_anonymous_setting_is_an_owners_step_and_plain_messages_are_never_anonymous(owned_room, settings):
    client, bob, slug = owned_room
    with as_user(client, bob):
        assert moderate(client, slug, "questions_anonymous", allow="1").status_code == 403
    moderate(client, slug, "questions_anonymous", allow="1")
    manage = client.get(f"/room/{slug}/manage").text
    assert "Questions may be anonymous: yes" in manage and "Stop anonymous questions" in manage
    with socket_as(client, bob, slug) as bob_ws:
        bob_ws.send_text(json.dumps({"message": "not a question", "anonymous": "1", "headers": {}}))
        assert "bob</bdi>" in receive_until(bob_ws, "not a question")
    moderate(client, slug, "questions_anonymous", allow="0")
    assert db_rows(settings, "SELECT questions_anonymous FROM rooms WHERE code = ?", slug) == [(0,)]
    assert db_rows(settings, "SELECT count(*) FROM messages WHERE anonymous")[0][0] == 0


def test_the_plain_form_asks_without_the_name_too(owned_room, settings):
    """Without JavaScript "Ask without my name" is a plain form's checkbox: it once reached
    post_message as a poll's options, and the question was stored with its asker's name."""
    client, bob, slug = owned_room
    moderate(client, slug, "questions_anonymous", allow="1")
    with as_user(client, bob):
        asked = post_form(client, f"/room/{slug}/", f"/room/{slug}/messages", message="Shy question?",
                          question="on", anonymous="on")
        assert asked.status_code == 303
    assert db_rows(settings, "SELECT kind, anonymous FROM messages WHERE text = 'Shy question?'") == [
        ("question", 1)]


# --- the transcript, catching up, and the previous release's database --------------------------


def test_the_transcript_lists_a_polls_options_with_their_final_counts(owned_room, settings):
    client, bob, slug = owned_room
    start_poll(client, slug, question="Tabs or *spaces*?", options="Tabs\nSpaces")
    poll = db_rows(settings, "SELECT id FROM messages")[0][0]
    with as_user(client, bob):
        vote(client, slug, poll, "2")
    tool(client, slug, f"polls/{poll}/close")
    markdown = client.get(f"/room/{slug}/transcript").text
    assert "· poll, closed" in markdown and "- Tabs: 0 votes\n- Spaces: 1 vote (most votes)" in markdown
    assert "bob" not in markdown  # (votes are never named)
    entry = client.get(f"/room/{slug}/transcript?format=json").json()["messages"][0]
    assert entry["kind"] == "poll" and entry["poll"] == {"closed": True, "options": [
        {"text": "Tabs", "votes": 0, "most_votes": False}, {"text": "Spaces", "votes": 1, "most_votes": True}]}


def test_a_page_that_was_offline_catches_up_with_votes_the_pin_and_answers(owned_room, settings):
    client, bob, slug = owned_room
    room = f"/room/{slug}/"
    start_poll(client, slug)
    with socket_as(client, bob, slug) as bob_ws:
        ask(bob_ws, "What is a closure?")
        receive_until(bob_ws, "closure")
    poll, question = (row[0] for row in db_rows(settings, "SELECT id FROM messages ORDER BY id"))
    with as_user(client, bob):
        offline_at = page_revision(client.get(room).text)  # then the page's socket drops
    vote(client, slug, poll, "3")
    tool(client, slug, f"messages/{poll}/pin")
    tool(client, slug, f"questions/{question}/vote", vote="1")
    tool(client, slug, f"questions/{question}/answered")
    with socket_as(client, bob, slug) as bob_ws:  # back: the catch-up form sends its revision
        bob_ws.send_text(json.dumps({"revision": str(offline_at)}))
        frame = receive_until(bob_ws, 'id="pinned"')
    assert option_counts(frame) == ["0 votes", "0 votes", "1 vote"]
    assert "Which language?" in pinned_text(frame) and answered_questions(frame) == ["What is a closure?"]
    assert f'value="{page_revision(client.get(room).text)}"' in frame
    with socket_as(client, bob, slug) as bob_ws:  # up to date: nothing but the acknowledgement
        bob_ws.send_text(json.dumps({"revision": str(page_revision(client.get(room).text))}))
        send(bob_ws, "marker")
        assert 'id="pinned"' not in receive_until(bob_ws, "marker")


def test_a_database_from_the_release_before_gains_the_class_tools(tmp_path):
    path = tmp_path / "chat.db"
    with sqlite3.connect(path) as db:
        db.executescript(frozen_schema("schema-v8.sql"))
        db.execute("PRAGMA user_version = 8")
        db.execute("INSERT INTO users (id, username, username_key, username_skeleton, password_hash, "
                   "created_at) VALUES (1, 'ada', 'ada', 'ada', 'x', '2026-01-01T00:00:00Z')")
        db.execute("INSERT INTO rooms (id, slug, name, created_by, created_at, revision) "
                   "VALUES (1, 'old-room', 'Old room', 1, '2026-01-01T00:00:00Z', 1)")
        db.execute("INSERT INTO messages (room_id, user_id, text, created_at, revision) "
                   "VALUES (1, 1, 'from before', '2026-01-01T00:00:00Z', 1)")
    settings = app_settings(db_path=path)
    with TestClient(chat.create_app(settings)) as client:
        store = client.app.state.chat.store
        (message,) = client.portal.call(store.read, chat.page_before, 1, None)[0]
        assert (message["kind"], message["anonymous"], message["votes"]) == ("message", 0, None)
        assert client.portal.call(store.write, chat.pin_message, message["id"], 1) == 2
    assert db_rows(settings, "SELECT pinned_id, questions_anonymous FROM rooms") == [(1, 0)]
    assert db_rows(settings, "SELECT count(*) FROM keys WHERE name = 'pseudonyms'") == [(1,)]
