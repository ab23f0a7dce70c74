"""Property-based tests: hostile input to the forms and the WebSocket never breaks anything.

Invariants checked after every generated input: no 500 and no traceback in a response, the
socket of an innocent client stays open and working, the database holds no empty or oversized
message, and /healthz still answers.
"""

from __future__ import annotations

import json
import re
import sqlite3
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.testclient import TestClient

import chat
from conftest import app_settings as make_settings
from test_chat import ORIGIN, create_room, csrf, receive_until, register, send

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
