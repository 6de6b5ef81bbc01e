-- The link-signing key is sealed with RAPPORT_SECRET_KEY when one is configured: whoever reads
-- the database alone can no longer forge survey, click and unsubscribe tokens.
ALTER TABLE service_keys ADD COLUMN sealed boolean NOT NULL DEFAULT false;
