-- Writing contacts in bulk (imports, batches) is now the widest write: per contact a row, five
-- index entries, a `contact.created` event and its counter. Measured with perf over a
-- 1,000,000-row import, PostgreSQL spent 22% of its time in foreign-key checks run after each
-- statement (AfterTriggerEndQuery -> SPI), half of them the contact's key to its tenant: a
-- look-up and a share lock on the one tenant row per contact, which every transaction writing
-- that tenant's contacts takes at once (multixacts), as the journeys' keys did (see
-- 20261124000004_engine_write_speed.sql).
--
-- What the key guarded still holds without it: tenants are never deleted, and a contact is
-- only ever written for the tenant of an authenticated API key, a webhook's tenant or an
-- import's tenant, each read from the tenants table in the same request or job. The key of
-- contact_event_counts to contacts stays: it is what guarantees that every event's contact
-- exists (20261124000002_event_append_speed.sql).
ALTER TABLE contacts DROP CONSTRAINT contacts_tenant_id_fkey;

-- An import's chunks are written once, read once and deleted: compressing them (pglz, by
-- default for a value over 2 kB) costs CPU on both sides for space held a few seconds.
ALTER TABLE contact_import_chunks ALTER COLUMN body SET STORAGE EXTERNAL;
