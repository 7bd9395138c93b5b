-- clinflow schema, version 1 (PostgreSQL): the SQLite schema translated.
--
-- Key text columns are COLLATE "C" (byte order, like SQLite's BINARY) so that
-- ORDER BY id, the row-value keyset comparisons and the string prefix range
-- (`value >= p AND value < p || U+10FFFF`) of the shared search SQL behave
-- the same on both engines and use the btree indexes whatever the database's
-- collation. Flags (`deleted`, `revoked`) are 0/1 integers, not BOOLEAN, so
-- the shared SQL (`r.deleted = 0`) runs unchanged.

-- The current version of each resource. `patient` is its patient compartment
-- (site scoping joins it to patient_sites); `sort_date` is never NULL
-- (i64::MIN when the resource has no date) so keyset paging is a row compare.
CREATE TABLE resources (
    rtype TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    vid BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted BIGINT NOT NULL,
    patient TEXT COLLATE "C",
    sort_date BIGINT NOT NULL,
    PRIMARY KEY (rtype, id)
);
CREATE INDEX resources_last_updated ON resources (rtype, last_updated, id);
CREATE INDEX resources_sort_date ON resources (rtype, sort_date, id);
CREATE INDEX resources_patient ON resources (patient);

-- Every version ever written, the current one included. `body` is NULL for a
-- deletion.
CREATE TABLE resource_versions (
    rtype TEXT COLLATE "C" NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    vid BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted BIGINT NOT NULL,
    body TEXT,
    PRIMARY KEY (rtype, id, vid)
);

-- Search index of the current versions. The primary key holds every column,
-- so a repeated value is stored once (ON CONFLICT DO NOTHING) and deleting a
-- resource's rows is a primary-key range; the second index serves searches.
CREATE TABLE idx_token (
    rtype TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL, param TEXT COLLATE "C" NOT NULL,
    system TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (rtype, id, param, system, code)
);
CREATE INDEX idx_token_search ON idx_token (rtype, param, code, system, id);

CREATE TABLE idx_string (
    rtype TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL, param TEXT COLLATE "C" NOT NULL,
    value TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (rtype, id, param, value)
);
CREATE INDEX idx_string_search ON idx_string (rtype, param, value, id);

CREATE TABLE idx_date (
    rtype TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL, param TEXT COLLATE "C" NOT NULL,
    low BIGINT NOT NULL, high BIGINT NOT NULL,
    PRIMARY KEY (rtype, id, param, low, high)
);
CREATE INDEX idx_date_search ON idx_date (rtype, param, low, high, id);

CREATE TABLE idx_reference (
    rtype TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL, param TEXT COLLATE "C" NOT NULL,
    target_type TEXT COLLATE "C" NOT NULL, target_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (rtype, id, param, target_type, target_id)
);
CREATE INDEX idx_reference_search ON idx_reference (rtype, param, target_id, target_type, id);

CREATE TABLE idx_quantity (
    rtype TEXT COLLATE "C" NOT NULL, id TEXT COLLATE "C" NOT NULL, param TEXT COLLATE "C" NOT NULL,
    value DOUBLE PRECISION NOT NULL, system TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (rtype, id, param, value, system, code)
);
CREATE INDEX idx_quantity_search ON idx_quantity (rtype, param, code, value, id);

-- Which site a patient is enrolled at (from ResearchSubject's site extension).
CREATE TABLE patient_sites (
    patient TEXT COLLATE "C" PRIMARY KEY,
    site TEXT COLLATE "C" NOT NULL
);
CREATE INDEX patient_sites_site ON patient_sites (site, patient);

-- API tokens: only the SHA-256 of the secret is kept.
CREATE TABLE tokens (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    site TEXT,
    patient TEXT,
    hash TEXT COLLATE "C" NOT NULL UNIQUE,
    created BIGINT NOT NULL,
    expires BIGINT,
    revoked BIGINT NOT NULL DEFAULT 0
);

-- Each protocol version loaded, as JSON.
CREATE TABLE trials (
    id TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    protocol TEXT NOT NULL,
    loaded_at BIGINT NOT NULL,
    PRIMARY KEY (id, version)
);

-- The audit trail: append-only and hash-chained (see audit.rs).
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    rtype TEXT,
    rid TEXT,
    vid BIGINT,
    reason TEXT,
    outcome TEXT NOT NULL,
    client TEXT,
    detail TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_time ON audit_log (time);
CREATE INDEX audit_log_entity ON audit_log (rtype, rid);
CREATE INDEX audit_log_actor ON audit_log (actor);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- The head of the chain, one row. Appenders lock it (SELECT ... FOR UPDATE)
-- for the rest of their transaction, so appends from several processes are
-- serialised and each one chains after the committed head.
CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
