-- Templates and the outbox: messages are inserted in the same transaction as the write that
-- caused them and sent by workers that claim them with a lease.

CREATE TABLE templates (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id),
    key        text        NOT NULL,
    -- 'transactional' or 'marketing': marketing needs an opt-in on the channel.
    purpose    text        NOT NULL,
    -- {"email": {"<locale>": {subject, html, text}}, "sms": {...}, "viber": {...}}
    variants   jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

CREATE TABLE messages (
    tenant_id           uuid        NOT NULL REFERENCES tenants (id),
    id                  uuid        NOT NULL,
    contact_id          uuid        NOT NULL,
    channel             text        NOT NULL,
    purpose             text        NOT NULL,
    template_key        text,
    locale              text,
    -- The address at the time of sending: an email, an E.164 number or a Viber user id.
    recipient           text,
    subject             text,
    body_text           text,
    body_html           text,
    -- Channel-specific extras (a Viber button...).
    extras              jsonb       NOT NULL DEFAULT '{}',
    -- queued -> sending -> sent -> delivered, or failed, or suppressed.
    status              text        NOT NULL,
    status_reason       text,
    provider            text,
    provider_message_id text,
    attempts            integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL,
    next_attempt_at     timestamptz NOT NULL,
    -- Set while a worker holds the message; an expired lease makes it due again.
    locked_until        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    delivered_at        timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id)
);
CREATE INDEX messages_due ON messages (next_attempt_at) WHERE status = 'queued';
CREATE INDEX messages_leased ON messages (locked_until) WHERE status = 'sending';
CREATE INDEX messages_by_contact ON messages (tenant_id, contact_id, id DESC);
CREATE INDEX messages_by_status ON messages (tenant_id, status, id DESC);

CREATE TABLE message_attempts (
    tenant_id           uuid        NOT NULL,
    message_id          uuid        NOT NULL,
    attempt             integer     NOT NULL,
    provider            text        NOT NULL,
    started_at          timestamptz NOT NULL,
    finished_at         timestamptz NOT NULL,
    -- sent, retry or failed.
    outcome             text        NOT NULL,
    detail              text,
    provider_message_id text,
    PRIMARY KEY (tenant_id, message_id, attempt),
    FOREIGN KEY (tenant_id, message_id) REFERENCES messages (tenant_id, id)
);
