-- idx_token keyed in search order, with no second index. The old table was
-- keyed by resource (rtype, id, ...) so that replacing a version could
-- delete its rows by key, plus idx_token_search for searches: two B-tree
-- inserts per token, three tokens per typical Observation. Now one. The
-- keys of a resource's token rows are kept with its current version in
-- `resources.tokens` (a JSON array of [param, system, code]), so that a
-- write replacing it deletes exactly those rows (`remove_token_rows` in
-- mod.rs). Searches, identifier lookups and conditional creates read
-- (rtype, param, code[, system]) prefixes, as before.
ALTER TABLE resources ADD COLUMN tokens TEXT;
UPDATE resources SET tokens = (
    SELECT json_group_array(json_array(t.param, t.system, t.code))
    FROM idx_token t WHERE t.rtype = resources.rtype AND t.id = resources.id
);
CREATE TABLE idx_token_v6 (
    rtype TEXT NOT NULL, param TEXT NOT NULL, code TEXT NOT NULL,
    system TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (rtype, param, code, system, id)
) WITHOUT ROWID;
INSERT INTO idx_token_v6 (rtype, param, code, system, id)
SELECT rtype, param, code, system, id FROM idx_token;
DROP TABLE idx_token;
ALTER TABLE idx_token_v6 RENAME TO idx_token;
