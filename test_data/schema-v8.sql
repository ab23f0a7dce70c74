-- The schema a new chat.db had at commit a82e1da, the release before this one (PRAGMA user_version 8), from sqlite_master.
CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL,
    username_key  TEXT NOT NULL UNIQUE,  -- casefolded: names are unique ignoring case
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    username_skeleton TEXT NOT NULL DEFAULT '',  -- what the name looks like (name_skeleton)
    is_guest      INTEGER NOT NULL DEFAULT 0,  -- a guest: no password, a session of GUEST_IDLE_HOURS
    deactivated_at TEXT  -- set by the operator (python chat.py users deactivate): no way in
);
CREATE TABLE login_links (  -- python chat.py users login-link: one use, one hour
    token_hash TEXT PRIMARY KEY,  -- sha256 of the link's token: the database never holds the link
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX users_by_skeleton ON users(username_skeleton);
CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,          -- random; the signed cookie carries it
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL DEFAULT ''  -- refreshed at most hourly: idle sessions end
);
CREATE INDEX sessions_by_user ON sessions(user_id, created_at);
CREATE INDEX sessions_by_last_seen ON sessions(last_seen_at);
CREATE INDEX sessions_by_age ON sessions(created_at);
CREATE TABLE rooms (
    id         INTEGER PRIMARY KEY,
    slug       TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at TEXT NOT NULL,
    revision   INTEGER NOT NULL DEFAULT 0,  -- advanced by every change its pages must see
    locked     INTEGER NOT NULL DEFAULT 0,  -- only its owners may post
    slow_mode  INTEGER NOT NULL DEFAULT 0,  -- seconds between a member's messages; 0: off
    cleared_up_to INTEGER NOT NULL DEFAULT 0,  -- its messages up to this id were cleared (gone, or going)
    cleared_revision INTEGER NOT NULL DEFAULT 0,  -- and the revision of that clearing
    deleted_at TEXT  -- deleted: not found any more, while its rows are removed
);
CREATE TABLE room_codes (  -- a room's earlier codes: they still lead its members in
    slug    TEXT PRIMARY KEY,
    room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE removals (  -- people an owner removed from a room, until let back in
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    removed_by INTEGER NOT NULL,
    removed_at TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE TABLE room_members (
    room_id       INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    joined_at     TEXT NOT NULL,
    last_visit_at TEXT NOT NULL,
    last_read_id  INTEGER NOT NULL DEFAULT 0,  -- the newest message the user had seen
    role          TEXT NOT NULL DEFAULT 'member',  -- 'owner' (the room's creator, and whom owners make so) or 'member'
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX memberships_by_user ON room_members(user_id, last_visit_at);
CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    text       TEXT NOT NULL CHECK (length(text) BETWEEN 1 AND 4000),
    created_at TEXT NOT NULL,
    client_key TEXT,  -- the composer's one-time key: a message resent after an outage is stored once
    revision   INTEGER NOT NULL DEFAULT 0,  -- the room's revision when it was sent or last changed
    edited_at  TEXT,
    reply_to   INTEGER  -- the message of the same room it answers (its quote shows that one as it is now)
);
CREATE INDEX messages_by_room ON messages(room_id, id);
CREATE UNIQUE INDEX messages_by_key ON messages(user_id, client_key) WHERE client_key IS NOT NULL;
CREATE INDEX messages_by_revision ON messages(room_id, revision);
CREATE INDEX messages_by_reply ON messages(reply_to) WHERE reply_to IS NOT NULL;
CREATE TABLE mentions (  -- who a message mentions (@name): their home page marks the room
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    room_id    INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, message_id)
) WITHOUT ROWID;
CREATE INDEX mentions_by_message ON mentions(message_id);
CREATE TABLE reactions (  -- one row per message, person and emoji (REACTIONS)
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    emoji      TEXT NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
) WITHOUT ROWID;
CREATE INDEX reactions_by_user ON reactions(user_id);
CREATE TABLE deletions (  -- a deleted message leaves only its id behind
    message_id INTEGER PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    revision   INTEGER NOT NULL
);
CREATE INDEX deletions_by_revision ON deletions(room_id, revision);
CREATE TRIGGER messages_advance_room AFTER INSERT ON messages
BEGIN UPDATE rooms SET revision = NEW.revision WHERE id = NEW.room_id; END;
CREATE TRIGGER edits_advance_room AFTER UPDATE OF revision ON messages
BEGIN UPDATE rooms SET revision = NEW.revision WHERE id = NEW.room_id; END;
CREATE TRIGGER deletions_advance_room AFTER INSERT ON deletions
BEGIN UPDATE rooms SET revision = NEW.revision WHERE id = NEW.room_id; END;
CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2');
CREATE TABLE search_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_up_to INTEGER NOT NULL  -- every message up to this id is in messages_fts
);
CREATE TRIGGER edits_indexed AFTER UPDATE OF text ON messages
WHEN OLD.id <= (SELECT indexed_up_to FROM search_state) BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', OLD.id, OLD.text);
    INSERT INTO messages_fts (rowid, text) VALUES (NEW.id, NEW.text);
END;
CREATE TRIGGER deletions_indexed AFTER DELETE ON messages
WHEN OLD.id <= (SELECT indexed_up_to FROM search_state)
BEGIN INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', OLD.id, OLD.text); END;
CREATE TRIGGER messages_read_by_author AFTER INSERT ON messages
BEGIN UPDATE room_members SET last_read_id = NEW.id WHERE room_id = NEW.room_id AND user_id = NEW.user_id; END;
