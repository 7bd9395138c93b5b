-- clinflow schema, version 5 (SQLite): data queries.
--
-- A query is opened by ingest for a stored value outside the protocol's soft
-- range, in the same transaction as the value, and then answered by the site
-- and closed. Rows change status but are never deleted (a trigger refuses
-- it, like the audit log's); every change has an audit record.
--
-- No index in random order: the key is a UUIDv7 (time-ordered) and the
-- listing indexes start with low-cardinality keys (site, status).
CREATE TABLE data_queries (
    id TEXT PRIMARY KEY,                 -- UUIDv7, time-ordered
    trial TEXT NOT NULL,
    site TEXT NOT NULL,
    patient TEXT NOT NULL,               -- the subject's Patient id
    rtype TEXT NOT NULL,                 -- the resource it is about
    rid TEXT NOT NULL,
    measurement TEXT NOT NULL,
    value TEXT NOT NULL,                 -- canonical unit, as text
    unit TEXT NOT NULL,
    soft_low REAL NOT NULL,
    soft_high REAL NOT NULL,
    location TEXT NOT NULL,              -- where in the input
    text TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'answered', 'closed')),
    answer TEXT,
    opened_at INTEGER NOT NULL,
    opened_by TEXT NOT NULL,
    answered_at INTEGER,
    answered_by TEXT,
    closed_at INTEGER,
    closed_by TEXT
) WITHOUT ROWID;
CREATE INDEX data_queries_site ON data_queries (site, status, id);
CREATE INDEX data_queries_status ON data_queries (status, id);
CREATE TRIGGER data_queries_no_delete BEFORE DELETE ON data_queries
BEGIN SELECT RAISE(ABORT, 'data queries are never deleted'); END;
