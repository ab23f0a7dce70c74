"""Backchat: a small real-time chat server in one file, for people who learn htmx.

What it is. People register (or join a class as guests), create a room (its name gets a
unique code and link), join by code or link, and chat live. The browser side is htmx 4: the
room page opens a WebSocket (hx-ws:connect), its message form sends JSON frames (hx-ws:send),
and every frame the server sends back is HTML whose hx-swap-oob elements htmx swaps in.
static/room.js does the little htmx 4 cannot do without eval. History lives in SQLite; Redis
shares the live part between workers. lesson/minimal_chat.py is the same idea in 60 lines.

The path of one message: section 9 ("A message") top to bottom, then section 6 ("The live
room") for the push:
  chat_socket          the WebSocket route: admit() checks the handshake, then it reads frames
  handle_frame         one frame from a page (the wire view's echo starts here)
  parse_frame          the form's fields out of htmx's JSON
  post_message         the one path for the socket and the plain form: the checks, then...
  add_messages         ...the commit to SQLite, on the writer thread (Store.write_together)
  new_message_frame    the message rendered once (templates/_fragments.html: new_message_frame
                       wraps messages_frame, which wraps message)
  LocalFanout.publish  the one string handed on (RedisFanout.publish with several workers)
  RoomHub.broadcast    to every socket in the room
  Connection.push      each socket sends it without ever waiting
docs/how-it-works.md walks through it with the frames as they travel.

Where things go. The file is a small core (1-6: settings, the database, guards, who is
asking, pages, the live room), then one section per capability (7-14: accounts, rooms, a
message, changing a message, moderation, search, class tools, bots and the API), then what
only scaling out needs (15, Redis), the app (16) and the operator's commands with main()
(17). A capability's section holds, in this order: its constants; its handlers, in the order
a request meets them; their helpers; its SQL (plain functions of a connection, run through
Store.read or Store.write); its route list (ACCOUNT_ROUTES, ...); its background task. A
section uses only what is above it (the migrations, which run at start, excepted), so a
reader can go top to bottom; a new capability is a new section before Redis, its tables in
SCHEMA (each names its section), and a line in create_app(), which only composes. Where a
section below adds to what one above runs, it registers in that one's table
(MODERATION_STEPS, ROOM_PARTS, MESSAGE_LISTENERS).

House rules, each kept by one place and proven by a test:
  1. Nothing is shown before it is committed: add_messages returns rows only after COMMIT,
     and post_message publishes only then.
     test_server.py::test_sigkill_mid_burst_loses_no_message_anyone_saw
  2. A pushed fragment is rendered once for everyone; what differs per viewer (your own
     messages, the owners' tools, your reactions) is shown by the room page's own nonce'd
     style (room.html), never by rendering per socket.
     test_chat.py::test_a_broadcast_is_rendered_once_and_the_same_for_everyone
  3. Every change a page must see advances the room's revision (NEXT_REVISION, advance_room),
     so live pages, pages that were offline (catch_up_frame) and other workers end alike.
     test_chat.py::test_every_frame_that_changes_the_room_moves_the_pages_revision_on
  4. Connection.push never waits: a socket that lags gets a bounded backlog, then is dropped.
     test_server.py::test_a_reader_that_stops_reading_holds_up_nobody
  5. Database work runs only on the Store's threads, never on the event loop.
     test_chat.py::test_the_database_is_used_only_on_the_stores_threads
  6. Every check is made on the server, whatever the page shows.
     test_chat.py::test_every_owners_step_is_refused_to_a_member_and_to_other_rooms_owners
  7. The Local and Redis twins (LocalFanout, RateLimiter, FailureLimit and theirs) keep the
     same methods; limiters() is the one place that chooses between them.
     test_house_rules.py::test_the_redis_twins_keep_the_local_ones_methods
  8. Nothing below main() reads the environment: Settings.from_env does, once.
     test_house_rules.py::test_only_settings_reads_the_environment
  And: a section uses only what is above it; no line is over 100 characters; every public
  function has a docstring (test_house_rules.py).

More: docs/how-it-works.md (the paths of a message, an edit, a reaction; catching up; real
networks; room.js), docs/guarantees.md, docs/performance.md, docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import resource
import secrets
import socket
import sqlite3
import ssl
import sys
import threading
import time
import unicodedata
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, NamedTuple
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import argon2
import httpx
import jinja2
import uvicorn
from linkify_it import LinkifyIt
import pygments
from markdown_it import MarkdownIt
from markupsafe import Markup, escape
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import (HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse,
                                 Response, StreamingResponse)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected
from uvicorn.protocols.http.h11_impl import H11Protocol

HERE = Path(__file__).resolve().parent
log = logging.getLogger("backchat")


# ---------------------------------------------------------------------------
# 1. Settings
# Every knob the app has, read once from CHAT_* environment variables (and the command line
# in main()); everything below receives a Settings, never os.environ.
# ---------------------------------------------------------------------------


def setting(default: Any, env: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A field of Settings: its default and the CHAT_* variable that sets it, stated once.
    `parse` turns the variable's text into the value (else the default's type does)."""
    return field(default=default, metadata={"env": env, "parse": parse})


def names_in(text: str, strip: str = "") -> frozenset[str]:
    """A comma-separated list as a set: lower case, each stripped of spaces and of `strip`."""
    return frozenset(name.strip().strip(strip).lower() for name in text.split(",") if name.strip())


def digits(text: str) -> int:
    """A whole number written in ASCII digits (not "²", not "٣"); ValueError otherwise."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


# (bool first: a bool is an int too, and the first type that fits is used)
PARSE_BY_TYPE: dict[type, Callable[[str], Any]] = {
    bool: lambda text: text.lower() in ("1", "true", "yes"), Path: Path, str: str, int: digits,
    float: float}


@dataclass(frozen=True)
class Settings:
    """Every setting with its CHAT_* variable and default (README, "Configuration")."""

    db_path: Path = setting(Path("chat.db"), "CHAT_DB")
    secret_key: str = setting("", "CHAT_SECRET_KEY")  # empty: made once, kept beside the database
    host: str = setting("127.0.0.1", "CHAT_HOST")  # what `python chat.py` listens on
    port: int = setting(8000, "CHAT_PORT")
    ws: str = setting("auto", "CHAT_WS")  # uvicorn's WebSocket implementation
    loop: str = setting("auto", "CHAT_LOOP")  # the event loop: uvloop if installed (auto)
    allowed_origins: frozenset[str] = setting(frozenset(), "CHAT_ALLOWED_ORIGINS",
                                              lambda text: names_in(text, "/"))
    message_rate: int = setting(20, "CHAT_MESSAGE_RATE")  # per user per room per 10 s; 0: off
    room_rate: int = setting(10, "CHAT_ROOM_RATE")  # rooms (and new codes) per user per hour
    login_failures: int = setting(10, "CHAT_LOGIN_FAILURES")  # per name and address per 15 min
    register_rate: int = setting(10, "CHAT_REGISTER_RATE")  # accounts per address per hour
    room_guesses: int = setting(30, "CHAT_ROOM_GUESSES")  # unknown codes per user, address, hour
    search_rate: int = setting(30, "CHAT_SEARCH_RATE")  # searches per user per minute
    # WebSocket handshakes per session per 10 s (and ten times that per client address)
    handshake_rate: int = setting(30, "CHAT_HANDSHAKE_RATE")
    sockets_per_user: int = setting(20, "CHAT_SOCKETS_PER_USER")  # open WebSockets per user
    # open WebSockets per client address (a classroom shares one)
    sockets_per_address: int = setting(200, "CHAT_SOCKETS_PER_ADDRESS")
    # open connections in all (HTTP and WebSocket) before refusing
    max_connections: int = setting(2000, "CHAT_MAX_CONNECTIONS")
    # open HTTP connections per client address (python chat.py; not behind a proxy)
    connections_per_address: int = setting(200, "CHAT_CONNECTIONS_PER_ADDRESS")
    request_body_seconds: float = setting(30.0, "CHAT_REQUEST_BODY_SECONDS")  # to send a body
    # Host names served besides IP addresses (DNS rebinding needs a name): "localhost", and
    # this machine's names when main() listens on every interface. "*" serves any.
    allowed_hosts: frozenset[str] = setting(frozenset({"localhost"}), "CHAT_ALLOWED_HOSTS",
                                            lambda text: names_in(text, "[]"))
    # addresses whose X-Forwarded-For is believed (python chat.py)
    trusted_proxies: str = setting("", "CHAT_TRUSTED_PROXIES")
    guests: bool = setting(False, "CHAT_GUESTS")  # "Join as a guest": a name, no password
    https_only: bool = setting(False, "CHAT_HTTPS_ONLY")  # the session cookie is Secure (TLS)
    redis_url: str = setting("", "CHAT_REDIS_URL")  # fan-out, presence, limits through Redis
    heartbeat: float = setting(10.0, "CHAT_HEARTBEAT")  # seconds between "still live" frames
    timezone: str = setting("", "CHAT_TIMEZONE")  # an IANA name; empty: this machine's own
    # Where bots' webhooks may go when the server listens beyond loopback: "host" or "host:port"
    webhook_hosts: frozenset[str] = setting(frozenset(), "CHAT_WEBHOOK_HOSTS",
                                            lambda text: names_in(text))
    webhook_seconds: float = setting(7.0, "CHAT_WEBHOOK_SECONDS")  # a webhook's time to answer

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """The settings the CHAT_* variables give (os.environ's, or `env`'s); ValueError, in
        plain words, for a value that is not one."""
        env = os.environ if env is None else env
        given = {}
        for known in fields(cls):
            name, text = known.metadata["env"], env.get(known.metadata["env"], "").strip()
            if text:
                try:
                    parse = known.metadata["parse"] or next(
                        parse for kind, parse in PARSE_BY_TYPE.items()
                        if isinstance(known.default, kind))
                    given[known.name] = parse(text)
                except ValueError as problem:
                    raise ValueError(f"{name}: {problem}") from None
        return cls(**given)


def load_secret_key(settings: Settings) -> str:
    """The session-signing key: from settings, or a file beside the database (mode 0600)."""
    if settings.secret_key:
        return settings.secret_key
    key_file = settings.db_path.with_name(settings.db_path.name + ".secret")
    with contextlib.suppress(FileNotFoundError):
        return key_file.read_text().strip()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: if two workers start at once, one writes and the other reads its key.
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    return key_file.read_text().strip()


# ---------------------------------------------------------------------------
# 2. The database
# SQLite through the standard library: the schema (each table names the section that owns
# it), its migrations, the Store (one writer thread, one reader thread, checkpoints on a
# third: never the event loop), the message SELECT every section shares, and revisions.
# A capability's own queries live in its section.
# ---------------------------------------------------------------------------


# The search index: an external-content FTS5 table over messages.text (it stores only the
# index; the text stays in messages). Words are split as Unicode says, accents folded.
SEARCH_INDEX = ("CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5("
                "text, content='messages', content_rowid='id', "
                "tokenize='unicode61 remove_diacritics 2')")


SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL,
    username_key  TEXT NOT NULL UNIQUE,  -- casefolded: names are unique ignoring case
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    username_skeleton TEXT NOT NULL DEFAULT '',  -- what the name looks like (name_skeleton)
    -- a guest: no password, a session of GUEST_IDLE_HOURS
    is_guest      INTEGER NOT NULL DEFAULT 0,
    deactivated_at TEXT,  -- set by the operator (python chat.py users deactivate): no way in
    last_seen_at  TEXT,  -- logged in or out, a request, an open page: the newest (seen_now)
    is_bot        INTEGER NOT NULL DEFAULT 0  -- a room's bot (section 14): never logs in
);
CREATE TABLE IF NOT EXISTS login_links (  -- python chat.py users login-link: one use, one hour
    token_hash TEXT PRIMARY KEY,  -- sha256 of the link's token: the database never holds the link
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS users_by_skeleton ON users(username_skeleton);
CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,          -- random; the signed cookie carries it
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL DEFAULT ''  -- refreshed at most hourly: idle sessions end
);
-- An account's sessions, oldest first.
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions(user_id, created_at);
-- Ended sessions, found without a scan.
CREATE INDEX IF NOT EXISTS sessions_by_last_seen ON sessions(last_seen_at);
CREATE INDEX IF NOT EXISTS sessions_by_age ON sessions(created_at);
CREATE TABLE IF NOT EXISTS rooms (
    id         INTEGER PRIMARY KEY,
    code       TEXT NOT NULL UNIQUE,  -- the readable part of its name, then 13 random characters
    name       TEXT NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at TEXT NOT NULL,
    revision   INTEGER NOT NULL DEFAULT 0,  -- advanced by every change its pages must see
    state_revision INTEGER NOT NULL DEFAULT 0,  -- that of the newest change to the state below
    locked     INTEGER NOT NULL DEFAULT 0,  -- only its owners may post
    slow_mode  INTEGER NOT NULL DEFAULT 0,  -- seconds between a member's messages; 0: off
    -- its messages up to this id were cleared (gone, or going)
    cleared_up_to INTEGER NOT NULL DEFAULT 0,
    cleared_revision INTEGER NOT NULL DEFAULT 0,  -- and the revision of that clearing
    deleted_at TEXT,  -- deleted: not found any more, while its rows are removed
    pinned_id  INTEGER,  -- the message its owners pinned (section 13, class tools)
    questions_anonymous INTEGER NOT NULL DEFAULT 0  -- "Ask without my name" offered
);
CREATE TABLE IF NOT EXISTS room_codes (  -- a room's earlier codes: they still lead its members in
    code    TEXT PRIMARY KEY,
    room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS removals (  -- people an owner removed from a room, until let back in
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    removed_by INTEGER NOT NULL,
    removed_at TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS room_members (
    room_id       INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    joined_at     TEXT NOT NULL,
    last_visit_at TEXT NOT NULL,
    last_read_id  INTEGER NOT NULL DEFAULT 0,  -- the newest message the user had seen
    -- 'owner' (the room's creator, and whom owners make so) or 'member'
    role          TEXT NOT NULL DEFAULT 'member',
    PRIMARY KEY (room_id, user_id)
);
-- A home page: a user's rooms, last visited first.
CREATE INDEX IF NOT EXISTS memberships_by_user ON room_members(user_id, last_visit_at);
CREATE TABLE IF NOT EXISTS messages (
    id         INTEGER PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    text       TEXT NOT NULL CHECK (length(text) BETWEEN 1 AND 4000),
    created_at TEXT NOT NULL,
    -- the composer's one-time key: a message resent after an outage is stored once
    client_key TEXT,
    revision   INTEGER NOT NULL DEFAULT 0,  -- the room's revision when it was sent or last changed
    edited_at  TEXT,
    html       TEXT,  -- the text rendered (render_text); NULL: not yet (render_old_messages)
    -- the message of the same room it answers (its quote shows that one as it is now)
    reply_to   INTEGER,
    kind       TEXT NOT NULL DEFAULT 'message',  -- or 'poll', 'question' (section 13)
    anonymous  INTEGER NOT NULL DEFAULT 0,  -- a question asked without its author's name shown
    answered_at TEXT  -- a question an owner marked answered
);
-- Newest page of a room = a backwards walk of this index: as fast at 100,000 rows as at 10.
CREATE INDEX IF NOT EXISTS messages_by_room ON messages(room_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_key ON messages(user_id, client_key)
    WHERE client_key IS NOT NULL;
-- Catch-up: what changed in a room since revision N.
CREATE INDEX IF NOT EXISTS messages_by_revision ON messages(room_id, revision);
CREATE INDEX IF NOT EXISTS messages_by_reply ON messages(reply_to) WHERE reply_to IS NOT NULL;
-- Who a message mentions (@name): their home page marks the room.
CREATE TABLE IF NOT EXISTS mentions (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    room_id    INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mentions_by_message ON mentions(message_id);
CREATE TABLE IF NOT EXISTS reactions (  -- one row per message, person and emoji (REACTIONS)
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    emoji      TEXT NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reactions_by_user ON reactions(user_id);
CREATE TABLE IF NOT EXISTS deletions (  -- a deleted message leaves only its id behind
    message_id INTEGER PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    revision   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deletions_by_revision ON deletions(room_id, revision);
-- A room's revision is that of its newest change: a new, edited or deleted message carries
-- the room's next revision (NEXT_REVISION, below) and these record it in the room.
CREATE TRIGGER IF NOT EXISTS messages_advance_room AFTER INSERT ON messages
BEGIN UPDATE rooms SET revision = NEW.revision WHERE id = NEW.room_id; END;
CREATE TRIGGER IF NOT EXISTS edits_advance_room AFTER UPDATE OF revision ON messages
BEGIN UPDATE rooms SET revision = NEW.revision WHERE id = NEW.room_id; END;
CREATE TRIGGER IF NOT EXISTS deletions_advance_room AFTER INSERT ON deletions
BEGIN UPDATE rooms SET revision = NEW.revision WHERE id = NEW.room_id; END;
-- Search: FTS5's index of every message's text. New messages are indexed in batches, up to
-- search_state.indexed_up_to (index_new_messages: a second behind at most); these triggers
-- keep what is indexed in step with edits and deletes (a cleared or deleted room's rows too).
{SEARCH_INDEX};
CREATE TABLE IF NOT EXISTS search_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_up_to INTEGER NOT NULL  -- every message up to this id is in messages_fts
);
INSERT OR IGNORE INTO search_state (id, indexed_up_to) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS edits_indexed AFTER UPDATE OF text ON messages
WHEN OLD.id <= (SELECT indexed_up_to FROM search_state) BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', OLD.id, OLD.text);
    INSERT INTO messages_fts (rowid, text) VALUES (NEW.id, NEW.text);
END;
CREATE TRIGGER IF NOT EXISTS deletions_indexed AFTER DELETE ON messages
WHEN OLD.id <= (SELECT indexed_up_to FROM search_state)
BEGIN INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', OLD.id, OLD.text); END;
-- Sending moves your read marker: what you wrote is read, and so is what came before it.
CREATE TRIGGER IF NOT EXISTS messages_read_by_author AFTER INSERT ON messages
BEGIN
    UPDATE room_members SET last_read_id = NEW.id
    WHERE room_id = NEW.room_id AND user_id = NEW.user_id;
END;
-- Bots (section 14): a bot is a user (users.is_bot) of one room, posting with a token.
CREATE TABLE IF NOT EXISTS bots (
    user_id     INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    room_id     INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    token_hash  TEXT UNIQUE,  -- sha256 of its token (NULL once removed): never the token
    webhook_url TEXT,  -- called when a message mentions it
    created_by  INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    removed_at  TEXT,  -- its token stopped; its messages stay, still the bot's
    last_call   TEXT,  -- how its webhook's latest call went ("timeout after 7 s"), for owners
    last_call_at TEXT,
    logged_at   TEXT   -- its latest failure in the log (once a minute at most)
);
CREATE INDEX IF NOT EXISTS bots_by_room ON bots(room_id);
-- Class tools (section 13): a poll is a message (its text the question) with options and one
-- vote per person; a question is a message with votes of its own.
CREATE TABLE IF NOT EXISTS polls (
    message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    closed_at  TEXT  -- voting ended: the result stays
);
CREATE TABLE IF NOT EXISTS poll_options (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,  -- 1, 2, ... as the owner wrote them
    text       TEXT NOT NULL,
    PRIMARY KEY (message_id, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS poll_votes (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    PRIMARY KEY (message_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS question_votes (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (message_id, user_id)
) WITHOUT ROWID;
-- A room's questions, open (answered_at NULL) and answered, for its Questions list.
CREATE INDEX IF NOT EXISTS questions_by_room ON messages(room_id, answered_at, id)
    WHERE kind = 'question';
-- How far render_old_messages (section 9) has come with re-rendering the messages the
-- renderer of another RENDERER_VERSION rendered (or none did: an older database).
CREATE TABLE IF NOT EXISTS render_state (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    version        INTEGER NOT NULL,  -- of the renderings up to `target`
    rendered_up_to INTEGER NOT NULL,  -- every message up to this id is rendered by it
    target         INTEGER NOT NULL   -- the newest id when this version started
);
INSERT OR IGNORE INTO render_state VALUES (1, 0, 0, 0);
-- The ids handed out so far (INSERT_MESSAGE and insert_room take the next): an id is never
-- handed out twice, even once every row that had it is gone (a deleted room's newest messages).
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,  -- 'message', 'room'
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) VALUES ('message', 0), ('room', 0);
-- Secrets of this database's own: 'pseudonyms' keys the names a page may know a person by
-- without knowing who they are (pseudonym(): a voter, an anonymous asker; section 13).
CREATE TABLE IF NOT EXISTS keys (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO keys (name, value) VALUES ('pseudonyms', randomblob(32));
CREATE TRIGGER IF NOT EXISTS messages_counted AFTER INSERT ON messages
BEGIN UPDATE counters SET value = NEW.id WHERE name = 'message' AND value < NEW.id; END;
CREATE TRIGGER IF NOT EXISTS rooms_counted AFTER INSERT ON rooms
BEGIN UPDATE counters SET value = NEW.id WHERE name = 'room' AND value < NEW.id; END;
""".replace("{SEARCH_INDEX}", SEARCH_INDEX)


# Upgrades for a chat.db made by an earlier release, oldest first; PRAGMA user_version
# counts the ones a database has had. A new database gets SCHEMA as it is and skips them.
MIGRATIONS = [
    ["ALTER TABLE messages ADD COLUMN client_key TEXT"],
    ["ALTER TABLE users ADD COLUMN username_skeleton TEXT NOT NULL DEFAULT ''",
     lambda db: db.executemany("UPDATE users SET username_skeleton = ? WHERE id = ?",
                               [(name_skeleton(name), uid)
                                for uid, name in db.execute("SELECT id, username FROM users")]),
     "ALTER TABLE sessions ADD COLUMN last_seen_at TEXT NOT NULL DEFAULT ''",
     "UPDATE sessions SET last_seen_at = created_at"],
    # Edits, deletes and unread markers: existing messages are revision = id, as read.
    ["ALTER TABLE rooms ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE messages ADD COLUMN revision INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE messages ADD COLUMN edited_at TEXT",
     "ALTER TABLE room_members ADD COLUMN last_read_id INTEGER NOT NULL DEFAULT 0",
     "UPDATE messages SET revision = id",
     "UPDATE rooms SET revision = "
     "(SELECT coalesce(max(id), 0) FROM messages WHERE room_id = rooms.id)",
     "UPDATE room_members SET last_read_id = "
     "(SELECT coalesce(max(id), 0) FROM messages WHERE room_id = room_members.room_id)"],
    ["ALTER TABLE users ADD COLUMN is_guest INTEGER NOT NULL DEFAULT 0"],
    # Skeletons that take case into account (name_skeleton); the sessions index gains its
    # second column (SCHEMA makes it again).
    [lambda db: db.executemany("UPDATE users SET username_skeleton = ? WHERE id = ?",
                               [(name_skeleton(name), uid)
                                for uid, name in db.execute("SELECT id, username FROM users")]),
     "DROP INDEX IF EXISTS sessions_by_user"],
    # Owners: a room's creator owns it.
    ["ALTER TABLE room_members ADD COLUMN role TEXT NOT NULL DEFAULT 'member'",
     "UPDATE room_members SET role = 'owner' "
     "WHERE user_id = (SELECT created_by FROM rooms WHERE id = room_id)"],
    # Running a room and the server: its settings, clearing and deleting it, removing people,
    # closing accounts (the new tables are SCHEMA's).
    ["ALTER TABLE rooms ADD COLUMN locked INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE rooms ADD COLUMN slow_mode INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE rooms ADD COLUMN cleared_up_to INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE rooms ADD COLUMN cleared_revision INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE rooms ADD COLUMN deleted_at TEXT",
     "ALTER TABLE users ADD COLUMN deactivated_at TEXT"],
    # Replies. (The search index, its triggers, and the mentions and reactions tables are
    # SCHEMA's; the messages already there are indexed in the background, index_new_messages.)
    ["ALTER TABLE messages ADD COLUMN reply_to INTEGER"],
    # Names that end in punctuation look like those that do not (name_skeleton). Messages are
    # Markdown, rendered when stored (messages.html; older ones by render_old_messages).
    # Polls, a pinned message and questions; bots (their tables are SCHEMA's).
    # One word for a room's code (it was "slug"). Ids are never handed out twice (counters):
    # an id a deleted room's messages had was, and the search index skipped those messages, so
    # it is rebuilt. A catch-up sends a room's state again if it changed (state_revision).
    ["ALTER TABLE rooms RENAME COLUMN slug TO code",
     lambda db: db.execute("ALTER TABLE room_codes RENAME COLUMN slug TO code") if db.execute(
         "SELECT 1 FROM sqlite_master WHERE name = 'room_codes'").fetchone() else None,
     "ALTER TABLE rooms ADD COLUMN state_revision INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE messages ADD COLUMN html TEXT",
     "ALTER TABLE users ADD COLUMN last_seen_at TEXT",
     "ALTER TABLE rooms ADD COLUMN pinned_id INTEGER",
     "ALTER TABLE rooms ADD COLUMN questions_anonymous INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'message'",
     "ALTER TABLE messages ADD COLUMN anonymous INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE messages ADD COLUMN answered_at TEXT",
     "ALTER TABLE users ADD COLUMN is_bot INTEGER NOT NULL DEFAULT 0",
     "UPDATE users SET last_seen_at = "
     "(SELECT max(last_seen_at) FROM sessions WHERE user_id = users.id)",
     "UPDATE rooms SET state_revision = revision",
     lambda db: count_ids_so_far(db),
     lambda db: db.executemany("UPDATE users SET username_skeleton = ? WHERE id = ?",
                               [(name_skeleton(name), user_id) for user_id, name
                                in db.execute("SELECT id, username FROM users")])],
]


def count_ids_so_far(db: sqlite3.Connection) -> None:
    """The counters start past every id an older database has had (a deleted message's too),
    and its search index is rebuilt: an id handed out twice was skipped by the indexer."""
    def has(table: str) -> bool:
        """Whether the database has this table yet."""
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                          (table,)).fetchone() is not None

    newest = max(db.execute(f"SELECT coalesce(max({column}), 0) FROM {table}").fetchone()[0]
                 for table, column in (("messages", "id"), ("deletions", "message_id"))
                 if has(table))
    rooms = db.execute("SELECT coalesce(max(id), 0) FROM rooms").fetchone()[0]
    db.execute("CREATE TABLE IF NOT EXISTS counters "
               "(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID")
    db.executemany("INSERT INTO counters (name, value) VALUES (?, ?)",
                   [("message", newest), ("room", rooms)])
    if has("messages_fts"):
        db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
        db.execute("UPDATE search_state SET indexed_up_to = ?",
                   (db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0],))


def migrate(db: sqlite3.Connection) -> None:
    """Bring the database to SCHEMA: upgrade an old one step by step, then create what is
    missing, all in one transaction. Workers that start together on a new file (uvicorn
    --workers) take turns: the second finds the first one's work done, never half done."""
    with transaction(db):
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchone() is None:
            version = len(MIGRATIONS)  # a new database: SCHEMA is already the newest shape
        for step in MIGRATIONS[version:]:
            for statement in step:
                db.execute(statement) if isinstance(statement, str) else statement(db)
        # IF NOT EXISTS throughout: adds only what is missing
        for statement in schema_statements(SCHEMA):
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def schema_statements(script: str) -> Iterator[str]:
    """The statements of an SQL script one by one (executescript would commit first)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Any:
    """All or nothing: the block's writes commit together or not at all."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def reading(db: sqlite3.Connection) -> Any:
    """One snapshot: the block's reads all see the database as it was at its first read."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        db.execute("COMMIT")


ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"  # every time in the database: UTC, to the second, sorts as text


def utc_now() -> str:
    """The time now, as the database keeps times (ISO_SECONDS)."""
    return datetime.now(timezone.utc).strftime(ISO_SECONDS)


def utc_ago(**delta: float) -> str:
    """The time `delta` ago (timedelta's keywords: days=, hours=...), as the database keeps
    times."""
    return (datetime.now(timezone.utc) - timedelta(**delta)).strftime(ISO_SECONDS)


def pseudonym(key: bytes, purpose: str, room_id: int, user_id: int) -> str:
    """How a page may know one person in one room, for one purpose ('vote': their votes;
    'ask': their anonymous questions), without learning who they are: an HMAC of the three
    keyed by the database's own secret (SCHEMA's keys), the same on every worker and after a
    restart, and nothing to guess a user id from. The room page's own style uses the viewer's
    to mark their votes and questions (section 13)."""
    return hmac.new(key, f"{purpose} {room_id} {user_id}".encode(), "sha256").hexdigest()[:12]


def add_sql_functions(db: sqlite3.Connection) -> bytes:
    """Give a connection the SQL functions the queries below call (pseudonym(), keyed by
    this database's own secret) and answer the key. Every connection needs them: the Store's,
    and any other that runs these queries (bench.py, a test standing in for another worker)."""
    key = db.execute("SELECT value FROM keys WHERE name = 'pseudonyms'").fetchone()[0]
    db.create_function("pseudonym", 3, functools.partial(pseudonym, key), deterministic=True)
    return key


class Store:
    """The database threads. The queries below are plain functions of a connection;
    read() and write() run one on the right thread and await its result."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One writer thread (SQLite has one writer at a time anyway) and one reader
        # thread with its own connection: in WAL mode readers never wait for a write,
        # so a slow commit does not hold up page loads, catch-ups or handshakes.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
        # And one for searches, which may read far more than a page: they never make a page
        # load, a catch-up or a handshake wait.
        self._searcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-search")
        self._write_db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._search_db: sqlite3.Connection | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._waiting: dict[Callable, list[tuple[Any, asyncio.Future]]] = {}  # for the next commit
        self._committing: set[Callable] = set()  # (write_together)
        self.key = b""  # the database's key for pseudonyms (read as it opens)

    async def read(self, method: Callable[..., Any], *args: Any) -> Any:
        """`method(db, *args)` on the reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, method,
                                                                self._read_db, *args)

    async def search(self, method: Callable[..., Any], *args: Any) -> Any:
        """`method(db, *args)` on the search thread."""
        return await asyncio.get_running_loop().run_in_executor(self._searcher, method,
                                                                self._search_db, *args)

    async def write(self, method: Callable[..., Any], *args: Any) -> Any:
        """`method(db, *args)` on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, method,
                                                                self._write_db, *args)

    async def write_together(self, method: Callable[[sqlite3.Connection, list], list],
                             item: Any) -> Any:
        """Group commit: `method(db, items)` writes a list of items in one transaction and
        answers each (an exception answers its own item only). A lone item goes to the writer at
        once; items that arrive while a commit of the same method is under way wait for it to
        end, then all of them go in one transaction and come back in one trip, so the hand-off
        and the commit are paid per batch, not per item (a message: add_messages)."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(method, []).append((item, done))
        if method not in self._committing:
            self._commit_waiting(method)
        return await done

    def _commit_waiting(self, method: Callable[[sqlite3.Connection, list], list]) -> None:
        batch = self._waiting.pop(method)
        self._committing.add(method)
        written = asyncio.get_running_loop().run_in_executor(
            self._writer, method, self._write_db, [item for item, _ in batch])

        def hand_back(finished: asyncio.Future) -> None:
            """Answer each item of the batch; then commit the ones that waited meanwhile."""
            self._committing.discard(method)
            for n, (_, done) in enumerate(batch):
                if done.done():  # its sender went away meanwhile
                    continue
                answer = finished.exception() or finished.result()[n]
                if isinstance(answer, BaseException):
                    done.set_exception(answer)
                else:
                    done.set_result(answer)
            if self._waiting.get(method):
                self._commit_waiting(method)

        written.add_done_callback(hand_back)

    def pseudonym(self, purpose: str, room_id: int, user_id: int) -> str:
        """How pages know this person in this room for `purpose` (pseudonym())."""
        return pseudonym(self.key, purpose, room_id, user_id)

    def write_soon(self, method: Callable[..., Any], *args: Any) -> None:
        """Queue a write that nobody waits for: bookkeeping a page should not be held up by."""
        def report(done: Any) -> None:
            """Log the write if it failed: nobody else hears of it."""
            if done.exception() is not None:
                log.warning("background write failed: %r", done.exception())

        self._writer.submit(method, self._write_db, *args).add_done_callback(report)

    async def open(self) -> None:
        """Connect the writer (which migrates the database), the reader and the searcher, and
        start the checkpoint thread."""
        loop = asyncio.get_running_loop()
        self._write_db = await loop.run_in_executor(self._writer, self._connect, True)
        self._read_db = await loop.run_in_executor(self._reader, self._connect, False)
        self._search_db = await loop.run_in_executor(self._searcher, self._connect, False)
        self._checkpointer = threading.Thread(target=self._checkpoint_every_second,
                                              name="sqlite-checkpoint", daemon=True)
        self._checkpointer.start()

    async def close(self) -> None:
        """Wait for every queued write to commit, then close."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._write_db.close)
        await loop.run_in_executor(self._reader, self._read_db.close)
        await loop.run_in_executor(self._searcher, self._search_db.close)
        for thread in (self._writer, self._reader, self._searcher):
            thread.shutdown(wait=True)
        self._stopping.set()
        self._checkpointer.join()

    def _connect(self, for_writing: bool) -> sqlite3.Connection:
        """A connection to the database (the writer's also sets WAL mode and migrates). The file
        is made, or kept, readable by this user only: it holds password hashes and session ids
        (SQLite gives its -wal and -shm files the same mode)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if for_writing:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            if self.path.stat().st_mode & 0o077:
                os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA foreign_keys=ON")
        if for_writing:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit is a write to the WAL file with no fsync, so it
            # survives the process dying; a power cut may lose the last commits since the
            # latest checkpoint, never the file's integrity (README, "Guarantees").
            db.execute("PRAGMA synchronous=NORMAL")
            # The fsyncs happen at checkpoints, which run on a thread of their own (below),
            # never inside a commit that a chat message is waiting for.
            db.execute("PRAGMA wal_autocheckpoint=0")
            # A deleted message's text is overwritten, not left behind.
            db.execute("PRAGMA secure_delete=ON")
            migrate(db)
        # (SCHEMA makes the key: the writer, which migrates, connects first)
        self.key = add_sql_functions(db)
        return db

    def _checkpoint_every_second(self) -> None:
        db = self._connect(for_writing=False)
        while not self._stopping.wait(1.0):
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a tidy file behind
        db.close()


# A message as pages show it: its row, its author's name, the message it answers as that is
# now (NULL text: deleted or cleared), whom it mentions and its reactions ("id name" and
# "emoji id name" lines). Every query for messages starts so.
SELECT_MESSAGES = (
    "SELECT m.id, m.room_id, m.user_id, m.text, m.html, m.created_at, m.edited_at, m.revision, "
    "m.reply_to, m.kind, m.anonymous, m.answered_at, "
    # An anonymous question's author is "Anonymous" to a page, which tells the asker's own by
    # a pseudonym (author: anybody else's, the user id); only `asker` names them (section 13).
    "iif(m.anonymous, 'Anonymous', u.username) AS username, "
    "iif(m.anonymous, 0, u.is_guest) AS is_guest, u.is_bot, "
    "iif(m.anonymous, pseudonym('ask', m.room_id, m.user_id), m.user_id) AS author, "
    "iif(m.anonymous, u.username, NULL) AS asker, "
    # a poll's options with their voters' pseudonyms; a question's voters' (section 13)
    "CASE m.kind WHEN 'poll' THEN (SELECT json_object('closed', p.closed_at, 'options', "
    " (SELECT json_group_array(json_array(o.position, o.text, (SELECT "
    "   group_concat(pseudonym('vote', m.room_id, v.user_id), ' ') FROM poll_votes v "
    "   WHERE v.message_id = o.message_id AND v.position = o.position))) "
    "  FROM poll_options o WHERE o.message_id = m.id)) "  # (poll_of puts them in order)
    "  FROM polls p WHERE p.message_id = m.id) "
    " WHEN 'question' THEN (SELECT group_concat(pseudonym('vote', m.room_id, v.user_id), ' ') "
    "  FROM question_votes v WHERE v.message_id = m.id) END AS votes, "
    "q.text AS quote_text, "
    "iif(q.anonymous, 'Anonymous', (SELECT username FROM users WHERE id = q.user_id)) "
    "AS quote_author, "
    "(SELECT group_concat(x.user_id || ' ' || xu.username, char(10))"
    " FROM mentions x JOIN users xu ON xu.id = x.user_id "
    " WHERE x.message_id = m.id) AS mentioned, "
    "(SELECT group_concat(r.emoji || ' ' || r.user_id || ' ' || ru.username, char(10))"
    " FROM reactions r "
    " JOIN users ru ON ru.id = r.user_id WHERE r.message_id = m.id) AS reactions "
    "FROM messages m JOIN users u ON u.id = m.user_id "
    "LEFT JOIN messages q ON q.id = m.reply_to"
    " AND q.id > (SELECT cleared_up_to FROM rooms WHERE id = m.room_id)")


# A message still in its room: not among those an owner cleared (while they are removed).
NOT_CLEARED = "m.id > (SELECT cleared_up_to FROM rooms WHERE id = m.room_id)"


# Revisions. A room's revision counts the changes its pages must see: every one moves it on by
# one, and every frame that shows a change carries the new number (room_revision in
# _fragments.html), which the page sends back when its socket reopens (catch-up). So a live
# page, a page that was offline and a page on another worker all end at the same state.
# A message's row carries the revision of its latest change (sent, edited, reacted to, its
# quote changed); a deleted one leaves its id and revision in `deletions`; the triggers in
# SCHEMA record the message's revision in its room. A change to the room itself (a lock, a
# new code, an owner) moves the room on directly (advance_room).

# The room's next revision, in a statement whose ?1 is the room's id.
NEXT_REVISION = "(SELECT revision + 1 FROM rooms WHERE id = ?1)"


def advance_room(db: sqlite3.Connection, room_id: int, state: bool = False) -> int:
    """Move the room on by one revision, inside the caller's transaction; the new revision.
    `state`: the change is to the room's state (its lock, slow mode, owners, code), which a
    catch-up then sends again (rooms.state_revision)."""
    return db.execute("UPDATE rooms SET revision = revision + 1, state_revision = CASE WHEN ?2 "
                      "THEN revision + 1 ELSE state_revision END WHERE id = ?1 RETURNING revision",
                      (room_id, state)).fetchall()[0][0]


def room_revision(db: sqlite3.Connection, room_id: int) -> int:
    """The revision of the room's newest change (0 for a room with none)."""
    return db.execute("SELECT revision FROM rooms WHERE id = ?", (room_id,)).fetchone()[0]


def changes_since(db: sqlite3.Connection, room_id: int, revision: int,
                  limit: int) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    """What changed in a room after `revision`: up to `limit` new or edited messages in id
    order, and up to `limit` deletions (`message_id`, `revision`)."""
    changed = db.execute(
        f"{SELECT_MESSAGES} WHERE m.room_id = ? AND m.revision > ? AND {NOT_CLEARED} "
        "ORDER BY m.revision LIMIT ?",
        (room_id, revision, limit),
    ).fetchall()
    deleted = db.execute("SELECT message_id, revision FROM deletions "
                         "WHERE room_id = ? AND revision > ? ORDER BY revision LIMIT ?",
                         (room_id, revision, limit)).fetchall()
    return sorted(changed, key=lambda m: m["id"]), deleted


# ---------------------------------------------------------------------------
# 3. Guards
# What every input passes before it is believed: text cleaning, look-alike names, lengths,
# the one refusal (Refused), and the rate and failure limits (their Redis twins: section 15).
# ---------------------------------------------------------------------------


# Unicode's control characters (category Cc: U+0000-U+001F, U+007F-U+009F) but newline and tab.
CONTROL_CHARACTERS = (dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)])
                      | {ord("\n"): "\n", ord("\t"): "\t"})


def clean_text(value: str) -> str:
    """Text as it may be stored: no lone surrogates, no control characters but newline and tab."""
    return value.encode("utf-8", "replace").decode("utf-8").translate(CONTROL_CHARACTERS)


# Letters that draw nothing (Hangul fillers, the blank Braille cell): like the format
# characters (zero-width spaces and joiners, bidi overrides), they let one name pass for another.
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def has_invisible(name: str) -> bool:
    """Whether the name has a character that draws nothing: a blank letter, a format
    character, a private-use or an unassigned one."""
    return any(ch in BLANK_LETTERS or unicodedata.category(ch) in ("Cf", "Co", "Cn") for ch in name)


@functools.cache
def confusable_prototypes() -> dict[str, str]:
    """Unicode's confusables.txt (UTS #39, vendored in data/): each character that looks
    like another, mapped to the one it looks like."""
    prototypes = {}
    for line in (HERE / "data" / "confusables.txt").read_text(encoding="utf-8-sig").splitlines():
        fields = line.split("#", 1)[0].split(";")
        if len(fields) >= 2:
            source, target = ("".join(chr(int(code, 16)) for code in field.split())
                              for field in fields[:2])
            prototypes[source] = target
    return prototypes


def name_skeleton(name: str) -> str:
    """UTS #39's skeleton of a name, case taken into account: two names with the same
    skeleton look alike (Cyrillic "аdmin" and Latin "admin", "rn" and "m"), so only one may
    exist. The name is mapped, casefolded and mapped again, so that capital I meets small l
    ("AI", "Al") and zero meets O ("0scar", "Oscar") before case is set aside. Punctuation and
    spaces at either end are set aside too: "Maria Lopez." looks like "Maria Lopez"."""
    prototypes = confusable_prototypes()

    def skeleton(text: str) -> str:
        """The text with each character mapped to the one it looks like (in NFD)."""
        return unicodedata.normalize("NFD", "".join(prototypes.get(ch, ch)
                                                    for ch in unicodedata.normalize("NFD", text)))

    bare = unicodedata.normalize("NFKC", name).strip(NAME_EDGES) or name
    return skeleton(skeleton(bare).casefold())


# What a name may have at either end that does not change how it looks: spaces, dots,
# apostrophes, hyphens, underscores and the like.
NAME_EDGES = " .'’-_+@\u00b7"


def too_long(what: str, limit: int, value: str) -> str | None:
    """The refusal for a value over its limit, counted as the server counts (characters,
    not the browser's UTF-16 units: an emoji is one), so nothing is ever cut short unsaid."""
    if len(value) > limit:
        return f"{what} are at most {limit:,} characters; yours has {len(value):,}."
    return None


class Refused(Exception):
    """Whatever the chat will not do, with the words that say why (shown to the person asking)
    and the HTTP status that goes with them. It is answered as the request came (section 5's
    refusal answers): a page with the input kept, an htmx fragment, or a push on the socket;
    anywhere else, the error page (http_error)."""

    def __init__(self, text: str, status_code: int = 400, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.status_code = status_code
        self.retry_after = retry_after  # (a 429's seconds to wait, where a client is told them)

    @property
    def detail(self) -> str:
        """The words, as the error page shows them (Starlette's HTTPException calls them so)."""
        return str(self)


def whole_number(value: str) -> int | None:
    """A whole number from a URL, a form or a frame (an id, a revision), or None: ASCII digits
    that SQLite can hold."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


def could_not_save(what: str, problem: sqlite3.Error) -> str:
    """The words for a write the database refused (a full disk, a lock held too long): the
    transaction rolled back, so nothing was changed, and the person's input is kept."""
    log.warning("%s: the database refused a write: %r", what, problem)
    return (f"{what} just now: the server could not save it (its disk may be full). "
            "Nothing was changed; try again.")


def limit_key(key: Any) -> str:
    """What a limiter counts under: a fixed-length digest of the key (a username, an address,
    a user id), so no key an attacker picks can grow a limiter's table, or Redis, by its size."""
    return hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest()


class RateLimiter:
    """At most `limit` events per key in a sliding `window` of seconds; limit 0 means no
    limit. allow() counts an event as it asks, before the work it guards, so a burst that
    arrives all at once is counted one by one."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.clock = time.monotonic  # (tests turn it)
        self._events: dict[str, deque[float]] = {}  # least recently counted key first

    async def allow(self, key: Any) -> bool:
        """Count one event if the key is under its limit; say whether it was."""
        if not self.limit:
            return True
        return self._count(limit_key(key), add=True)

    async def retry_after(self, key: Any) -> float:
        """Seconds until the key is under its limit again (0: it is now)."""
        events = self._events.get(limit_key(key))
        if not self.limit or not events or len(events) < self.limit:
            return 0.0
        return max(0.0, events[-self.limit] + self.window - self.clock())

    def _count(self, key: str, add: bool) -> bool:
        now = self.clock()
        horizon = now - self.window
        events = self._events.pop(key, None) or deque()
        while events and events[0] <= horizon:
            events.popleft()
        allowed = len(events) < self.limit
        if allowed and add:
            events.append(now)
        if events:
            self._events[key] = events  # re-inserted: now the most recently counted
        # Forget a couple of keys whose events have all expired, oldest first: the table
        # stays as small as the set of recent keys without ever sweeping all of it.
        for stale, stale_events in list(itertools.islice(self._events.items(), 2)):
            if stale_events[-1] > horizon:
                break
            del self._events[stale]
        return allowed


class TooManyFailures(Refused):
    """A key is at its limit of failures; `retry_after` says in how many seconds it is not."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"Too many failed tries. Try again {in_plain_words(retry_after)}.", 429)
        self.retry_after = retry_after


def in_plain_words(seconds: float) -> str:
    """"in a minute", "in 14 minutes", "in an hour": when to try again."""
    minutes = max(1, -(-int(seconds) // 60))
    return ("in a minute" if minutes == 1 else "in an hour" if minutes == 60
            else f"in {minutes} minutes")


@dataclass
class Attempt:
    """One guarded try (a login, a room code): fail() if it turned out to be a failure."""

    failed: bool = False

    def fail(self) -> None:
        """Mark the attempt a failure: it counts against each of its keys."""
        self.failed = True


class FailureLimit(RateLimiter):
    """At most `limit` failures per key in a sliding `window` of seconds (limit 0: none).
    Only failures count, not attempts: an attempt waits while the ones still being checked
    could take a key past its limit, and goes ahead as soon as they cannot. So 25 right
    passwords sent at once from one address all get in, and of 200 wrong ones sent at once
    no more than `limit` are ever checked."""

    MAX_WAIT = 10.0  # seconds an attempt waits for others to be checked before it is turned away

    def __init__(self, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self._in_flight: Counter[str] = Counter()
        self._changed: asyncio.Condition | None = None  # (made in the event loop, at first use)

    @contextlib.asynccontextmanager
    async def attempt(self, *keys: Any) -> AsyncIterator[Attempt]:
        """Guard one attempt under each key: TooManyFailures if any is at its limit."""
        attempt = Attempt()
        if not self.limit:
            yield attempt
            return
        leave = await self._enter([limit_key(key) for key in keys])
        try:
            yield attempt
        finally:
            await leave(attempt.failed)

    async def check(self, *keys: Any) -> None:
        """TooManyFailures if any key is at its limit, for an attempt already known to succeed
        (a handshake with a real room code): it cannot fail, so it need not be counted or wait
        for the attempts still being checked (with Redis: one round trip instead of two)."""
        if self.limit and (blocked := [key for key in map(limit_key, keys)
                                       if not self._count(key, add=False)]):
            raise TooManyFailures(self._retry_after(blocked))

    async def _enter(self, keys: list[str]) -> Callable[[bool], Awaitable[None]]:
        """Wait for the keys to have room for one more attempt; what to call when it is over."""
        self._changed = self._changed or asyncio.Condition()
        deadline = self.clock() + self.MAX_WAIT
        async with self._changed:
            while True:
                if blocked := [key for key in keys if not self._count(key, add=False)]:
                    raise TooManyFailures(self._retry_after(blocked))
                if all(len(self._events.get(key, ())) + self._in_flight[key] < self.limit
                       for key in keys):
                    self._in_flight.update(keys)
                    return functools.partial(self._leave, keys)
                with contextlib.suppress(TimeoutError):  # others are being checked: wait for them
                    await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - self.clock()))
                if self.clock() >= deadline:
                    raise TooManyFailures(5)

    async def _leave(self, keys: list[str], failed: bool) -> None:
        async with self._changed:
            self._in_flight.subtract(keys)
            self._in_flight += Counter()  # (drops the keys back at zero)
            if failed:
                for key in keys:
                    self._events.setdefault(key, deque()).append(self.clock())
            self._changed.notify_all()

    def _retry_after(self, keys: list[str]) -> float:
        """Seconds until every key is under its limit again (the oldest failure that counts
        expires)."""
        now = self.clock()
        return max(self._events[key][-self.limit] + self.window - now for key in keys)


# ---------------------------------------------------------------------------
# 4. Who is asking
# Sessions (a random id in a signed cookie, which the database can end), the logged-in user,
# CSRF, safe redirects, the peer's address and forms.
# ---------------------------------------------------------------------------


MAX_FORM_BYTES = 64 * 1024


SESSION_IDLE_DAYS = 14  # a session unused this long has ended


SESSION_MAX_DAYS = 30  # and none lives longer than this (the cookie's own lifetime)


GUEST_IDLE_HOURS = 12  # a guest's session (the only way in to a guest account) ends sooner


MAX_SESSIONS = 100  # live sessions per account: logging in again and again ends the oldest


SESSION_SWEEP = 100  # ended sessions cleared out per login at most: bounded work on the writer


def chat_of(conn: HTTPConnection) -> Chat:
    """The Chat a request or a socket belongs to (its app's state)."""
    return conn.app.state.chat


async def current_user(conn: HTTPConnection) -> sqlite3.Row | None:
    """The logged-in user of a request or a socket, or None; their session's idle clock
    restarts (hourly at most)."""
    session_id = conn.session.get("sid")
    if not session_id:
        return None
    chat = chat_of(conn)
    store = chat.store
    user = await store.read(user_by_session, session_id, chat.settings.guests)
    if user is not None and user["session_seen"] < utc_ago(hours=1):
        store.write_soon(touch_session, session_id)  # the idle clock restarts, hourly at most
    return user


def login_required(handler: Callable[[Request], Awaitable[Response]]
                   ) -> Callable[[Request], Awaitable[Response]]:
    """The handler for logged-in users only (in request.state.user): anybody else is sent to
    the login page, and comes back here after."""
    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        """The handler's answer for a logged-in user; the login page for anybody else."""
        user = await current_user(request)
        if user is None:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/auth/login/?next={quote(here, safe='')}", status_code=303)
        request.state.user = user
        return await handler(request)

    return guarded


async def read_form(request: Request) -> dict[str, str]:
    """The POSTed fields, cleaned; 403 unless they carry this session's CSRF token."""
    form = await request.form(max_files=0, max_fields=20, max_part_size=MAX_FORM_BYTES)
    fields = {k: clean_text(v) for k, v in form.items() if isinstance(v, str)}
    expected = request.session.get("csrf", "")
    # htmx requests that carry no form of their own (Edit, Delete) send it as a header.
    given = fields.get("csrf_token") or request.headers.get("x-csrf-token", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Refused("This form has expired or did not come from this site. Go back, "
                      "reload and try again.", 403)
    return fields


def csrf_token(conn: HTTPConnection) -> str:
    """The session's CSRF token, made at its first use."""
    token = conn.session.get("csrf")
    if not token:
        token = conn.session["csrf"] = secrets.token_urlsafe(24)
    return token


def safe_next(target: str | None) -> str:
    """A same-site path to go to after login; anything else means home."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or any(ord(ch) < 32 for ch in target):
        return "/"
    return target


def client_address(conn: HTTPConnection) -> str:
    """The peer's address; a proxy's X-Forwarded-For only from CHAT_TRUSTED_PROXIES (main())."""
    return conn.client.host if conn.client else "unknown"


async def start_session(request: Request, user: sqlite3.Row) -> None:
    """Log the user in: a new session, its id in the signed cookie, nothing kept from before."""
    store = chat_of(request).store
    request.session.clear()  # a fresh CSRF token too: nothing carries over from before login
    request.session["sid"] = await store.write(create_session, user["id"])


def create_session(db: sqlite3.Connection, user_id: int) -> str:
    """A new session for the user, ending their oldest past MAX_SESSIONS; and a bounded
    batch of anybody's ended sessions cleared out, found by index, never by a scan."""
    session_id = secrets.token_urlsafe(24)
    now = utc_now()
    with transaction(db):
        db.execute("DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE user_id = ? "
                   "ORDER BY created_at DESC LIMIT -1 OFFSET ?)", (user_id, MAX_SESSIONS - 1))
        db.execute("INSERT INTO sessions (id, user_id, created_at, last_seen_at) "
                   "VALUES (?, ?, ?, ?)", (session_id, user_id, now, now))
        seen_now(db, [user_id])
        db.execute("DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                   "WHERE last_seen_at < ? OR created_at < ? LIMIT ?)",
                   (utc_ago(days=SESSION_IDLE_DAYS), utc_ago(days=SESSION_MAX_DAYS), SESSION_SWEEP))
    return session_id


# A session (s) of a user (u) is live unless it was ended (its row is gone), has been idle for
# SESSION_IDLE_DAYS (a guest's: GUEST_IDLE_HOURS), is older than SESSION_MAX_DAYS, is a
# guest's while guest mode is off, or its account was closed by the operator. Its
# parameters, ?2 to ?6, are live_session_params(); the cut-off times are computed by SQLite
# (every handshake asks this).
LIVE_SESSION = ("s.last_seen_at >= strftime(?2, 'now', CASE WHEN u.is_guest THEN ?3 ELSE ?4 END) "
                "AND s.created_at >= strftime(?2, 'now', ?5) AND (NOT u.is_guest OR ?6) "
                "AND u.deactivated_at IS NULL")


def live_session_params(guests: bool) -> tuple[Any, ...]:
    """LIVE_SESSION's parameters ?2 to ?6: the time format, the three cut-offs (a guest's idle
    time, anybody's, the longest life) and whether guest mode is on."""
    return (ISO_SECONDS, f"-{GUEST_IDLE_HOURS} hours", f"-{SESSION_IDLE_DAYS} days",
            f"-{SESSION_MAX_DAYS} days", guests)


def user_by_session(db: sqlite3.Connection, session_id: str,
                    guests: bool = True) -> sqlite3.Row | None:
    """The session's user, with `session_seen`; None once the session is not live (LIVE_SESSION;
    `guests`: whether guest mode is on)."""
    return db.execute("SELECT u.*, s.last_seen_at AS session_seen FROM sessions s "
                      f"JOIN users u ON u.id = s.user_id WHERE s.id = ?1 AND {LIVE_SESSION}",
                      (session_id, *live_session_params(guests))).fetchone()


def live_sessions(db: sqlite3.Connection, session_ids: list[str], guests: bool) -> dict[str, str]:
    """Of these sessions, the live ones (LIVE_SESSION), each with when it was last seen."""
    return dict(db.execute("SELECT s.id, s.last_seen_at FROM sessions s "
                           "JOIN users u ON u.id = s.user_id "
                           f"WHERE s.id IN (SELECT value FROM json_each(?1)) AND {LIVE_SESSION}",
                           (json.dumps(session_ids), *live_session_params(guests))).fetchall())


def touch_session(db: sqlite3.Connection, *session_ids: str) -> None:
    """The sessions were used just now: their idle clocks restart (and their users are seen)."""
    with transaction(db):
        users = [row[0] for row in db.execute(
            "UPDATE sessions SET last_seen_at = ?1 WHERE id IN (SELECT value FROM json_each(?2)) "
            "RETURNING user_id", (utc_now(), json.dumps(session_ids)))]
        seen_now(db, users)


def seen_now(db: sqlite3.Connection, user_ids: list[int]) -> None:
    """These users were seen just now (the operator's `users` says when each was last)."""
    db.execute("UPDATE users SET last_seen_at = ?1 WHERE id IN (SELECT value FROM json_each(?2))",
               (utc_now(), json.dumps(sorted(set(user_ids)))))


def seen_now_alone(db: sqlite3.Connection, user_ids: list[int]) -> None:
    """seen_now in a transaction of its own."""
    with transaction(db):
        seen_now(db, user_ids)


def end_session(db: sqlite3.Connection, session_id: str, everywhere: bool) -> None:
    """The session ends; `everywhere`: every session of its user does. Its user was seen."""
    with transaction(db):
        db.execute("UPDATE users SET last_seen_at = ? WHERE id = "
                   "(SELECT user_id FROM sessions WHERE id = ?)", (utc_now(), session_id))
        if everywhere:
            db.execute("DELETE FROM sessions WHERE user_id = "
                       "(SELECT user_id FROM sessions WHERE id = ?)", (session_id,))
        else:
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


def end_sessions_of(db: sqlite3.Connection, user_id: int) -> None:
    """Every session of the user ends (a login link logs them in afresh)."""
    with transaction(db):
        db.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))


def end_guest_sessions(db: sqlite3.Connection) -> int:
    """Guest mode is off: every guest's session ends (a later start with --guests does not
    bring them back). How many ended."""
    with transaction(db):
        return db.execute("DELETE FROM sessions "
                          "WHERE user_id IN (SELECT id FROM users WHERE is_guest)").rowcount


# ---------------------------------------------------------------------------
# 5. Pages
# HTML: the Jinja environment and its filters, the fragments (templates/_fragments.html,
# compiled at first use), the room's clock, message text as HTML (links and mentions), the
# wire view, and render/redirect. Every {{ value }} is escaped: that keeps user text inert.
# ---------------------------------------------------------------------------


# autoescape=True: every {{ value }} is HTML-escaped, which is what keeps user text inert.
templates = Jinja2Templates(
    env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True))


def template_filter(name: str) -> Callable[[Callable], Callable]:
    """Register the function below as the templates' filter `name` (a section registers its own)."""
    def register(function: Callable) -> Callable:
        """Add the function to the templates' filters; it is returned as it was."""
        templates.env.filters[name] = function
        return function
    return register


class RoomClock:
    """Times as pages show them, in one zone for everybody: a message is rendered once for
    its whole room. The zone is CHAT_TIMEZONE, else this machine's own (a classroom and a
    hobby server run where their people are); create_app() sets it."""

    MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()

    def __init__(self, zone: tzinfo | None = None) -> None:
        self.set_zone(zone)

    def set_zone(self, zone: tzinfo | None) -> None:
        """None: the machine's local time, daylight saving and all."""
        self.zone = zone
        # Messages sent in the same second share one conversion (a busy server sends many).
        self._shown = functools.lru_cache(maxsize=1024)(self._times)

    def shown(self, iso: str) -> tuple[str, str]:
        """A time from the database (UTC, ISO_SECONDS) as a message shows it, and in full for
        its tooltip: ("13:36", "2026-11-30 13:36:10 JST") today; "28 Nov 13:36" on another
        day, the year too in another year. A time not in ISO_SECONDS is shown as it is."""
        return self._shown(iso, datetime.now(self.zone).date())

    def short(self, iso: str) -> str:
        """A time from the database as a message shows it ("13:36", "28 Nov 13:36")."""
        return self.shown(iso)[0]

    def full(self, iso: str) -> str:
        """A time from the database in full, as a message's tooltip shows it."""
        return self.shown(iso)[1]

    def zone_name(self) -> str:
        """The zone's name as its times carry it ("JST", "CET"), today."""
        return datetime.now(timezone.utc).astimezone(self.zone).tzname() or "UTC"

    def _times(self, iso: str, today: Any) -> tuple[str, str]:
        try:
            when = datetime.fromisoformat(iso).astimezone(self.zone)
        except ValueError:
            return iso, iso
        clock = f"{when.hour:02}:{when.minute:02}"
        day = f"{when.day} {self.MONTHS[when.month - 1]}"
        short = (clock if when.date() == today else f"{day} {clock}" if when.year == today.year
                 else f"{day} {when.year} {clock}")
        return short, (f"{when.year}-{when.month:02}-{when.day:02} "
                       f"{clock}:{when.second:02} {when.tzname()}")


def time_zone(name: str) -> tzinfo | None:
    """CHAT_TIMEZONE's zone (None: this machine's); ValueError, in plain words, for a name
    that is not one (tzdata supplies the zones where the system has none)."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"CHAT_TIMEZONE: there is no time zone called {name!r}; "
                         "use an IANA name such as Europe/Paris or Asia/Tokyo") from None


room_clock = RoomClock()


@template_filter("local_time")
def local_time(iso: str) -> tuple[str, str]:
    """A time from the database as pages show it, short and in full (RoomClock.shown)."""
    return room_clock.shown(iso)


@template_filter("mentioned_ids")
def mentioned_ids(mentioned: str) -> str:
    """The ids of the people a message mentions ("id name" lines), for its data-mentions."""
    return " ".join(line.split(" ", 1)[0] for line in mentioned.split("\n"))


# Links as people paste them (balanced brackets, trailing punctuation, quotes around them,
# query strings, internationalised domains): linkify-it-py, the linkifier markdown-it uses.
# Only http(s) links that say so; no bare "example.org", e-mail, ftp: or //host.
LINKS = LinkifyIt(schemas={"ftp:": None, "//": None, "mailto:": None},
                  options={"fuzzy_link": False, "fuzzy_email": False, "fuzzy_ip": False})


TYPOGRAPHIC_CLOSERS = "»”“’‘›‹«…"  # quotes and an ellipsis around a link are not part of it


def real_host(url: str) -> str | None:
    """The host a link really goes to, in ASCII (punycode), when its text could hide it: a
    user name before the host ("https://bank.example@evil.example"), a host mixing scripts
    (Cyrillic "а" in "аpple.com"), or an invisible or direction control character anywhere
    in it. None for a link that goes where it looks like it goes."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # a malformed [IPv6] host
        return None
    scripts = {unicodedata.name(ch, "?").split()[0] for ch in host if ch.isalpha()}
    if "@" not in parts.netloc and not has_invisible(url) and len(scripts) <= 1:
        return None  # one script throughout (bücher.example, 例え.jp): it goes where it says
    return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
                    for label in host.split("."))


def linkify(text: str, people: tuple[tuple[int, str], ...] = ()) -> Markup:
    """Text as HTML: escaped, with its http(s) links made links and its mentions of `people`
    ((user id, name)) marked. It is built from escaped pieces (Markup.format escapes the URL
    too), so no markup can ride along; a link whose text could hide where it goes has its real
    host beside it."""
    plain = with_mentions(people) if people and "@" in text else escape
    if "://" not in text:  # the common case, 20 times cheaper than asking the linkifier
        return plain(text)
    parts, done = [], 0
    for found in LINKS.match(text) or ():
        if found.schema not in ("http:", "https:"):
            continue
        url = text[found.index:found.last_index].rstrip(TYPOGRAPHIC_CLOSERS)
        parts.append(plain(text[done:found.index]))
        if host := real_host(url):  # (its text isolated, so no direction control reaches past it)
            parts.append(Markup('<a href="{0}" rel="noopener noreferrer nofollow" target="_blank">'
                                '<bdi>{0}</bdi></a> '
                                '<small class="real-host">(goes to {1})</small>').format(url, host))
        else:
            parts.append(Markup('<a href="{0}" rel="noopener noreferrer nofollow" target="_blank">'
                                '{0}</a>').format(url))
        done = found.index + len(url)
    parts.append(plain(text[done:]))
    return Markup("").join(parts)


def with_mentions(people: tuple[tuple[int, str], ...]) -> Callable[[str], Markup]:
    """Escapes text, marking "@name" for each of the people ((user id, name)) as a mention of
    that person's id: the room page's style marks those of its viewer."""

    def marked(text: str) -> Markup:
        """The text escaped, with each "@name" of these people marked."""
        parts, done = [], 0
        for start, end, user_id in find_mentions(text, people):
            parts += [escape(text[done:start]),
                      Markup('<span class="mention" data-user="{0}">{1}</span>').format(
                          user_id, text[start:end])]
            done = end
        return Markup("").join([*parts, escape(text[done:])])
    return marked


MENTION_NAME_CHARS = 150  # no name is longer (usernames: 150, guests: 40)
MENTIONS_PER_MESSAGE = 50  # "@"s looked at in one message: the work per message stays bounded


def find_mentions(text: str, people: tuple[tuple[int, str], ...]) -> list[tuple[int, int, int]]:
    """Where the text mentions one of the people ((user id, name)): (start, end, user id) of
    each "@name", ignoring case. The longest name that fits wins, and a name must end where a
    word does ("@ada" is not in "@adam"). Each "@" is looked up by the casefolded text after
    it, length by length, so a match always has its person ("@Asli" for "Aslı" is no mention,
    not a crash), and the cost is bounded: no regular expression of every name is built."""
    names, lengths = mention_index(people)
    found: list[tuple[int, int, int]] = []
    start = 0
    while names and len(found) < MENTIONS_PER_MESSAGE and (at := text.find("@", start)) != -1:
        start = at + 1
        if at and (text[at - 1].isalnum() or text[at - 1] in "_@"):
            continue  # inside a word, or an address: not a mention
        for length in lengths:
            end = at + 1 + length
            if end > len(text) or (end < len(text) and (text[end].isalnum() or text[end] == "_")):
                continue
            if (user_id := names.get(text[at + 1:end].casefold())) is not None:
                found.append((at, end, user_id))
                start = end
                break
    return found


@functools.lru_cache(maxsize=256)
def mention_index(people: tuple[tuple[int, str], ...]) -> tuple[dict[str, int], list[int]]:
    """The people by casefolded name, and their names' lengths, longest first (cached: a
    room's members change far less often than they are mentioned)."""
    names: dict[str, int] = {}
    for user_id, name in people:
        if 0 < len(name) <= MENTION_NAME_CHARS:
            names.setdefault(name.casefold(), user_id)
    return names, sorted({len(name) for _, name in people if 0 < len(name) <= MENTION_NAME_CHARS},
                         reverse=True)


# Message text as HTML. A message is Markdown (CommonMark, through markdown-it-py), rendered
# once, on the server, when it is stored or edited (render_text), and kept with its row
# (messages.html): every page, live frame and catch-up shows that one rendering. Raw HTML,
# images and headings are off (shown as text); links are http(s) only, found as today
# (linkify, with the real host beside a look-alike) and never inside code; fenced code with a
# language is highlighted by Pygments into CSS classes (the CSP allows no inline style).


# What can make Markdown of a text: a plain one (most chat) skips the parser. Not "!" ("![" is
# an image: "[" is here), a lone "~" (strikethrough is "~~"), "|" (a table needs two lines),
# an "&" that starts no entity, nor ">" or "#" but at the start (a quote; headings are off):
# "Thanks! Q&A at 5" is plain. (A Hypothesis test holds the plain path to the parser's HTML.)
MARKDOWN_SIGNS = re.compile(r"[\\`*_\[\]<\n]|~~|&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);"
                            r"|^(?:[>#]|(?:[-+*]|\d{1,9}[.)])(?:\s|$))")

# Pygments' lexer for each language a fenced block may name; any other is plain monospace.
HIGHLIGHTED = {
    "python": "python", "py": "python", "javascript": "javascript", "js": "javascript",
    "typescript": "typescript", "ts": "typescript", "html": "html", "css": "css", "json": "json",
    "bash": "bash", "sh": "bash", "shell": "bash", "sql": "sql", "c": "c", "cpp": "cpp",
    "c++": "cpp", "java": "java", "go": "go", "rust": "rust", "ruby": "ruby", "php": "php",
    "yaml": "yaml", "toml": "toml", "diff": "diff", "kotlin": "kotlin", "swift": "swift"}
HIGHLIGHT_SECONDS = 0.02  # a block that takes longer to highlight is shown plain
CODE_CLASSES = HtmlFormatter(nowrap=True, classprefix="hl-")


def is_web_link(url: str) -> bool:
    """Whether a link may be a link: http or https, nothing else (no javascript:, data:)."""
    return url.strip().lower().startswith(("http://", "https://"))


# markdown-it's time grows faster than the text for some input (4,000 "[" took 80 ms here):
# a text with more brackets, or emphasis marks, than a person writes is parsed without
# links, or emphasis, and shows those characters as they are. So no message takes more than
# about 25 ms (docs/performance.md, "A message's Markdown").
MARKDOWN_BRACKETS = 200
MARKDOWN_EMPHASIS = 1000


# Raise it when render_text makes other HTML of the same text: render_old_messages then
# renders every stored message again, in the background.
RENDERER_VERSION = 1


@dataclass(frozen=True)
class Rendered:
    """A message's text as HTML, and whom it mentions (user ids)."""

    html: str
    mentioned: tuple[int, ...] = ()


def render_text(text: str, people: tuple[tuple[int, str], ...] = ()) -> Rendered:
    """A message's text (Markdown) as HTML, the mentions of `people` ((user id, name)) marked
    in it. Plain text, the common case, skips the parser (the same HTML, 20 times faster)."""
    if not MARKDOWN_SIGNS.search(text):
        html = Markup("<p>{}</p>\n").format(linkify(text, people))
    else:
        parser = MARKDOWN[text.count("[") <= MARKDOWN_BRACKETS,
                          sum(map(text.count, "*_~")) <= MARKDOWN_EMPHASIS]
        html = Markup(parser.render(text, {"people": people}))
    mentioned = tuple(dict.fromkeys(
        user_id for _, _, user_id in find_mentions(text, people))) if "@" in text else ()
    return Rendered(str(html), tuple(user_id for user_id in mentioned
                                     if f'data-user="{user_id}"' in html))


# Markdown is parsed here, a message at a time, off the event loop: a long message costs its
# milliseconds on this thread, never every socket's.
RENDERING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")


async def rendered(text: str, people: tuple[tuple[int, str], ...] = ()) -> Rendered:
    """render_text, on the RENDERING thread when the text is Markdown (plain text: here)."""
    if not MARKDOWN_SIGNS.search(text):
        return render_text(text, people)
    return await asyncio.get_running_loop().run_in_executor(RENDERING, render_text, text, people)


@template_filter("message_html")
def message_html(m: sqlite3.Row) -> Markup:
    """A message's text as pages show it: its stored rendering, or (a message from before
    renderings were stored, until render_old_messages reaches it) rendered now."""
    if m["html"] is not None:
        return Markup(m["html"])
    people = tuple((int(user_id), name) for user_id, name in
                   (line.split(" ", 1) for line in (m["mentioned"] or "").split("\n") if line))
    return Markup(render_text(m["text"], people).html)


# A fenced code block in a message's text: its fence, its language, its lines.
FENCED_CODE = re.compile(r"^(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*\n(.*?)(?:^\1[`~]*[ \t]*$|\Z)",
                         re.M | re.S)


@template_filter("spoken")
def spoken(text: str) -> str:
    """A message as the screen reader's line reads it: a fenced block is "code block, python,
    6 lines", not its fences and every symbol in it."""
    def said(found: re.Match) -> str:
        """What the screen reader hears for one fenced block."""
        lines = found.group(3).rstrip("\n").count("\n") + 1
        language = HIGHLIGHTED.get(found.group(2).lower(), found.group(2)[:20])
        named = f"{language}, " if language else ""
        return f"(code block, {named}{lines} line{'s' * (lines != 1)}) "
    return FENCED_CODE.sub(said, text).strip()


def markdown_text_tokens(state: Any) -> None:
    """markdown-it's last step here: the text outside links and code gets today's links and
    the mentions (linkify), as HTML built from escaped pieces."""
    people = state.env.get("people", ())
    for block in state.tokens:
        inside_link = 0
        for token in block.children or ():
            inside_link += token.type == "link_open"
            inside_link -= token.type == "link_close"
            if token.type == "text" and not inside_link and token.content:
                token.type, token.content = "html_inline", str(linkify(token.content, people))




def render_link_open(renderer: Any, tokens: list, index: int, options: Any, env: Any) -> str:
    """A Markdown link opens a new tab, tells the target nothing, and is not endorsed."""
    tokens[index].attrSet("rel", "noopener noreferrer nofollow")
    tokens[index].attrSet("target", "_blank")
    return renderer.renderToken(tokens, index, options, env)


def render_link_close(renderer: Any, tokens: list, index: int, options: Any, env: Any) -> str:
    """After a link whose words are not its address, the host it goes to (in red when it could
    pass for another: real_host)."""
    start = next(n for n in range(index - 1, -1, -1) if tokens[n].type == "link_open")
    href = tokens[start].attrGet("href") or ""
    words = "".join(token.content for token in tokens[start + 1:index])
    closing = renderer.renderToken(tokens, index, options, env)
    if host := real_host(href) or ("://" in words and real_host(words.strip())):
        return closing + str(Markup(' <small class="real-host">(goes to {})</small>').format(host))
    if words.strip() not in (href, href.split("://", 1)[-1]):
        return closing + str(Markup(' <small class="link-host">({})</small>').format(
            urlsplit(href).hostname or ""))
    return closing


def render_code(renderer: Any, tokens: list, index: int, options: Any, env: Any) -> str:
    """A code block: monospace, its indentation kept, scrolling sideways; highlighted when its
    fence names a language of HIGHLIGHTED (in time: HIGHLIGHT_SECONDS), else plain."""
    token = tokens[index]
    language = HIGHLIGHTED.get(token.info.strip().split(" ", 1)[0].lower()) if token.info else None
    code = token.content
    body = highlighted(code, language) if language else None
    label = Markup(' data-language="{}"').format(language) if language else ""
    return str(Markup('<pre class="code"{}><code>{}</code></pre>\n').format(
        label, body if body is not None else code))


@functools.cache
def lexer_for(language: str) -> Any:
    """Pygments' lexer for a language (made once: a lexer is used again and again)."""
    return get_lexer_by_name(language, stripnl=False)


def highlighted(code: str, language: str) -> Markup | None:
    """The code as Pygments' tokens in CSS classes (hl-k, hl-s, ...); None if that takes
    longer than HIGHLIGHT_SECONDS (checked as the tokens come: a lexer is never waited on
    for long)."""
    lexer = lexer_for(language)
    deadline = time.thread_time() + HIGHLIGHT_SECONDS  # (this thread's CPU: not the machine's load)
    found = []
    for n, token in enumerate(lexer.get_tokens(code)):
        found.append(token)
        if n % 64 == 0 and time.thread_time() > deadline:
            return None
    return Markup(pygments.format(found, CODE_CLASSES))


def markdown_parser(links: bool, emphasis: bool) -> MarkdownIt:
    """The Markdown a message may use: CommonMark with a line break for each new line and
    ~~strikethrough~~; no raw HTML, images, headings, rules or reference links (their text
    shows as it is); `links` and `emphasis` on or off (MARKDOWN_BRACKETS)."""
    parser = (MarkdownIt("commonmark", {"breaks": True, "html": False})
              .enable(["strikethrough"])
              .disable(["image", "heading", "lheading", "reference", "hr", "html_block",
                        "html_inline", "linkify"]))
    parser.disable([*(() if links else ("link",)),
                    *(() if emphasis else ("emphasis", "strikethrough"))])
    parser.validateLink = is_web_link
    parser.core.ruler.push("backchat_text", markdown_text_tokens)
    for token, rule in (("link_open", render_link_open), ("link_close", render_link_close),
                        ("fence", render_code), ("code_block", render_code)):
        parser.add_render_rule(token, rule)
    return parser


MARKDOWN = {(links, emphasis): markdown_parser(links, emphasis)
            for links in (True, False) for emphasis in (True, False)}


class Fragments:
    """The macros of templates/_fragments.html, compiled at first use: Jinja checks a
    template's filters as it compiles it, and each section registers its own (template_filter)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = templates.env.get_template("_fragments.html").module
        self.__dict__.update((key, value) for key, value in vars(module).items()
                             if not key.startswith("_"))
        return getattr(module, name)


fragments = Fragments()


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """The page `name` rendered with `context`, and what every page needs: the user, whether
    guest mode is on, the CSRF token and the CSP nonce."""
    context.setdefault("user", getattr(request.state, "user", None))
    context["guests"] = chat_of(request).settings.guests
    context["csrf_token"] = csrf_token(request) if "session" in request.scope else ""
    context["csp_nonce"] = request.scope.get("csp_nonce", "")
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def redirect(url: str) -> RedirectResponse:
    """See Other: after a form, the browser GETs `url`."""
    return RedirectResponse(url, status_code=303)


def get(path: str, handler: Callable[[Request], Awaitable[Response]],
        name: str | None = None) -> Route:
    """A route for GET (and HEAD): each section lists its routes, a function per path and method."""
    return Route(path, handler, methods=["GET"], name=name)


def post(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
    """A route for POST."""
    return Route(path, handler, methods=["POST"])


# Who a frame went to, as the wire view (?wire=1) labels it.
TO_EVERYONE, ONLY_YOU, SENT = "to everyone in the room", "only to you", "sent by this page"


WIRE_ECHO_CHARS = 8 * 1024  # teaching mode shows at most this much of each frame


_last_echo: tuple[str, str, str | None, str] = ("", "", None, "")


# What the wire view (made for a projector) never shows: the page's CSRF token and a
# message's one-time key, in the JSON a page sends and in the answer it gets.
SECRETS_RE = re.compile(r'("(?:csrf_token|key|X-CSRF-Token)"\s*:\s*")(?:[^"\\]|\\.)*"'
                        r'|(data-key=")[^"]*"')


def without_secrets(frame: str) -> str:
    """The frame with its secrets shown as "…"."""
    return SECRETS_RE.sub(lambda found: f'{found.group(1) or found.group(2)}…"', frame)


def with_wire_echo(frame: str, audience: str, label: str | None = None) -> str:
    """A frame plus its own escaped source (the first WIRE_ECHO_CHARS of it) and who got
    it, for pages in teaching mode (?wire=1); with a `label`, folded under it. A broadcast
    hands one string to every socket in turn, so remembering the last one renders each
    echo once and holds one at most."""
    global _last_echo
    if _last_echo[0] is not frame or _last_echo[1] != audience or _last_echo[2] != label:
        entry = fragments.wire_entry(without_secrets(frame), WIRE_ECHO_CHARS, audience, label)
        _last_echo = (frame, audience, label, frame + str(entry))
    return _last_echo[3]


# ---------------------------------------------------------------------------
# 6. The live room
# Who is connected to which room and who is online in it, each room's state as its owners
# set it, and fan-out: one rendered frame handed to every socket in a room (across workers:
# section 15). Then the record every handler shares (Chat).
# ---------------------------------------------------------------------------


# Close code for a socket whose session ended: "policy violation", which htmx does not
# retry (it reconnects on 1001, 1005, 1006, 1011-1014), so a logged-out page stops knocking.
SESSION_ENDED = 1008


SEND_QUEUE_BYTES = 1024 * 1024  # what a slow reader may fall behind by before it is dropped


# What a page gets every CHAT_HEARTBEAT: nothing to swap, only a sign of life that room.js
# counts (a page that stops getting them says "Reconnecting…" and reconnects).
HEARTBEAT_FRAME = "<!-- live -->"

# The page's catch-up cursor in a frame (the room_revision macro): left out of a frame older
# than what the page has (Connection.push).
ROOM_REVISION_RE = re.compile(r'<input type="hidden" id="room-revision"[^>]*>')


class Connection:
    """One open WebSocket: frames go out at once while its socket keeps up, and into a
    bounded backlog while it does not."""

    __slots__ = ("websocket", "send", "session_id", "user_id", "username", "is_guest",
                 "room_id", "room_code", "wire", "backlog", "backlog_bytes", "flusher", "handler",
                 "dropped", "caught_up", "revision", "held")

    @property
    def user(self) -> tuple[int, str, bool]:
        """The socket's user, as the online list counts people (a Person)."""
        return self.user_id, self.username, self.is_guest

    def __init__(self, websocket: WebSocket, session_id: str, user: sqlite3.Row, room_id: int,
                 room_code: str, wire: bool) -> None:
        self.websocket = websocket
        self.session_id = session_id
        # Frames go straight to the server's ASGI send, past the middleware: sessions and
        # error pages are about HTTP, and each layer would cost time on every frame.
        self.send: Send = websocket.scope["backchat.raw_send"]
        self.user_id, self.username, self.is_guest = (user["id"], user["username"],
                                                      bool(user["is_guest"]))
        self.room_id, self.room_code = room_id, room_code
        self.wire = wire
        self.backlog: list[str] = []
        self.backlog_bytes = 0
        self.flusher: asyncio.Task | None = None  # exists only while the socket lags behind
        self.handler = asyncio.current_task()  # the task reading this socket
        self.dropped = False
        self.caught_up = False  # a page catches up once per socket, as it opens
        self.revision = 0  # the newest revision this page was sent (its cursor only moves on)
        # While the page's catch-up is being read: what arrives meanwhile, sent after it.
        self.held: list[tuple[str, str | None, str | None, int | None]] | None = None

    def push(self, frame: str, audience: str | None = ONLY_YOU, label: str | None = None,
             revision: int | None = None) -> None:
        """Send a frame without ever waiting: at once if the socket can take it, else later.
        In teaching mode it carries its own source, labelled with its `audience` (None: not
        shown, as for heartbeats) and, folded under a `label`, when it is long and routine.
        `revision`: the room's revision the frame brings the page to. A frame that arrives
        while the page's catch-up is being read waits for it (catch_up); one older than what
        the page has (two workers' frames crossing) keeps its content but not its cursor, so
        the page's revision only ever moves on."""
        if self.dropped:
            return
        if self.held is not None:
            self.held.append((frame, audience, label, revision))
            return
        if revision is not None:
            if revision < self.revision:
                frame = ROOM_REVISION_RE.sub("", frame)
            self.revision = max(self.revision, revision)
        if self.wire and audience:
            frame = with_wire_echo(frame, audience, label)
        if self.flusher is None:
            self._send_now(frame)
        elif self.backlog_bytes + len(frame) <= SEND_QUEUE_BYTES:
            self.backlog.append(frame)
            self.backlog_bytes += len(frame)
        else:  # never wait for one slow reader: drop it; its page reconnects and catches up
            log.warning("dropping a socket of %s in %s: %d frames (%d characters) behind",
                        self.username, self.room_code, len(self.backlog), self.backlog_bytes)
            self.drop(1013, "too slow")  # "try again later", which htmx reconnects on

    def _message(self, frame: str) -> Message:
        return {"type": "websocket.send", "text": frame}

    def _send_now(self, frame: str) -> None:
        # Run the server's send coroutine by hand up to its first wait. Nearly always it
        # has copied the frame into the socket's buffer by then and is done: no task, no
        # trip through the event loop, for each of a room's thousand sockets. Only when
        # the socket's buffer is full does it wait, and then a task takes over from there.
        # (Python 3.12's eager tasks do the same; this works on 3.11 too.)
        sending = self.send(self._message(frame))
        try:
            waiting_for = sending.send(None)
        except StopIteration:
            return
        except Exception:
            return  # the socket is gone; the receive loop notices and cleans up
        self.flusher = asyncio.create_task(self._flush(sending, waiting_for))

    async def _flush(self, sending: Any, waiting_for: Any) -> None:
        """Finish the send that had to wait, then everything that piled up behind it."""
        try:
            while True:
                if waiting_for is None:  # a bare yield: just let the loop run once
                    await asyncio.sleep(0)
                else:
                    # What asyncio's Task does with each future a coroutine yields: clear the
                    # "a task is blocked on me" mark, then wait for it. (Left set, awaiting
                    # the future again raises "await wasn't used with future".)
                    waiting_for._asyncio_future_blocking = False
                    await waiting_for
                try:
                    waiting_for = sending.send(None)
                except StopIteration:
                    break
            while self.backlog:
                frames, self.backlog, self.backlog_bytes = self.backlog, [], 0
                for frame in frames:
                    await self.send(self._message(frame))
        except asyncio.CancelledError:
            sending.close()
            raise
        except Exception:
            sending.close()  # the socket is gone; the receive loop notices and cleans up
        finally:
            self.flusher = None

    def drop(self, code: int, reason: str) -> None:
        """From now on send nothing to this socket and read nothing from it; close it."""
        self.dropped = True
        asyncio.create_task(self._close_and_stop_reading(code, reason))

    async def _close_and_stop_reading(self, code: int, reason: str) -> None:
        if self.flusher is not None:  # what was handed over before (a notice) gets a second
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.flusher), 1)
        self.stop_flushing()  # a reader that reads nothing would keep it waiting forever
        await self.close(code, reason)
        if self.handler is not None:  # still reading: a peer that never answers the close
            self.handler.cancel()

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket; a peer that reads nothing cannot even take the close frame,
        so this waits a second at most."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.close(code, reason), 1)

    def stop_flushing(self) -> None:
        """Stop sending what waits for this socket: it will never be sent."""
        if self.flusher is not None:
            self.flusher.cancel()


Person = tuple[int, str, bool]  # someone in a room: (user id, name, is a guest)


@dataclass(frozen=True)
class RoomState:
    """What a room's owners set, as every worker holding a page of it keeps it in memory:
    read at each handshake, changed by the owners' tools (Moderation). Posting obeys it
    (the database checks a lock and removals again as it stores a message)."""

    code: str
    owners: frozenset[int] = frozenset()
    locked: bool = False
    slow_mode: int = 0  # seconds between a member's messages; 0: off
    questions_anonymous: bool = False  # "Ask without my name" is offered (section 13)

    @classmethod
    def of(cls, room: sqlite3.Row, owners: frozenset[int]) -> RoomState:
        """The state of a room as the database has it."""
        return cls(room["code"], owners, bool(room["locked"]), room["slow_mode"],
                   bool(room["questions_anonymous"]))

    def to_wire(self) -> dict[str, Any]:
        """The state by name, as it travels between workers (RedisFanout.room_changed)."""
        return {"code": self.code, "owners": sorted(self.owners), "locked": self.locked,
                "slow_mode": self.slow_mode, "questions_anonymous": self.questions_anonymous}

    @classmethod
    def from_wire(cls, sent: dict[str, Any]) -> RoomState:
        """The state another worker sent: the fields this worker knows, by name; one it does
        not know (a newer worker's) is left out, one missing (an older worker's) keeps its
        default. So workers of two versions, during a rolling restart, understand each other."""
        known = {name: sent[name] for name in ("code", "locked", "slow_mode",
                                               "questions_anonymous") if name in sent}
        return cls(**known, owners=frozenset(sent.get("owners", ())))


# The parts of a room page outside the log that show the room as it is now (the pinned
# message and the questions: section 13 registers them), by name: each gives its HTML from a
# connection and the room's row, out of band (`oob`) for a frame or in place for the page
# (`csrf`: the page's token, for its forms without JavaScript). A change that may touch them
# sends them whole, read after its write (so they are never older than the change); so does
# every catch-up that finds anything changed.
ROOM_PARTS: dict[str, Callable[[sqlite3.Connection, sqlite3.Row, bool, str | None], str]] = {}


def room_parts(db: sqlite3.Connection, room: sqlite3.Row | int) -> str:
    """The room's parts (ROOM_PARTS) as they are now, out of band (`room`: its row, or id)."""
    if isinstance(room, int):
        room = db.execute("SELECT * FROM rooms WHERE id = ?", (room,)).fetchone()
    return "".join(part(db, room, True, None) for part in ROOM_PARTS.values()) if room else ""


def page_parts(db: sqlite3.Connection, room_id: int, csrf: str) -> dict[str, str]:
    """The room's parts as its page shows them, by name."""
    room = db.execute("SELECT * FROM rooms WHERE id = ?", (room_id,)).fetchone()
    return {name: Markup(part(db, room, False, csrf)) for name, part in ROOM_PARTS.items()}


def by_name(people: set[Person]) -> list[Person]:
    """The people sorted by name (case aside), then by id."""
    return sorted(people, key=lambda person: (person[1].casefold(), person[0]))


class RoomHub:
    """The in-memory registry: connections per room, who is online in each, and each room's
    state (its owners, lock and slow mode; read when a page opens)."""

    def __init__(self, sockets_per_user: int = 0, sockets_per_address: int = 0,
                 max_sockets: int = 0) -> None:
        self.connections: dict[int, set[Connection]] = {}  # room id -> its sockets
        self.tabs: dict[int, dict[Person, int]] = {}  # room id -> person -> open tabs
        # room id -> its state, while a page of it is open here
        self.rooms: dict[int, RoomState] = {}
        self.limits = {"user": sockets_per_user, "address": sockets_per_address, "all": max_sockets}
        # ("user", id) / ("address", ip) -> count
        self.open_sockets: Counter[tuple[str, Any]] = Counter()

    def claim(self, user_id: int, address: str) -> bool:
        """Count one more socket for this user and address, if both are under their caps."""
        keys = [(kind, owner)
                for kind, owner in (("user", user_id), ("address", address), ("all", ""))
                if self.limits[kind]]
        if any(self.open_sockets[key] >= self.limits[key[0]] for key in keys):
            return False
        self.open_sockets.update(keys)
        return True

    def release(self, user_id: int, address: str) -> None:
        """Count one socket fewer for this user and address (a closed one that claim() let in)."""
        for key in (("user", user_id), ("address", address), ("all", "")):
            if self.open_sockets[key] <= 1:
                self.open_sockets.pop(key, None)
            else:
                self.open_sockets[key] -= 1

    def join(self, conn: Connection) -> bool:
        """Register a connection; True when its user just came online in the room."""
        self.connections.setdefault(conn.room_id, set()).add(conn)
        tabs = self.tabs.setdefault(conn.room_id, {})
        tabs[conn.user] = tabs.get(conn.user, 0) + 1
        return tabs[conn.user] == 1

    def leave(self, conn: Connection) -> bool:
        """Forget a connection; True when its user's last tab in the room closed."""
        room = self.connections.get(conn.room_id, set())
        if conn not in room:
            return False
        room.discard(conn)
        tabs = self.tabs[conn.room_id]
        tabs[conn.user] -= 1
        went_offline = tabs[conn.user] == 0
        if went_offline:
            del tabs[conn.user]
        if not room:
            del self.connections[conn.room_id], self.tabs[conn.room_id]
            self.rooms.pop(conn.room_id, None)
        return went_offline

    def has_page(self, room_id: int, user_id: int) -> bool:
        """Whether the user has the room open (on this worker)."""
        return any(user[0] == user_id for user in self.tabs.get(room_id, ()))

    def online(self, room_id: int) -> list[Person]:
        """Who has the room open, by name."""
        return by_name(set(self.tabs.get(room_id, {})))

    def everyone(self) -> list[Connection]:
        """Every open connection on this worker, in every room."""
        return [conn for room in self.connections.values() for conn in room]

    async def close_all(self, code: int) -> None:
        """Close every socket (1012: pages reconnect and catch up from the database)."""
        for conn in self.everyone():
            await conn.close(code)

    def close_room(self, room_id: int, code: int) -> None:
        """Close every socket in the room (1012: they reconnect and catch up), without waiting."""
        for conn in tuple(self.connections.get(room_id, ())):
            asyncio.create_task(conn.close(code))

    def end_pages(self, user_id: int | None, session_id: str | None = None,
                  room_id: int | None = None, why: str = "logged out") -> None:
        """Pages that may not go on (`why`: "logged out" of one session or everywhere, "left"
        the room, "removed" from it, the room "deleted"; user None: everybody in the room):
        told in place, and their sockets closed with a code htmx does not retry."""
        for conn in self.everyone():
            if (user_id in (None, conn.user_id) and session_id in (None, conn.session_id)
                    and room_id in (None, conn.room_id)):
                conn.push(str(fragments.page_ended(conn.room_code, why)))
                conn.drop(SESSION_ENDED, why)

    def set_room(self, room_id: int, state: RoomState) -> None:
        """The room's state changed (its owners' tools): kept, if a page of it is open here."""
        if room_id in self.connections:
            self.rooms[room_id] = state

    async def heartbeat(self, every: float) -> None:
        """Tell every page it is live, again and again: a page whose frames stop coming
        (a dead link that no close ever crossed) says "Reconnecting…" and reconnects (room.js)."""
        while True:
            await asyncio.sleep(every)
            for conn in self.everyone():
                conn.push(HEARTBEAT_FRAME, audience=None)

    def broadcast(self, room_id: int, frame: str, label: str | None = None,
                  revision: int | None = None) -> None:
        """Hand one already-rendered frame to every connection in the room, sender included
        (`label`: what the wire view calls it, shown folded, as for the online list;
        `revision`: the room's revision it brings a page to)."""
        for conn in tuple(self.connections.get(room_id, ())):
            conn.push(frame, TO_EVERYONE, label, revision)


def owners_first(people: list[Person], owners: frozenset[int]) -> list[Person]:
    """The online list as pages show it: the room's owners (the teacher) first, then by name."""
    return sorted(people, key=lambda person: person[0] not in owners)


def presence_frame(people: list[Person], owners: frozenset[int]) -> str:
    """The frame that gives a room's pages its online list, owners first."""
    return str(fragments.presence_frame(owners_first(people, owners), owners))


class LocalFanout:
    """Fan-out within one process (the default): a frame goes straight to the hub.
    RedisFanout below has the same methods; nothing else knows which one runs."""

    PRESENCE_WINDOW = 0.25  # seconds: a room's joins and leaves within it make one frame

    def __init__(self, hub: RoomHub) -> None:
        self.hub = hub
        # the presence list (and owners) each room's pages last got
        self.shown: dict[int, tuple] = {}
        self.due: set[tuple[str, int]] = set()  # (action, room id) waiting for its window to end

    async def start(self) -> None:
        """Nothing to start in one process (RedisFanout connects to Redis)."""
        pass

    async def stop(self) -> None:
        """Nothing to stop in one process."""
        pass

    async def publish(self, room_id: int, frame: str, revision: int | None = None) -> None:
        """Hand one rendered frame to every page of the room (`revision`: the room's revision
        the frame brings a page to, if it changes the room)."""
        self.hub.broadcast(room_id, frame, revision=revision)

    async def watch(self, room_id: int) -> None:
        """A socket of this worker is in the room: its frames must reach this worker from now
        on (RedisFanout subscribes to the room; here, every frame is this worker's anyway)."""

    async def unwatch(self, room_id: int) -> None:
        """The last socket of this worker in the room closed."""

    async def online(self, room_id: int) -> list[Person]:
        """Who has the room open, by name (on every worker)."""
        return (await self.online_in([room_id]))[room_id]

    async def online_in(self, room_ids: list[int]) -> dict[int, list[Person]]:
        """online() for several rooms at once (RedisFanout: one trip to Redis for all)."""
        return {room_id: self.hub.online(room_id) for room_id in room_ids}

    async def came_online(self, conn: Connection) -> None:
        """The socket's user opened their first page of the room (went_offline: closed their
        last): its pages get the new online list, soon."""
        self.soon(self.show_presence, conn.room_id)

    went_offline = came_online  # either way: everybody gets the new list, soon

    def soon(self, action: Callable[[int], Awaitable[None]], room_id: int) -> None:
        """Run `action(room)` once PRESENCE_WINDOW from now, however often it is asked for
        meanwhile: an account that connects and disconnects in a loop costs a room a few
        small frames a second, not one per connection."""
        key = (action.__name__, room_id)
        if key in self.due:
            return
        self.due.add(key)

        def window_ended() -> None:
            """Run the action now, and let it be asked for again."""
            self.due.discard(key)
            asyncio.create_task(action(room_id))

        asyncio.get_running_loop().call_later(self.PRESENCE_WINDOW, window_ended)

    async def show_presence(self, room_id: int) -> None:
        """Send the room's pages its online list, if it changed since they last got it."""
        await self.show_presences([room_id])

    async def show_presences(self, room_ids: list[int]) -> None:
        """show_presence() for several rooms, with one online_in() for all of them."""
        for room_id in room_ids:
            if room_id not in self.hub.connections:
                self.shown.pop(room_id, None)  # nobody here is in that room any more
        online = await self.online_in([room_id for room_id in room_ids
                                       if room_id in self.hub.connections])
        for room_id, people in online.items():
            state = self.hub.rooms.get(room_id)
            owners = state.owners if state else frozenset()
            if room_id in self.hub.connections and self.shown.get(room_id) != (people, owners):
                self.shown[room_id] = (people, owners)
                self.hub.broadcast(room_id, presence_frame(people, owners),
                                   f"Online list ({len(people)})")

    async def end_pages(self, user_id: int | None, session_id: str | None = None,
                        room_id: int | None = None, why: str = "logged out") -> None:
        """Pages that may not go on are told so and closed, on every worker (RoomHub.end_pages)."""
        self.hub.end_pages(user_id, session_id, room_id, why)

    async def room_changed(self, room_id: int, state: RoomState, frame: str,
                           revision: int | None = None) -> None:
        """Its owners changed the room: every worker keeps its new state, every page gets the
        frame that shows it (on `revision`), and the online list marks the owners as they are."""
        self.hub.set_room(room_id, state)
        self.hub.broadcast(room_id, frame, revision=revision)
        self.soon(self.show_presence, room_id)


# How often the sessions of open sockets are checked (a closed account leaves soon).
SESSION_CHECK_SECONDS = 5.0


async def watch_sessions(chat: Chat, every: float = SESSION_CHECK_SECONDS) -> None:
    """An open room page is its session in use, and a session that ends ends its pages:
    every `every` seconds, each open socket's session is kept alive (its idle clock restarted,
    hourly at most, as HTTP requests do), and the pages of sessions that are no longer live
    (ended elsewhere, idle or too old, a guest's with guest mode off) are told so and closed."""
    while True:
        await asyncio.sleep(every)
        try:
            await check_sessions(chat)
        except sqlite3.Error as problem:
            log.warning("could not check the sessions of open sockets: %r", problem)


async def heartbeats(chat: Chat) -> None:
    """Every page hears it is live, every CHAT_HEARTBEAT seconds (RoomHub.heartbeat)."""
    await chat.hub.heartbeat(chat.settings.heartbeat)


SEEN_EVERY = 60.0  # seconds: how stale "last seen" may be for somebody with a page open


async def check_sessions(chat: Chat) -> None:
    """One round of watch_sessions: pages whose sessions are no longer live are told and
    closed; the sessions still in use are touched (hourly at most)."""
    pages = chat.hub.everyone()
    if not pages:
        return
    live = await chat.store.read(live_sessions, sorted({conn.session_id for conn in pages}),
                                 chat.settings.guests)
    for conn in pages:
        if conn.session_id not in live and not conn.dropped:
            log.info("closing a socket of %s in %s: its session ended",
                     conn.username, conn.room_code)
            conn.push(str(fragments.page_ended(conn.room_code)))
            conn.drop(SESSION_ENDED, "session ended")
    hour_ago = utc_ago(hours=1)
    if in_use := [session_id for session_id, seen in live.items() if seen < hour_ago]:
        chat.store.write_soon(touch_session, *in_use)
    if time.monotonic() - chat.seen_written >= SEEN_EVERY:  # who has a page open is seen
        chat.seen_written = time.monotonic()
        chat.store.write_soon(seen_now_alone, [conn.user_id for conn in pages])


@dataclass
class Chat:
    """The record every handler shares (chat_of): settings, database, hub, fan-out and the
    limits. Fields only: open_chat() (section 16) fills it, choosing Local or Redis once."""

    settings: Settings
    store: Store
    hub: RoomHub
    fanout: LocalFanout  # (or RedisFanout, which has the same methods)
    message_limit: RateLimiter  # messages, edits, reactions per user per room (CHAT_MESSAGE_RATE)
    room_limit: RateLimiter  # rooms and new codes per user per hour
    login_limit: FailureLimit  # failed logins per name and per address per 15 minutes
    register_limit: RateLimiter  # accounts per address per hour
    room_guess_limit: FailureLimit  # unknown room codes per user and per address per hour
    search_limit: RateLimiter  # searches per user per minute
    handshake_limit: RateLimiter  # WebSocket handshakes per session per 10 s
    address_handshake_limit: RateLimiter  # and per client address (a class behind one NAT)
    slow_limits: dict[int, RateLimiter]  # slow mode's seconds -> one message per that
    api_limit: RateLimiter | None = None  # a bot's reads through the API (section 14)
    # stored messages that mention a bot with a webhook, waiting for their calls (section 14)
    webhook_calls: asyncio.Queue | None = None
    webhooks_dropped: int = 0  # those a full queue turned away
    purges: set[asyncio.Task] = field(default_factory=set)  # cleared or deleted rooms' rows going
    transcripts: Counter[int] = field(default_factory=Counter)  # user id -> downloads under way
    seen_written: float = 0.0  # when those with a page open were last written as seen


# ---------------------------------------------------------------------------
# 7. Accounts
# Registering, logging in and out, guests, login links: the pages, the passwords, the users' SQL.
# ---------------------------------------------------------------------------


USERNAME_RE = re.compile(r"[\w.@+-]{1,150}")


NAME_SHOWN_BACK = 1_000  # characters: a refused name longer than this is not put back in the form


MIN_PASSWORD_CHARS = 8


GUEST_NAME_CHARS = 40


GUEST_NAME_PUNCTUATION = " .'’-"


# argon2id with OWASP's minimum (m=19 MiB, t=2, p=1): about 25 ms and 19 MiB per hash.
PASSWORDS = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


# Hashes run here, two at a time: a flood of logins or registrations queues instead of
# taking every core (and 19 MiB a hash) from the chat.
HASHING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="password-hash")


def hash_password(password: str) -> str:
    """The password's hash as it is stored (argon2id, PASSWORDS)."""
    return PASSWORDS.hash(password)


def verify_password(password: str, stored: str) -> tuple[bool, bool]:
    """Whether the password matches the stored hash, and whether that hash should be
    redone (scrypt from before argon2id, or weaker argon2 settings)."""
    if stored.startswith("scrypt$"):
        _, n, r, p, salt, expected = stored.split("$")
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt),
                                n=int(n), r=int(r), p=int(p), dklen=32)
        return hmac.compare_digest(digest.hex(), expected), True
    try:
        PASSWORDS.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False, False
    return True, PASSWORDS.check_needs_rehash(stored)


async def hashing(work: Callable[..., Any], *args: Any) -> Any:
    """`work(*args)` on the hashing threads (HASHING), awaited."""
    return await asyncio.get_running_loop().run_in_executor(HASHING, work, *args)


# Checking a password that belongs to nobody costs the same as a real one, so the
# response time does not tell which usernames exist.
DUMMY_PASSWORD_HASH = hash_password(secrets.token_urlsafe())


async def register_page(request: Request) -> Response:
    """The sign-up form."""
    return render(request, "register.html",
                  form={"next": safe_next(request.query_params.get("next"))})


async def register(request: Request) -> Response:
    """Make an account with a password and log it in; the form again, saying why, if not."""
    form = await read_form(request)
    next_url = safe_next(form.get("next"))
    # NFKC: the full-width "ＡＤＡ" is the name "ADA", and taken if "ada" is.
    username = unicodedata.normalize("NFKC", form.get("username", "").strip())
    password, again = form.get("password1", ""), form.get("password2", "")
    error, status_code = username_problem(username), 400
    if error is None and len(password) < MIN_PASSWORD_CHARS:
        error = (f"Passwords need at least {MIN_PASSWORD_CHARS} characters; "
                 f"yours has {len(password)}.")
    elif error is None and password != again:
        error = "The two passwords differ."
    if error is None:
        error, status_code = await create_account(request, username, password)
        if error is None:
            return redirect(next_url)
    return render(request, "register.html", status_code,
                  form={"username": shown_back(username), "next": next_url}, error=error)


async def join_as_guest(request: Request) -> Response:
    """Guest mode (--guests): a name, no password. A guest is a real user for as long as
    the session lasts (GUEST_IDLE_HOURS idle); the name stays taken, marked "guest"."""
    if not chat_of(request).settings.guests:
        raise Refused("Guest mode is off on this server.", 404)
    form = await read_form(request)
    next_url = safe_next(form.get("next"))
    name = " ".join(unicodedata.normalize("NFKC", form.get("guest_name", "")).split())
    error, status_code = guest_name_problem(name), 400
    if error is None:
        error, status_code = await create_account(request, name, password=None)
        if error is None:
            return redirect(next_url)
    return render(request, "login.html", status_code,
                  form={"next": next_url, "guest_name": shown_back(name)}, guest_error=error)


async def login_page(request: Request) -> Response:
    """The login form (and the guest form, in guest mode)."""
    return render(request, "login.html",
                  form={"next": safe_next(request.query_params.get("next"))})


async def login(request: Request) -> Response:
    """Log in with a name and password, within the failure limits (FailureLimit)."""
    form = await read_form(request)
    chat = chat_of(request)
    username = unicodedata.normalize("NFKC", form.get("username", "").strip())
    password, next_url = form.get("password", ""), safe_next(form.get("next"))
    wrong = render(request, "login.html", 400,
                   form={"username": shown_back(username), "next": next_url},
                   error="Wrong username or password.")
    # No account has such a name: nothing to count or look up.
    if not USERNAME_RE.fullmatch(username):
        return wrong
    # Failures count per username and per address; a right password is no failure, and
    # guesses sent all at once are checked no more than the limit allows (FailureLimit).
    try:
        async with chat.login_limit.attempt(("user", username.casefold()),
                                            ("address", client_address(request))) as attempt:
            user = await chat.store.read(user_by_name, username)
            has_password = user is not None and not user["is_guest"]  # a guest's name is no way in
            stored = user["password_hash"] if has_password else DUMMY_PASSWORD_HASH
            right, outdated = await hashing(verify_password, password, stored)
            if not right or not has_password:
                attempt.fail()
    except TooManyFailures as refused:
        return render(request, "login.html", 429, form={"username": username, "next": next_url},
                      error="Too many failed logins. Try again "
                            f"{in_plain_words(refused.retry_after)}.")
    if attempt.failed:
        return wrong
    if user["deactivated_at"]:
        return render(request, "login.html", 403, form={"username": username, "next": next_url},
                      error="This account was closed by whoever runs this server.")
    if outdated:  # an scrypt hash from before argon2id: redone now that we have the password
        chat.store.write_soon(set_password_hash, user["id"], await hashing(hash_password, password))
    try:
        await start_session(request, user)
    except sqlite3.Error as problem:
        return render(request, "login.html", 503, form={"username": username, "next": next_url},
                      error=could_not_save("You could not be logged in", problem))
    return redirect(next_url)


async def login_link_page(request: Request) -> Response:
    """A link from `python chat.py users login-link NAME`: the account it logs in, and (for a
    registered user) the form for a new password."""
    return render(request, "login_link.html", account=await login_link_account(request), form={})


async def login_link(request: Request) -> Response:
    """Use the login link: it logs that account in, once, within the hour; a registered user
    sets a new password on the way (recovery without e-mail), and every other session of
    theirs ends."""
    user, token, chat = (await login_link_account(request), request.path_params["token"],
                         chat_of(request))
    form = await read_form(request)
    password, again = form.get("password1", ""), form.get("password2", "")
    if not user["is_guest"]:
        error = (f"Passwords need at least {MIN_PASSWORD_CHARS} characters; "
                 f"yours has {len(password)}." if len(password) < MIN_PASSWORD_CHARS
                 else "The two passwords differ." if password != again else None)
        if error:
            return render(request, "login_link.html", 400, account=user, form={}, error=error)
    if await chat.store.write(login_link_user, token, True) is None:  # used up meanwhile
        raise Refused(LINK_GONE, 404)
    if not user["is_guest"]:
        chat.store.write_soon(set_password_hash, user["id"], await hashing(hash_password, password))
    await chat.store.write(end_sessions_of, user["id"])
    await chat.fanout.end_pages(user["id"])
    await start_session(request, user)
    log.info("%s logged in with a login link", user["username"])
    return redirect("/")


LINK_GONE = ("That login link has been used, has expired, or was never made. "
             "Ask for a new one.")


async def login_link_account(request: Request) -> sqlite3.Row:
    """The open account a login link in the URL is for; Refused (404) if none."""
    token = request.path_params["token"]
    if (len(token) > 100
            or (user := await chat_of(request).store.read(login_link_user, token, False)) is None):
        raise Refused(LINK_GONE, 404)
    return user


async def logout(request: Request) -> Response:
    """Log out of this session (with scope "everywhere": of every session of the user); the
    open room pages of what ended stop."""
    form = await read_form(request)
    chat = chat_of(request)
    session_id = request.session.get("sid")
    user = await current_user(request)
    if session_id and user is not None:
        everywhere = form.get("scope") == "everywhere"
        await chat.store.write(end_session, session_id, everywhere)
        # Open room pages of the ended session(s) stop at once, on every worker.
        await chat.fanout.end_pages(user["id"], None if everywhere else session_id)
    request.session.clear()
    return redirect("/auth/login/")


async def create_account(request: Request, name: str,
                         password: str | None) -> tuple[str | None, int]:
    """Create a user (a guest, without a password) and log them in. None and 303, or the
    reason it was refused and its status."""
    chat = chat_of(request)
    if not await chat.register_limit.allow(client_address(request)):
        return ("This server has made many accounts for your network in the last hour and will "
                "not make more just now. Ask whoever runs it to raise CHAT_REGISTER_RATE, "
                "or try again in an hour."), 429
    password_hash = await hashing(hash_password, password) if password is not None else ""
    try:
        user = await chat.store.write(create_user, name, password_hash, password is None)
        if user is None:
            return ("That name is taken on this server, or looks just like one that is; "
                    "try adding an initial."), 400
        await start_session(request, user)
    except sqlite3.Error as problem:
        return could_not_save("Your account could not be created", problem), 503
    return None, 303


def username_problem(username: str) -> str | None:
    """Why a username will not do, in plain words; None if it will."""
    if problem := too_long("Usernames", 150, username):
        return problem
    if not USERNAME_RE.fullmatch(username) or has_invisible(username):
        return "Usernames are 1-150 letters, digits and @ . + - _ only."
    return kept_name_problem(username)


def kept_name_problem(name: str) -> str | None:
    """Names nobody may take, nor anything that looks like them: "Anonymous" is how a room
    shows the asker of an anonymous question (section 13)."""
    if name_skeleton(name) == name_skeleton("Anonymous"):
        return "That name is kept for anonymous questions; choose another."
    return None


def guest_name_problem(name: str) -> str | None:
    """A guest's name is a display name, written as people write their names: letters of
    any script with their accents, digits, spaces and . ' - ("Maria Lopez", "José", "李雷"),
    1-40 characters, nothing invisible or direction-changing. None if it will do; else why not,
    in plain words."""
    if problem := too_long("Names", GUEST_NAME_CHARS, name):
        return problem
    if not name:
        return "Type the name the others should see."
    if has_invisible(name):
        return ("That name has characters that do not show; type it again with letters, "
                "digits and spaces.")
    if not name[0].isalnum() or not all(unicodedata.category(ch)[0] in "LMN"
                                        or ch in GUEST_NAME_PUNCTUATION for ch in name):
        return "Names are letters, digits and spaces (and . ' -), starting with a letter or digit."
    return kept_name_problem(name)


def shown_back(name: str) -> str:
    """A refused name as its form shows it again: whole, so it can be corrected (never cut
    short unsaid), unless it is far past any limit (a 60,000-character paste): then not at all."""
    return name if len(name) <= NAME_SHOWN_BACK else ""


def create_user(db: sqlite3.Connection, username: str, password_hash: str,
                guest: bool = False) -> sqlite3.Row | None:
    """The new user (a guest has no password); None if the name is taken, or looks like one
    that is."""
    skeleton = name_skeleton(username)
    with transaction(db):
        if db.execute("SELECT 1 FROM users WHERE username_key = ? OR username_skeleton = ?",
                      (username.casefold(), skeleton)).fetchone():
            return None
        cur = db.execute(
            "INSERT INTO users (username, username_key, password_hash, created_at, "
            "username_skeleton, is_guest) VALUES (?, ?, ?, ?, ?, ?)",
            (username, username.casefold(), password_hash, utc_now(), skeleton, guest))
    return user_by_id(db, cur.lastrowid)


def set_password_hash(db: sqlite3.Connection, user_id: int, password_hash: str) -> None:
    """Store the user's new password hash."""
    with transaction(db):
        db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))


def user_by_id(db: sqlite3.Connection, user_id: int) -> sqlite3.Row | None:
    """The user with this id, or None."""
    return db.execute("SELECT * FROM users WHERE id = ?", (user_id,)).fetchone()


def user_by_name(db: sqlite3.Connection, username: str) -> sqlite3.Row | None:
    """The user with this name (case aside), or None."""
    return db.execute("SELECT * FROM users WHERE username_key = ? AND NOT is_bot",
                      (username.casefold(),)).fetchone()


def login_link_user(db: sqlite3.Connection, token: str, use: bool) -> sqlite3.Row | None:
    """The account a login link is for, if it is unused, unexpired and the account open;
    with `use`, the link is used up in the same transaction (it works once)."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    with transaction(db):
        row = db.execute("SELECT u.* FROM login_links l JOIN users u ON u.id = l.user_id "
                         "WHERE l.token_hash = ? AND l.expires_at >= ? "
                         "AND u.deactivated_at IS NULL", (digest, utc_now())).fetchone()
        if row is not None and use:
            db.execute("DELETE FROM login_links WHERE token_hash = ?", (digest,))
    return row


ACCOUNT_ROUTES = [
    get("/auth/register/", register_page), post("/auth/register/", register),
    get("/auth/login/", login_page), post("/auth/login/", login),
    post("/auth/guest/", join_as_guest),
    post("/auth/logout/", logout),
    get("/auth/link/{token}", login_link_page), post("/auth/link/{token}", login_link),
]


# ---------------------------------------------------------------------------
# 8. Rooms
# Creating, finding and joining rooms by their code, the home page's list, the room page and
# its history, leaving.
# ---------------------------------------------------------------------------


MAX_ROOM_NAME_CHARS = 128


PAGE_SIZE = 50  # messages per history page


# The code is the room's only secret: 13 random characters from 32 (65 bits) behind the
# readable part of the name, with no 0/o or 1/l to misread.
ROOM_CODE_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


UNREAD_SHOWN = 99  # past this a badge says "99+": counting stops there, however many there are


REMOVED = "You were removed from this room."


ROOM_URL_RE = re.compile(r"/room/([^/?#\s]+)")


@login_required
async def home(request: Request) -> Response:
    """The home page: the user's rooms, with what is unread in each, and the forms to create
    or join one."""
    chat = chat_of(request)
    user_id = request.state.user["id"]
    rooms = await chat.store.read(rooms_of, user_id)
    # A room open live in another tab has nothing unread, as its page's "New" divider says.
    live = {room["code"] for room in rooms if chat.hub.has_page(room["id"], user_id)}
    return render(request, "home.html", rooms=rooms, live=live, create={}, join={})


@login_required
async def create_page(request: Request) -> Response:
    """The form for a new room (home has it too)."""
    return render(request, "create.html", form={})


@login_required
async def create_room(request: Request) -> Response:
    """A new room with a new code, owned by whoever made it; to its page."""
    form = await read_form(request)
    chat = chat_of(request)
    name = " ".join(form.get("room_name", "").split())
    if problem := too_long("Room names", MAX_ROOM_NAME_CHARS, name):
        return render(request, "create.html", 400, form={"room_name": name}, error=problem)
    if not name or has_invisible(name):
        return render(request, "create.html", 400, form={"room_name": name},
                      error=f"Room names are 1-{MAX_ROOM_NAME_CHARS} visible characters.")
    if not await chat.room_limit.allow(request.state.user["id"]):
        return render(request, "create.html", 429, form={"room_name": name},
                      error="You have created many rooms lately. Try again in an hour.")
    try:
        room = await chat.store.write(insert_room, name, code_prefix(name),
                                      request.state.user["id"])
    except sqlite3.Error as problem:
        return render(request, "create.html", 503, form={"room_name": name},
                      error=could_not_save("The room could not be created", problem))
    return redirect(f"/room/{room['code']}/")


@login_required
async def join_page(request: Request) -> Response:
    """The form for a room's code or link (home has it too)."""
    return render(request, "join.html", form={})


@login_required
async def join_room(request: Request) -> Response:
    """To the room a typed code or pasted link leads to (every unknown code counts as a guess)."""
    form = await read_form(request)
    typed = form.get("code", "")
    code = room_code_from(typed)
    if not code:
        return render(request, "join.html", 400, form={"code": typed},
                      error="Type a room code or paste its link.")
    try:
        access = await find_room(request, code)
    except TooManyFailures as refused:
        return render(request, "join.html", 429, form={"code": typed},
                      error=too_many_guesses(refused))
    if access is not None:
        return redirect(f"/room/{access.room['code']}/")
    return render(request, "join.html", 404, form={"code": typed},
                  error=f"No room has the code “{code}”. Check it with whoever invited you.")


@login_required
async def room_page(request: Request) -> Response:
    """The room page (render_room), with `around` and `reply` from the URL; a member who came
    by one of its earlier codes goes to its code now."""
    access = await access_or_404(request)
    if access.old_code:  # a member with the room's earlier link: to where it is now
        return redirect(f"/room/{access.room['code']}/"
                        + (f"?{request.url.query}" if request.url.query else ""))
    return await render_room(request, access.room,
                             around=whole_number(request.query_params.get("around", "")),
                             reply=whole_number(request.query_params.get("reply", "")))


@login_required
async def history(request: Request) -> Response:
    """A page of history: older than `before` (Load older messages), or newer than `after`
    (Load newer messages, below a page opened around an old message)."""
    room = await room_or_404(request)
    store = chat_of(request).store
    if (after := whole_number(request.query_params.get("after", ""))) is not None:
        messages, has_newer = await store.read(page_after, room["id"], after)
        return HTMLResponse(str(fragments.newer_page(room, messages, after, has_newer)))
    before = whole_number(request.query_params.get("before", ""))
    if before is None:
        return PlainTextResponse("`before` (or `after`) must be a message id.", status_code=400)
    messages, has_older = await store.read(page_before, room["id"], before)
    return HTMLResponse(str(fragments.history_page(room, messages, has_older)))


@login_required
async def leave_room(request: Request) -> Response:
    """Leave: the room goes from the user's list and the user from its presence (every tab
    of theirs in it closes). The room and its history stay; the code lets them back in."""
    room = await room_or_404(request)
    await read_form(request)
    chat = chat_of(request)
    try:
        await chat.store.write(leave_room_membership, room["id"], request.state.user["id"])
    except Refused as problem:
        raise Refused(str(problem), 409) from None
    await chat.fanout.end_pages(request.state.user["id"], room_id=room["id"], why="left")
    return redirect("/")


async def render_room(request: Request, room: sqlite3.Row, status_code: int = 200, error: str = "",
                      draft: str = "", around: int | None = None,
                      reply: int | None = None) -> Response:
    """The room page: its newest messages, or (`around`: a message id, as a search hit links
    to it) those around one message, older and newer both loadable; `reply`: the composer
    armed to answer that message (the Reply link without JavaScript)."""
    chat = chat_of(request)
    user_id = request.state.user["id"]
    # The "New" divider goes after what the user had seen. A page of theirs that shows the
    # room live has seen all of it, and one that closes marks it read before it leaves the
    # hub (chat_socket): so ask the hub first, then the database, and no close can slip
    # between the two. Read before marking the room read.
    live_elsewhere = chat.hub.has_page(room["id"], user_id)
    seen_up_to, messages, has_older, owners, parts = await chat.store.read(
        room_page_rows, room["id"], user_id, csrf_token(request))
    has_newer, replying_to = False, None
    if around is not None and (found := await chat.store.read(page_around, room["id"], around)):
        (messages, has_older, has_newer), seen_up_to = found, None
    if reply is not None:
        replying_to = await chat.store.read(message_in_room, reply, room["id"])
    chat.store.write_soon(record_visit, room["id"], user_id)
    # Who is online, this page's viewer included from the start: its socket is on its way,
    # and "Online · 0, nobody" until it lands said something untrue.
    me = request.state.user
    online = {*await chat.fanout.online(room["id"]),
              (me["id"], me["username"], bool(me["is_guest"]))}
    # `room` was read before the messages: its revision is the page's catch-up cursor.
    return render(request, "room.html", status_code, room=room, messages=messages,
                  has_older=has_older, around=around,
                  seen_up_to=None if live_elsewhere else seen_up_to,
                  online=owners_first(by_name(online), owners), owners=owners,
                  state=RoomState.of(room, owners), online_open=not is_phone(request),
                  invite=invite_link(request, room["code"]),
                  wire=request.query_params.get("wire") == "1",
                  error=error, draft=draft, composer_key=new_message_key(),
                  stale_after=2.5 * chat.settings.heartbeat,
                  has_newer=has_newer, replying_to=replying_to, parts=parts,
                  # how the page knows its viewer's votes and anonymous questions (pseudonym)
                  my_vote=chat.store.pseudonym("vote", room["id"], user_id),
                  my_ask=chat.store.pseudonym("ask", room["id"], user_id))


def is_phone(request: Request) -> bool:
    """Whether the browser says it is a phone (its Sec-CH-UA-Mobile hint, or "Mobi" in its
    user agent, as MDN advises): the room's online list then starts folded behind its count."""
    return (request.headers.get("sec-ch-ua-mobile") == "?1"
            or "Mobi" in request.headers.get("user-agent", ""))


def new_message_key() -> str:
    """A one-time key for the composer: a message sent twice with it is stored once."""
    return secrets.token_urlsafe(16)


MESSAGE_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


async def room_or_404(request: Request) -> sqlite3.Row:
    """The room in the URL, for this user (room_access): 404, 403 or 429 otherwise."""
    return (await access_or_404(request)).room


async def access_or_404(request: Request) -> RoomAccess:
    """The room in the URL as this user may reach it (find_room): 404 if its code leads
    nowhere, 429 past the limit of guesses, 403 for somebody removed from it."""
    try:
        access = await find_room(request, request.path_params["code"].lower())
    except TooManyFailures as refused:
        raise Refused(too_many_guesses(refused), 429) from None
    if access is None:
        raise Refused("There is no room with that code. Check the link, or ask for a new one.", 404)
    return access


async def member_or_403(request: Request) -> RoomAccess:
    """The room in the URL, for one of its members: 403 for anybody else."""
    access = await access_or_404(request)
    if access.role is None:
        raise Refused("Only the room's members can do that: join it first.", 403)
    return access


async def find_room(request: Request, code: str) -> RoomAccess | None:
    """The room a code leads the user to (room_access), counted as a guess if it leads nowhere;
    403 for somebody an owner removed from it."""
    chat = chat_of(request)
    async with room_lookup(chat, request.state.user["id"], client_address(request)) as lookup:
        access = (await chat.store.read(room_access, code, request.state.user["id"])
                  if code else None)
        if access is None:
            lookup.fail()
    if access is not None and access.removed:
        raise Refused(f"{REMOVED} An owner of it can let you back in.", 403)
    return access


@contextlib.asynccontextmanager
async def room_lookup(chat: Chat, user_id: int, address: str) -> AsyncIterator[Attempt]:
    """Guard one lookup of a room code: the code is the room's only secret, so a code that
    turns out not to exist is a failure against the user's and the address's guesses. Past
    the limit this raises TooManyFailures before anybody learns what the lookup found, so a
    burst of guesses is refused long before it could hit a room; real codes never count."""
    async with chat.room_guess_limit.attempt(("user", user_id), ("address", address)) as attempt:
        yield attempt


def too_many_guesses(refused: TooManyFailures) -> str:
    """The words for somebody past the limit of room codes that do not exist."""
    return ("You tried many room codes that do not exist. "
            f"Try again {in_plain_words(refused.retry_after)}.")


def code_prefix(name: str) -> str:
    """The readable part of a new room's code: its name in ASCII letters and digits."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    prefix = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:40].strip("-")
    return prefix or "room"


def invite_link(conn: HTTPConnection, code: str) -> str:
    """The room's invite link, as the page it came from shows it (scheme, host and port)."""
    link = conn.url_for("room", code=code)
    return str(link.replace(scheme={"ws": "http", "wss": "https"}.get(link.scheme, link.scheme)))


def room_code_from(value: str) -> str:
    """The room code in what a user typed: a bare code or a pasted room URL."""
    value = value.strip()
    found = ROOM_URL_RE.search(value)
    return (found.group(1) if found else value.strip("/")).lower()


def new_room_code(db: sqlite3.Connection, prefix: str) -> str:
    """A new room code: `prefix`, a dash and 13 random characters, a code no room has or
    had."""
    while True:  # a clash of random suffixes is all but impossible; just draw again
        code = f"{prefix}-{''.join(secrets.choice(ROOM_CODE_ALPHABET) for _ in range(13))}"
        if db.execute("SELECT 1 FROM rooms WHERE code = ?1 "
                      "UNION ALL SELECT 1 FROM room_codes WHERE code = ?1",
                      (code,)).fetchone() is None:
            return code


def insert_room(db: sqlite3.Connection, name: str, prefix: str, user_id: int) -> sqlite3.Row:
    """A new room with a new code (new_room_code), owned by the user who made it."""
    with transaction(db):
        code = new_room_code(db, prefix)
        now = utc_now()
        cur = db.execute(
            "INSERT INTO rooms (id, code, name, created_by, created_at) "
            "VALUES ((SELECT value + 1 FROM counters WHERE name = 'room'), ?, ?, ?, ?)",
            (code, name, user_id, now)
        )
        db.execute(
            "INSERT INTO room_members (room_id, user_id, joined_at, last_visit_at, role) "
            "VALUES (?, ?, ?, ?, 'owner')",
            (cur.lastrowid, user_id, now, now),
        )
    return room_by_code(db, code)


def room_by_code(db: sqlite3.Connection, code: str) -> sqlite3.Row | None:
    """The room with this code, unless it was deleted."""
    return db.execute("SELECT * FROM rooms WHERE code = ? AND deleted_at IS NULL",
                      (code,)).fetchone()


@dataclass(frozen=True)
class RoomAccess:
    """A room as one user may reach it by a code: their role in it ('owner', 'member', or
    None if it is not one of theirs), whether an owner removed them, and whether the code
    was one of its earlier ones (which lead its members in, and nobody else)."""

    room: sqlite3.Row
    role: str | None
    removed: bool
    old_code: bool


# A room with what one user (?2) is in it: their role (NULL: not a member) and whether removed.
ROOM_FOR_USER = ("SELECT r.*, "
                 "(SELECT role FROM room_members WHERE room_id = r.id AND user_id = ?2) "
                 "AS viewer_role, "
                 "EXISTS (SELECT 1 FROM removals WHERE room_id = r.id AND user_id = ?2) "
                 "AS viewer_removed FROM rooms r ")


def room_access(db: sqlite3.Connection, code: str, user_id: int) -> RoomAccess | None:
    """The room a code leads this user to; None if it leads nowhere (an unknown code, a
    deleted room, or a room's earlier code in the hands of somebody who is not a member)."""
    room = db.execute(f"{ROOM_FOR_USER} WHERE r.code = ?1 AND r.deleted_at IS NULL",
                      (code, user_id)).fetchone()
    old_code = room is None
    if old_code:
        room = db.execute(f"{ROOM_FOR_USER} JOIN room_codes c ON c.room_id = r.id "
                          "WHERE c.code = ?1 AND r.deleted_at IS NULL", (code, user_id)).fetchone()
    if room is None or (old_code and room["viewer_role"] is None and not room["viewer_removed"]):
        return None  # (somebody removed is told so, by any of its codes)
    return RoomAccess(room, room["viewer_role"], bool(room["viewer_removed"]), old_code)


def record_visit(db: sqlite3.Connection, room_id: int, user_id: int) -> None:
    """The user opened the room: it is (again) one of theirs, and all in it is seen."""
    now = utc_now()
    with transaction(db):
        db.execute(
            "INSERT INTO room_members (room_id, user_id, joined_at, last_visit_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (room_id, user_id) DO UPDATE "
            "SET last_visit_at = excluded.last_visit_at",
            (room_id, user_id, now, now),
        )
        mark_read(db, room_id, user_id)


def rooms_of(db: sqlite3.Connection, user_id: int) -> list[sqlite3.Row]:
    """The user's rooms, most recently visited first, each with `unread`: how many messages
    arrived since the user last had it open (a short walk of the room's index, capped), and
    `mentioned`: whether one of those mentions them."""
    return db.execute(
        "SELECT r.id, r.code, r.name, m.last_visit_at, "
        "(SELECT count(*) FROM (SELECT 1 FROM messages x "
        "  WHERE x.room_id = r.id AND x.id > m.last_read_id LIMIT ?)) AS unread, "
        "  EXISTS (SELECT 1 FROM mentions x WHERE x.user_id = m.user_id AND x.room_id = r.id "
        "          AND x.message_id > m.last_read_id) AS mentioned "
        "FROM room_members m JOIN rooms r ON r.id = m.room_id "
        "WHERE m.user_id = ? AND r.deleted_at IS NULL "
        "ORDER BY m.last_visit_at DESC, r.id DESC LIMIT 100",
        (UNREAD_SHOWN + 1, user_id),
    ).fetchall()


def last_read(db: sqlite3.Connection, room_id: int, user_id: int) -> int | None:
    """The newest message the user had seen in the room; None if it is not one of theirs."""
    row = db.execute("SELECT last_read_id FROM room_members WHERE room_id = ? AND user_id = ?",
                     (room_id, user_id)).fetchone()
    return row[0] if row else None


def room_page_rows(db: sqlite3.Connection, room_id: int, user_id: int, csrf: str
                   ) -> tuple[int | None, list[sqlite3.Row], bool, frozenset[int], dict[str, str]]:
    """What a room page shows, in one trip: the newest message the user had seen (last_read),
    the newest page of messages and whether older ones exist (page_before), the owners, and
    the parts beside the log (page_parts)."""
    return (last_read(db, room_id, user_id), *page_before(db, room_id, None),
            room_owners(db, room_id), page_parts(db, room_id, csrf))


def mark_read(db: sqlite3.Connection, room_id: int, user_id: int) -> None:
    """The user has seen everything in the room so far (the page is open, or just closed)."""
    db.execute("UPDATE room_members SET last_read_id = (SELECT coalesce(max(id), 0) FROM messages "
               "WHERE room_id = ?) WHERE room_id = ? AND user_id = ?", (room_id, room_id, user_id))


def mark_read_now(db: sqlite3.Connection, room_id: int, user_id: int) -> None:
    """mark_read in a transaction of its own (a page of the room just closed: its user was
    seen just now, too)."""
    with transaction(db):
        mark_read(db, room_id, user_id)
        seen_now(db, [user_id])


def leave_room_membership(db: sqlite3.Connection, room_id: int, user_id: int) -> None:
    """The user leaves the room; Refused (409) for its only owner (somebody must run it)."""
    with transaction(db):
        if room_owners(db, room_id) == {user_id}:
            raise Refused("You are this room's only owner: make somebody else an owner first, "
                          "or delete the room.", 409)
        db.execute("DELETE FROM room_members WHERE room_id = ? AND user_id = ?", (room_id, user_id))


def room_owners(db: sqlite3.Connection, room_id: int) -> frozenset[int]:
    """The user ids of the room's owners."""
    return frozenset(row[0] for row in db.execute(
        "SELECT user_id FROM room_members WHERE room_id = ? AND role = 'owner'", (room_id,)))


def message_by_id(db: sqlite3.Connection, message_id: int) -> sqlite3.Row | None:
    """The message as pages show it (SELECT_MESSAGES), or None."""
    return db.execute(f"{SELECT_MESSAGES} WHERE m.id = ?", (message_id,)).fetchone()


def message_in_room(db: sqlite3.Connection, message_id: int, room_id: int) -> sqlite3.Row | None:
    """The message as pages show it, if it is in this room (and not cleared); else None."""
    return db.execute(f"{SELECT_MESSAGES} WHERE m.id = ? AND m.room_id = ? AND {NOT_CLEARED}",
                      (message_id, room_id)).fetchone()


def page_before(db: sqlite3.Connection, room_id: int, before: int | None,
                limit: int = PAGE_SIZE) -> tuple[list[sqlite3.Row], bool]:
    """Up to `limit` messages older than `before` (or the newest), oldest first; and whether
    more exist."""
    rows = db.execute(
        f"{SELECT_MESSAGES} WHERE m.room_id = ? AND m.id < ? AND {NOT_CLEARED} "
        "ORDER BY m.id DESC LIMIT ?",
        (room_id, before if before is not None else 2**63 - 1, limit + 1),
    ).fetchall()
    return rows[:limit][::-1], len(rows) > limit


def page_after(db: sqlite3.Connection, room_id: int, after: int,
               limit: int = PAGE_SIZE) -> tuple[list[sqlite3.Row], bool]:
    """Up to `limit` messages newer than `after`, oldest first; and whether more exist."""
    rows = db.execute(f"{SELECT_MESSAGES} WHERE m.room_id = ? AND m.id > ? AND {NOT_CLEARED} "
                      "ORDER BY m.id LIMIT ?", (room_id, after, limit + 1)).fetchall()
    return rows[:limit], len(rows) > limit


def page_around(db: sqlite3.Connection, room_id: int,
                message_id: int) -> tuple[list[sqlite3.Row], bool, bool] | None:
    """The messages around one of the room's (it among them), oldest first, and whether older
    and newer ones exist; None if that message is not in this room."""
    if message_in_room(db, message_id, room_id) is None:
        return None
    older, has_older = page_before(db, room_id, message_id + 1, PAGE_SIZE // 2)
    newer, has_newer = page_after(db, room_id, message_id, PAGE_SIZE // 2)
    return older + newer, has_older, has_newer


ROOM_ROUTES = [
    get("/", home),
    get("/create/", create_page), post("/create/", create_room),
    get("/join/", join_page), post("/join/", join_room),
    get("/room/{code}/", room_page, name="room"),
    get("/room/{code}/messages", history),
    post("/room/{code}/leave", leave_room),
]


# ---------------------------------------------------------------------------
# 9. A message
# The path of one message, top to bottom in the order it runs: the socket, its handshake, a
# frame, the checks, the commit, the push; then catch-up and the plain form without JavaScript.
# ---------------------------------------------------------------------------


MAX_MESSAGE_CHARS = 4000


MAX_WS_FRAME_BYTES = 64 * 1024


# Beyond a page of missed changes a page is re-synced whole: a catch-up costs a page at most.
CATCH_UP_LIMIT = PAGE_SIZE


CATCH_UP_BYTES = 256 * 1024  # and beyond this size too: what one catch-up frame may hold


LOCKED = "This room is locked by its owner: only its owners can write for now."


NOT_STORED = {"locked": (LOCKED, 403), "removed": (REMOVED, 403),
              "deleted": ("This room was deleted.", 404),
              "owners": ("Only this room's owners can start a poll.", 403)}


# What the sender gets once its message is taken: the same every time but for the key it
# answers (URL-safe letters: nothing to escape), so rendered once here (README, Performance).
KEY_SLOT = "key-slot"


async def chat_socket(websocket: WebSocket) -> None:
    """The room's WebSocket: the handshake (admit), a catch-up if asked, then every frame the
    page sends (handle_frame) until it closes; then the room is marked read and left."""
    chat = chat_of(websocket)
    conn = await admit(chat, websocket)
    if conn is None:
        return
    hub, fanout = chat.hub, chat.fanout
    # Join before any catch-up: a message stored in between arrives both ways, and the
    # page's upsert swap shows it once. (Watched before the catch-up: a frame sent after it
    # reads will arrive.)
    await fanout.watch(conn.room_id)
    if hub.join(conn):
        await fanout.came_online(conn)
    try:
        # The room page says what it has in its first frame (the catch-up form); another
        # client may say it in the URL (`?revision=<n>`), or not at all and get only
        # what is said from now on.
        if (revision := whole_number(websocket.query_params.get("revision", ""))) is not None:
            await catch_up(chat, conn, revision)
        while True:
            event = await websocket.receive()
            if event["type"] == "websocket.disconnect":
                break
            if not conn.dropped:  # dropped: closing; nothing more it sends is read
                await handle_frame(chat, conn, event)
    except (WebSocketDisconnect, WebSocketDisconnected):
        pass  # the client went away mid-receive
    except asyncio.CancelledError:
        if not conn.dropped:
            raise
        asyncio.current_task().uncancel()  # we cancelled ourselves to drop a slow reader
    finally:
        conn.handler = None  # done reading: nothing to cancel any more
        conn.stop_flushing()
        hub.release(conn.user_id, client_address(websocket))
        try:  # what came live was seen: marked read before the page leaves the hub (render_room)
            await chat.store.write(mark_read_now, conn.room_id, conn.user_id)
        except sqlite3.Error as problem:
            log.warning("could not mark %s read for %s: %r", conn.room_code, conn.username, problem)
        finally:
            if hub.leave(conn):
                await fanout.went_offline(conn)
            if conn.room_id not in hub.connections:
                await fanout.unwatch(conn.room_id)


async def admit(chat: Chat, websocket: WebSocket) -> Connection | None:
    """The handshake: refuse (403), or accept and return the new connection."""
    if not origin_allowed(websocket, chat.settings.allowed_origins):
        await refuse(websocket, "cross-site Origin")
        return None
    session_id, address = websocket.session.get("sid", ""), client_address(websocket)
    # Counted before anything is read: a page reconnecting in a loop (or 19 at once) costs a
    # refusal each, not a session read and a catch-up each.
    if not (await chat.handshake_limit.allow(("session", session_id))
            and await chat.address_handshake_limit.allow(("address", address))):
        await refuse(websocket, "too many handshakes")
        return None
    code = websocket.path_params["code"].lower()
    user, access, owners = await chat.store.read(handshake_rows, session_id, code,
                                                 chat.settings.guests)
    if user is None:
        # A page whose session ended (logged out, elsewhere too) while it was away: accept
        # only to tell it so, in place, and close with a code htmx does not retry.
        log.info("WebSocket %s: no live session; told the page to log in again", websocket.url.path)
        return await end_at_once(websocket, code, "logged out")
    try:  # (the room was read in the same trip as the session; nothing of it is said before this)
        if access is not None:  # a real code never counts: only refused if a key is past its limit
            await chat.room_guess_limit.check(("user", user["id"]), ("address", address))
        else:
            async with room_lookup(chat, user["id"], address) as lookup:
                lookup.fail()
    except TooManyFailures:
        access = None
    if access is None:
        await refuse(websocket, "no such room (or too many unknown codes)")
        return None
    if access.removed:  # told so, as a removal tells the pages open at the time
        return await end_at_once(websocket, code, "removed")
    room = access.room
    if not chat.hub.claim(user["id"], address):
        await refuse(websocket, f"{user['username']} or {address} has too many sockets open")
        return None
    try:
        await websocket.accept()
    except BaseException:
        chat.hub.release(user["id"], address)
        raise
    chat.hub.rooms[room["id"]] = RoomState.of(room, owners)  # as the database has it now
    # The connection keeps a few values, not the rows: it may live for days, by the thousand.
    return Connection(websocket, session_id, user, room["id"], room["code"],
                      wire=websocket.query_params.get("wire") == "1")


async def handle_frame(chat: Chat, conn: Connection, event: Message) -> None:
    """One frame from a page: a message to post (post_message) or the catch-up form; what is
    refused is said to that page alone, and a message taken is acknowledged to it."""
    if conn.wire:  # teaching mode: the page sees what it sent, as the server received it
        sent = event.get("text") or f"({len(event.get('bytes') or b'')} bytes of binary)"
        conn.push(str(fragments.wire_entry(without_secrets(sent), WIRE_ECHO_CHARS, SENT)),
                  audience=None)
    key = None
    try:
        if event.get("text") is None:
            raise Refused("Binary frames are not understood; send text.")
        fields = parse_frame(event["text"])
        if "revision" in fields:
            return await catch_up(chat, conn, fields["revision"])
        key = fields["key"] if fields["key"] and MESSAGE_KEY_RE.fullmatch(fields["key"]) else None
        await post_message(chat, conn.room_id, conn.user_id, fields["message"], fields["key"],
                           chat.hub.rooms.get(conn.room_id), fields["reply_to"],
                           "question" if fields["question"] else "message",
                           anonymous=fields["anonymous"])
    except Refused as problem:
        return conn.push(str(fragments.chat_error(str(problem), key=key)))
    except Exception:  # a bug: said in the log, once, and to the sender; the socket stays open
        log.exception("a frame from %s in %s failed", conn.username, conn.room_code)
        return conn.push(str(fragments.chat_error(NOT_SAVED, key=key)))
    conn.push(composer_ack().replace(KEY_SLOT, key or ""))  # taken (stored, or stored before)


def parse_frame(frame: str) -> dict[str, Any]:
    """The fields of an hx-ws:send frame (a form's fields at the top level of a JSON object,
    beside htmx's `headers`) from one of the room page's two forms: the composer
    ({"message": str, "key": str | None, "reply_to": int | None, "question": bool,
    "anonymous": bool}: ticked boxes are there, unticked ones are not) or the catch-up form
    ({"revision": int}, the revision the page has). Refused, with the reason, for anything else."""
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        raise Refused("That frame was not JSON; send the message form.") from None
    if isinstance(data, dict) and "message" not in data and "revision" in data:
        revision = whole_number(data["revision"]) if isinstance(data["revision"], str) else None
        if revision is None:
            raise Refused("`revision` must be the revision number the page has.")
        return {"revision": revision}
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        raise Refused("That frame had no text `message` field.")
    key = data.get("key")
    if key is not None and not isinstance(key, str):
        raise Refused("That message came with a broken `key`; reload the page.")
    reply_to = data.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str)
                                 or (reply_to := whole_number(reply_to)) is None):
        raise Refused("`reply_to` must be the id of the message you answer.")
    return {"message": data["message"], "key": key, "reply_to": reply_to,
            "question": "question" in data, "anonymous": "anonymous" in data}


async def post_message(chat: Chat, room_id: int, user_id: int, text: str, key: str | None,
                       state: RoomState | None, reply_to: int | None = None,
                       kind: str = "message", options: tuple[str, ...] = (),
                       anonymous: bool = False) -> sqlite3.Row | None:
    """Check one message, store it, then push it to the room: the one path every message
    takes, from the socket, the plain form, a poll's question and a bot (its API, its
    webhook's answer); then tell MESSAGE_LISTENERS. `state`: the room's lock
    and slow mode, as the hub holds them (the database checks a lock, and removals, again as
    it stores). `reply_to`: the id of the message it answers (one of another room's is
    ignored). `kind`: "message", "question" (`anonymous`: asked without the name shown, where
    the room allows it) or "poll" (its `options`; its owners' only). The message as pages show
    it; None if there was nothing to send, or it was a resend; raises Refused with the reason
    it was not taken."""
    text = clean_text(text).strip()
    if not text:
        return None  # an empty message is simply not sent
    if key is not None and not MESSAGE_KEY_RE.fullmatch(key):
        raise Refused("That message came with a broken `key`; reload the page.")
    check_text(text)
    await check_turn(chat, room_id, user_id, state)
    shown = await rendered(text, await chat.store.read(room_people, room_id) if "@" in text else ())
    try:
        message = await chat.store.write_together(add_messages, NewMessage(
            room_id, user_id, text, key, reply_to, shown.mentioned, shown.html, kind, anonymous,
            options))
    except sqlite3.Error:  # e.g. the file stayed locked past busy_timeout: nothing was stored
        raise Refused(NOT_SAVED, 503) from None
    except Exception:  # a bug in this one message: nothing of it stored, nobody else's lost
        log.exception("a message from user %d in room %d could not be stored", user_id, room_id)
        raise Refused(NOT_SAVED, 503) from None
    if isinstance(message, str):  # a removal, a lock or a deletion got there first
        raise Refused(*NOT_STORED[message])
    if message is not None:  # None: a resend of a stored message (same key), already shown
        frame = str(fragments.new_message_frame(message))
        if kind == "question":  # (in the Questions list too: read after the write, section 6)
            frame += await chat.store.read(room_parts, room_id)
        await chat.fanout.publish(room_id, frame, message["revision"])
        for listener in MESSAGE_LISTENERS:
            listener(chat, message)
    return message


# What else hears of a message once it is stored and pushed (section 14: a mentioned bot's
# webhook): each is called with the Chat and the message's row, on the message path, so it
# must only queue work, never wait.
MESSAGE_LISTENERS: list[Callable[[Chat, sqlite3.Row], None]] = []


NOT_SAVED = "Your message could not be saved just now. Press Send again."


def check_text(text: str) -> None:
    """The rule for any text going into a room, new or edited: its length."""
    if problem := too_long("Messages", MAX_MESSAGE_CHARS, text):
        raise Refused(problem)


async def check_turn(chat: Chat, room_id: int, user_id: int, state: RoomState | None,
                     pace: bool = True) -> None:
    """The one check every way of changing what others see passes (a message, an edit, a
    reaction; a vote, a question and a bot's post too): the message rate (per user per room,
    owners included), then, for members, the room's lock and, with `pace` (what adds to the
    conversation: messages and edits, not reactions or votes), its slow mode. Refused with the
    reason. `state`: the room's lock, slow mode and owners (RoomState)."""
    if not await chat.message_limit.allow((user_id, room_id)):
        raise Refused("You are sending messages too fast. Wait a few seconds.", 429,
                      await chat.message_limit.retry_after((user_id, room_id)))
    if state is None or user_id in state.owners:  # owners are never held back
        return
    if state.locked:
        raise Refused(LOCKED, 403)
    if pace and state.slow_mode and not await (
            slow := chat.slow_limits[state.slow_mode]).allow((room_id, user_id)):
        wait = max(1, round(await slow.retry_after((room_id, user_id))))
        raise Refused(f"Slow mode: one message every {state.slow_mode} s. "
                      f"Wait {wait} s more.", 429, wait)


def state_of(access: RoomAccess, user_id: int) -> RoomState:
    """The room's state as an HTTP request finds it (the database's row), for check_turn: its
    lock and slow mode, and whether the person asking is one of its owners."""
    owners = frozenset({user_id}) if access.role == "owner" else frozenset()
    return RoomState.of(access.room, owners)


@functools.cache
def composer_ack() -> str:
    """The frame that tells the sender its message was taken, with KEY_SLOT where its key
    goes (rendered once)."""
    return str(fragments.chat_error(key=KEY_SLOT))


async def catch_up(chat: Chat, conn: Connection, revision: int) -> None:
    """Send the page what changed after the revision it has, once per socket: a page asks
    as its socket opens, and asking again would only cost the database. What the room
    broadcasts while the catch-up is read waits, and follows it if it is newer: a change
    read into the catch-up is never overwritten by an older copy, nor the page's cursor set
    back (Connection.push)."""
    if conn.caught_up:
        return
    conn.caught_up, conn.held = True, []
    try:
        frame, covered = await chat.store.read(catch_up_frame, conn.room_id, revision,
                                               invite_link(conn.websocket, conn.room_code))
    finally:
        held, conn.held = conn.held, None
    if frame:
        conn.push(frame)
    conn.revision = max(conn.revision, covered)
    for frame, audience, label, changed in held:
        if changed is None or changed > covered:  # (the rest is in the catch-up, as it is now)
            conn.push(frame, audience, label, changed)


def catch_up_frame(db: sqlite3.Connection, room_id: int, revision: int,
                   invite: str) -> tuple[str | None, int]:
    """What a (re)connecting page is missing, and the room's revision it covers: every
    message sent or edited, and every one deleted, since the revision the page has (the one
    it was rendered at, moved on by every change it received since), and the room's state
    (lock, slow mode, owners, code: `invite` is its link) if that changed since, and the parts
    beside the log (room_parts: the pin, the questions) if anything did. The upsert
    swap replaces what the page already shows, so overlap is harmless. A page too far behind
    (CATCH_UP_LIMIT changes, CATCH_UP_BYTES of HTML) gets the newest page whole instead, as
    much of it as fits. Read in one snapshot on the reader thread, so a big catch-up never
    holds up the event loop, and the revision it covers is true of all of it."""
    with reading(db):
        room = db.execute("SELECT * FROM rooms WHERE id = ?", (room_id,)).fetchone()
        frame = messages_since(db, room, revision)
        if room["state_revision"] > revision:  # (the lock, slow mode, owners or code changed)
            state = RoomState.of(room, room_owners(db, room_id))
            frame = (frame or "") + str(fragments.room_changed_frame(state, room["revision"],
                                                                    invite))
        if room["revision"] > revision:  # (anything changed: the pin and questions as they are)
            frame = ((frame or "") + room_parts(db, room)
                     + str(fragments.room_revision(room["revision"], oob=True)))
    return frame, room["revision"]


def messages_since(db: sqlite3.Connection, room: sqlite3.Row, revision: int) -> str | None:
    """The messages part of a catch-up (catch_up_frame): None if none changed."""
    changed, deleted = changes_since(db, room["id"], revision, CATCH_UP_LIMIT + 1)
    cleared_since = room["cleared_revision"] > revision
    if not changed and not deleted and not cleared_since:
        return None
    if len(changed) <= CATCH_UP_LIMIT and len(deleted) <= CATCH_UP_LIMIT and not cleared_since:
        newest = max(row["revision"] for row in [*changed, *deleted])
        frame = (str(fragments.messages_frame(changed)) if changed else "") + str(
            fragments.deleted_frame([row["message_id"] for row in deleted], newest))
        if len(frame) <= CATCH_UP_BYTES:
            return frame
    messages, has_older = page_before(db, room["id"], None)
    while True:
        frame = str(fragments.history_page(room, messages, has_older, oob=True,
                                           revision=room["revision"]))
        if len(frame) <= CATCH_UP_BYTES or len(messages) <= 1:
            return frame
        # The newer half; "Load older messages" has the rest.
        messages, has_older = messages[len(messages) // 2:], True


@login_required
async def send_message(request: Request) -> Response:
    """The composer without JavaScript (or before htmx has loaded): a plain POST, with the
    same checks as a frame on the socket, then back to the room. Text never goes in a URL."""
    access = await access_or_404(request)
    room = access.room
    form = await read_form(request)
    user = request.state.user
    try:
        await post_message(chat_of(request), room["id"], user["id"], form.get("message", ""),
                           form.get("key") or None, state_of(access, user["id"]),
                           whole_number(form.get("reply_to", "")),
                           "question" if "question" in form else "message",
                           anonymous="anonymous" in form)
    except Refused as problem:
        return await render_room(request, room, problem.status_code, error=str(problem),
                                 draft=form.get("message", ""),
                                 reply=whole_number(form.get("reply_to", "")))
    return redirect(f"/room/{room['code']}/#composer")


def handshake_rows(db: sqlite3.Connection, session_id: str, code: str,
                   guests: bool) -> tuple[sqlite3.Row | None, RoomAccess | None, frozenset[int]]:
    """What a socket's handshake needs, in one trip: the session's user, the room as the code
    leads them to it (room_access), its owners."""
    user = user_by_session(db, session_id, guests)
    access = room_access(db, code, user["id"]) if user else None
    return user, access, room_owners(db, access.room["id"]) if access else frozenset()


def origin_allowed(websocket: WebSocket, allowed: frozenset[str]) -> bool:
    """Whether the handshake comes from a page of this site (its Origin is the scheme and
    Host it came to) or from one of `allowed` (CHAT_ALLOWED_ORIGINS)."""
    origin = websocket.headers.get("origin")
    if origin is None:
        # Not a browser (browsers always send Origin); the session still has to be valid.
        return True
    # (Not .url: it parses the whole URL.)
    scheme = "https" if websocket.scope["scheme"] == "wss" else "http"
    origin = origin.rstrip("/").lower()
    return origin == f"{scheme}://{websocket.headers.get('host', '').lower()}" or origin in allowed


async def refuse(websocket: WebSocket, reason: str) -> None:
    """Refuse a handshake: HTTP 403, and one INFO line that says why."""
    log.info("refused WebSocket %s from %s: %s",
             websocket.url.path, client_address(websocket), reason)
    # A close before accept is uvicorn's own 403. (A denial response would log a spurious
    # ERROR on uvicorn's default implementation: its pull request #3138.)
    await websocket.close()


async def end_at_once(websocket: WebSocket, code: str, why: str) -> None:
    """Accept only to tell the page in place why it may not go on (page_ended), and close
    with a code htmx does not retry."""
    await websocket.accept()
    await websocket.send_text(str(fragments.page_ended(code, why)))
    await websocket.close(SESSION_ENDED, why)


# One statement stores a message and hands back its id. Its id is the next of the messages'
# counter (SCHEMA's `counters`), never one a deleted message had: a page catching up would
# take the new message for the deleted one, and the search index would skip it. Nothing is
# stored from somebody an owner removed, nor from a member while the room is locked, nor in
# a deleted room: checked in the same statement, so no send can slip past a removal or a lock
# that committed first.
INSERT_MESSAGE = (
    "INSERT INTO messages (id, room_id, user_id, text, html, created_at, client_key, revision, "
    "reply_to, kind, anonymous) "
    "SELECT (SELECT value + 1 FROM counters WHERE name = 'message'), :room_id, :user_id, :text, "
    "      :html, "
    f"      strftime('{ISO_SECONDS}', 'now'), :key, "
    "      (SELECT revision + 1 FROM rooms WHERE id = :room_id), "
    # reply_to (another room's message: none)
    "      (SELECT id FROM messages m WHERE id = :reply_to AND room_id = :room_id "
    f"       AND {NOT_CLEARED}), :kind, "
    # (anonymous: a question, where the room's owners allow it)
    "      :kind = 'question' AND :anonymous "
    "      AND (SELECT questions_anonymous FROM rooms WHERE id = :room_id) "
    "WHERE NOT EXISTS (SELECT 1 FROM removals WHERE room_id = :room_id AND user_id = :user_id) "
    "  AND (SELECT deleted_at IS NULL AND (NOT locked OR is_owner) "
    "       AND (:kind != 'poll' OR is_owner) "
    "       FROM rooms, (SELECT EXISTS (SELECT 1 FROM room_members WHERE room_id = :room_id "
    "                    AND user_id = :user_id AND role = 'owner') AS is_owner) "
    "       WHERE id = :room_id) "
    "ON CONFLICT DO NOTHING "  # the same user and key: a resend of a stored message
    "RETURNING id")


class NewMessage(NamedTuple):
    """A message on its way to the database (add_messages)."""

    room_id: int
    user_id: int
    text: str
    key: str | None  # the composer's one-time key
    reply_to: int | None  # the message it answers
    mentioned: tuple[int, ...] = ()  # whom it mentions (render_text)
    html: str | None = None  # its text rendered (render_text)
    kind: str = "message"  # or "question", "poll" (section 13)
    anonymous: bool = False  # a question asked without its author's name shown
    options: tuple[str, ...] = ()  # a poll's, in order


def add_messages(db: sqlite3.Connection, messages: list[NewMessage]) -> list[Any]:
    """Store messages in one transaction (group commit: Store.write_together), each inside a
    savepoint of its own, so one that fails (any exception) fails alone and the others are
    stored. For each: its row as pages show it; None when its user already sent one with its
    key (a resend); why it was not stored ("removed", "locked" or "deleted"); or the
    exception that stopped it."""
    answers: list[Any] = []
    with transaction(db):
        for message in messages:
            db.execute("SAVEPOINT message")
            try:
                answers.append(add_message(db, message))
            except Exception as problem:
                db.execute("ROLLBACK TO message")
                answers.append(problem)
            db.execute("RELEASE message")
    return answers  # only after COMMIT: nobody is shown a message the database could still lose


def add_message(db: sqlite3.Connection, message: NewMessage) -> sqlite3.Row | str | None:
    """Store one message (INSERT_MESSAGE) and whom it mentions; what add_messages answers."""
    # All its rows: the statement ends before COMMIT.
    returned = db.execute(INSERT_MESSAGE, message._asdict()).fetchall()
    if not returned:
        return why_not_stored(db, message)
    message_id = returned[0]["id"]
    store_mentions(db, message_id, message.room_id, message.mentioned)
    if message.kind == "poll":  # (its options and votes are section 13's tables)
        db.execute("INSERT INTO polls (message_id) VALUES (?)", (message_id,))
        db.executemany("INSERT INTO poll_options (message_id, position, text) VALUES (?, ?, ?)",
                       [(message_id, n, text) for n, text in enumerate(message.options, 1)])
    return message_by_id(db, message_id)


def store_mentions(db: sqlite3.Connection, message_id: int, room_id: int,
                   mentioned: tuple[int, ...]) -> None:
    """Note whom a message mentions (their home page marks the room), instead of whom it did."""
    db.execute("DELETE FROM mentions WHERE message_id = ?", (message_id,))
    db.executemany("INSERT INTO mentions (message_id, user_id, room_id) VALUES (?, ?, ?) "
                   "ON CONFLICT DO NOTHING",
                   [(message_id, user_id, room_id) for user_id in mentioned])


def room_people(db: sqlite3.Connection, room_id: int) -> tuple[tuple[int, str], ...]:
    """The room's members ((user id, name), 1,000 at most): whom a message may mention."""
    return tuple((user_id, name) for user_id, name in db.execute(
        "SELECT u.id, u.username FROM room_members rm JOIN users u ON u.id = rm.user_id "
        "WHERE rm.room_id = ? LIMIT 1000", (room_id,)))


def why_not_stored(db: sqlite3.Connection, message: NewMessage) -> str | None:
    """Why INSERT_MESSAGE stored nothing (the rare case, asked only then): None for a resend,
    "removed", "deleted" (a room deleted, or gone altogether), "owners" (a poll by somebody who
    is not one of them) or "locked"."""
    if message.key is not None and db.execute(
            "SELECT 1 FROM messages WHERE user_id = ? AND client_key = ?",
            (message.user_id, message.key)).fetchone():
        return None  # a resend
    if db.execute("SELECT 1 FROM removals WHERE room_id = ? AND user_id = ?",
                  (message.room_id, message.user_id)).fetchone():
        return "removed"
    room = db.execute("SELECT deleted_at FROM rooms WHERE id = ?", (message.room_id,)).fetchone()
    if room is None or room["deleted_at"]:
        return "deleted"
    return "owners" if message.kind == "poll" else "locked"  # (only an owner may start a poll)


def locked_for(db: sqlite3.Connection, room_id: int, user_id: int) -> bool:
    """Whether the room is locked and the user is not one of its owners (asked inside the
    transaction of a change, so a lock that committed first holds it back)."""
    return bool(db.execute(
        "SELECT locked AND NOT EXISTS (SELECT 1 FROM room_members WHERE room_id = ?1 "
        "AND user_id = ?2 AND role = 'owner') FROM rooms WHERE id = ?1",
        (room_id, user_id)).fetchone()[0])


class PollOption(NamedTuple):
    """One option of a poll, as pages and the transcript show it."""

    position: int  # 1, 2, ... as the owner wrote them
    text: str
    voters: list[str]  # their pseudonyms (pseudonym 'vote'): a page marks its viewer's own
    won: bool  # a closed poll's option with the most votes (a tie: each of them)


class Poll(NamedTuple):
    """A poll message's options and votes (section 13)."""

    closed: bool
    options: list[PollOption]
    total: int  # votes cast


@template_filter("poll_of")
def poll_of(m: sqlite3.Row) -> Poll:
    """The poll a message of kind 'poll' holds, out of its `votes` (SELECT_MESSAGES)."""
    data = json.loads(m["votes"] or '{"closed": null, "options": []}')
    counted = sorted((position, text, voters.split() if voters else [])
                     for position, text, voters in data["options"])
    most, closed = max((len(voters) for *_, voters in counted), default=0), bool(data["closed"])
    return Poll(closed, [PollOption(position, text, voters, closed and 0 < most == len(voters))
                         for position, text, voters in counted],
                sum(len(voters) for *_, voters in counted))


RENDER_BATCH = 200  # messages rendered again per trip (render_old_messages)


async def render_old_messages(chat: Chat) -> None:
    """At start, in the background: render again the messages that another version of
    render_text rendered (or none did: a database from before), RENDER_BATCH at a time, oldest
    first, on the rendering thread, until every one is; meanwhile pages render an unrendered
    one as they show it (message_html)."""
    await chat.store.write(start_rendering, RENDERER_VERSION)
    while rows := await chat.store.read(messages_to_render, RENDER_BATCH):
        shown = await asyncio.get_running_loop().run_in_executor(RENDERING, render_rows, rows)
        await chat.store.write(store_renderings, shown, rows[-1]["id"])


def render_rows(rows: list[sqlite3.Row]) -> list[tuple[str, int, str]]:
    """(html, id, text) for each message, its mentions as they were recorded."""
    return [(render_text(row["text"], tuple(
        (int(user_id), name) for user_id, name in (line.split(" ", 1) for line in
                                                    (row["mentioned"] or "").split("\n") if line)
    )).html, row["id"], row["text"]) for row in rows]


def start_rendering(db: sqlite3.Connection, version: int) -> None:
    """If the stored renderings are of another version, every message up to the newest is
    to be rendered again."""
    with transaction(db):
        db.execute("UPDATE render_state SET version = ?1, rendered_up_to = 0, target = "
                   "(SELECT coalesce(max(id), 0) FROM messages) WHERE version != ?1", (version,))


def messages_to_render(db: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """The next messages render_old_messages is to render, with whom each mentions."""
    return db.execute(
        "SELECT m.id, m.text, (SELECT group_concat(x.user_id || ' ' || u.username, char(10)) "
        "  FROM mentions x JOIN users u ON u.id = x.user_id WHERE x.message_id = m.id) "
        "  AS mentioned "
        "FROM messages m, render_state "  # (one row)
        "WHERE m.id > render_state.rendered_up_to AND m.id <= render_state.target "
        "ORDER BY m.id LIMIT ?", (limit,)).fetchall()


def store_renderings(db: sqlite3.Connection, shown: list[tuple[str, int, str]], up_to: int) -> None:
    """Keep the renderings (of a text not edited meanwhile: an edit renders its own), and
    how far they reach."""
    with transaction(db):
        db.executemany("UPDATE messages SET html = ? WHERE id = ? AND text = ?", shown)
        db.execute("UPDATE render_state SET rendered_up_to = ?", (up_to,))


MESSAGE_ROUTES = [
    WebSocketRoute("/chat/{code}/", chat_socket),
    post("/room/{code}/messages", send_message),
]


# ---------------------------------------------------------------------------
# 10. Changing a message
# Edit, delete, react and reply: each checked on the server, each reaching every page on the
# room's next revision.
# ---------------------------------------------------------------------------


REACTIONS = {"👍": "thumbs up", "❤️": "heart", "😂": "laughing",
             "🎉": "party", "😮": "surprised", "👀": "eyes"}


@login_required
async def message_editor(request: Request) -> Response:
    """The Edit button's form, loaded into the page's editor popover."""
    room = await room_or_404(request)
    me = request.state.user["id"]
    return HTMLResponse(str(fragments.editor_form(await message_or_404(request, room, author=me))))


@login_required
async def edit(request: Request) -> Response:
    """Save an edit: the same rules as a new message; every open page gets the new text."""
    access = await access_or_404(request)
    room, me = access.room, request.state.user["id"]
    message = await message_or_404(request, room, author=me)
    form = await read_form(request)
    chat = chat_of(request)
    text = clean_text(form.get("message", "")).strip()
    try:
        if not text:
            raise Refused("A message needs some text; to remove it, use Delete.")
        check_text(text)
        await check_turn(chat, room["id"], me, state_of(access, me))
        people = await chat.store.read(room_people, room["id"]) if "@" in text else ()
        shown = await rendered(text, people)
        # (edit_message checks the author and the lock again inside its transaction)
        try:
            edited = await chat.store.write(edit_message, message["id"], room["id"], me, text,
                                            shown)
        except sqlite3.Error as problem:
            raise Refused(could_not_save("Your edit could not be saved", problem), 503) from None
    except Refused as problem:
        return HTMLResponse(str(fragments.editor_error(str(problem))),
                            status_code=problem.status_code)
    if edited is None:  # deleted meanwhile
        raise Refused(GONE, 404)
    parts = await chat.store.read(parts_showing, room["id"], message["id"])
    await chat.fanout.publish(room["id"],
                              str(fragments.messages_frame(edited, edited[-1]["revision"])) + parts,
                              edited[-1]["revision"])
    return HTMLResponse(str(fragments.editor_closed()))


@login_required
async def delete(request: Request) -> Response:
    """Delete a message (its author, or an owner of the room: any message in it): gone from
    the database and from every open page."""
    access = await access_or_404(request)
    room, as_owner = access.room, access.role == "owner"
    me = request.state.user
    author = None if as_owner else me["id"]  # an owner may delete anybody's
    message = await message_or_404(request, room, author)
    await read_form(request)  # the CSRF check
    chat = chat_of(request)
    try:
        deleted = await chat.store.write(delete_message, message["id"], room["id"], author)
    except sqlite3.Error as problem:  # said where the page shows the sender's errors
        return HTMLResponse(str(fragments.chat_error(
            could_not_save("The message could not be deleted", problem))), 503)
    if deleted is not None:
        revision, replies, unpinned = deleted  # (the replies' quotes now say "deleted message")
        parts = (await chat.store.read(room_parts, room["id"])
                 if unpinned or message["kind"] == "question" else "")
        await chat.fanout.publish(room["id"],
                                  (str(fragments.messages_frame(replies)) if replies else "")
                                  + str(fragments.deleted_frame([message["id"]], revision))
                                  + parts, revision)
        if message["user_id"] != me["id"]:
            log.info("moderation: %s deleted %s's message %d in %s",
                     me["username"], message["username"], message["id"], room["code"])
    return HTMLResponse("")


@login_required
async def reaction_picker(request: Request) -> Response:
    """The React button's choices for one message, loaded into the page's reactor popover."""
    access = await member_or_403(request)
    message = await message_or_404(request, access.room)
    return HTMLResponse(str(fragments.reaction_picker(message, REACTIONS)))


@login_required
async def react_to(request: Request) -> Response:
    """Give a reaction (`give`: one of REACTIONS) or take yours back (`take_back`): members
    only, not in a locked room (but for its owners), at the pace messages are limited to.
    Every page of the room gets the message's new reactions, on the room's next revision."""
    access = await member_or_403(request)
    room = access.room
    message = await message_or_404(request, room)
    form = await read_form(request)
    chat, me = chat_of(request), request.state.user
    emoji, given = (form["give"], True) if "give" in form else (form.get("take_back", ""), False)
    if emoji not in REACTIONS:
        return HTMLResponse(
            str(fragments.chat_error(f"Reactions are {' '.join(REACTIONS)} only.")), 400)
    try:
        await check_turn(chat, room["id"], me["id"], state_of(access, me["id"]), pace=False)
        changed = await chat.store.write(react, message["id"], room["id"], me["id"], emoji, given)
    except Refused as problem:
        return HTMLResponse(str(fragments.chat_error(str(problem))), problem.status_code)
    except sqlite3.Error as problem:
        return HTMLResponse(str(fragments.chat_error(
            could_not_save("Your reaction could not be saved", problem))), 503)
    if changed is None:  # deleted meanwhile
        raise Refused(GONE, 404)
    # (Giving twice changes nothing, and sends nothing.)
    if changed["revision"] != message["revision"]:
        await chat.fanout.publish(room["id"],
                                  str(fragments.messages_frame([changed], changed["revision"])),
                                  changed["revision"])
    return HTMLResponse(str(fragments.reactor_closed()) + str(fragments.chat_error()))


@login_required
async def reply_to(request: Request) -> Response:
    """The Reply link: the composer's "Replying to ..." box for that message."""
    access = await member_or_403(request)
    return HTMLResponse(str(fragments.replying(await message_or_404(request, access.room))))


async def message_or_404(request: Request, room: sqlite3.Row,
                         author: int | None = None) -> sqlite3.Row:
    """The message named in the URL: 404 if it is not in this room; with an `author`, 403 if
    somebody else wrote it. The author check is here, on the server, whatever the page shows."""
    wanted = whole_number(request.path_params["message_id"])
    found = wanted and await chat_of(request).store.read(message_in_room, wanted, room["id"])
    if not found:
        raise Refused(GONE, 404)
    return by_author(found, author)


GONE = "That message is not here (any more)."
ONLY_ITS_AUTHOR = "Only its author can change a message."


def by_author(message: sqlite3.Row | None, author: int | None) -> sqlite3.Row | None:
    """The message, if `author` wrote it (author None: whoever did; no message: None);
    Refused (403) if somebody else did."""
    if message is not None and author is not None and message["user_id"] != author:
        raise Refused(ONLY_ITS_AUTHOR, 403)
    return message


@template_filter("reaction_groups")
def reaction_groups(reactions: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """A message's reactions ("emoji id name" lines) by emoji, in REACTIONS' order: each
    emoji, its name, and who gave it ([(id, name)])."""
    given: dict[str, list[tuple[str, str]]] = {}
    for line in reactions.split("\n"):
        emoji, user_id, name = line.split(" ", 2)
        given.setdefault(emoji, []).append((user_id, name))
    return [(emoji, label, given[emoji]) for emoji, label in REACTIONS.items() if emoji in given]


@template_filter("first_line")
def first_line(text: str, limit: int = 100) -> str:
    """A message's first line, cut at `limit` characters: what a quote of it shows."""
    line = text.split("\n", 1)[0]
    return line if len(line) <= limit else line[:limit - 1] + "…"


def edit_message(db: sqlite3.Connection, message_id: int, room_id: int, author: int,
                 text: str, shown: Rendered) -> list[sqlite3.Row] | None:
    """The edited message (`shown`: its new text rendered), then the replies whose
    quote of it changed with it (None: no such message here); Refused (403) for somebody
    else's, or for a member while the room is locked (checked in the transaction, so no edit
    slips past a lock that committed first)."""
    with transaction(db):
        if by_author(message_in_room(db, message_id, room_id), author) is None:
            return None
        if locked_for(db, room_id, author):
            raise Refused(LOCKED, 403)
        db.execute("UPDATE messages SET text = ?2, html = ?3, edited_at = ?4, "
                   f"revision = {NEXT_REVISION} WHERE id = ?5",
                   (room_id, text, shown.html, utc_now(), message_id))
        store_mentions(db, message_id, room_id, shown.mentioned)
        replies = requote_replies(db, message_id, room_id)
    return [message_by_id(db, message_id), *replies]


def parts_showing(db: sqlite3.Connection, room_id: int, message_id: int) -> str:
    """The room's parts beside the log (room_parts) if they show this message (it is pinned,
    or a question), read after its change; else nothing."""
    shown = db.execute("SELECT kind = 'question' OR id = (SELECT pinned_id FROM rooms "
                       "WHERE id = ?1) FROM messages WHERE id = ?2", (room_id, message_id))
    return room_parts(db, room_id) if (shown.fetchone() or [False])[0] else ""


def requote_replies(db: sqlite3.Connection, message_id: int, room_id: int) -> list[sqlite3.Row]:
    """The replies to a message that was just edited or deleted, moved on to the room's next
    revision (their quotes show it as it is now), as pages show them."""
    ids = [row[0] for row in db.execute(f"UPDATE messages SET revision = {NEXT_REVISION} "
                                        "WHERE reply_to = ?2 AND room_id = ?1 RETURNING id",
                                        (room_id, message_id)).fetchall()]
    return db.execute(f"{SELECT_MESSAGES} WHERE m.id IN ({','.join('?' * len(ids))}) ORDER BY m.id",
                      ids).fetchall() if ids else []


def delete_message(db: sqlite3.Connection, message_id: int, room_id: int,
                   author: int | None) -> tuple[int, list[sqlite3.Row], bool] | None:
    """Delete the row, text and all (secure_delete overwrites it on disk; its reactions,
    mentions and votes go with it, and its pin), leaving only its id and the room's revision,
    for pages that catch up later. That revision, the replies now quoting a deleted message,
    and whether it was the room's pinned message; None if there was no such message.
    `author`: who must have written it (None: anybody, for an owner)."""
    with transaction(db):
        if by_author(message_in_room(db, message_id, room_id), author) is None:
            return None
        db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        unpinned = db.execute("UPDATE rooms SET pinned_id = NULL WHERE id = ? AND pinned_id = ?",
                              (room_id, message_id)).rowcount > 0
        revision = db.execute("INSERT INTO deletions (message_id, room_id, revision) "
                              f"VALUES (?2, ?1, {NEXT_REVISION}) RETURNING revision",
                              (room_id, message_id)).fetchall()[0][0]
        replies = requote_replies(db, message_id, room_id)
    return (replies[-1]["revision"] if replies else revision), replies, unpinned


def react(db: sqlite3.Connection, message_id: int, room_id: int, user_id: int, emoji: str,
          given: bool) -> sqlite3.Row | None:
    """Give (`given`) or take back one's reaction to a message of this room; the message as
    pages show it, on the room's next revision if that changed anything (None: no such
    message here). Giving twice, or taking back what was not given, changes nothing. Refused
    (403) for a member while the room is locked."""
    with transaction(db):
        if message_in_room(db, message_id, room_id) is None:
            return None
        if locked_for(db, room_id, user_id):
            raise Refused(LOCKED, 403)
        changed = db.execute(
            "INSERT INTO reactions (message_id, user_id, emoji) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING" if given else
            "DELETE FROM reactions WHERE message_id = ? AND user_id = ? AND emoji = ?",
            (message_id, user_id, emoji)).rowcount
        if changed:
            db.execute(f"UPDATE messages SET revision = {NEXT_REVISION} WHERE id = ?2",
                       (room_id, message_id))
    return message_by_id(db, message_id)


CHANGE_ROUTES = [
    get("/room/{code}/messages/{message_id}/edit", message_editor),
    post("/room/{code}/messages/{message_id}/edit", edit),
    post("/room/{code}/messages/{message_id}/delete", delete),
    get("/room/{code}/messages/{message_id}/react", reaction_picker),
    post("/room/{code}/messages/{message_id}/react", react_to),
    get("/room/{code}/messages/{message_id}/reply", reply_to),
]


# ---------------------------------------------------------------------------
# 11. Moderation
# What a room's owners do to run it (lock, slow mode, a new code, owners, removing people and
# letting them back in, clearing, deleting) and the transcript every member can take home.
# Each is checked here, on the server, and reaches every page (room_changed).
# ---------------------------------------------------------------------------


SLOW_MODES = (0, 5, 10, 30, 60)  # seconds between a member's messages; 0: off


PURGE_BATCH = 500  # rows removed per transaction when a room is cleared or deleted




TRANSCRIPT_PAGE = 100  # messages read per trip to the database while a transcript streams
TRANSCRIPT_PIECE = 16 * 1024  # characters sent at a time (each once the last has drained)
TRANSCRIPTS_PER_USER = 2  # at once, per worker


@login_required
async def manage_room(request: Request) -> Response:
    """The owners' page: the room's settings, its members, the people removed from it."""
    return await manage_page(request, (await owner_or_403(request)).room)


@login_required
async def owner_tools(request: Request) -> Response:
    """The room page's "Room tools" popover: what a class uses live (lock, slow mode, a new
    invite link), so the owner never leaves the room (and its Online list)."""
    return await owner_panel(request, (await owner_or_403(request)).room)


@login_required
async def moderate(request: Request) -> Response:
    """One owner's step (MODERATION_STEPS), from the manage page's forms or the room page's
    tools: field `step`, and `user_id` or `slow_mode`. Done: back to the manage page (from the
    room page, with htmx: the tools again); refused: that page (or the tools) again, saying
    why (400 for a step that makes no sense, 409 for one that cannot be done now)."""
    access = await owner_or_403(request)
    form = await read_form(request)
    live = request.headers.get("hx-request") == "true"  # (the room page's tools)
    step = MODERATION_STEPS.get(form.get("step", ""))
    if step is None:
        raise Refused("That is not something an owner can do here.", 400)
    try:
        answer = await step(request, access.room, form)
    except Refused as problem:
        if live:
            return await owner_panel(request, access.room, problem)
        return await manage_page(request, access.room, problem)
    if live:
        return await owner_panel(request, access.room)
    return answer or redirect(f"/room/{access.room['code']}/manage")


async def owner_panel(request: Request, room: sqlite3.Row, refused: Refused | None = None
                      ) -> Response:
    """The tools popover as the room is now (a refused step's reason in it; answered 200, so
    htmx shows it in place)."""
    room, owners = await chat_of(request).store.read(room_settings, room["id"])
    if request.state.user["id"] not in owners:  # (stepped down: nothing more to show)
        return HTMLResponse("")
    return HTMLResponse(str(fragments.owner_panel(room, SLOW_MODES, str(refused or ""))))


async def manage_page(request: Request, room: sqlite3.Row,
                      refused: Refused | None = None, **shown: Any) -> Response:
    """The manage page, with why a step was refused (and its status) if one was, and what a
    step shows once (`shown`: a new bot's token, section 14)."""
    chat = chat_of(request)
    room, _ = await chat.store.read(room_settings, room["id"])  # (as a refused step left it)
    members, removed = await chat.store.read(members_of, room["id"])
    return render(request, "manage.html", refused.status_code if refused else 200, room=room,
                  members=members, removed=removed, slow_modes=SLOW_MODES, error=str(refused or ""),
                  **shown)


# The owners' steps: each stores its change, shows it to every page (room_changed) and logs who.


async def lock_room(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """Only the owners may write."""
    await change_setting(request, room, "locked", 1, "locked the room")


async def unlock_room(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """Everybody may write again."""
    await change_setting(request, room, "locked", 0, "unlocked the room")


async def set_slow_mode(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """One message per `slow_mode` seconds (one of SLOW_MODES) for each member."""
    seconds = whole_number(form.get("slow_mode", ""))
    if seconds not in SLOW_MODES:
        raise Refused(f"Slow mode is one of {', '.join(map(str, SLOW_MODES))} seconds.", 400)
    await change_setting(request, room, "slow_mode", seconds, f"set slow mode to {seconds} s")


async def give_new_code(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """A new invite link (counted like a new room: a new code is one more thing to guess)."""
    chat = chat_of(request)
    if not await chat.room_limit.allow(request.state.user["id"]):
        raise Refused("You have made many rooms and codes lately. Try again in an hour.", 429)
    room, owners = await chat.store.write(change_code, room["id"])
    await room_changed(request, room, owners, f"gave the room a new code, {room['code']}")


async def make_owner(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """Make a member (`user_id`) an owner."""
    who = person_named(form)
    room, owners = await chat_of(request).store.write(set_role, room["id"], who, "owner")
    await room_changed(request, room, owners, f"made user {who} an owner")


async def step_down(request: Request, room: sqlite3.Row, form: dict[str, str]) -> Response:
    """The owner asking becomes a member (not the last owner); back to the room."""
    chat = chat_of(request)
    room, owners = await chat.store.write(set_role, room["id"], request.state.user["id"], "member")
    await room_changed(request, room, owners, "stepped down")
    return redirect(f"/room/{room['code']}/")


async def remove_person(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """Take somebody (`user_id`) out of the room until an owner lets them back in: their open
    pages are told and closed, on every worker."""
    chat, me, who = chat_of(request), request.state.user, person_named(form)
    person = await chat.store.write(remove_member, room["id"], who, me["id"])
    await chat.fanout.end_pages(who, room_id=room["id"], why="removed")
    log.info("moderation: %s removed %s from %s", me["username"], person["username"], room["code"])


async def let_person_back_in(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """Undo a removal (`user_id`): they can join again by the code."""
    if name := await chat_of(request).store.write(let_back_in, room["id"], person_named(form)):
        log.info("moderation: %s let %s back into %s",
                 request.state.user["username"], name, room["code"])


MODERATION_STEPS: dict[str, Callable[[Request, sqlite3.Row, dict[str, str]],
                                     Awaitable[Response | None]]] = {
    "lock": lock_room, "unlock": unlock_room, "slow_mode": set_slow_mode, "new_code": give_new_code,
    "make_owner": make_owner, "step_down": step_down, "remove": remove_person,
    "let_back_in": let_person_back_in}


def person_named(form: dict[str, str]) -> int:
    """The user id a step names (`user_id`); Refused (400) without one."""
    if (user_id := whole_number(form.get("user_id", ""))) is None:
        raise Refused("Say whom (user_id).", 400)
    return user_id


async def change_setting(request: Request, room: sqlite3.Row, name: str, value: int,
                         what: str) -> None:
    """Set one of the room's settings (change_room) and show it to every page."""
    room, owners = await chat_of(request).store.write(change_room, room["id"], {name: value})
    await room_changed(request, room, owners, what)


@login_required
async def confirm_clear(request: Request) -> Response:
    """The confirm step before clearing the history."""
    return render(request, "confirm.html", room=(await owner_or_403(request)).room, what="clear")


@login_required
async def clear_history(request: Request) -> Response:
    """Clear every message: gone from every page at once, its rows removed in batches behind it."""
    access = await owner_or_403(request)
    await read_form(request)
    chat, room = chat_of(request), access.room
    revision = await chat.store.write(clear_room, room["id"])
    await chat.fanout.publish(
        room["id"], str(fragments.history_page(room, [], False, oob=True, revision=revision))
        + await chat.store.read(room_parts, room["id"]), revision)
    log.info("moderation: %s cleared the history of %s",
             request.state.user["username"], room["code"])
    purge_soon(chat, room["id"])
    return redirect(f"/room/{room['code']}/")


@login_required
async def confirm_delete(request: Request) -> Response:
    """The confirm step before deleting the room."""
    return render(request, "confirm.html", room=(await owner_or_403(request)).room, what="delete")


@login_required
async def remove_room(request: Request) -> Response:
    """Delete the room: every open page is told and closed, its code answers 404 from then
    on, it leaves everyone's list, and its rows go in batches."""
    access = await owner_or_403(request)
    await read_form(request)
    chat, room = chat_of(request), access.room
    await chat.store.write(delete_room, room["id"])
    await chat.fanout.end_pages(None, room_id=room["id"], why="deleted")
    log.info("moderation: %s deleted the room %s", request.state.user["username"], room["code"])
    purge_soon(chat, room["id"])
    return redirect("/")


@login_required
async def transcript(request: Request) -> Response:
    """Every message of the room in order, as a Markdown file (or ?format=json), for its
    members: streamed from the database TRANSCRIPT_PAGE messages at a time, in pieces of at
    most TRANSCRIPT_PIECE characters, each sent only once the connection has taken the last
    (uvicorn waits for its buffer to drain), so memory stays flat however long the room and
    however slowly (or never) the reader reads; at most TRANSCRIPTS_PER_USER at once."""
    access = await access_or_404(request)
    if access.role is None:
        raise Refused("Only the room's members can download its transcript.", 403)
    chat, user_id = chat_of(request), request.state.user["id"]
    if chat.transcripts[user_id] >= TRANSCRIPTS_PER_USER:
        raise Refused("You are downloading transcripts already; wait for them to finish.", 429)
    room, as_json = access.room, request.query_params.get("format") == "json"
    owner = access.role == "owner"  # (an anonymous question's asker is named to owners only)

    async def pages() -> AsyncIterator[list[sqlite3.Row]]:
        """The room's messages in order, TRANSCRIPT_PAGE of them per trip to the database."""
        after = 0
        while rows := await chat.store.read(transcript_page, room["id"], after, TRANSCRIPT_PAGE):
            yield rows
            after = rows[-1]["id"]

    async def pieces() -> AsyncIterator[str]:
        """The transcript in pieces of about TRANSCRIPT_PIECE characters, counted while it runs."""
        chat.transcripts[user_id] += 1
        try:
            piece = ""
            async for part in (transcript_json if as_json else transcript_markdown)(room, pages(),
                                                                                   owner):
                piece += part
                if len(piece) >= TRANSCRIPT_PIECE:
                    yield piece
                    piece = ""
            yield piece
        finally:
            chat.transcripts[user_id] -= 1

    filename = f"{room['code']}-transcript.{'json' if as_json else 'md'}"
    return StreamingResponse(
        pieces(), media_type="application/json" if as_json else "text/markdown; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{filename}"'})


async def owner_or_403(request: Request) -> RoomAccess:
    """The room in the URL, if the user is one of its owners; 403 for anybody else."""
    access = await access_or_404(request)
    if access.role != "owner":
        raise Refused("Only this room's owners can do that.", 403)
    return access


def room_changed_frame(request: Request, room: sqlite3.Row, owners: frozenset[int]) -> str:
    """What every page of the room gets when its owners change it: the room's state (its lock,
    slow mode and owners, shown by each page's own style), its code and link, its revision."""
    return str(fragments.room_changed_frame(RoomState.of(room, owners), room["revision"],
                                            invite_link(request, room["code"])))


async def room_changed(request: Request, room: sqlite3.Row, owners: frozenset[int],
                       what: str) -> None:
    """Tell every page of the room, on every worker, and log who did it."""
    chat = chat_of(request)
    await chat.fanout.room_changed(room["id"], RoomState.of(room, owners),
                                   room_changed_frame(request, room, owners), room["revision"])
    log.info("moderation: %s %s in %s", request.state.user["username"], what, room["code"])


def purge_soon(chat: Chat, room_id: int) -> None:
    """Remove a cleared or deleted room's rows, a batch per write, so messages elsewhere go
    on being stored in between (the ones still there are hidden meanwhile: NOT_CLEARED)."""
    async def purge() -> None:
        """Remove a batch of the room's rows per write until none is left."""
        with contextlib.suppress(sqlite3.Error):  # (a restart finishes it: purge_left_over)
            while await chat.store.write(purge_room, room_id):
                pass

    task = asyncio.create_task(purge())
    chat.purges.add(task)
    task.add_done_callback(chat.purges.discard)


async def purge_left_over(chat: Chat) -> None:
    """At start: finish the purges a stop cut short."""
    for room_id in await chat.store.read(rooms_to_purge):
        purge_soon(chat, room_id)


# The characters that can make Markdown of a name (emphasis, a link or image, HTML, an
# entity, code): a backslash before each makes it plain text (CommonMark).
MARKDOWN_PUNCTUATION = re.compile(r"""([\\`*_\[\]<>&!#|~])""")


def markdown_words(text: str) -> str:
    """A name as Markdown shows it as it is: what could make Markdown of it escaped with a
    backslash (no HTML entities: a text editor shows those too), so `**`, `<img>` and `[x](y)`
    in a room's or a person's name are only characters, and "maria.lopez" stays as it is."""
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(text.split()))


def markdown_block(text: str) -> str:
    """A message's text as written, in a fenced block (longer than any run of backticks in
    it), so a Markdown viewer shows it as it is, letter for letter: no link, no image (a
    tracking pixel), no HTML, no entity escapes, and a text editor shows it as written."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def transcript_author(m: sqlite3.Row, owner: bool) -> str:
    """Who wrote a message, as the transcript names them: an anonymous question's asker is
    "Anonymous" but to the room's owners (`owner`)."""
    if m["anonymous"] and owner:
        return f"Anonymous (asked by {markdown_words(m['asker'])})"
    return markdown_words(m["username"]) + (" (guest)" if m["is_guest"] else "") + (
        " (bot)" if m["is_bot"] else "")


def transcript_kind(m: sqlite3.Row) -> str:
    """What a message is beyond a message, for its heading line: a question (its votes,
    answered or not) or a poll (closed or not); nothing for a plain one."""
    if m["kind"] == "question":
        votes = len(m["votes"].split()) if m["votes"] else 0
        return (f" · question, {votes} vote{'' if votes == 1 else 's'}"
                + (", answered" if m["answered_at"] else ""))
    if m["kind"] == "poll":
        return " · poll, closed" if poll_of(m).closed else " · poll"
    return ""


async def transcript_markdown(room: sqlite3.Row, pages: AsyncIterator[list[sqlite3.Row]],
                              owner: bool = False) -> AsyncIterator[str]:
    """The transcript as Markdown, message by message: a heading, then each message's author,
    time, and whom it answers, and its text as written (markdown_block); a poll's options
    with their final counts after it. Votes are never named, to owners either."""
    yield (f"# {markdown_words(room['name'])}\n\n"
           f"The transcript of {room['code']}; times are {room_clock.zone_name()}.\n")
    async for rows in pages:  # (each time: "2026-11-30 13:36:10 JST" to the minute)
        for m in rows:
            answers = ""
            if m["reply_to"]:
                answers = (f" · replying to {markdown_words(m['quote_author'])}"
                           if m["quote_text"] is not None else " · replying to a deleted message")
            yield (f"\n**{transcript_author(m, owner)}** · "
                   f"{room_clock.full(m['created_at'])[:16]}{transcript_kind(m)}"
                   f"{' · (edited)' if m['edited_at'] else ''}{answers}\n\n"
                   f"{markdown_block(m['text'])}\n")
            if m["kind"] == "poll":
                yield "".join(f"\n- {markdown_words(option.text)}: {len(option.voters)} vote"
                              f"{'' if len(option.voters) == 1 else 's'}"
                              f"{' (most votes)' if option.won else ''}"
                              for option in poll_of(m).options) + "\n"


async def transcript_json(room: sqlite3.Row, pages: AsyncIterator[list[sqlite3.Row]],
                          owner: bool = False) -> AsyncIterator[str]:
    """The transcript as one JSON object, piece by piece: the room's name and code, then its
    messages (each with its author, times, text and kind; a poll's options and counts, a
    question's votes; an anonymous question's asker for owners only)."""
    yield json.dumps({"room": room["name"], "code": room["code"]})[:-1] + ', "messages": ['
    first = True
    async for rows in pages:
        for m in rows:
            entry = {"id": m["id"], "author": m["username"], "guest": bool(m["is_guest"]),
                     "bot": bool(m["is_bot"]),
                     "sent_at": m["created_at"], "local_time": room_clock.full(m["created_at"]),
                     "text": m["text"], "edited_at": m["edited_at"], "kind": m["kind"]}
            if m["kind"] == "question":
                entry |= {"votes": len(m["votes"].split()) if m["votes"] else 0,
                          "answered_at": m["answered_at"]}
                if m["anonymous"] and owner:
                    entry["asked_by"] = m["asker"]
            elif m["kind"] == "poll":
                poll = poll_of(m)
                entry["poll"] = {"closed": poll.closed, "options": [
                    {"text": option.text, "votes": len(option.voters), "most_votes": option.won}
                    for option in poll.options]}
            yield ("" if first else ",") + json.dumps(entry)
            first = False
    yield "]}"


def room_settings(db: sqlite3.Connection, room_id: int) -> tuple[sqlite3.Row, frozenset[int]]:
    """The room as its pages must show it (its settings and code), and its owners."""
    return (db.execute("SELECT * FROM rooms WHERE id = ?", (room_id,)).fetchone(),
            room_owners(db, room_id))


def change_room(db: sqlite3.Connection, room_id: int,
                settings: dict[str, int]) -> tuple[sqlite3.Row, frozenset[int]]:
    """Set the room's `locked`, `slow_mode` (or section 13's `questions_anonymous`); its pages
    must see it: the room moves on a revision."""
    assert set(settings) <= {"locked", "slow_mode", "questions_anonymous"}
    with transaction(db):
        db.execute(f"UPDATE rooms SET {', '.join(f'{name} = :{name}' for name in settings)} "
                   "WHERE id = :room_id", {**settings, "room_id": room_id})
        advance_room(db, room_id, state=True)
    return room_settings(db, room_id)


def set_role(db: sqlite3.Connection, room_id: int, user_id: int,
             role: str) -> tuple[sqlite3.Row, frozenset[int]]:
    """Make a member an owner, or an owner a member (stepping down): Refused (409) for somebody
    who is not a member, or for the room's last owner stepping down."""
    with transaction(db):
        member = db.execute("SELECT u.is_bot FROM room_members m JOIN users u ON u.id = m.user_id "
                            "WHERE m.room_id = ? AND m.user_id = ?", (room_id, user_id)).fetchone()
        if member is None:
            raise Refused("That person is not a member of this room.", 409)
        if member["is_bot"]:
            raise Refused("A bot cannot be an owner.", 409)
        if role == "member" and room_owners(db, room_id) == {user_id}:
            raise Refused("You are this room's only owner: make somebody else an owner first.", 409)
        db.execute("UPDATE room_members SET role = ? WHERE room_id = ? AND user_id = ?",
                   (role, room_id, user_id))
        advance_room(db, room_id, state=True)
    return room_settings(db, room_id)


def remove_member(db: sqlite3.Connection, room_id: int, user_id: int, by: int) -> sqlite3.Row:
    """Take somebody out of the room until an owner lets them back in: their name, or
    Refused (409: an owner, yourself, nobody)."""
    with transaction(db):
        person = db.execute("SELECT u.id, u.username, m.role FROM users u "
                            "LEFT JOIN room_members m ON m.user_id = u.id AND m.room_id = ? "
                            "WHERE u.id = ?", (room_id, user_id)).fetchone()
        if person is None or person["role"] is None:  # (no silent ban of somebody not here)
            raise Refused("That person is not a member of this room.", 409)
        if user_id == by or person["role"] == "owner":
            raise Refused("Owners cannot be removed; an owner can step down first.", 409)
        db.execute("DELETE FROM room_members WHERE room_id = ? AND user_id = ?", (room_id, user_id))
        db.execute("INSERT INTO removals (room_id, user_id, removed_by, removed_at) "
                   "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (room_id, user_id, by, utc_now()))
    return person


def let_back_in(db: sqlite3.Connection, room_id: int, user_id: int) -> str | None:
    """Undo a removal (they can join again by the code; a bot, which joins no other way, is a
    member again); their name, or None if not removed (or a bot its owners ended)."""
    with transaction(db):
        row = db.execute("DELETE FROM removals WHERE room_id = ?1 AND user_id = ?2 AND NOT EXISTS "
                         "(SELECT 1 FROM bots WHERE user_id = ?2 AND removed_at IS NOT NULL) "
                         "RETURNING (SELECT username FROM users WHERE id = user_id)",
                         (room_id, user_id)).fetchall()
        db.execute("INSERT INTO room_members (room_id, user_id, joined_at, last_visit_at) "
                   "SELECT ?1, ?2, ?3, ?3 FROM bots WHERE user_id = ?2 AND room_id = ?1 "
                   "AND ?4 ON CONFLICT DO NOTHING", (room_id, user_id, utc_now(), bool(row)))
    return row[0][0] if row else None


def change_code(db: sqlite3.Connection, room_id: int) -> tuple[sqlite3.Row, frozenset[int]]:
    """A new code for the room; the old one stays a way in for its members only (room_access)."""
    with transaction(db):
        old = db.execute("SELECT code FROM rooms WHERE id = ?", (room_id,)).fetchone()[0]
        code = new_room_code(db, old.rsplit("-", 1)[0])
        db.execute("INSERT INTO room_codes (code, room_id) VALUES (?, ?)", (old, room_id))
        db.execute("UPDATE rooms SET code = ? WHERE id = ?", (code, room_id))
        advance_room(db, room_id, state=True)
    return room_settings(db, room_id)


def clear_room(db: sqlite3.Connection, room_id: int) -> int:
    """Every message so far is cleared at once (NOT_CLEARED hides them) and removed in
    batches (purge_room); the room's new revision, from which pages start again. The newest
    cleared id is kept in `deletions`, as a deleted message's is, so no id is used again."""
    with transaction(db):
        revision = advance_room(db, room_id)
        newest = db.execute(
            "UPDATE rooms SET cleared_up_to = coalesce((SELECT max(id) FROM messages "
            "WHERE room_id = ?1), cleared_up_to), cleared_revision = revision, pinned_id = NULL "
            "WHERE id = ?1 RETURNING cleared_up_to",
            (room_id,)).fetchall()[0][0]
        if newest:
            db.execute("INSERT INTO deletions (message_id, room_id, revision) "
                       "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                       (newest, room_id, revision))
    return revision


def delete_room(db: sqlite3.Connection, room_id: int) -> None:
    """The room is deleted at once (not found any more) and its rows removed in batches."""
    with transaction(db):
        db.execute("UPDATE rooms SET deleted_at = ? WHERE id = ?", (utc_now(), room_id))
        advance_room(db, room_id)


def purge_room(db: sqlite3.Connection, room_id: int) -> bool:
    """Remove one batch of a cleared or deleted room's rows (secure_delete overwrites them);
    whether there is more to do. A deleted room's own row goes last."""
    with transaction(db):
        room = db.execute("SELECT cleared_up_to, deleted_at FROM rooms WHERE id = ?",
                          (room_id,)).fetchone()
        if room is None:
            return False
        bound = 2**63 - 1 if room["deleted_at"] else room["cleared_up_to"]
        gone = db.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages "
                          "WHERE room_id = ? AND id <= ? LIMIT ?)",
                          (room_id, bound, PURGE_BATCH)).rowcount
        if not room["deleted_at"]:
            return gone == PURGE_BATCH
        if gone:
            return True
        for table in ("deletions", "room_members", "removals", "room_codes"):
            db.execute(f"DELETE FROM {table} WHERE room_id = ?", (room_id,))
        db.execute("DELETE FROM rooms WHERE id = ?", (room_id,))
    return False


def members_of(db: sqlite3.Connection, room_id: int) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    """The room's members (owners first, then by name; its bots among them, with their webhook
    and how its last call went: section 14) and the people removed from it."""
    members = db.execute("SELECT u.id, u.username, u.is_guest, u.is_bot, m.role, b.webhook_url, "
                         "b.last_call, b.last_call_at FROM room_members m "
                         "JOIN users u ON u.id = m.user_id LEFT JOIN bots b ON b.user_id = u.id "
                         "WHERE m.room_id = ? "
                         "ORDER BY m.role = 'owner' DESC, u.username_key LIMIT 1000",
                         (room_id,)).fetchall()
    removed = db.execute("SELECT u.id, u.username, u.is_guest FROM removals r "
                         "JOIN users u ON u.id = r.user_id WHERE r.room_id = ? AND NOT EXISTS "
                         "(SELECT 1 FROM bots b WHERE b.user_id = u.id "
                         "AND b.removed_at IS NOT NULL) "
                         "ORDER BY u.username_key LIMIT 1000", (room_id,)).fetchall()
    return members, removed


def rooms_to_purge(db: sqlite3.Connection) -> list[int]:
    """Rooms a stop left half cleared or half deleted (read once, at start)."""
    return [row[0] for row in db.execute(
        "SELECT id FROM rooms r WHERE deleted_at IS NOT NULL OR EXISTS "
        "(SELECT 1 FROM messages m WHERE m.room_id = r.id AND m.id <= r.cleared_up_to)")]


def transcript_page(db: sqlite3.Connection, room_id: int, after: int,
                    limit: int) -> list[sqlite3.Row]:
    """Up to `limit` of the room's messages after message id `after`, oldest first."""
    return db.execute(f"{SELECT_MESSAGES} WHERE m.room_id = ? AND m.id > ? AND {NOT_CLEARED} "
                      "ORDER BY m.id LIMIT ?", (room_id, after, limit)).fetchall()


MODERATION_ROUTES = [
    get("/room/{code}/manage", manage_room), post("/room/{code}/manage", moderate),
    get("/room/{code}/tools", owner_tools),
    get("/room/{code}/clear", confirm_clear), post("/room/{code}/clear", clear_history),
    get("/room/{code}/delete-room", confirm_delete), post("/room/{code}/delete-room", remove_room),
    get("/room/{code}/transcript", transcript),
]


# ---------------------------------------------------------------------------
# 12. Search
# Finding what was said in your rooms: FTS5 over every message's text (the index is
# SCHEMA's messages_fts), filled a second behind the messages; a hit links to its room page
# opened around it (render_room's `around`).
# ---------------------------------------------------------------------------


SEARCH_BATCH = 500  # messages indexed per transaction


SEARCH_PAGE = 50  # hits per page of results
SEARCH_SCAN = 2000  # matches looked at per page at most, in anybody's rooms


SEARCH_CHARS = 200  # a longer query is cut here (and at SEARCH_WORDS words)


SEARCH_WORDS = 12


# Around each matched word in a snippet: no message holds these (clean_text).
HIT_START, HIT_END = "\x02", "\x03"


SEARCH_INDEX_SECONDS = 1.0  # how far behind the messages the search index may be


@login_required
async def search(request: Request) -> Response:
    """`GET /search/?q=words[&before=id]`: the newest SEARCH_PAGE messages with those words
    (the last one a prefix) in the rooms the person is a member of, then "More". Any text is
    a valid query; an empty one shows the box. At most CHAT_SEARCH_RATE searches a minute per
    person, each on the search thread, each looking at SEARCH_SCAN matches at most."""
    query = clean_text(request.query_params.get("q", "")[:SEARCH_CHARS])
    before = whole_number(request.query_params.get("before", ""))
    expression, chat = search_expression(query), chat_of(request)
    hits, more = [], None
    if expression is not None:
        if not await chat.search_limit.allow(request.state.user["id"]):
            return render(request, "search.html", 429, query=query, searched=False, hits=[],
                          more=None, error="You have searched a lot in the last minute. "
                                           "Wait a little, then try again.")
        try:
            hits, more = await chat.store.search(search_messages, request.state.user["id"],
                                                 expression, before)
        except sqlite3.OperationalError as problem:
            # (search_expression leaves FTS5 nothing to object to)
            log.warning("search for %r failed: %r", expression, problem)
            raise Refused("That search could not be run; try other words.", 400) from None
    return render(request, "search.html", query=query, searched=expression is not None, hits=hits,
                  more=more)


def search_expression(query: str) -> str | None:
    """Any text as an FTS5 query that cannot be a syntax error: each word in double quotes
    (FTS5 reads a quoted string as the phrase of its tokens, so `AND`, `NEAR(`, `*` and `:`
    are only words), the last one a prefix (`"wor"*` finds "world" as it is typed). None if
    no word has a letter or digit in it: nothing to look for."""
    words = [word for word in query[:SEARCH_CHARS].split()
             if any(ch.isalnum() for ch in word)][:SEARCH_WORDS]
    if not words:
        return None
    return " ".join('"' + word.replace('"', '""') + '"' for word in words) + "*"


@template_filter("hits")
def marked_hits(snippet: str) -> Markup:
    """A search snippet as HTML: escaped, the words found in <mark>."""
    return Markup(str(escape(snippet)).replace(HIT_START, "<mark>").replace(HIT_END, "</mark>"))


def search_messages(db: sqlite3.Connection, user_id: int, expression: str,
                    before: int | None) -> tuple[list[sqlite3.Row], int | None]:
    """The newest SEARCH_PAGE messages older than `before` matching the FTS5 `expression`
    (search_expression) in the rooms the user is a member of (not those left, removed from,
    cleared or deleted), newest first, each with its room and a `snippet` of its text with
    the matches between HIT_START and HIT_END; and where "More" goes on from (None: nothing
    more). The index is walked newest first, SEARCH_SCAN matches at most, whoever's rooms they
    are in: a word found mostly in other people's rooms costs the same bounded walk, and the
    next page goes on from where this one stopped looking."""
    found = db.execute(
        "SELECT f.rowid, m.id IS NOT NULL AS mine FROM (SELECT rowid FROM messages_fts "
        "  WHERE messages_fts MATCH ?2 AND rowid < ?3 ORDER BY rowid DESC LIMIT ?4) f "
        "LEFT JOIN messages m ON m.id = f.rowid AND EXISTS (SELECT 1 FROM room_members rm "
        "  JOIN rooms r ON r.id = rm.room_id WHERE rm.room_id = m.room_id AND rm.user_id = ?1 "
        "  AND r.deleted_at IS NULL AND m.id > r.cleared_up_to) ORDER BY f.rowid DESC",
        (user_id, expression, before if before is not None else 2**63 - 1, SEARCH_SCAN)).fetchall()
    mine = [row[0] for row in found if row[1]][:SEARCH_PAGE + 1]
    if len(mine) > SEARCH_PAGE:
        more: int | None = mine[SEARCH_PAGE - 1]
    else:
        more = found[-1][0] if len(found) == SEARCH_SCAN else None  # (looked as far as it may)
    ids = mine[:SEARCH_PAGE]
    hits = db.execute(
        "SELECT m.id, iif(m.anonymous, 'Anonymous', u.username) AS username, "
        "       iif(m.anonymous, 0, u.is_guest) AS is_guest, u.is_bot, m.created_at, r.code, "
        "       r.name AS room_name, "  # (an anonymous question's asker: never, section 13)
        f"       snippet(messages_fts, 0, '{HIT_START}', '{HIT_END}', '…', 24) AS snippet "
        "FROM messages_fts f JOIN messages m ON m.id = f.rowid JOIN rooms r ON r.id = m.room_id "
        "JOIN users u ON u.id = m.user_id "
        f"WHERE messages_fts MATCH ? AND f.rowid IN ({','.join('?' * len(ids))}) "
        "ORDER BY f.rowid DESC", (expression, *ids)).fetchall() if ids else []
    return hits, more


async def index_search(chat: Chat, every: float = SEARCH_INDEX_SECONDS) -> None:
    """Keep the search index up with the messages: every `every` seconds, index what was sent
    meanwhile (index_new_messages), a batch per trip to the writer so sends interleave."""
    failing = False  # (a full disk is said once, and its end once: not every second)
    while True:
        try:
            while await chat.store.write(index_new_messages):
                pass
            if failing:
                log.warning("indexing new messages for search again")
            failing = False
        except sqlite3.Error as problem:
            if not failing:
                log.warning("could not index new messages for search "
                            "(trying again every %g s): %r", every, problem)
            failing = True
        await asyncio.sleep(every)


def index_new_messages(db: sqlite3.Connection) -> bool:
    """Add the messages sent since the last call to the search index, SEARCH_BATCH at a time
    in one transaction (the index_search task calls it every second, and at start for what an
    upgrade brought). Indexing each message as it is sent cost more than its INSERT (README,
    "Search"). Whether more are waiting."""
    with transaction(db):
        mark = db.execute("SELECT indexed_up_to FROM search_state").fetchone()[0]
        rows = db.execute("SELECT id, text FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                          (mark, SEARCH_BATCH)).fetchall()
        if rows:
            db.executemany("INSERT INTO messages_fts (rowid, text) VALUES (?, ?)",
                           [tuple(row) for row in rows])
            db.execute("UPDATE search_state SET indexed_up_to = ?", (rows[-1][0],))
    return len(rows) == SEARCH_BATCH


SEARCH_ROUTES = [get("/search/", search)]


# ---------------------------------------------------------------------------
# 13. Class tools
# What a live class does every ten minutes: a poll, a pinned message, and a queue of
# questions the room votes on. A poll and a question are messages (messages.kind), so they
# are sent, stored, shown, edited, deleted, searched and caught up with as any message is
# (section 9 stores a poll's options with it); their votes, the pin and "answered" are this
# section's, and so are the Pinned and Questions parts of the room page (ROOM_PARTS). Owners
# start and close polls, pin, and mark questions answered; members vote and ask. Votes count
# on every page at once but are never shown by name, to owners either: a page knows voters
# only by pseudonyms (pseudonym()), with which its own style presses the viewer's own. A
# locked room still takes votes (a class votes while its chat is quiet) and slow mode does
# not pace them; the message rate limit counts them.
# ---------------------------------------------------------------------------


POLL_OPTIONS = (2, 6)  # a poll has at least and at most this many options
POLL_QUESTION_CHARS = 300
POLL_OPTION_CHARS = 200
QUESTIONS_SHOWN = 30  # open questions listed beside the log (the most voted); the rest counted
ANSWERED_SHOWN = 5  # answered questions listed under them (the latest)
NO_POLL = "That poll is not here (any more)."
NO_QUESTION = "That question is not here (any more)."


@login_required
async def start_poll(request: Request) -> Response:
    """An owner's new poll, from the room page's Poll form: `question`, and `options`, one
    per line (POLL_OPTIONS of them). Every page shows it in the log at once, as a message."""
    access = await owner_or_403(request)
    form = await read_form(request)
    chat, me = chat_of(request), request.state.user["id"]

    async def step() -> None:
        """Check the question and the options, then send the poll."""
        question, options = form.get("question", "").strip(), poll_options(form.get("options", ""))
        if not question:
            raise Refused("A poll needs a question.")
        if problem := too_long("Poll questions", POLL_QUESTION_CHARS, question):
            raise Refused(problem)
        await post_message(chat, access.room["id"], me, question, None, state_of(access, me),
                           kind="poll", options=options)

    return await class_step(request, access, step(), str(fragments.poll_maker(oob=True)),
                            fragments.poll_error)


@login_required
async def vote_in_poll(request: Request) -> Response:
    """A member's vote in an open poll: `option`, its number (another one moves the vote
    there; 0 takes it back). The counts move on every page at once."""
    access = await member_or_403(request)
    form = await read_form(request)
    chat, me, room = chat_of(request), request.state.user["id"], access.room

    async def step() -> None:
        """Check the option and the pace, then count the vote."""
        option = whole_number(form.get("option", ""))
        if option is None:
            raise Refused("Say which option: its number (0 takes your vote back).")
        await check_turn(chat, room["id"], me, None)  # (the rate only: see above)
        if changed := await chat.store.write(cast_vote, message_named(request), room["id"], me,
                                             option):
            await show_changed(chat, changed)

    return await class_step(request, access, step())


@login_required
async def close_poll(request: Request) -> Response:
    """An owner ends a poll: voting stops, the result stays, the most voted option marked,
    and screen readers hear the result once. Closing a closed poll changes nothing."""
    access = await owner_or_403(request)
    await read_form(request)
    chat = chat_of(request)

    async def step() -> None:
        """Close it and show the result."""
        if closed := await chat.store.write(end_poll, message_named(request), access.room["id"]):
            await show_changed(chat, closed, str(fragments.poll_closed_said(closed)))
            log.info("moderation: %s closed poll %d in %s", request.state.user["username"],
                     closed["id"], access.room["code"])

    return await class_step(request, access, step())


@login_required
async def pin(request: Request) -> Response:
    """An owner pins a message (a poll too): every page shows it under "Pinned", above the
    log, in place of the one pinned before."""
    access = await owner_or_403(request)
    await read_form(request)
    return await class_step(request, access, set_pin(request, access, message_named(request)))


@login_required
async def unpin(request: Request) -> Response:
    """An owner takes the pin away: "Pinned" leaves every page."""
    access = await owner_or_403(request)
    await read_form(request)
    return await class_step(request, access, set_pin(request, access, None))


@login_required
async def vote_for_question(request: Request) -> Response:
    """A member's vote for an open question (`vote`: 1), or taking it back (0): the
    Questions list, ordered by votes, changes on every page."""
    access = await member_or_403(request)
    form = await read_form(request)
    chat, me, room = chat_of(request), request.state.user["id"], access.room

    async def step() -> None:
        """Check the pace, then count the vote."""
        if form.get("vote") not in ("0", "1"):
            raise Refused("`vote` is 1 (vote) or 0 (take it back).")
        await check_turn(chat, room["id"], me, None)
        revision = await chat.store.write(question_vote, message_named(request), room["id"], me,
                                          form["vote"] == "1")
        await show_parts(chat, room["id"], revision)

    return await class_step(request, access, step())


@login_required
async def mark_answered(request: Request) -> Response:
    """An owner marks a question answered: it leaves the open questions for the answered
    ones, and its message in the log says so, on every page."""
    access = await owner_or_403(request)
    await read_form(request)
    chat = chat_of(request)

    async def step() -> None:
        """Mark it, and show it."""
        if answered := await chat.store.write(answer_question, message_named(request),
                                              access.room["id"]):
            await show_changed(chat, answered)

    return await class_step(request, access, step())


@login_required
async def who_asked(request: Request) -> Response:
    """An owner's "Who asked?" on an anonymous question: the asker's name, for the owner who
    asked only (and logged), in place of the button. The owners can always know."""
    access = await owner_or_403(request)
    question = await message_or_404(request, access.room)
    name = question["asker"] or question["username"]
    log.info("moderation: %s saw who asked question %d in %s", request.state.user["username"],
             question["id"], access.room["code"])
    return HTMLResponse(str(fragments.asker(name)))


async def allow_anonymous_questions(request: Request, room: sqlite3.Row,
                                    form: dict[str, str]) -> None:
    """The Manage page's "Questions may be anonymous" (`allow`: 1 or 0): the composer then
    offers "Ask without my name" on every page."""
    allow = form.get("allow") == "1"
    await change_setting(request, room, "questions_anonymous", int(allow),
                         "allowed anonymous questions" if allow else "ended anonymous questions")


MODERATION_STEPS.update(questions_anonymous=allow_anonymous_questions)


async def class_step(request: Request, access: RoomAccess, step: Awaitable[None], done: str = "",
                     refused: Callable[[str], Any] | None = None) -> Response:
    """Take one step of a class tool and answer it. From htmx: `done` and the sender's error
    line emptied, or why not (in `refused`, else that line) with its status. From a plain
    form (no JavaScript): back to the room, or the room page saying why."""
    htmx = request.headers.get("hx-request") == "true"
    try:
        try:
            await step
        except sqlite3.Error as problem:
            raise Refused(could_not_save("That could not be saved", problem), 503) from None
    except Refused as problem:
        if htmx:
            shown = (refused or fragments.chat_error)(str(problem))
            return HTMLResponse(str(shown), problem.status_code)
        return await render_room(request, access.room, problem.status_code, error=str(problem))
    if htmx:
        return HTMLResponse(done + str(fragments.chat_error()))
    return redirect(f"/room/{access.room['code']}/")


def message_named(request: Request) -> int:
    """The message id in the URL; Refused (404) for what is not one."""
    if (message_id := whole_number(request.path_params["message_id"])) is None:
        raise Refused(GONE, 404)
    return message_id


def poll_options(text: str) -> tuple[str, ...]:
    """A poll's options out of its Options box: one per line, blank lines left out. Refused
    unless there are POLL_OPTIONS of them, none too long and none twice."""
    options = tuple(line.strip() for line in text.split("\n") if line.strip())
    fewest, most = POLL_OPTIONS
    if not fewest <= len(options) <= most:
        raise Refused(f"A poll has {fewest} to {most} options, one per line; "
                      f"this one has {len(options)}.")
    for option in options:
        if problem := too_long("Poll options", POLL_OPTION_CHARS, option):
            raise Refused(problem)
    if len({option.casefold() for option in options}) < len(options):
        raise Refused("Each option once: two of these are the same.")
    return options


async def set_pin(request: Request, access: RoomAccess, message_id: int | None) -> None:
    """Pin a message of the room (None: unpin) and show every page."""
    chat = chat_of(request)
    if (revision := await chat.store.write(pin_message, message_id, access.room["id"])):
        await show_parts(chat, access.room["id"], revision)
        log.info("moderation: %s %s in %s", request.state.user["username"],
                 f"pinned message {message_id}" if message_id else "unpinned", access.room["code"])


async def show_changed(chat: Chat, message: sqlite3.Row, said: str = "") -> None:
    """Every page gets a poll or question as it now is, with the Pinned and Questions parts
    if they show it (read after the change: section 6), and `said` for screen readers."""
    parts = await chat.store.read(parts_showing, message["room_id"], message["id"])
    await chat.fanout.publish(message["room_id"], str(fragments.messages_frame(
        [message], message["revision"])) + parts + said, message["revision"])


async def show_parts(chat: Chat, room_id: int, revision: int | None) -> None:
    """Every page gets the parts beside the log as they now are, on the room's `revision`
    (None: nothing changed, nothing sent)."""
    if revision is not None:
        parts = await chat.store.read(room_parts, room_id)
        await chat.fanout.publish(room_id, parts + str(fragments.room_revision(revision, True)),
                                  revision)


def pinned_part(db: sqlite3.Connection, room: sqlite3.Row, oob: bool, csrf: str | None) -> str:
    """The Pinned part (ROOM_PARTS): the room's pinned message, or an empty, hidden region."""
    pinned = room["pinned_id"] and message_in_room(db, room["pinned_id"], room["id"])
    return str(fragments.pinned(pinned or None, oob, csrf))


def questions_part(db: sqlite3.Connection, room: sqlite3.Row, oob: bool, csrf: str | None) -> str:
    """The Questions part (ROOM_PARTS): the open questions by votes, then age
    (QUESTIONS_SHOWN of them), then the latest answered."""
    open_questions = db.execute(
        f"{SELECT_MESSAGES} WHERE m.room_id = ?1 AND m.kind = 'question' "
        f"AND m.answered_at IS NULL AND {NOT_CLEARED} ORDER BY (SELECT count(*) "
        "FROM question_votes v WHERE v.message_id = m.id) DESC, m.id LIMIT ?2",
        (room["id"], QUESTIONS_SHOWN)).fetchall()
    answered = db.execute(
        f"{SELECT_MESSAGES} WHERE m.room_id = ?1 AND m.kind = 'question' "
        f"AND m.answered_at IS NOT NULL AND {NOT_CLEARED} "
        "ORDER BY m.answered_at DESC, m.id DESC LIMIT ?2", (room["id"], ANSWERED_SHOWN)).fetchall()
    return str(fragments.questions(open_questions, answered, oob, csrf))


def questions_count_part(db: sqlite3.Connection, room: sqlite3.Row, oob: bool,
                         csrf: str | None) -> str:
    """How many questions are open (ROOM_PARTS), for the Questions heading (folded, on a
    phone, behind it)."""
    count = db.execute(f"SELECT count(*) FROM messages m WHERE m.room_id = ? AND "
                       f"m.kind = 'question' AND m.answered_at IS NULL AND {NOT_CLEARED}",
                       (room["id"],)).fetchone()[0]
    return str(fragments.questions_count(count, oob))


ROOM_PARTS.update(pinned=pinned_part, questions=questions_part,
                  questions_count=questions_count_part)


def poll_in_room(db: sqlite3.Connection, poll_id: int, room_id: int) -> sqlite3.Row:
    """A poll of this room (its `closed_at`), inside the caller's transaction; Refused (404)."""
    poll = db.execute("SELECT p.closed_at FROM polls p JOIN messages m ON m.id = p.message_id "
                      f"WHERE p.message_id = ? AND m.room_id = ? AND {NOT_CLEARED}",
                      (poll_id, room_id)).fetchone()
    if poll is None:
        raise Refused(NO_POLL, 404)
    return poll


def question_in_room(db: sqlite3.Connection, question_id: int, room_id: int) -> sqlite3.Row:
    """A question of this room (its `answered_at`), inside the caller's transaction; Refused
    (404)."""
    question = db.execute("SELECT m.answered_at FROM messages m WHERE m.id = ? AND m.room_id = ? "
                          f"AND m.kind = 'question' AND {NOT_CLEARED}",
                          (question_id, room_id)).fetchone()
    if question is None:
        raise Refused(NO_QUESTION, 404)
    return question


def check_member(db: sqlite3.Connection, room_id: int, user_id: int) -> None:
    """Refused (403) for somebody who is not a member of the room (any more), inside the
    caller's transaction: a removal that committed first holds."""
    if db.execute("SELECT 1 FROM room_members WHERE room_id = ? AND user_id = ?",
                  (room_id, user_id)).fetchone() is None:
        raise Refused("Only the room's members can vote: join it first.", 403)


def cast_vote(db: sqlite3.Connection, poll_id: int, room_id: int, user_id: int,
              option: int) -> sqlite3.Row | None:
    """Vote for `option` in a poll of this room (0: take the vote back); the poll as pages
    show it, on the room's next revision, or None if that changed nothing. Refused: no such
    poll here (404), closed (409), no such option (400), not a member (403)."""
    with transaction(db):
        if poll_in_room(db, poll_id, room_id)["closed_at"]:
            raise Refused("This poll is closed: voting has ended.", 409)
        check_member(db, room_id, user_id)
        if option == 0:
            changed = db.execute("DELETE FROM poll_votes WHERE message_id = ? AND user_id = ?",
                                 (poll_id, user_id)).rowcount
        elif db.execute("SELECT 1 FROM poll_options WHERE message_id = ? AND position = ?",
                        (poll_id, option)).fetchone() is None:
            raise Refused(f"That poll has no option {option}.")
        else:
            changed = db.execute(
                "INSERT INTO poll_votes (message_id, user_id, position) VALUES (?, ?, ?) "
                "ON CONFLICT (message_id, user_id) DO UPDATE SET position = excluded.position "
                "WHERE position != excluded.position", (poll_id, user_id, option)).rowcount
        if not changed:
            return None
        db.execute(f"UPDATE messages SET revision = {NEXT_REVISION} WHERE id = ?2",
                   (room_id, poll_id))
    return message_by_id(db, poll_id)


def end_poll(db: sqlite3.Connection, poll_id: int, room_id: int) -> sqlite3.Row | None:
    """Close a poll of this room; the poll as pages show it, on the room's next revision, or
    None if it was closed already. Refused (404) for no such poll here."""
    with transaction(db):
        poll_in_room(db, poll_id, room_id)
        if not db.execute("UPDATE polls SET closed_at = ? WHERE message_id = ? "
                          "AND closed_at IS NULL", (utc_now(), poll_id)).rowcount:
            return None
        db.execute(f"UPDATE messages SET revision = {NEXT_REVISION} WHERE id = ?2",
                   (room_id, poll_id))
    return message_by_id(db, poll_id)


def pin_message(db: sqlite3.Connection, message_id: int | None, room_id: int) -> int | None:
    """Pin a message of this room in place of the one pinned before (None: unpin); the
    room's new revision, or None if it was so already. Refused (404) for no such message
    here (deleted: a delete that committed first wins)."""
    with transaction(db):
        if message_id is not None and message_in_room(db, message_id, room_id) is None:
            raise Refused(GONE, 404)
        if not db.execute("UPDATE rooms SET pinned_id = ?2 WHERE id = ?1 AND pinned_id IS NOT ?2",
                          (room_id, message_id)).rowcount:
            return None
        return advance_room(db, room_id)


def question_vote(db: sqlite3.Connection, question_id: int, room_id: int, user_id: int,
                  given: bool) -> int | None:
    """Give (`given`) or take back one's vote for an open question of this room; the room's
    new revision, or None if that changed nothing. Refused: no such question here (404),
    answered already (409), not a member (403)."""
    with transaction(db):
        if question_in_room(db, question_id, room_id)["answered_at"]:
            raise Refused("That question is answered already.", 409)
        check_member(db, room_id, user_id)
        if not db.execute("INSERT INTO question_votes (message_id, user_id) VALUES (?, ?) "
                          "ON CONFLICT DO NOTHING" if given else
                          "DELETE FROM question_votes WHERE message_id = ? AND user_id = ?",
                          (question_id, user_id)).rowcount:
            return None
        return advance_room(db, room_id)


def answer_question(db: sqlite3.Connection, question_id: int, room_id: int
                    ) -> sqlite3.Row | None:
    """Mark a question of this room answered; the question as pages show it, on the room's
    next revision, or None if it was answered already. Refused (404) for no such question."""
    with transaction(db):
        if question_in_room(db, question_id, room_id)["answered_at"]:
            return None
        db.execute(f"UPDATE messages SET answered_at = ?3, revision = {NEXT_REVISION} "
                   "WHERE id = ?2", (room_id, question_id, utc_now()))
    return message_by_id(db, question_id)


CLASS_ROUTES = [
    post("/room/{code}/polls", start_poll),
    post("/room/{code}/polls/{message_id}/vote", vote_in_poll),
    post("/room/{code}/polls/{message_id}/close", close_poll),
    post("/room/{code}/messages/{message_id}/pin", pin),
    post("/room/{code}/unpin", unpin),
    post("/room/{code}/questions/{message_id}/vote", vote_for_question),
    post("/room/{code}/questions/{message_id}/answered", mark_answered),
    get("/room/{code}/questions/{message_id}/asker", who_asked),
]


# ---------------------------------------------------------------------------
# 14. Bots and the API
# A room's bots: users of that one room (users.is_bot) that post with a token through a JSON
# API that takes no cookie, and whose webhook is called when a stored message mentions them,
# its answer posted back as the bot's reply. Every post takes post_message's path (the room's
# rules, the revision, the fan-out, Redis). A webhook is a request this server makes to an
# address somebody typed, so it goes only where webhook_target allows (no private, link-local
# or own addresses; only CHAT_WEBHOOK_HOSTS once the server listens beyond loopback), to the
# address it checked, with no redirects, in bounded time and size, off the message path.
# ---------------------------------------------------------------------------


API_PAGE = 100  # messages per read at most
API_READS_PER_MINUTE = 120  # per bot: a script that polls every half second is not held back
WEBHOOK_ANSWER_BYTES = 64 * 1024
WEBHOOK_CALLS = 8  # at once, across bots and rooms
WEBHOOK_ROOM_CALLS = 4  # at once for one room: one room's slow webhooks leave the others half
WEBHOOK_QUEUE = 100  # calls (and mentioning messages) waiting; past it, dropped and counted
WEBHOOK_ROOM_QUEUE = 25  # calls waiting for one room: one room cannot fill the queue
BOTS_PER_ROOM = 10
# httpx logs each request's URL at INFO, query and all: a webhook's may hold its secret.
logging.getLogger("httpx").setLevel(logging.WARNING)
WEBHOOK_LOG_MINUTES = 1  # a bot's failures go to the log at most once a minute
WEBHOOK_URL_CHARS = 2000
NO_TOKEN = ("This needs a bot's valid token, as the header Authorization: Bearer <token> "
            "(an owner adds a bot on the room's Manage page; a token stops when it is "
            "replaced or its bot removed).")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that are an IPv4 one inside


async def add_bot(request: Request, room: sqlite3.Row, form: dict[str, str]) -> Response:
    """The Manage page's "Add bot": `bot_name` (a display name, checked as a guest's is, and
    not looking like anybody's in the room) and an optional `webhook_url` (webhook_target's
    rules, checked now and at every call). The page then shows its token, once, with a curl
    line; the database keeps only the token's hash."""
    chat = chat_of(request)
    name = " ".join(unicodedata.normalize("NFKC", form.get("bot_name", "")).split())
    if problem := guest_name_problem(name):
        raise Refused(problem.replace("the others should see", "the bot should go by"))
    if webhook_url := form.get("webhook_url", "").strip():
        await webhook_target(webhook_url, chat.settings)
    token = secrets.token_urlsafe(32)
    await chat.store.write(create_bot, room["id"], name, token_digest(token), webhook_url or None,
                           request.state.user["id"])
    log.info("moderation: %s added the bot %s to %s", request.state.user["username"], name,
             room["code"])
    return await manage_page(request, room, new_bot=name, bot_token=token,
                             api_url=str(request.url_for("api_messages", code=room["code"])))


async def give_bot_new_token(request: Request, room: sqlite3.Row, form: dict[str, str]) -> Response:
    """A bot's "New token" (`user_id`): the old one stops at once, on every worker; the new one
    is shown once."""
    token = secrets.token_urlsafe(32)
    name = await chat_of(request).store.write(replace_token, room["id"], person_named(form),
                                              token_digest(token))
    log.info("moderation: %s gave the bot %s a new token in %s", request.state.user["username"],
             name, room["code"])
    return await manage_page(request, room, new_bot=name, bot_token=token,
                             api_url=str(request.url_for("api_messages", code=room["code"])))


async def remove_bot(request: Request, room: sqlite3.Row, form: dict[str, str]) -> None:
    """A bot's "Remove" (`user_id`): its token stops at once, on every worker, and its webhook
    is called no more; its messages stay, still marked as the bot's."""
    name = await chat_of(request).store.write(end_bot, room["id"], person_named(form),
                                              request.state.user["id"])
    log.info("moderation: %s removed the bot %s from %s", request.state.user["username"], name,
             room["code"])


MODERATION_STEPS.update(add_bot=add_bot, bot_token=give_bot_new_token, remove_bot=remove_bot)


async def api_post(request: Request) -> Response:
    """POST /api/rooms/<code>/messages as a bot (its token as `Authorization: Bearer`):
    {"text": "...", "reply_to": <id>?} goes through post_message's path, the room's rules and
    all; 201 with {"id", "revision", "url"}. Refused in JSON (api_refusal)."""
    try:
        bot, room = await bot_in_room(request)
        fields = await json_body(request)
        text, reply_to = fields.get("text"), fields.get("reply_to")
        if not isinstance(text, str) or not text.strip():
            raise Refused('"text" must be the message: a string, and not empty.')
        if reply_to is not None and (type(reply_to) is not int or not 0 < reply_to < 2**63):
            raise Refused('"reply_to", if given, must be the id of the message it answers.')
        message = await post_message(chat_of(request), room["id"], bot["user_id"], text, None,
                                     RoomState.of(room, frozenset()), reply_to)
        if message is None:  # (nothing left once cleaned: control characters only)
            raise Refused('"text" must be the message: a string, and not empty.')
    except Refused as problem:
        return api_refusal(problem)
    url = f"{invite_link(request, room['code'])}?around={message['id']}#msg-{message['id']}"
    return JSONResponse({"id": message["id"], "revision": message["revision"], "url": url}, 201)


async def api_read(request: Request) -> Response:
    """GET /api/rooms/<code>/messages?after=<id>&limit=<n>, as a bot: the room's messages
    after that id (what a member may read), oldest first, API_PAGE at most."""
    chat = chat_of(request)
    try:
        bot, room = await bot_in_room(request)
        after = whole_number(request.query_params.get("after", "0"))
        limit = whole_number(request.query_params.get("limit", str(API_PAGE)))
        if after is None or not limit:
            raise Refused(f'"after" is a message id and "limit" a number from 1 to {API_PAGE} '
                          "(both may be left out).")
        if not await chat.api_limit.allow(bot["user_id"]):
            raise Refused(f"At most {API_READS_PER_MINUTE} reads a minute.", 429,
                          await chat.api_limit.retry_after(bot["user_id"]))
        rows = await chat.store.read(messages_after, room["id"], after, min(limit, API_PAGE))
    except Refused as problem:
        return api_refusal(problem)
    return JSONResponse({"messages": [
        {"id": m["id"], "author": m["username"], "author_is_bot": bool(m["is_bot"]),
         "text": m["text"], "sent_at": m["created_at"], "edited_at": m["edited_at"],
         "reply_to": m["reply_to"], "kind": m["kind"]} for m in rows]})


async def bot_in_room(request: Request) -> tuple[sqlite3.Row, sqlite3.Row]:
    """The bot whose token the request bears, and the room in its URL, which must be the
    bot's. Refused: 401 without a token or with one that is no live bot's (one answer, one
    lookup, whatever was wrong), 404 for a code that leads nowhere, 403 for another room's."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bot = await chat_of(request).store.read(
        bot_by_token, token_digest(token.strip() if scheme.lower() == "bearer" else ""))
    if bot is None:
        raise Refused(NO_TOKEN, 401)
    room = await chat_of(request).store.read(room_by_code, request.path_params["code"].lower())
    if room is None:
        raise Refused("There is no room with that code.", 404)
    if room["id"] != bot["room_id"]:
        raise Refused("This bot's token is for another room.", 403)
    if bot["removed"]:
        raise Refused("This bot was removed from the room (an owner can let it back in).", 403)
    return bot, room


async def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object; Refused (400) for anything else."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # (not JSON, not UTF-8, or nested past any sense)
        raise Refused('The body must be JSON, like {"text": "hello"}.') from None
    if not isinstance(body, dict):
        raise Refused('The body must be a JSON object, like {"text": "hello"}.')
    return body


def api_refusal(problem: Refused) -> Response:
    """A refusal as the API answers it: {"error": why}, its status, and how long to wait."""
    wait = {"retry-after": str(math.ceil(problem.retry_after))} if problem.retry_after else {}
    wanted = {"www-authenticate": "Bearer"} if problem.status_code == 401 else {}
    return JSONResponse({"error": str(problem)}, problem.status_code, headers=wait | wanted)


def token_digest(token: str) -> str:
    """What the database keeps of a bot's token: its sha256, never the token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class WebhookTarget(NamedTuple):
    """Where one webhook call goes: the checked address (url), the name it was given (host,
    for the Host header and TLS) and the name to verify TLS for (None: an IP address)."""

    url: str
    host: str
    tls_name: str | None


class WebhookFailed(Exception):
    """Why a webhook call did not give an answer, in words for the Manage page."""


async def webhook_target(url: str, settings: Settings) -> WebhookTarget:
    """Where a webhook may be called, resolved once here (the call goes to the address checked,
    so a name that resolves elsewhere the second time changes nothing): http or https only, no
    user name or password, no address that is link-local, multicast, unspecified or reserved
    (as written, in an odd notation or inside IPv6), nor this server's own port or Redis's;
    loopback only while the server listens on loopback alone, private addresses and (once it
    listens beyond loopback) every host only if listed in CHAT_WEBHOOK_HOSTS. Refused (400)
    with the reason in plain words."""
    if len(url) > WEBHOOK_URL_CHARS or not url.isascii() or not url.isprintable() or " " in url:
        raise Refused("A webhook's address is a plain http:// or https:// URL, with no spaces.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("A webhook's address starts with http:// or https:// and a host.")
    if "@" in parts.netloc or "\\" in url:
        raise Refused("A webhook's address may not hold a user name or password.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("That address's port is not a port number.") from None
    host = parts.hostname
    listed = host in settings.webhook_hosts or f"{host}:{port}" in settings.webhook_hosts
    if not listed and not loopback_only(settings):
        raise Refused(f"This server listens beyond this machine, so bots' webhooks go only to "
                      f"the hosts in CHAT_WEBHOOK_HOSTS, and {host} is not one of them.")
    try:
        found = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM), settings.webhook_seconds)
    except (OSError, TimeoutError, UnicodeError):
        raise Refused(f"{host} could not be found.") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in found]
    for address in addresses:
        if problem := address_problem(address, port, listed, settings):
            raise Refused(f"A webhook may not go to {host}: {problem}.")
    at = f"[{addresses[0]}]" if addresses[0].version == 6 else str(addresses[0])
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    literal = host.replace(".", "").isdigit() or ":" in host
    return WebhookTarget(f"{parts.scheme}://{at}:{port}{path}", parts.netloc,
                         None if literal or parts.scheme == "http" else host)


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                    listed: bool, settings: Settings) -> str | None:
    """Why a webhook may not go to this address and port (webhook_target); None if it may."""
    if address.version == 6:  # an IPv4 address inside an IPv6 one is that IPv4 address
        inside = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if address in NAT64:
            inside = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        address = inside or address
    if address.is_link_local or address.is_multicast or address.is_unspecified or (
            address.is_reserved and not address.is_loopback):  # (IPv6's ::1 is in ::/8, reserved)
        return f"{address} is a link-local, multicast, unspecified or reserved address"
    redis = urlsplit(settings.redis_url) if settings.redis_url else None
    everywhere = settings.host in ("0.0.0.0", "::", "")  # (then any of this machine's addresses)
    if port == settings.port and (address.is_loopback or str(address) == settings.host or (
            everywhere and not address.is_global)):
        return "that is (or may be) this server's own port"
    if redis and (address.is_loopback or str(address) == redis.hostname) and (
            port == (redis.port or 6379)):
        return "that is Redis's port"
    if address.is_loopback:
        return None if listed or loopback_only(settings) else "a loopback address"
    if (not address.is_global or getattr(address, "is_site_local", False)) and not listed:
        return (f"{address} is a private address (list the host in CHAT_WEBHOOK_HOSTS to "
                "allow it)")
    return None


def loopback_only(settings: Settings) -> bool:
    """Whether the server listens on this machine's loopback alone (`python chat.py`'s default:
    a laptop's experiments), where a bot's webhook may be on the same machine."""
    try:
        return settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        return False


def call_mentioned_bots(chat: Chat, message: sqlite3.Row) -> None:
    """MESSAGE_LISTENERS: a stored message that mentions somebody, not written by a bot (no
    loops), is queued for call_webhooks, which calls the bots it mentions; past WEBHOOK_QUEUE
    waiting it is dropped, and counted."""
    if not message["mentioned"] or message["is_bot"] or chat.webhook_calls is None:
        return
    try:
        chat.webhook_calls.put_nowait(message["id"])
    except asyncio.QueueFull:
        dropped(chat)


MESSAGE_LISTENERS.append(call_mentioned_bots)


def dropped(chat: Chat) -> None:
    """One webhook call (or mentioning message) turned away: counted, and logged now and then."""
    chat.webhooks_dropped += 1
    if chat.webhooks_dropped % 100 == 1:
        log.warning("webhooks: %d dropped so far: more were waiting than %d",
                    chat.webhooks_dropped, WEBHOOK_QUEUE)


async def call_webhooks(chat: Chat) -> None:
    """BACKGROUND_TASKS: the webhooks of the bots each queued message mentions, WEBHOOK_CALLS
    at a time (WEBHOOK_ROOM_CALLS for one room), the rooms taking turns, the rest waiting
    (WEBHOOK_ROOM_QUEUE a room, WEBHOOK_QUEUE in all, then dropped), each at most once per
    message, from the worker that stored it, never holding up a message."""
    waiting: dict[int, deque[tuple[sqlite3.Row, sqlite3.Row, sqlite3.Row]]] = {}  # by room
    running: set[asyncio.Task] = set()
    running_in: Counter[int] = Counter()

    def finished(call: asyncio.Task, room_id: int) -> None:
        """A call is over: its place goes to the next one waiting."""
        running.discard(call)
        running_in[room_id] -= 1
        start_calls()

    def start_calls() -> None:
        """Start waiting calls while fewer than WEBHOOK_CALLS run: the first room in turn
        with fewer than WEBHOOK_ROOM_CALLS running goes, then to the back of the line."""
        while len(running) < WEBHOOK_CALLS:
            room_id = next((r for r in waiting if running_in[r] < WEBHOOK_ROOM_CALLS), None)
            if room_id is None:
                return
            calls = waiting.pop(room_id)
            call = asyncio.create_task(call_bot(chat, *calls.popleft()))
            if calls:
                waiting[room_id] = calls  # (to the back)
            running.add(call)
            running_in[room_id] += 1
            call.add_done_callback(functools.partial(finished, room_id=room_id))

    try:
        while True:
            message_id = await chat.webhook_calls.get()
            with contextlib.suppress(sqlite3.Error):
                message, room, bots = await chat.store.read(bots_to_call, message_id)
                for bot in bots:
                    calls = waiting.setdefault(room["id"], deque())
                    if len(calls) < WEBHOOK_ROOM_QUEUE and sum(map(len, waiting.values())) < (
                            WEBHOOK_QUEUE):
                        calls.append((message, room, bot))
                    else:
                        dropped(chat)
                    if not calls:
                        del waiting[room["id"]]
                start_calls()
    finally:  # (none waiting first: a cancelled call's callback would start the next)
        waiting.clear()
        for call in running:
            call.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def call_bot(chat: Chat, message: sqlite3.Row, room: sqlite3.Row, bot: sqlite3.Row) -> None:
    """One webhook call: POST the message to the bot's webhook, and post its answer's "text"
    as the bot's reply to it (the room's rules apply; an empty body, {} or no "text": no
    answer). How it went is noted for the owners (the Manage page); a failure is logged, once
    a minute per bot at most; the room is not told."""
    payload = {"room": {"code": room["code"], "name": room["name"]},
               "message": {"id": message["id"], "author": message["username"],
                           "text": message["text"], "sent_at": message["created_at"]},
               "bot": {"name": bot["username"]}}
    try:
        status, answer = await webhook_answer(bot["webhook_url"], payload, chat.settings)
        text = answer.get("text") if isinstance(answer, dict) else None
        if (answer is not None and not isinstance(answer, dict)) or (
                text is not None and not isinstance(text, str)):
            raise WebhookFailed(f'answered {status}, but not with {{"text": "..."}}')
        outcome, failed = f"answered {status}", False
        if text and text.strip():
            posted = await post_message(chat, room["id"], bot["user_id"], text, None,
                                        RoomState.of(room, frozenset()), message["id"])
            outcome += (", its answer posted" if posted is not None else
                        ", but its text was empty once cleaned (nothing posted)")
    except (WebhookFailed, Refused) as problem:
        outcome, failed = (str(problem) if isinstance(problem, WebhookFailed) else
                           f"its answer was refused: {problem}"), True
    except Exception:  # a bug: logged whole, and the owners told where to look
        log.exception("webhook of the bot %s in %s", bot["username"], room["code"])
        outcome, failed = "failed (the server's log says why)", True
    with contextlib.suppress(sqlite3.Error):
        if await chat.store.write(note_call, bot["user_id"], outcome, failed) and failed:
            log.warning("webhook of the bot %s in %s: %s", bot["username"], room["code"], outcome)


async def webhook_answer(url: str, payload: dict[str, Any],
                         settings: Settings) -> tuple[int, Any]:
    """POST `payload` as JSON to a webhook (webhook_target, checked again now), with no
    redirects, no proxy, no compression, in settings.webhook_seconds and at most
    WEBHOOK_ANSWER_BYTES of answer: its status and its JSON (None for an empty body).
    WebhookFailed with why, otherwise."""
    try:
        target = await webhook_target(url, settings)
    except Refused as problem:
        raise WebhookFailed(f"not called: {problem}") from None
    body = bytearray()
    tls = await asyncio.to_thread(webhook_tls)
    try:
        async with asyncio.timeout(settings.webhook_seconds):
            async with httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=tls,
                                         timeout=settings.webhook_seconds) as client:
                async with client.stream(
                        "POST", target.url, content=json.dumps(payload).encode(),
                        headers={"host": target.host, "content-type": "application/json",
                                 "accept-encoding": "identity", "user-agent": "Backchat bot"},
                        extensions={"sni_hostname": target.tls_name} if target.tls_name else {}
                ) as response:
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > WEBHOOK_ANSWER_BYTES:
                            raise WebhookFailed(f"its answer was over "
                                                f"{WEBHOOK_ANSWER_BYTES // 1024} KiB")
    except TimeoutError:
        raise WebhookFailed(f"timeout after {settings.webhook_seconds:g} s") from None
    except httpx.HTTPError as problem:
        raise WebhookFailed(f"could not be reached ({type(problem).__name__})") from None
    status = response.status_code
    if 300 <= status < 400:
        raise WebhookFailed(f"answered {status}: a redirect, which is not followed")
    if not 200 <= status < 300:
        raise WebhookFailed(f"answered {status}")
    try:
        return status, (json.loads(body) if body.strip() else None)
    except (ValueError, RecursionError):
        raise WebhookFailed(f"answered {status}, but not with JSON") from None


@functools.cache
def webhook_tls() -> ssl.SSLContext:
    """The TLS context every webhook call shares, made once, on a thread: httpx makes one per
    client by default, loading the CA bundle, about 25 ms on the event loop for each call
    (bench.py's slow webhook moved the room's p99 from 5 to 130 ms)."""
    context = httpx.create_ssl_context()
    httpx.AsyncClient(verify=context)  # (its lazy imports too, 20 ms more the first time)
    return context


@template_filter("ago")
def ago(iso: str) -> str:
    """How long ago a time was, in words ("2 minutes ago"), as the Manage page says it."""
    seconds = (datetime.now(timezone.utc) - datetime.strptime(iso, ISO_SECONDS).replace(
        tzinfo=timezone.utc)).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'} ago"
    return "just now"


def create_bot(db: sqlite3.Connection, room_id: int, name: str, digest: str,
               webhook_url: str | None, by: int) -> int:
    """A new bot of the room: its user (is_bot; a key no login can type), its membership (so a
    message can mention it), its token's digest; its user id. Refused (409) past BOTS_PER_ROOM,
    or for a name that looks like the name of somebody in the room, or removed from it."""
    skeleton = name_skeleton(name)
    with transaction(db):
        if db.execute("SELECT count(*) FROM bots WHERE room_id = ? AND removed_at IS NULL",
                      (room_id,)).fetchone()[0] >= BOTS_PER_ROOM:
            raise Refused(f"A room has at most {BOTS_PER_ROOM} bots: remove one first.", 409)
        if db.execute(
                "SELECT 1 FROM users u WHERE u.id IN (SELECT user_id FROM room_members WHERE "
                "room_id = ?1 UNION SELECT user_id FROM removals WHERE room_id = ?1) AND "
                "(u.username_skeleton IN (?2, ?3) OR u.username_key IN (?4, ?5))",
                (room_id, skeleton, f"bot:{room_id}:{skeleton}", name.casefold(),
                 f"bot:{room_id}:{name.casefold()}")).fetchone():
            raise Refused("That name looks like the name of somebody in this room; "
                          "choose another.", 409)
        user_id = db.execute(
            "INSERT INTO users (username, username_key, password_hash, created_at, "
            "username_skeleton, is_bot) VALUES (?, ?, '!', ?, ?, 1) RETURNING id",
            (name, f"bot:{room_id}:{name.casefold()}", utc_now(),
             f"bot:{room_id}:{skeleton}")).fetchall()[0][0]
        db.execute("INSERT INTO room_members (room_id, user_id, joined_at, last_visit_at) "
                   "VALUES (?, ?, ?, ?)", (room_id, user_id, utc_now(), utc_now()))
        db.execute("INSERT INTO bots (user_id, room_id, token_hash, webhook_url, created_by, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (user_id, room_id, digest, webhook_url, by, utc_now()))
    return user_id


def live_bot(db: sqlite3.Connection, room_id: int, user_id: int) -> sqlite3.Row:
    """One of the room's bots, not removed (its name), inside the caller's transaction;
    Refused (409) for anybody else."""
    bot = db.execute("SELECT u.username FROM bots b JOIN users u ON u.id = b.user_id "
                     "WHERE b.user_id = ? AND b.room_id = ? AND b.removed_at IS NULL",
                     (user_id, room_id)).fetchone()
    if bot is None:
        raise Refused("That is not one of this room's bots.", 409)
    return bot


def replace_token(db: sqlite3.Connection, room_id: int, user_id: int, digest: str) -> str:
    """A bot's new token (its digest): the old one stops; the bot's name."""
    with transaction(db):
        bot = live_bot(db, room_id, user_id)
        db.execute("UPDATE bots SET token_hash = ? WHERE user_id = ?", (digest, user_id))
    return bot["username"]


def end_bot(db: sqlite3.Connection, room_id: int, user_id: int, by: int) -> str:
    """Remove a bot: its token stops, it leaves the room's members (no mention reaches it) and
    its name is free again; its messages stay, still the bot's. Its name. It is also among the
    room's removals (not listed: members_of), so an answer its webhook was still giving is
    refused by INSERT_MESSAGE like a removed person's message."""
    with transaction(db):
        bot = live_bot(db, room_id, user_id)
        db.execute("INSERT INTO removals (room_id, user_id, removed_by, removed_at) "
                   "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (room_id, user_id, by, utc_now()))
        db.execute("UPDATE bots SET token_hash = NULL, removed_at = ? WHERE user_id = ?",
                   (utc_now(), user_id))
        db.execute("UPDATE users SET username_key = username_key || ':' || id, "
                   "username_skeleton = username_skeleton || ':' || id WHERE id = ?", (user_id,))
        db.execute("DELETE FROM room_members WHERE room_id = ? AND user_id = ?", (room_id, user_id))
    return bot["username"]


def bot_by_token(db: sqlite3.Connection, digest: str) -> sqlite3.Row | None:
    """The live bot whose token has this digest (its user id, name, room, and whether an owner
    removed it from the room, as anybody is removed), or None."""
    return db.execute("SELECT b.user_id, b.room_id, u.username, EXISTS (SELECT 1 FROM removals "
                      "x WHERE x.room_id = b.room_id AND x.user_id = b.user_id) AS removed "
                      "FROM bots b "
                      "JOIN users u ON u.id = b.user_id JOIN rooms r ON r.id = b.room_id "
                      "WHERE b.token_hash = ? AND b.removed_at IS NULL AND r.deleted_at IS NULL",
                      (digest,)).fetchone()


def messages_after(db: sqlite3.Connection, room_id: int, after: int,
                   limit: int) -> list[sqlite3.Row]:
    """Up to `limit` of the room's messages after id `after`, oldest first (none cleared)."""
    return db.execute(f"{SELECT_MESSAGES} WHERE m.room_id = ? AND m.id > ? AND {NOT_CLEARED} "
                      "ORDER BY m.id LIMIT ?", (room_id, after, limit)).fetchall()


def bots_to_call(db: sqlite3.Connection, message_id: int
                 ) -> tuple[sqlite3.Row | None, sqlite3.Row | None, list[sqlite3.Row]]:
    """A stored message, its room, and the live bots with a webhook that it mentions (none if
    a bot wrote it)."""
    with reading(db):
        message = message_by_id(db, message_id)
        if message is None or message["is_bot"]:
            return message, None, []
        room = db.execute("SELECT * FROM rooms WHERE id = ?", (message["room_id"],)).fetchone()
        bots = db.execute("SELECT b.user_id, b.webhook_url, u.username FROM mentions x "
                          "JOIN bots b ON b.user_id = x.user_id JOIN users u ON u.id = b.user_id "
                          "WHERE x.message_id = ? AND b.room_id = ? AND b.removed_at IS NULL "
                          "AND b.webhook_url IS NOT NULL", (message_id, message["room_id"]))
        return message, room, bots.fetchall()


def note_call(db: sqlite3.Connection, user_id: int, outcome: str, failed: bool) -> bool:
    """How a bot's latest webhook call went, for its owners; whether a failure is to be logged
    (none was in the last WEBHOOK_LOG_MINUTES)."""
    with transaction(db):
        db.execute("UPDATE bots SET last_call = ?, last_call_at = ? WHERE user_id = ?",
                   (outcome, utc_now(), user_id))
        return failed and db.execute(
            "UPDATE bots SET logged_at = ?1 WHERE user_id = ?2 AND (logged_at IS NULL "
            "OR logged_at <= ?3)", (utc_now(), user_id,
                                    utc_ago(minutes=WEBHOOK_LOG_MINUTES))).rowcount > 0


BOT_ROUTES = [
    post("/api/rooms/{code}/messages", api_post),
    get("/api/rooms/{code}/messages", api_read, name="api_messages"),
]


# ---------------------------------------------------------------------------
# 15. Scaling out: Redis
# Only with CHAT_REDIS_URL (nothing above needs it): fan-out, presence and rate limits shared
# by every worker through Redis; the twins of LocalFanout, RateLimiter and FailureLimit.
# ---------------------------------------------------------------------------


class RedisFanout(LocalFanout):
    """Fan-out across processes through Redis pub/sub: each worker publishes a room's
    frames to the room's channel, and the workers with a socket in the room (itself too)
    hand what they receive to their connections. A worker subscribes to a room's channels
    while it has a socket in it (watch, unwatch), so it spends nothing on other rooms'
    messages. Presence is a sorted set per room whose entries expire unless their worker
    keeps renewing them, so a crashed worker's users vanish within PRESENCE_TTL."""

    # Rare: every worker hears them.
    EVERY_ROOM = ("backchat:logout", "backchat:resync", "backchat:state")
    # (No room's id: soon() runs _announce once a window for all the rooms that changed.)
    ALL_ROOMS = 0
    SUBSCRIBED_WITHIN = 2.0  # seconds a handshake waits for Redis to confirm a room's subscription

    PRESENCE_TTL = 20.0  # seconds an entry lives without renewal
    HEARTBEAT = 5.0  # seconds between renewals

    def __init__(self, hub: RoomHub, url: str) -> None:
        super().__init__(hub)
        import redis.asyncio  # optional: only needed when CHAT_REDIS_URL is set

        self.redis = redis.asyncio.Redis.from_url(url, decode_responses=True, socket_timeout=2,
                                                  socket_connect_timeout=2)
        # The subscriber sits idle between messages, so it gets no read timeout.
        self.subscriber = redis.asyncio.Redis.from_url(url, decode_responses=True,
                                                       socket_connect_timeout=2,
                                                       health_check_interval=10)
        self.worker = secrets.token_hex(4)
        self.tasks: list[asyncio.Task] = []
        self.healthy = True
        self.missed: set[str] = set()  # rooms whose frames other workers may not have had
        self.recovering: asyncio.Task | None = None
        self.pubsub: Any = None  # the subscriber's pub/sub, while it is connected
        # rooms with sockets here -> set once subscribed
        self.watched: dict[int, asyncio.Event] = {}
        # Since the last _announce: room id -> who came online (True) or went offline (False).
        self.changed: dict[int, dict[Person, bool]] = {}
        # Rooms whose presence changed, to be shown at the window's end.
        self.presence_due: set[int] = set()

    async def start(self) -> None:
        """Start listening to Redis and renewing this worker's presence entries."""
        self.tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._heartbeat())]

    async def stop(self) -> None:
        """Stop listening and renewing, and close both connections to Redis."""
        for task in [*self.tasks, self.recovering]:
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
            await self.subscriber.aclose()

    def _unhealthy(self, problem: Exception) -> None:
        if self.healthy:
            log.error("Redis unreachable (%s): serving this worker's connections only "
                      "until it is back", problem)
        self.healthy = False
        if self.recovering is None or self.recovering.done():
            self.recovering = asyncio.create_task(self._recover())

    async def publish(self, room_id: int, frame: str, revision: int | None = None) -> None:
        """Every worker's pages get the frame, through Redis (after its revision, if it has
        one: "<revision>|<frame>"). If Redis is away (or was, a moment ago, and is not yet known
        to be back) this worker's pages get it at once and the room is remembered: once Redis
        answers, every page in it catches up (_recover)."""
        if self.healthy:
            try:
                await self.redis.publish(f"backchat:room:{room_id}",
                                         frame if revision is None else f"{revision}|{frame}")
                return
            except Exception as problem:
                # The message is stored: it is not lost, only late elsewhere.
                self._unhealthy(problem)
        self.missed.add(room_id)
        self.hub.broadcast(room_id, frame, revision=revision)

    async def _recover(self) -> None:
        """Ask Redis, with back-off, until it answers; then tell every worker (this one too)
        which rooms' frames may have gone missing meanwhile: each closes its sockets in them
        with 1012, and the pages reconnect and catch up from the database (a page that missed
        nothing is sent nothing)."""
        delay = 0.25
        while True:
            await asyncio.sleep(delay)
            rooms = sorted(self.missed)
            try:
                await self.redis.publish("backchat:resync", json.dumps(rooms))
            except Exception:
                delay = min(delay * 2, 5.0)
                continue
            self.missed.difference_update(rooms)
            if not self.healthy:
                log.warning("Redis is back: publishing again; pages in %d room(s) that may have "
                            "missed frames reconnect and catch up", len(rooms))
                self.healthy = True
            if not self.missed:
                return

    @staticmethod
    def _channels(room_id: int) -> tuple[str, str]:
        return f"backchat:room:{room_id}", f"backchat:presence:{room_id}"

    async def watch(self, room_id: int) -> None:
        """Subscribe to the room's channels (the first socket here in it) and wait, briefly,
        for Redis to confirm: a frame published after that reaches this worker, so nothing
        sent between the page's catch-up and its first live frame is missed."""
        if room_id not in self.watched:
            self.watched[room_id] = asyncio.Event()
            with contextlib.suppress(Exception):  # (Redis away: _listen subscribes when it is back)
                await self.pubsub.subscribe(*self._channels(room_id))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.watched[room_id].wait(), self.SUBSCRIBED_WITHIN)

    async def unwatch(self, room_id: int) -> None:
        """Unsubscribe from the room's channels (the last socket here in it closed)."""
        if self.watched.pop(room_id, None) is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.unsubscribe(*self._channels(room_id))

    async def _listen(self) -> None:
        """Receive the frames and presence notices of the rooms with sockets here, and what
        every worker must hear; after an outage, close local sockets with 1012 so their pages
        reconnect and catch up on what they missed."""
        delay = 0.5
        while True:
            try:
                async with self.subscriber.pubsub() as pubsub:
                    for subscribed in self.watched.values():
                        subscribed.clear()
                    self.pubsub = pubsub
                    await pubsub.subscribe(*self.EVERY_ROOM,
                                           *(channel for room_id in list(self.watched)
                                             for channel in self._channels(room_id)))
                    if not self.healthy:
                        log.warning("Redis is back: asking every page on this worker to "
                                    "reconnect and catch up")
                        self.healthy = True
                        await self.hub.close_all(1012)
                    delay = 0.5
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._deliver_one(message["channel"], message["data"])
                        elif (message["type"] == "subscribe"
                              and message["channel"].startswith("backchat:room:")):
                            if subscribed := self.watched.get(
                                    int(message["channel"].rsplit(":", 1)[1])):
                                subscribed.set()
            except asyncio.CancelledError:
                raise
            except Exception as problem:
                self.pubsub = None
                self._unhealthy(problem)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _deliver_one(self, channel: str, data: str) -> None:
        """Hand on one notice; one this worker cannot read (a bug, or a worker of another
        version) is logged and skipped: it is not Redis being away, and must not close sockets."""
        try:
            self._deliver(channel, data)
        except Exception as problem:
            log.warning("could not use a notice on %s (%r): skipped", channel, problem)

    def _deliver(self, channel: str, data: str) -> None:
        if channel == "backchat:logout":
            ended = json.loads(data)
            return self.hub.end_pages(ended.get("user_id"), ended.get("session_id"),
                                      ended.get("room_id"), ended.get("why", "logged out"))
        if channel == "backchat:state":
            changed = json.loads(data)
            room_id = changed["room_id"]
            self.hub.set_room(room_id, RoomState.from_wire(changed["state"]))
            self.hub.broadcast(room_id, changed["frame"], revision=changed.get("revision"))
            return self.soon(self.show_presence, room_id)
        if channel == "backchat:resync":
            for room_id in json.loads(data):
                self.hub.close_room(room_id, 1012)
            return
        kind, room = channel.split(":", 2)[1:]
        if (room_id := int(room)) not in self.hub.connections:
            return  # nobody here is in that room
        if kind == "room":  # "<revision>|<frame>", or a frame that changes no revision
            revision, bar, frame = data.partition("|")
            if bar and revision.isascii() and revision.isdigit():
                self.hub.broadcast(room_id, frame, revision=int(revision))
            else:
                self.hub.broadcast(room_id, data)
        else:
            # Shown once the window ends, with every other room whose presence changed meanwhile.
            self.presence_due.add(room_id)
            self.soon(self._show_due_presence, self.ALL_ROOMS)

    async def _show_due_presence(self, _: int = 0) -> None:
        """Send the pages of every room whose presence changed in the window their online
        list (show_presences)."""
        due, self.presence_due = sorted(self.presence_due), set()
        await self.show_presences(due)

    async def online_in(self, room_ids: list[int]) -> dict[int, list[Person]]:
        """Who has each room open, by name, on every worker: the live entries of each room's
        set in Redis, in one trip (this worker's own pages if Redis is away)."""
        if not room_ids:
            return {}
        try:
            now = time.time()
            async with self.redis.pipeline(transaction=False) as pipe:
                for room_id in room_ids:
                    pipe.zrangebyscore(f"backchat:online:{room_id}", now, "+inf")
                found = await pipe.execute()
        except Exception as problem:
            self._unhealthy(problem)
            return await super().online_in(room_ids)
        return {room_id: by_name({(int(user_id), name, guest == "1")
                                  for _, user_id, guest, name in (entry.split("|", 3)
                                                                  for entry in entries)})
                for room_id, entries in zip(room_ids, found)}

    async def end_pages(self, user_id: int | None, session_id: str | None = None,
                        room_id: int | None = None, why: str = "logged out") -> None:
        """Pages that may not go on are told so and closed, on every worker through Redis
        (RoomHub.end_pages)."""
        ended = {"user_id": user_id, "session_id": session_id, "room_id": room_id, "why": why}
        try:
            await self.redis.publish("backchat:logout", json.dumps(ended))
        except Exception as problem:
            # This worker's pages at least; the others' on their next reconnect.
            self._unhealthy(problem)
            self.hub.end_pages(user_id, session_id, room_id, why)

    async def room_changed(self, room_id: int, state: RoomState, frame: str,
                           revision: int | None = None) -> None:
        """LocalFanout.room_changed, on every worker: the state by name (RoomState.to_wire)."""
        changed = {"room_id": room_id, "state": state.to_wire(), "frame": frame,
                   "revision": revision}
        try:
            await self.redis.publish("backchat:state", json.dumps(changed))
        except Exception as problem:  # this worker's pages now; the others' when they reconnect
            self._unhealthy(problem)
            self.missed.add(room_id)
            await super().room_changed(room_id, state, frame, revision)

    def _entry(self, user: tuple[int, str, bool]) -> str:
        user_id, name, guest = user
        return f"{self.worker}|{user_id}|{int(guest)}|{name}"

    async def _announce(self, _: int = 0) -> None:
        """Write who came online and who went offline since the last time, in every room,
        and tell every worker (itself too) which rooms' presence changed: one trip to Redis
        for all of them, so a class arriving at once costs a few trips, not one per socket."""
        changed, self.changed = self.changed, {}
        expires = time.time() + self.PRESENCE_TTL
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for room_id, people in changed.items():
                    key = f"backchat:online:{room_id}"
                    if went := [self._entry(person)
                                for person, online in people.items() if not online]:
                        pipe.zrem(key, *went)
                    if came := {self._entry(person): expires
                                for person, online in people.items() if online}:
                        pipe.zadd(key, came)
                    pipe.publish(f"backchat:presence:{room_id}", "")
                await pipe.execute()
        except Exception as problem:  # (who is here is written again by the next _heartbeat)
            self._unhealthy(problem)
            for room_id in changed:
                await self.show_presence(room_id)

    async def came_online(self, conn: Connection) -> None:
        """The socket's user opened their first page of the room here: announced soon, with
        every other change."""
        self.changed.setdefault(conn.room_id, {})[conn.user] = True
        self.soon(self._announce, self.ALL_ROOMS)

    async def went_offline(self, conn: Connection) -> None:
        """The socket's user closed their last page of the room here: announced soon, with
        every other change."""
        self.changed.setdefault(conn.room_id, {})[conn.user] = False
        self.soon(self._announce, self.ALL_ROOMS)

    async def _heartbeat(self) -> None:
        """Renew this worker's presence entries, drop expired ones (a crashed worker's),
        and show pages any change that caused."""
        while True:
            await asyncio.sleep(self.HEARTBEAT)
            now = time.time()
            rooms = list(self.hub.tabs.items())
            try:  # (every room in one trip: an idle worker with 100 rooms open wakes for one)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room_id, tabs in rooms:
                        key = f"backchat:online:{room_id}"
                        pipe.zadd(key, {self._entry(user): now + self.PRESENCE_TTL
                                        for user in tabs})
                        pipe.zremrangebyscore(key, "-inf", now)
                        pipe.expire(key, int(self.PRESENCE_TTL) * 2)
                    await pipe.execute()
            except Exception as problem:
                self._unhealthy(problem)
            await self.show_presences([room_id for room_id, _ in rooms])


# A sliding window in Redis, in one atomic step: the key's events (a sorted set of times)
# older than the window are dropped; if fewer than the limit remain, this one is added (1),
# else nothing is (0).
SLIDING_WINDOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(ARGV[2] * 1000))
return 1
"""


class RedisRateLimiter(RateLimiter):
    """The same limits, counted in Redis so that every worker sees every event: a sliding
    window per key, as RateLimiter's (a sorted set of the events' times, checked and added to
    in one atomic script: a burst across workers is counted one by one, and slow mode's "one
    message per 30 s" means 30 s on every worker, not the rest of a block of the clock). If
    Redis is unreachable, this worker counts on its own."""

    def __init__(self, fanout: RedisFanout, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self.fanout = fanout
        self._script: Any = None

    def _key(self, key: Any) -> str:
        return f"backchat:events:{self.window:g}:{limit_key(key)}"

    async def retry_after(self, key: Any) -> float:
        """Seconds until the key is under its limit again (the oldest event that counts
        leaves the window); this worker's own count if Redis is away."""
        try:
            oldest = await self.fanout.redis.zrange(self._key(key), -self.limit, -self.limit,
                                                    withscores=True)
            return max(0.0, oldest[0][1] + self.window - time.time()) if oldest else 0.0
        except Exception:
            return await super().retry_after(key)

    async def allow(self, key: Any) -> bool:
        """Count one event in the key's window, in Redis; say whether it is within the limit
        (counted on this worker alone if Redis is away)."""
        if not self.limit:
            return True
        try:
            if self._script is None:
                self._script = self.fanout.redis.register_script(SLIDING_WINDOW)
            allowed = await self._script(keys=[self._key(key)], args=[
                time.time(), self.window, self.limit, secrets.token_hex(6)])
        except Exception as problem:
            self.fanout._unhealthy(problem)
            return await super().allow(key)
        return bool(allowed)


class RedisFailureLimit(FailureLimit):
    """FailureLimit counted in Redis, so every worker sees every failure and every attempt
    being checked: failures in a fixed-window counter per key (one INCR when a failure
    happens), attempts in flight in a counter of their own that forgets a crashed worker's
    within a minute. If Redis is unreachable, this worker counts on its own."""

    POLL = 0.05  # seconds between looks while other workers' attempts are being checked

    def __init__(self, fanout: RedisFanout, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self.fanout = fanout

    async def check(self, *keys: Any) -> None:
        """TooManyFailures if any key is at its limit, as Redis counts failures
        (FailureLimit.check); this worker's own count if Redis is away."""
        if not self.limit:
            return
        try:
            failures, ends_in = self._failure_counters(map(limit_key, keys))
            counts = await self.fanout.redis.mget(failures)
        except Exception as problem:
            self.fanout._unhealthy(problem)
            return await super().check(*keys)
        if any(int(count or 0) >= self.limit for count in counts):
            raise TooManyFailures(ends_in)

    def _failure_counters(self, keys: Iterable[str]) -> tuple[list[str], float]:
        """The keys' failure counters for the current block of `window` seconds (fixed blocks
        of the clock, the same on every worker), and the seconds until that block ends: when a
        key at its limit may try again."""
        window = int(self.window)
        block, into = divmod(time.time(), window)
        return ([f"backchat:failures:{window}:{key}:{int(block)}" for key in keys],
                max(1.0, window - into))

    async def _enter(self, keys: list[str]) -> Callable[[bool], Awaitable[None]]:
        try:
            return await self._enter_redis(keys)
        except TooManyFailures:
            raise
        except Exception as problem:
            self.fanout._unhealthy(problem)
            return await super()._enter(keys)

    async def _enter_redis(self, keys: list[str]) -> Callable[[bool], Awaitable[None]]:
        redis, window = self.fanout.redis, int(self.window)
        failures, ends_in = self._failure_counters(keys)
        in_flight = [f"backchat:inflight:{window}:{key}" for key in keys]
        deadline = time.monotonic() + self.MAX_WAIT
        while True:
            async with redis.pipeline(transaction=False) as pipe:
                for failed, checking in zip(failures, in_flight):
                    pipe.get(failed).incr(checking).expire(checking, 60)
                replies = await pipe.execute()
            # Each key's failures and attempts being checked (ours included).
            counts = [(int(replies[3 * n] or 0), replies[3 * n + 1]) for n in range(len(keys))]
            if all(failed + checking <= self.limit for failed, checking in counts):
                break
            await self._done(in_flight, [])
            if any(failed >= self.limit for failed, _ in counts):
                raise TooManyFailures(ends_in)
            if time.monotonic() >= deadline:
                raise TooManyFailures(5)
            await asyncio.sleep(self.POLL)

        async def leave(failed: bool) -> None:
            """The attempt is over: it is checked no more, and counts if it failed."""
            with contextlib.suppress(Exception):  # (a lost count: at worst one guess more)
                await self._done(in_flight, failures if failed else [])

        return leave

    async def _done(self, in_flight: list[str], failures: list[str]) -> None:
        async with self.fanout.redis.pipeline(transaction=False) as pipe:
            for checking in in_flight:
                pipe.decr(checking)
            for failed in failures:
                pipe.incr(failed).expire(failed, int(self.window) + 1)
            await pipe.execute()


def limiters(settings: Settings, hub: RoomHub) -> tuple[LocalFanout, Callable, Callable]:
    """The one place that chooses Local or Redis: the fan-out for these settings, and how to
    make a rate limiter and a failure limit (each called with its limit and window)."""
    if not settings.redis_url:
        return LocalFanout(hub), RateLimiter, FailureLimit
    fanout = RedisFanout(hub, settings.redis_url)
    return (fanout, functools.partial(RedisRateLimiter, fanout),
            functools.partial(RedisFailureLimit, fanout))


# ---------------------------------------------------------------------------
# 16. The app
# The record every handler shares, the background tasks, security headers, error pages, and
# create_app(), which only composes the sections' routes.
# ---------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    """For a load balancer or a monitor: 200 while the app serves."""
    return JSONResponse({"status": "ok"})


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client went away before its request was read (or was cut off for sending its body
    too slowly: GuardedHTTP): one INFO line, no traceback; the answer goes nowhere."""
    log.info("%s %s: the client went away before its request was read", request.method,
             request.url.path)
    return Response(status_code=400)


async def storage_error(request: Request, exc: Exception) -> Response:
    """Any other write the database refused (a full disk): a clear 503, no traceback."""
    return await http_error(request, Refused(could_not_save("That could not be done", exc), 503))


async def http_error(request: Request, exc: Exception) -> Response:
    """The error page, with the refusal's words (never a 500's: what broke is not shown);
    plain text for a socket."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) if status != 500 else None
    titles = {403: "Not allowed", 404: "Not found", 405: "Not allowed", 413: "Too large",
              429: "Slow down", 500: "Something broke", 503: "Not saved"}
    if request.scope["type"] != "http":
        return PlainTextResponse(titles.get(status, "Error"), status_code=status)
    if request.url.path.startswith("/api/"):  # (a script: JSON, never a page; section 14)
        return JSONResponse({"error": detail or titles.get(status, "Error")}, status)
    request.state.user = await current_user(request) if status != 500 else None
    response = render(request, "error.html", status, title=titles.get(status, "Error"),
                      detail=detail or ("Something went wrong on our side; try again. "
                                        "If it keeps happening, tell whoever runs this server."))
    if status == 500:  # Starlette answers these from outside all middleware: add the headers here
        response.headers.update(security_headers(request.scope.get("csp_nonce", "")))
    return response


def security_headers(nonce: str) -> dict[str, str]:
    """Headers every HTML response carries. Scripts only from this site (htmx needs no
    inline script and no eval); inline style only with this response's nonce."""
    return {
        "content-security-policy": "default-src 'self'; script-src 'self'; "
        f"style-src 'self' 'nonce-{nonce}'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
        "x-frame-options": "DENY",
    }


NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    """The outermost layer: serves only the Host names this server is for (DNS rebinding),
    and adds security_headers() with a fresh nonce to every response. It also hands
    WebSocket routes the server's own `send`."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    def host_allowed(self, scope: Scope) -> bool:
        """Whether the request's Host is an IP address or a name this server is for."""
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = (host.rsplit(":", 1)[0] if not host.endswith("]") else host).strip("[]")  # no port
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True  # an address, not a name: no DNS in between to rebind
        return name in self.allowed_hosts or "*" in self.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not self.host_allowed(scope):
            log.info("refused %s %s: Host not in CHAT_ALLOWED_HOSTS", scope["type"], scope["path"])
            if scope["type"] == "websocket":  # a close before accept: uvicorn's 403 (see refuse())
                return await send({"type": "websocket.close", "code": 1008})
            return await PlainTextResponse("This server does not serve that host name.", 400)(
                scope, receive, send)
        if scope["type"] == "websocket":
            scope["backchat.raw_send"] = send  # see Connection.send
            return await self.app(scope, receive, send)
        nonce = scope["csp_nonce"] = secrets.token_urlsafe(16)
        headers = [(name.encode(), value.encode())
                   for name, value in security_headers(nonce).items()]

        async def send_with_headers(message: Message) -> None:
            """Send the message, a response's start with the security headers added."""
            if message["type"] == "http.response.start":
                given = list(message.get("headers", []))
                # Pages depend on the session (history, a CSRF token): no shared cache, nor the
                # back button after logging out, may keep them. Static files say otherwise.
                no_store = ([] if any(name.lower() == b"cache-control" for name, _ in given)
                            else [NO_STORE])
                message = {**message, "headers": given + headers + no_store}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CachedStaticFiles(StaticFiles):
    """Static files with caching a slow phone notices: what sits under a versioned path
    (vendor/htmx-4.0.1/) is kept for a year; the rest is revalidated by its ETag."""

    def file_response(self, full_path: Any, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        """The file's response, cached a year if it is versioned, else revalidated."""
        response = super().file_response(full_path, stat_result, scope, status_code)
        versioned = Path(full_path).is_relative_to(HERE / "static" / "vendor")
        response.headers["cache-control"] = ("public, max-age=31536000, immutable" if versioned
                                             else "no-cache")
        return response


def create_app(settings: Settings | None = None) -> Starlette:
    """The app for these settings (default: from CHAT_* variables). ValueError for a setting
    that cannot work (an unknown CHAT_TIMEZONE)."""
    settings = settings or Settings.from_env()
    room_clock.set_zone(time_zone(settings.timezone))  # one zone per process: see RoomClock

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """Open the chat and start its background tasks; at the end, stop them all and close."""
        app.state.chat = chat = await open_chat(settings)
        background = [asyncio.create_task(task(chat)) for task in BACKGROUND_TASKS]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await chat.fanout.stop()
            await chat.store.close()

    routes = [*ACCOUNT_ROUTES, *ROOM_ROUTES, *MESSAGE_ROUTES, *CHANGE_ROUTES, *MODERATION_ROUTES,
              *SEARCH_ROUTES, *CLASS_ROUTES, *BOT_ROUTES, get("/healthz", healthz),
              Mount("/static", GZipMiddleware(CachedStaticFiles(directory=HERE / "static")),
                    name="static")]
    middleware = [
        Middleware(SecurityHeaders, allowed_hosts=settings.allowed_hosts),
        Middleware(SessionMiddleware, secret_key=load_secret_key(settings), same_site="lax",
                   https_only=settings.https_only, max_age=30 * 24 * 3600),
    ]
    errors = {HTTPException: http_error, Refused: http_error, ClientDisconnect: client_gone,
              sqlite3.Error: storage_error, Exception: http_error}
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     max_body_size=MAX_FORM_BYTES, exception_handlers=errors)


async def open_chat(settings: Settings) -> Chat:
    """The record every handler shares, its database open and its fan-out started, with what
    a stop left undone finished (purges) or ended (guests' sessions when guest mode is off)."""
    store = Store(settings.db_path)
    await store.open()
    hub = RoomHub(settings.sockets_per_user, settings.sockets_per_address, settings.max_connections)
    fanout, limiter, failures = limiters(settings, hub)
    chat = Chat(settings, store, hub, fanout, message_limit=limiter(settings.message_rate, 10),
                room_limit=limiter(settings.room_rate, 3600),
                login_limit=failures(settings.login_failures, 15 * 60),
                register_limit=limiter(settings.register_rate, 3600),
                room_guess_limit=failures(settings.room_guesses, 3600),
                search_limit=limiter(settings.search_rate, 60),
                handshake_limit=limiter(settings.handshake_rate, 10),
                address_handshake_limit=limiter(10 * settings.handshake_rate, 10),
                slow_limits={seconds: limiter(1, seconds) for seconds in SLOW_MODES if seconds},
                api_limit=limiter(API_READS_PER_MINUTE, 60),
                webhook_calls=asyncio.Queue(WEBHOOK_QUEUE))
    await fanout.start()
    await purge_left_over(chat)
    if not settings.guests and (ended := await store.write(end_guest_sessions)):
        log.info("guest mode is off: %d guest session(s) ended", ended)
    return chat


# What runs beside the requests for as long as the app does, each a function of the Chat.
BACKGROUND_TASKS: tuple[Callable[[Chat], Awaitable[None]], ...] = (
    heartbeats, watch_sessions, index_search, render_old_messages, call_webhooks)


def __getattr__(name: str) -> Starlette:
    """`uvicorn chat:app` gets an app built from CHAT_* settings on first use, so that
    merely importing this module (tests do) creates no key file and opens no database."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


# ---------------------------------------------------------------------------
# 17. The operator's commands and main()
# `python chat.py backup FILE` and `python chat.py users ...`, run beside the server on the same
# database; then `python chat.py` itself: flags over CHAT_* variables, and uvicorn with the
# limits this app relies on.
# ---------------------------------------------------------------------------


def backup(db_path: Path, target: Path) -> int:
    """Write a consistent copy of the database to `target` (a new file, mode 0600: it holds
    password hashes and session ids), while the server may be running: SQLite's online backup
    API copies one snapshot of it, committed writes and nothing half-done. The number of pages
    copied; FileExistsError rather than overwrite, or follow a link (even a dangling one)."""
    try:  # O_EXCL: never an existing file, nor a symbolic link, wherever it points
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        raise FileExistsError(f"{target} exists already (or is a link); name a new file") from None
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)  # never creates an empty one
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        return copy.execute("PRAGMA page_count").fetchone()[0]
    except BaseException:
        copy.close()
        target.unlink()  # (nothing half-written is left behind)
        raise
    finally:
        copy.close()
        source.close()


def accounts(db: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every account: name, guest, created, last seen (logged in or out, a request, an open
    page: within a minute), rooms, closed. (Bots are their rooms': the Manage page.)"""
    return db.execute("SELECT u.username, u.is_guest, u.created_at, u.deactivated_at, "
                      "u.last_seen_at AS last_seen, "
                      "(SELECT count(*) FROM room_members WHERE user_id = u.id) AS rooms "
                      "FROM users u WHERE NOT u.is_bot ORDER BY u.username_key").fetchall()


def deactivate(db: sqlite3.Connection, username: str) -> bool:
    """Close an account: its sessions end (its open pages, on every worker, within
    SESSION_CHECK_SECONDS) and it cannot log in again. False if there is no such account."""
    with transaction(db):
        user = user_by_name(db, username)
        if user is None:
            return False
        db.execute("UPDATE users SET deactivated_at = ? WHERE id = ?", (utc_now(), user["id"]))
        db.execute("DELETE FROM sessions WHERE user_id = ?", (user["id"],))
        db.execute("DELETE FROM login_links WHERE user_id = ?", (user["id"],))
    return True


LOGIN_LINK_HOURS = 1


def make_login_link(db: sqlite3.Connection, username: str) -> str | None:
    """A one-time token that logs the account in (and asks a registered user for a new
    password) within LOGIN_LINK_HOURS: password recovery without e-mail. Only its hash is
    stored; an earlier link of the account stops working. None: no such open account."""
    token = secrets.token_urlsafe(32)
    with transaction(db):
        user = user_by_name(db, username)
        if user is None or user["deactivated_at"]:
            return None
        db.execute("DELETE FROM login_links WHERE user_id = ?", (user["id"],))
        db.execute("INSERT INTO login_links (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
                   (hashlib.sha256(token.encode()).hexdigest(), user["id"],
                    utc_ago(hours=-LOGIN_LINK_HOURS)))
    return token


def operate(args: argparse.Namespace) -> None:
    """The subcommands: backup, users (list), users deactivate NAME, users login-link NAME."""
    if args.command == "backup":
        try:
            pages = backup(args.db, args.file)
        except (OSError, sqlite3.Error) as problem:
            sys.exit(f"Backchat: no backup written to {args.file}: {problem}")
        print(f"Backchat: {args.db} copied to {args.file} ({pages:,} pages); "
              "see the README to restore it")
        return
    if not args.db.exists():
        sys.exit(f"Backchat: there is no database at {args.db} (give --db)")
    db = Store(args.db)._connect(for_writing=True)  # (migrated first, as the server would)
    try:
        if args.action == "deactivate":
            if not deactivate(db, args.name):
                sys.exit(f"Backchat: there is no account called {args.name!r}")
            print(f"Backchat: {args.name} is closed: logged out everywhere (open pages within "
                  f"{SESSION_CHECK_SECONDS:g} s) and cannot log in again")
        elif args.action == "login-link":
            if (token := make_login_link(db, args.name)) is None:
                sys.exit(f"Backchat: there is no open account called {args.name!r}")
            print(f"Backchat: a login link for {args.name}, for one use within "
                  f"{LOGIN_LINK_HOURS} hour; give it to them privately:\n"
                  f"  {args.url.rstrip('/')}/auth/link/{token}")
        else:
            print(f"{'name':24} {'guest':5} {'created':20} {'last seen':20} {'rooms':>5}  closed")
            for row in accounts(db):
                print(f"{row['username'][:24]:24} {'yes' if row['is_guest'] else '':5} "
                      f"{row['created_at']:20} {row['last_seen'] or '-':20} {row['rooms']:>5}  "
                      f"{row['deactivated_at'] or ''}")
    finally:
        db.close()


REQUEST_HEAD_SECONDS = 10  # to send a request's line and headers, before the connection is cut


# Connections accepted in one go (uvicorn's default, 2048, could overrun the file limit).
ACCEPT_BACKLOG = 128


class GuardedHTTP(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the guards it lacks: a deadline for each request head
    (a client that trickles its headers, or sends none, is cut off: slowloris) and one for
    each request body (`body_seconds`: one that promises 65,000 bytes and sends one every few
    seconds too), and a plain 503 at once for a connection past the total or past
    `per_address` from one client address (a class behind one NAT fits in the default 200),
    so idle connections cannot use up the process's file descriptors. serve() sets the two
    settings on a subclass (guarded_http)."""

    body_seconds: float = 30.0
    per_address: int = 0  # 0: no cap (behind a proxy every client has the proxy's address)
    open_by_address: Counter[str] = Counter()  # (one per process: uvicorn runs one server)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection: a 503 at once past the total or its address's share, else a
        deadline for its first head."""
        super().connection_made(transport)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.body_deadline: asyncio.TimerHandle | None = None
        peer = transport.get_extra_info("peername") or ("",)
        self.address = peer[0] if self.per_address else ""
        if (self.limit_concurrency and len(self.connections) > self.limit_concurrency) or (
                self.address and self.open_by_address[self.address] >= self.per_address):
            self.address = ""  # (not counted)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\n"
                            b"connection: close\r\ncontent-length: 0\r\n\r\n")
            transport.close()
            return
        if self.address:
            self.open_by_address[self.address] += 1
        self.await_head()

    def await_head(self) -> None:
        """Close the connection unless a request head is in within REQUEST_HEAD_SECONDS."""
        self.head_deadline = self.loop.call_later(REQUEST_HEAD_SECONDS, self.transport.close)

    def handle_events(self) -> None:
        """uvicorn's parsing of what came in; once a request head is in, its deadline ends and
        its body's begins; once the body is in, that one ends too."""
        super().handle_events()
        upgraded = self.transport.get_protocol() is not self  # (a WebSocket: its own caps)
        head_in = self.cycle is not None and not self.cycle.response_complete
        if self.head_deadline is not None and (head_in or upgraded):
            self.head_deadline.cancel()
            self.head_deadline = None
            if head_in and self.cycle.more_body and not upgraded:
                self.body_deadline = self.loop.call_later(self.body_seconds, self.body_too_slow)
        if self.body_deadline is not None and (upgraded or not head_in or not self.cycle.more_body):
            self.body_deadline.cancel()
            self.body_deadline = None
        if upgraded:
            self.uncount()

    def body_too_slow(self) -> None:
        """The request's body did not arrive in time: the connection is cut (the handler
        reading it hears the client went away: client_gone)."""
        self.body_deadline = None
        if self.cycle is not None and self.cycle.more_body:
            log.info("cut a connection from %s: its request body took over %g s",
                     self.address or "a client", self.body_seconds)
            self.transport.close()

    def on_response_complete(self) -> None:
        """A response is sent: the connection waits for its next request head, with a deadline."""
        super().on_response_complete()
        if not self.transport.is_closing() and self.head_deadline is None:
            self.await_head()  # the next request on this keep-alive connection gets one too

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: its deadlines and its place in its address's share go."""
        for deadline in (self.head_deadline, self.body_deadline):
            if deadline is not None:
                deadline.cancel()
        self.uncount()
        super().connection_lost(exc)

    def uncount(self) -> None:
        """This connection no longer counts against its address's share."""
        if self.address:
            self.open_by_address[self.address] -= 1
            if self.open_by_address[self.address] <= 0:
                del self.open_by_address[self.address]
            self.address = ""


def guarded_http(settings: Settings) -> type[GuardedHTTP]:
    """GuardedHTTP with the settings' body deadline and per-address cap (none behind a proxy,
    where every connection comes from the proxy's address)."""
    per_address = 0 if settings.trusted_proxies else settings.connections_per_address
    return type("GuardedHTTP", (GuardedHTTP,), {"body_seconds": settings.request_body_seconds,
                                                 "per_address": per_address,
                                                 "open_by_address": Counter()})


def without_tokens(record: logging.LogRecord) -> bool:
    """A filter for uvicorn's access log: a login link's path carries its token, which is as good
    as a password for an hour (the database keeps only its hash): logged as "/auth/link/…"."""
    if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and arg.startswith("/auth/link/") for arg in record.args):
        record.args = tuple("/auth/link/…" if isinstance(arg, str) and arg.startswith("/auth/link/")
                            else arg for arg in record.args)
    return True


def open_files_allowed(wanted: int) -> int:
    """Raise this process's open-file limit to `wanted` if the system lets us; what it is now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses but loopback: what students on the LAN type in."""
    found = set()
    with contextlib.suppress(OSError):
        found |= {info[4][0]
                  for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    siocgifaddr = {"linux": 0x8915, "darwin": 0xC0206921}.get(sys.platform)  # ask each interface
    if siocgifaddr:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # sends nothing
            for _, interface in socket.if_nameindex():
                with contextlib.suppress(OSError):
                    request = struct.pack("256s", interface.encode()[:15])
                    found.add(socket.inet_ntoa(
                        fcntl.ioctl(probe.fileno(), siocgifaddr, request)[20:24]))
    return sorted(address for address in found if not address.startswith("127."))


WS_IMPLEMENTATIONS = {"auto": None, "websockets-sansio": "websockets", "websockets": "websockets",
                      "wsproto": "wsproto"}  # uvicorn's, and the package each needs


def main(argv: list[str] | None = None) -> None:
    """`python chat.py [COMMAND]`: the one place that reads the environment (Settings.from_env)."""
    parser = argparse.ArgumentParser(description="Backchat: a small real-time chat server.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    try:
        env = Settings.from_env()
    except ValueError as problem:
        parser.error(str(problem))
    parser.add_argument("--host", default=env.host, help="the address to listen on (CHAT_HOST)")
    parser.add_argument("--port", type=int, default=env.port, help="the port (CHAT_PORT)")
    parser.add_argument("--db", type=Path, default=env.db_path, help="the SQLite file (CHAT_DB)")
    parser.add_argument("--https", action="store_true", default=env.https_only,
                        help="Secure cookies, for TLS deployments (CHAT_HTTPS_ONLY)")
    parser.add_argument("--ws", default=env.ws, choices=list(WS_IMPLEMENTATIONS),
                        help="uvicorn's WebSocket implementation (CHAT_WS)")
    parser.add_argument("--loop", default=env.loop, choices=["auto", "uvloop", "asyncio"],
                        help="the event loop; auto: uvloop when installed (CHAT_LOOP)")
    parser.add_argument("--guests", action="store_true", default=env.guests,
                        help='offer "Join as a guest" (a name, no password) for classes and demos '
                             "(CHAT_GUESTS)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="or, instead of serving:")
    same_db = argparse.ArgumentParser(add_help=False)  # --db after the command works too
    same_db.add_argument("--db", type=Path, default=argparse.SUPPRESS,
                         help="the SQLite file (default: chat.db)")
    backup_command = commands.add_parser("backup", parents=[same_db],
                                         help="copy the database while it runs")
    backup_command.add_argument("file", type=Path, help="the new file to write")
    users = commands.add_parser("users", parents=[same_db],
                                help="list accounts, close one, or make a login link")
    users.add_argument("action", nargs="?", choices=["list", "deactivate", "login-link"],
                       default="list")
    users.add_argument("name", nargs="?", help="the account's name (for deactivate and login-link)")
    users.add_argument("--url", default=server_address(env),
                       help="the address people open, as the server prints it (for login-link)")
    args = parser.parse_args(argv)
    if args.command == "users" and args.action != "list" and not args.name:
        users.error(f"users {args.action} needs the account's name: "
                    f"python chat.py users {args.action} NAME")
    if args.command:
        return operate(args)
    try:
        time_zone(env.timezone)
    except ValueError as problem:
        parser.error(str(problem))
    if (package := WS_IMPLEMENTATIONS[args.ws]) and importlib.util.find_spec(package) is None:
        parser.error(f"--ws {args.ws} needs the {package} package: "
                     f".venv/bin/pip install {package}")
    serve(args, env)


def server_address(settings: Settings) -> str:
    """The address `python chat.py` prints for these settings (its first, on every interface)."""
    if settings.host in ("0.0.0.0", "::", ""):
        return f"http://{(lan_addresses() or ['localhost'])[0]}:{settings.port}"
    return f"http://{settings.host}:{settings.port}"


class ListeningServer(uvicorn.Server):
    """uvicorn's server, saying where to open it (and in what mode) only once it listens (a
    port already taken stops it before it says anything of the kind)."""

    addresses: list[str] = []

    async def startup(self, sockets: list | None = None) -> None:
        """Start listening; then print the addresses to open."""
        await super().startup(sockets)
        if self.started:
            for address in self.addresses:
                print(address, flush=True)
            loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
            print(f"Backchat: event loop {'uvloop' if loop == 'uvloop' else 'asyncio'}", flush=True)


def serve(args: argparse.Namespace, env: Settings) -> None:
    """`python chat.py`: uvicorn with this app and the limits it relies on."""
    hosts, everywhere = env.allowed_hosts, args.host in ("0.0.0.0", "::", "")
    if everywhere and hosts == Settings.allowed_hosts:  # (not set: the default)
        name = socket.gethostname().lower()  # a LAN also reaches this machine by its names
        hosts |= {name, f"{name}.local", socket.getfqdn().lower()}
    # Every connection is a file descriptor: keep the total under what the process may open,
    # less the files it needs besides and three accept() bursts (the listen backlog each):
    # asyncio accepts a burst per loop turn and a connection refused with a 503 closes
    # three turns after its accept, so three bursts can be open at once.
    spare = 3 * ACCEPT_BACKLOG + 64
    max_connections = min(env.max_connections,
                          open_files_allowed(env.max_connections + spare) - spare)
    # (what the flags say: where it listens decides where bots' webhooks may go)
    settings = Settings(**{**env.__dict__, "db_path": args.db, "https_only": args.https,
                           "allowed_hosts": hosts, "max_connections": max_connections,
                           "guests": args.guests, "host": args.host, "port": args.port,
                           "ws": args.ws, "loop": args.loop})
    print(f"Backchat: database {settings.db_path.resolve()}")
    # On every interface: the LAN addresses first, the ones to share (an invite link is built
    # from the address the page was opened at); localhost only works on this machine. Said
    # once the server listens (ListeningServer).
    ListeningServer.addresses = [
        f"Backchat: open http://{address}:{args.port}/"
        + ("  (this machine only)" if address == "localhost" else "")
        for address in ([*lan_addresses(), "localhost"] if everywhere else [args.host])]
    if settings.guests:
        ListeningServer.addresses.append(
            "Backchat: guest mode is on: anyone who can open the page can join with just a name")
    sys.stdout.flush()
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(message)s")  # uvicorn's look
    logging.getLogger("uvicorn.access").addFilter(without_tokens)
    # Pings find connections that died without a word (Wi-Fi gone): within three
    # heartbeats the socket is closed and its user leaves the room's presence.
    # X-Forwarded-For only from the proxies named in CHAT_TRUSTED_PROXIES (uvicorn's own
    # default believes anyone on loopback, which lets a local client pick its address).
    config = uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, http=guarded_http(settings),
        ws=args.ws, loop=args.loop, ws_max_size=MAX_WS_FRAME_BYTES, ws_per_message_deflate=False,
        ws_ping_interval=settings.heartbeat, ws_ping_timeout=2 * settings.heartbeat,
        limit_concurrency=max_connections, proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None, backlog=ACCEPT_BACKLOG,
        timeout_graceful_shutdown=5, log_level="info")
    ListeningServer(config).run()


if __name__ == "__main__":
    main()
