-- (PostgreSQL) Whose data a batch may hold: '' (any subject), 'site:ID' (a site user's
-- site), 'patient:ID' (a patient's own). Part of a batch's identity: the
-- same content sent by two site users is two batches, each checked
-- against its own scope (items stored by both are duplicates by key).
ALTER TABLE ingest_batches ADD COLUMN scope TEXT NOT NULL DEFAULT '';
DROP INDEX ingest_batches_content;
CREATE UNIQUE INDEX ingest_batches_content ON ingest_batches (format, sha256, scope);
