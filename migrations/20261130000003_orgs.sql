-- The organisation tree and member records (党组织管理). Same conventions as the accounts
-- migration: TEXT ids (UUIDv7), BIGINT milliseconds, flags BIGINT 0/1; calendar dates are TEXT
-- 'YYYY-MM-DD' (they sort and compare as text); money is BIGINT fen (0.01 yuan).

-- `path` is the materialised path of ids from the root, '/a/b/c/': a subtree is every org whose
-- path starts with its root's path, which both databases answer from the index.
CREATE TABLE orgs (
    id TEXT PRIMARY KEY,
    parent_id TEXT REFERENCES orgs (id),
    path TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    -- committee | general_branch | branch | group
    kind TEXT NOT NULL,
    -- An optional code people use in spreadsheets (unique when given).
    code TEXT UNIQUE,
    sort_order BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX orgs_parent ON orgs (parent_id);

CREATE TABLE members (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs (id),
    name TEXT NOT NULL,
    -- male | female
    gender TEXT NOT NULL,
    -- 18 characters, GB 11643 checksum; the natural key for imports.
    id_number TEXT NOT NULL UNIQUE,
    birth_date TEXT NOT NULL,
    ethnicity TEXT NOT NULL DEFAULT '',
    education TEXT NOT NULL DEFAULT '',
    native_place TEXT NOT NULL DEFAULT '',
    phone TEXT NOT NULL DEFAULT '',
    employer TEXT NOT NULL DEFAULT '',
    employer_type TEXT NOT NULL DEFAULT '',
    area TEXT NOT NULL DEFAULT '',
    joined_on TEXT NOT NULL,
    -- full | probationary
    category TEXT NOT NULL,
    full_member_on TEXT,
    -- normal | transferred_out | deceased | left | lost_contact
    status TEXT NOT NULL DEFAULT 'normal',
    -- none | full_time | part_time
    cadre TEXT NOT NULL DEFAULT 'none',
    cadre_position TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX members_org ON members (org_id);
CREATE INDEX members_name ON members (name);

-- Rewards and penalties, kept as history.
CREATE TABLE member_honours (
    id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    -- reward | penalty
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    decided_on TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL
);
CREATE INDEX member_honours_member ON member_honours (member_id);

-- Membership changes: transfers within the system (the receiving org accepts or rejects), out of
-- the system (with the letter number), in from outside, and moves between branches.
CREATE TABLE member_transfers (
    id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    -- internal | out | in | move
    kind TEXT NOT NULL,
    from_org_id TEXT,
    to_org_id TEXT,
    -- Where a member goes outside the system, or comes from.
    outside_org TEXT NOT NULL DEFAULT '',
    letter_no TEXT NOT NULL DEFAULT '',
    -- pending | accepted | rejected | done
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    requested_by TEXT,
    decided_by TEXT,
    created_at BIGINT NOT NULL,
    decided_at BIGINT
);
CREATE INDEX member_transfers_member ON member_transfers (member_id);
CREATE INDEX member_transfers_to ON member_transfers (to_org_id, status);

-- Dues (党费): per member and month ('YYYY-MM'), amounts in fen.
CREATE TABLE dues (
    member_id TEXT NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    month TEXT NOT NULL,
    -- The member's org when the dues were entered, so totals follow the tree as it was.
    org_id TEXT NOT NULL,
    due_fen BIGINT NOT NULL,
    paid_fen BIGINT NOT NULL DEFAULT 0,
    paid_on TEXT,
    updated_by TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (member_id, month)
);
CREATE INDEX dues_org_month ON dues (org_id, month);

-- Org life (组织生活): meetings held.
CREATE TABLE org_meetings (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs (id),
    -- party_congress (支部党员大会) | committee (支委会) | group (党小组会) | lecture (党课) | other
    kind TEXT NOT NULL,
    held_on TEXT NOT NULL,
    topic TEXT NOT NULL,
    minutes TEXT NOT NULL DEFAULT '',
    -- A live session or recording this meeting came from, when it did.
    recording_id TEXT,
    created_by TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX org_meetings_org ON org_meetings (org_id, held_on);

CREATE TABLE org_meeting_attendance (
    meeting_id TEXT NOT NULL REFERENCES org_meetings (id) ON DELETE CASCADE,
    member_id TEXT NOT NULL REFERENCES members (id) ON DELETE CASCADE,
    present BIGINT NOT NULL,
    absence_reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (meeting_id, member_id)
);

CREATE TABLE org_meeting_attachments (
    id TEXT PRIMARY KEY,
    meeting_id TEXT NOT NULL REFERENCES org_meetings (id) ON DELETE CASCADE,
    file_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    object_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Work guidance (工作指导): an instruction from a superior org to chosen subordinate orgs.
CREATE TABLE guidance (
    id TEXT PRIMARY KEY,
    from_org_id TEXT NOT NULL REFERENCES orgs (id),
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    due_on TEXT,
    created_by TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE guidance_targets (
    guidance_id TEXT NOT NULL REFERENCES guidance (id) ON DELETE CASCADE,
    org_id TEXT NOT NULL REFERENCES orgs (id),
    acknowledged_at BIGINT,
    reply TEXT NOT NULL DEFAULT '',
    replied_at BIGINT,
    replied_by TEXT,
    PRIMARY KEY (guidance_id, org_id)
);
CREATE INDEX guidance_targets_org ON guidance_targets (org_id);
