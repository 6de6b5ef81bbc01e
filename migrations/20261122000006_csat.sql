-- CSAT ratings, and messages addressed to agents (alerts) rather than contacts.

ALTER TABLE messages
    ALTER COLUMN contact_id DROP NOT NULL,
    ADD COLUMN agent_id uuid,
    ADD CONSTRAINT messages_agent_fk FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id),
    ADD CONSTRAINT messages_has_recipient CHECK (contact_id IS NOT NULL OR agent_id IS NOT NULL);

CREATE TABLE ratings (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id),
    id         uuid        NOT NULL,
    contact_id uuid        NOT NULL,
    ticket_id  uuid,
    agent_id   uuid,
    score      smallint    NOT NULL CHECK (score BETWEEN 1 AND 5),
    comment    text,
    -- 'survey' (Rapport's page) or what an outside tool says it is.
    source     text        NOT NULL,
    -- The ticket's channel, and the contact's country when rated: reports group by them.
    channel    text,
    country    text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id),
    FOREIGN KEY (tenant_id, ticket_id) REFERENCES tickets (tenant_id, id),
    FOREIGN KEY (tenant_id, agent_id) REFERENCES agents (tenant_id, id)
);
-- A survey's score can be given once.
CREATE UNIQUE INDEX ratings_one_survey_per_ticket ON ratings (tenant_id, ticket_id) WHERE source = 'survey';
CREATE INDEX ratings_by_contact ON ratings (tenant_id, contact_id, created_at DESC);
CREATE INDEX ratings_by_time ON ratings (tenant_id, created_at);
