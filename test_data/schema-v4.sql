-- The schema as release 2c8ea84 (before issues 17-22) made it, PRAGMA user_version 4.
CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL,
    username_key  TEXT NOT NULL UNIQUE,  -- casefolded: names are unique ignoring case
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    username_skeleton TEXT NOT NULL DEFAULT '',  -- what the name looks like (name_skeleton)
    is_guest      INTEGER NOT NULL DEFAULT 0  -- a guest: no password, a session of GUEST_IDLE_HOURS
);
CREATE INDEX IF NOT EXISTS users_by_skeleton ON users(username_skeleton);
CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,          -- random; the signed cookie carries it
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL DEFAULT ''  -- refreshed at most hourly: idle sessions end
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions(user_id);
CREATE TABLE IF NOT EXISTS rooms (
    id         INTEGER PRIMARY KEY,
    slug       TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at TEXT NOT NULL,
    revision   INTEGER NOT NULL DEFAULT 0  -- advanced by every insert, edit and delete in the room
);
CREATE TABLE IF NOT EXISTS room_members (
    room_id       INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    joined_at     TEXT NOT NULL,
    last_visit_at TEXT NOT NULL,
    last_read_id  INTEGER NOT NULL DEFAULT 0,  -- the newest message the user had seen
    PRIMARY KEY (room_id, user_id)
);
CREATE TABLE IF NOT EXISTS messages (
    id         INTEGER PRIMARY KEY,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    text       TEXT NOT NULL CHECK (length(text) BETWEEN 1 AND 4000),
    created_at TEXT NOT NULL,
    client_key TEXT,  -- the composer's one-time key: a message resent after an outage is stored once
    revision   INTEGER NOT NULL DEFAULT 0,  -- the room's revision when it was sent or last edited
    edited_at  TEXT
);
-- Newest page of a room = a backwards walk of this index: as fast at 100,000 rows as at 10.
CREATE INDEX IF NOT EXISTS messages_by_room ON messages(room_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_key ON messages(user_id, client_key) WHERE client_key IS NOT NULL;
-- Catch-up: what changed in a room since revision N.
CREATE INDEX IF NOT EXISTS messages_by_revision ON messages(room_id, revision);
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
