-- The foundation: tenants, API keys, contacts, events and their counters, idempotency keys.
--
-- Sharding rule (checked by tests/schema.rs): every tenant-owned table has tenant_id as the
-- first column of its primary key, and every foreign key between tenant-owned tables includes
-- tenant_id. `tenants` itself is the root (a reference table under Citus).

CREATE TABLE tenants (
    id              uuid        PRIMARY KEY,
    name            text        NOT NULL,
    slug            text        NOT NULL UNIQUE,
    default_country text        NOT NULL,
    default_locale  text        NOT NULL,
    timezone        text        NOT NULL,
    settings        jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id),
    id           uuid        NOT NULL,
    name         text        NOT NULL,
    -- SHA-256 of the whole key; the key itself is never stored.
    key_hash     bytea       NOT NULL,
    -- The first characters of the key, to recognise it in a list.
    key_prefix   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX api_keys_key_hash ON api_keys (key_hash);

CREATE TABLE contacts (
    tenant_id      uuid        NOT NULL REFERENCES tenants (id),
    id             uuid        NOT NULL,
    external_id    text,
    email          text,
    phone          text,
    viber_id       text,
    first_name     text,
    last_name      text,
    locale         text,
    country        text,
    timezone       text,
    birthday       date,
    owner_agent_id uuid,
    attributes     jsonb       NOT NULL DEFAULT '{}',
    consents       jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- Set by the right to erasure: personal data is gone, the row keeps aggregates joined.
    erased_at      timestamptz,
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT contacts_external_id_unique UNIQUE (tenant_id, external_id)
);
CREATE INDEX contacts_email ON contacts (tenant_id, email) WHERE email IS NOT NULL;
CREATE INDEX contacts_phone ON contacts (tenant_id, phone) WHERE phone IS NOT NULL;
CREATE INDEX contacts_viber_id ON contacts (tenant_id, viber_id) WHERE viber_id IS NOT NULL;

-- Per-contact counters by event type. The row lock taken by the increment serialises
-- concurrent events of one contact and type, so each event's ordinal is exact.
CREATE TABLE contact_event_counts (
    tenant_id  uuid   NOT NULL,
    contact_id uuid   NOT NULL,
    event_type text   NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (tenant_id, contact_id, event_type),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id)
);

CREATE TABLE events (
    tenant_id       uuid        NOT NULL,
    id              uuid        NOT NULL,
    contact_id      uuid        NOT NULL,
    type            text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    properties      jsonb       NOT NULL DEFAULT '{}',
    -- 'api' for events sent by the tenant, 'rapport' for those Rapport emits itself.
    source          text        NOT NULL,
    -- 1 for the contact's first event of this type, 2 for the second...
    ordinal         bigint      NOT NULL,
    idempotency_key text,
    -- The object the event is about (a message, a ticket, a call...), for the timeline.
    subject_type    text,
    subject_id      uuid,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id),
    CONSTRAINT events_idempotency_key_unique UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX events_timeline ON events (tenant_id, contact_id, occurred_at DESC, id DESC);

-- Responses remembered for the Idempotency-Key header. tenant_id is the nil UUID for
-- operators' (admin) requests.
CREATE TABLE idempotency_keys (
    tenant_id     uuid        NOT NULL,
    key           text        NOT NULL,
    request_hash  bytea       NOT NULL,
    status        smallint,
    content_type  text,
    response_body bytea,
    -- While the first request runs; a claim whose lease expired (its process died) is taken over.
    locked_until  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
