-- SLA breaches are stamped once per ticket and kind; snippets are canned responses.
ALTER TABLE tickets
    ADD COLUMN first_response_breached_at timestamptz,
    ADD COLUMN resolution_breached_at     timestamptz;
CREATE INDEX tickets_sla_watch ON tickets (tenant_id, created_at)
    WHERE status IN ('new', 'open', 'pending');

CREATE TABLE snippets (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id),
    key        text        NOT NULL,
    title      text,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);
