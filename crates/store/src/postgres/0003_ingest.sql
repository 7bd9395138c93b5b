-- clinflow schema, version 3 (PostgreSQL): the ingest pipeline's batches.
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
    received_at BIGINT NOT NULL,        -- ms since the epoch
    status TEXT NOT NULL,                -- processing | done
    received BIGINT NOT NULL DEFAULT 0,
    stored BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    duplicates BIGINT NOT NULL DEFAULT 0,
    queries_opened BIGINT NOT NULL DEFAULT 0,
    finished_at BIGINT
);
-- Idempotency: the same content in the same format is one batch.
CREATE UNIQUE INDEX ingest_batches_content ON ingest_batches (format, sha256);
-- Resuming at startup reads the unfinished ones.
CREATE INDEX ingest_batches_status ON ingest_batches (status, id);

-- The bytes as received, committed before the 202.
CREATE TABLE ingest_inputs (
    batch TEXT PRIMARY KEY REFERENCES ingest_batches (id),
    sha256 TEXT NOT NULL,
    body BYTEA NOT NULL
);

-- What the edit checks rejected, per batch, in input order.
CREATE TABLE ingest_rejections (
    batch TEXT NOT NULL REFERENCES ingest_batches (id),
    seq BIGINT NOT NULL,
    item BIGINT NOT NULL,
    reason TEXT NOT NULL,
    location TEXT NOT NULL,
    PRIMARY KEY (batch, seq)
);
