-- The recordings catalogue: one row per recording, its comments (学习心得) and chapter marks.
-- Same conventions as the accounts migration: TEXT ids (UUIDv7), BIGINT milliseconds since the
-- Unix epoch, flags as BIGINT 0/1. The media itself lives in the object store under
-- `recordings/{id}/`; only its key and size are kept here.

CREATE TABLE recordings (
    id TEXT PRIMARY KEY,
    room TEXT NOT NULL,
    title TEXT NOT NULL,
    -- The organisation the recording belongs to (the org tree comes later).
    org_id TEXT,
    -- The user who started it (users.id); kept when that user is deleted.
    created_by TEXT NOT NULL,
    -- `recording`, `processing`, `ready` or `failed`.
    status TEXT NOT NULL,
    failure TEXT,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    duration_ms BIGINT NOT NULL DEFAULT 0,
    size_bytes BIGINT NOT NULL DEFAULT 0,
    -- JSON array of the replay's tracks.
    tracks TEXT NOT NULL DEFAULT '[]',
    media_key TEXT,
    published BIGINT NOT NULL DEFAULT 0,
    views BIGINT NOT NULL DEFAULT 0,
    -- Deleted with its objects by the retention sweep once past; NULL keeps it forever.
    expires_at BIGINT
);

CREATE INDEX recordings_started_at ON recordings (started_at);
CREATE INDEX recordings_status ON recordings (status);
CREATE INDEX recordings_room ON recordings (room);
-- At most one live capture per room.
CREATE UNIQUE INDEX recordings_one_live_per_room ON recordings (room) WHERE status = 'recording';

CREATE TABLE recording_comments (
    id TEXT PRIMARY KEY,
    recording_id TEXT NOT NULL REFERENCES recordings (id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX recording_comments_recording ON recording_comments (recording_id, created_at);

CREATE TABLE recording_marks (
    id TEXT PRIMARY KEY,
    recording_id TEXT NOT NULL REFERENCES recordings (id) ON DELETE CASCADE,
    -- Offset into the replay.
    at_ms BIGINT NOT NULL,
    -- `vote`, `screen` or `note`.
    kind TEXT NOT NULL,
    label TEXT NOT NULL
);

CREATE INDEX recording_marks_recording ON recording_marks (recording_id, at_ms);
