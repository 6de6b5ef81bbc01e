-- Webhook deliveries already processed (Standard Webhooks' webhook-id), to drop duplicates;
-- and background jobs (the Aircall insight card push).
CREATE TABLE webhook_receipts (
    tenant_id   uuid        NOT NULL REFERENCES tenants (id),
    source      text        NOT NULL,
    delivery_id text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source, delivery_id)
);

CREATE TABLE jobs (
    tenant_id       uuid        NOT NULL REFERENCES tenants (id),
    id              uuid        NOT NULL,
    kind            text        NOT NULL,
    -- One job per (kind, dedupe_key): a redelivered webhook does not push twice.
    dedupe_key      text        NOT NULL,
    payload         jsonb       NOT NULL,
    -- queued -> running -> done | failed
    status          text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX jobs_dedupe ON jobs (tenant_id, kind, dedupe_key);
CREATE INDEX jobs_due ON jobs (next_attempt_at) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (locked_until) WHERE status = 'running';
