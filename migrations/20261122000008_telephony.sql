-- Telephony: per-tenant integration settings and calls, upserted on the provider's call id.

CREATE TABLE integrations (
    tenant_id      uuid        NOT NULL REFERENCES tenants (id),
    kind           text        NOT NULL,
    settings       jsonb       NOT NULL DEFAULT '{}',
    secrets_sealed bytea,
    secret_names   text[]      NOT NULL DEFAULT '{}',
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind)
);

CREATE TABLE calls (
    tenant_id        uuid        NOT NULL REFERENCES tenants (id),
    id               uuid        NOT NULL,
    provider         text        NOT NULL,
    provider_call_id text        NOT NULL,
    -- 'inbound' or 'outbound'
    direction        text,
    -- The customer's number: E.164 when it could be read, else as received.
    external_number  text,
    contact_id       uuid,
    -- The provider's user (agent) as it names it.
    user_name        text,
    user_email       text,
    agent_id         uuid,
    -- 1 ringing, 2 answered, 3 ended: a late or duplicate event never moves a call back.
    stage            smallint    NOT NULL,
    missed           boolean     NOT NULL DEFAULT false,
    missed_reason    text,
    started_at       timestamptz,
    answered_at      timestamptz,
    ended_at         timestamptz,
    duration_secs    integer,
    recording_url    text,
    voicemail_url    text,
    tags             jsonb       NOT NULL DEFAULT '[]',
    comments         jsonb       NOT NULL DEFAULT '[]',
    ticket_id        uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT calls_provider_id_unique UNIQUE (tenant_id, provider, provider_call_id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id),
    FOREIGN KEY (tenant_id, ticket_id) REFERENCES tickets (tenant_id, id)
);
CREATE INDEX calls_by_contact ON calls (tenant_id, contact_id, started_at DESC);
