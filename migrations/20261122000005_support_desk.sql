-- The support desk: agents, tickets with per-tenant numbers, and ticket messages.

CREATE TABLE agents (
    tenant_id        uuid        NOT NULL REFERENCES tenants (id),
    id               uuid        NOT NULL,
    name             text        NOT NULL,
    email            text        NOT NULL,
    phone            text,
    -- Language codes (`hr`, `en`); empty means any.
    languages        text[]      NOT NULL DEFAULT '{}',
    -- ISO country codes; empty means any.
    countries        text[]      NOT NULL DEFAULT '{}',
    max_open_tickets integer     NOT NULL,
    active           boolean     NOT NULL DEFAULT true,
    -- Round-robin among equally loaded agents: the one assigned longest ago goes first.
    last_assigned_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT agents_email_unique UNIQUE (tenant_id, email)
);

-- Per-tenant sequences (ticket numbers...).
CREATE TABLE tenant_counters (
    tenant_id uuid   NOT NULL REFERENCES tenants (id),
    name      text   NOT NULL,
    value     bigint NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE tickets (
    tenant_id         uuid        NOT NULL REFERENCES tenants (id),
    id                uuid        NOT NULL,
    number            bigint      NOT NULL,
    contact_id        uuid        NOT NULL,
    channel           text        NOT NULL,
    subject           text        NOT NULL,
    category          text,
    priority          text        NOT NULL,
    -- new -> open -> pending -> solved -> closed
    status            text        NOT NULL,
    assignee_id       uuid,
    first_response_at timestamptz,
    solved_at         timestamptz,
    closed_at         timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT tickets_number_unique UNIQUE (tenant_id, number),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id),
    FOREIGN KEY (tenant_id, assignee_id) REFERENCES agents (tenant_id, id)
);
CREATE INDEX tickets_by_contact ON tickets (tenant_id, contact_id, id DESC);
CREATE INDEX tickets_open_by_assignee ON tickets (tenant_id, assignee_id)
    WHERE status IN ('new', 'open', 'pending');
CREATE INDEX tickets_waiting ON tickets (tenant_id, created_at)
    WHERE assignee_id IS NULL AND status IN ('new', 'open', 'pending');

CREATE TABLE ticket_messages (
    tenant_id  uuid        NOT NULL,
    id         uuid        NOT NULL,
    ticket_id  uuid        NOT NULL,
    -- 'agent' or 'contact'
    author     text        NOT NULL,
    agent_id   uuid,
    body       text        NOT NULL,
    internal   boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, ticket_id) REFERENCES tickets (tenant_id, id),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id)
);
CREATE INDEX ticket_messages_by_ticket ON ticket_messages (tenant_id, ticket_id, created_at);
