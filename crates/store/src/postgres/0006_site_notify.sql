-- (PostgreSQL) Tells every clinflow node when a site or a trial changes, so
-- each rebuilds its site-registry snapshot: a NOTIFY on channel
-- `clinflow_sites` at the commit of any write of an Organization or a
-- ResearchStudy, whoever made it. The payload is the writer's schema, so
-- that nodes on other schemas of the same database ignore it.
CREATE FUNCTION clinflow_notify_sites() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('clinflow_sites', current_schema());
    RETURN NULL;
END
$$;
CREATE TRIGGER resources_notify_sites
    AFTER INSERT OR UPDATE ON resources
    FOR EACH ROW WHEN (NEW.rtype IN ('Organization', 'ResearchStudy'))
    EXECUTE FUNCTION clinflow_notify_sites();
