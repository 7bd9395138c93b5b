-- clinflow schema, version 1 (SQLite).
-- The current version of each resource. `patient` is its patient compartment
-- (site scoping joins it to patient_sites); `sort_date` is never NULL
-- (i64::MIN when the resource has no date) so keyset paging is a row compare.
CREATE TABLE resources (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    vid INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    patient TEXT,
    sort_date INTEGER NOT NULL,
    PRIMARY KEY (rtype, id)
) WITHOUT ROWID;
CREATE INDEX resources_last_updated ON resources (rtype, last_updated, id);
CREATE INDEX resources_sort_date ON resources (rtype, sort_date, id);
CREATE INDEX resources_patient ON resources (patient);

-- Every version ever written, the current one included. `body` is NULL for a
-- deletion.
CREATE TABLE resource_versions (
    rtype TEXT NOT NULL,
    id TEXT NOT NULL,
    vid INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    body TEXT,
    PRIMARY KEY (rtype, id, vid)
) WITHOUT ROWID;

-- Search index of the current versions. The primary key holds every column,
-- so a repeated value is stored once (INSERT OR IGNORE) and deleting a
-- resource's rows is a primary-key range; the second index serves searches.
CREATE TABLE idx_token (
    rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT NOT NULL, code TEXT NOT NULL,
    PRIMARY KEY (rtype, id, param, system, code)
) WITHOUT ROWID;
CREATE INDEX idx_token_search ON idx_token (rtype, param, code, system, id);

CREATE TABLE idx_string (
    rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (rtype, id, param, value)
) WITHOUT ROWID;
CREATE INDEX idx_string_search ON idx_string (rtype, param, value, id);

CREATE TABLE idx_date (
    rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    low INTEGER NOT NULL, high INTEGER NOT NULL,
    PRIMARY KEY (rtype, id, param, low, high)
) WITHOUT ROWID;
CREATE INDEX idx_date_search ON idx_date (rtype, param, low, high, id);

CREATE TABLE idx_reference (
    rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    target_type TEXT NOT NULL, target_id TEXT NOT NULL,
    PRIMARY KEY (rtype, id, param, target_type, target_id)
) WITHOUT ROWID;
CREATE INDEX idx_reference_search ON idx_reference (rtype, param, target_id, target_type, id);

CREATE TABLE idx_quantity (
    rtype TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    value REAL NOT NULL, system TEXT NOT NULL, code TEXT NOT NULL,
    PRIMARY KEY (rtype, id, param, value, system, code)
) WITHOUT ROWID;
CREATE INDEX idx_quantity_search ON idx_quantity (rtype, param, code, value, id);

-- Which site a patient is enrolled at (from ResearchSubject's site extension).
CREATE TABLE patient_sites (
    patient TEXT PRIMARY KEY,
    site TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX patient_sites_site ON patient_sites (site, patient);

-- API tokens: only the SHA-256 of the secret is kept.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    site TEXT,
    patient TEXT,
    hash TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    expires INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0
);

-- Each protocol version loaded, as JSON.
CREATE TABLE trials (
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    loaded_at INTEGER NOT NULL,
    PRIMARY KEY (id, version)
);

-- The audit trail: append-only and hash-chained (see audit.rs).
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    rtype TEXT,
    rid TEXT,
    vid INTEGER,
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
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
