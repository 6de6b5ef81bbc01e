-- API processes cache the tenant behind each API key. Any change that can invalidate such an
-- entry (a key revoked or deleted, a tenant's defaults changed) notifies every process at
-- commit, whatever made it: the admin API, the CLI or a hand-written statement.

CREATE FUNCTION rapport_notify_auth_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('rapport_auth', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION rapport_notify_auth_change();

CREATE TRIGGER tenants_changed
    AFTER UPDATE OF default_country, default_locale, timezone OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION rapport_notify_auth_change();
