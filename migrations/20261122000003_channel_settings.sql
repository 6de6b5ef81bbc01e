-- Per-tenant provider settings of each channel. Secrets are sealed with the service's secret
-- key (XChaCha20-Poly1305) and never returned by the API.
CREATE TABLE channel_settings (
    tenant_id      uuid        NOT NULL REFERENCES tenants (id),
    channel        text        NOT NULL,
    provider       text        NOT NULL,
    settings       jsonb       NOT NULL DEFAULT '{}',
    secrets_sealed bytea,
    -- The names of the secrets that are set, to show without the values.
    secret_names   text[]      NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel)
);
