-- The rule engine writes a journey for every enrolment and the ingestion path an inbox row for
-- every event; each foreign key on those rows is a per-row check that takes a share lock on
-- the referenced row. For journeys that is three look-ups and three row locks per enrolment,
-- and the locks on the campaign and version rows are shared by every transaction enrolling
-- into the campaign (multixacts): measured with pg_stat_statements in the rules benchmark,
-- the journey insert took 95 ms for ~1,400 rows, as long as appending all the events.
--
-- What the keys guarded still holds without them:
-- * journeys are written only by the engine, for a campaign and version it has just read in
--   the same transaction, and for a contact it holds under an advisory lock and has just
--   read; campaigns and their versions are never deleted (they are archived), and contacts
--   are never deleted (erasure keeps the row).
-- * an inbox row is written by the statement that appends its event, and events are never
--   deleted.
ALTER TABLE journeys DROP CONSTRAINT journeys_tenant_id_campaign_id_fkey;
ALTER TABLE journeys DROP CONSTRAINT journeys_tenant_id_contact_id_fkey;
ALTER TABLE journeys DROP CONSTRAINT journeys_tenant_id_campaign_id_version_fkey;
ALTER TABLE campaign_inbox DROP CONSTRAINT campaign_inbox_tenant_id_event_id_fkey;
