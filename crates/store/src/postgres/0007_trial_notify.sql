-- (PostgreSQL) A protocol version is committed apart from its resources (the
-- ResearchStudy's NOTIFY may reach a node before the protocol is there), and
-- the protocol says which sites a trial lists: notify on it too.
CREATE TRIGGER trials_notify_sites
    AFTER INSERT ON trials
    FOR EACH ROW
    EXECUTE FUNCTION clinflow_notify_sites();
