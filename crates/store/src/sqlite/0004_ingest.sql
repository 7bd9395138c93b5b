-- clinflow schema, version 4 (SQLite): the ingest pipeline's batches.
--
-- One row per accepted input (an HTTP body), not per resource: the unique
-- (format, sha256) index inserts at a random point, but once per batch, so
-- it costs nothing beside the resources a batch writes.
CREATE TABLE ingest_batches (
    id TEXT PRIMARY KEY,                 -- UUIDv7, time-ordered
    format TEXT NOT NULL,                -- hl7v2, wearable-csv, diary-json, diary-ndjson
    sha256 TEXT NOT NULL,                -- hex SHA-256 of the raw input
    submitter TEXT NOT NULL,             -- the token's name
    role TEXT NOT NULL,                  -- the submitter's role
    received_at INTEGER NOT NULL,        -- ms since the epoch
    status TEXT NOT NULL,                -- processing | done
    received INTEGER NOT NULL DEFAULT 0,
    stored INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    queries_opened INTEGER NOT NULL DEFAULT 0,
    finished_at INTEGER
) WITHOUT ROWID;
-- Idempotency: the same content in the same format is one batch.
CREATE UNIQUE INDEX ingest_batches_content ON ingest_batches (format, sha256);
-- Resuming at startup reads the unfinished ones.
CREATE INDEX ingest_batches_status ON ingest_batches (status, id);

-- The bytes as received, committed before the 202.
CREATE TABLE ingest_inputs (
    batch TEXT PRIMARY KEY REFERENCES ingest_batches (id),
    sha256 TEXT NOT NULL,
    body BLOB NOT NULL
) WITHOUT ROWID;

-- What the edit checks rejected, per batch, in input order.
CREATE TABLE ingest_rejections (
    batch TEXT NOT NULL REFERENCES ingest_batches (id),
    seq INTEGER NOT NULL,
    item INTEGER NOT NULL,
    reason TEXT NOT NULL,
    location TEXT NOT NULL,
    PRIMARY KEY (batch, seq)
) WITHOUT ROWID;
