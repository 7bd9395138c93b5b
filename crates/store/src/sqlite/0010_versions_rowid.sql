-- resource_versions becomes a rowid table with its key in a unique index.
-- As a WITHOUT ROWID table it kept at most ~1 KB of a row in its B-tree page
-- (4 KiB pages); an ingested Observation's body (~1.6 KB with its
-- provenance) spilled the rest into an overflow page of its own, so the
-- table's pages were 45% full and ingest wrote twice the bytes per resource
-- (measured 2026-12-04: 310 MiB for 92k versions). A rowid table keeps rows
-- up to ~4 KB in the leaf and appends them in insert order.
CREATE TABLE resource_versions_new (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    vid INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    body TEXT
);
INSERT INTO resource_versions_new (rtype, id, vid, last_updated, deleted, body)
    SELECT rtype, id, vid, last_updated, deleted, body FROM resource_versions;
DROP TABLE resource_versions;
ALTER TABLE resource_versions_new RENAME TO resource_versions;
CREATE UNIQUE INDEX resource_versions_key ON resource_versions (rtype, id, vid);
