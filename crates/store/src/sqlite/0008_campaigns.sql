-- clinflow schema, version 8 (SQLite): notification campaigns.
--
-- A campaign and all of its (recipient, channel) delivery rows are written
-- in one transaction. Delivery rows change status (claimed, sent, retried)
-- but are never deleted. The unique (campaign, practitioner, channel) key
-- is what makes "one message per recipient and channel" a database fact.
--
-- No index in random order: ids are UUIDv7; the work queue index starts
-- with (channel, status), low-cardinality keys.
CREATE TABLE campaigns (
    id TEXT PRIMARY KEY,                 -- UUIDv7
    name TEXT NOT NULL,
    channels TEXT NOT NULL,              -- "email,sms"
    spec TEXT NOT NULL,                  -- the request as accepted (JSON)
    send_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    idempotency_key TEXT,
    cancelled_at INTEGER,
    cancelled_by TEXT
) WITHOUT ROWID;
CREATE UNIQUE INDEX campaigns_idempotency ON campaigns (created_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,                 -- UUIDv7
    campaign TEXT NOT NULL REFERENCES campaigns (id),
    practitioner TEXT NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    address TEXT NOT NULL,
    subject TEXT,
    body TEXT NOT NULL,
    html TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'sending', 'sent', 'delivered', 'failed', 'suppressed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    claim TEXT,
    claimed_at INTEGER,
    lease_until INTEGER,
    provider_id TEXT,
    last_error TEXT,
    sent_at INTEGER,
    updated_at INTEGER NOT NULL,
    UNIQUE (campaign, practitioner, channel)
) WITHOUT ROWID;
CREATE INDEX deliveries_due ON deliveries (channel, status, next_at, id);
-- A campaign's rows by status in id order (the deliveries listing), and
-- covering the counts and the send rate a progress poll reads (channel,
-- sent_at), so a poll of a 20,000-row campaign reads the index only, never
-- the rows with their message bodies (measured: the rows' lookups were the
-- most of the server's CPU under a 20-a-second poll).
CREATE INDEX deliveries_campaign ON deliveries (campaign, status, id, channel, sent_at);
CREATE TRIGGER deliveries_no_delete BEFORE DELETE ON deliveries
BEGIN SELECT RAISE(ABORT, 'deliveries are never deleted'); END;

-- Per-channel opt-outs; a row is the recipient's choice, kept until they
-- opt in again (not supported yet: no code path deletes a row).
CREATE TABLE opt_outs (
    practitioner TEXT NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    at INTEGER NOT NULL,
    source TEXT NOT NULL,                -- "unsubscribe-link", "api", ...
    PRIMARY KEY (practitioner, channel)
) WITHOUT ROWID;

-- Server secrets generated once per database (the unsubscribe links' key).
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO secrets (name, value) VALUES ('unsubscribe', lower(hex(randomblob(32))));
