-- Indexes whose insert points are random take the write path's cost: data
-- arrives in any order of clinical date and value, so each such index
-- dirties about one page per row per group commit, where the other indexes
-- (by id, UUIDv7 and so time-ordered; by code, patient, status: a few hot
-- spots) dirty a handful. Measured on SQLite with bench/limit-write,
-- 100,000 Observations: at 800 per transaction, 14,300 rows/s with every
-- index, 27,000 without the two range indexes; at 400 per transaction (a
-- group commit's usual size under 8 clients), 14,900 without the range
-- indexes, 28,000 without resources_sort_date as well.
-- PostgreSQL pays for random inserts too (a full-page image of each page
-- first touched after a checkpoint).
--
-- * idx_date_search, idx_quantity_search: no query used them. Date and
--   quantity predicates are probes by the resource's key (sql.rs,
--   `open_probe`), so that a wide range never drives a search.
-- * resources_sort_date: `_sort=date` now sorts the rows that the search's
--   other predicates select (a subject, a code, a date range) instead of
--   walking an index in date order. Sorted searches over a whole type with
--   no other predicate cost a sort of that type's rows: the price of
--   ingest speed, and not a query clinical screens make.
DROP INDEX IF EXISTS idx_date_search;
DROP INDEX IF EXISTS idx_quantity_search;
DROP INDEX IF EXISTS resources_sort_date;
