-- Conversations both ways. An outgoing message may be about a ticket (acknowledgement, agent
-- reply, solved notice, survey): its email threads with the ticket's other mails. A public
-- agent message on a ticket names the outbox message that carries it to the customer.
ALTER TABLE messages ADD COLUMN ticket_id uuid;
CREATE INDEX messages_by_ticket ON messages (tenant_id, ticket_id, id) WHERE ticket_id IS NOT NULL;
ALTER TABLE ticket_messages ADD COLUMN message_id uuid;

-- Every message a customer sends in (an SMS, a Viber message, later an email), once per
-- provider message id: a redelivery finds its row and changes nothing. `kind` says what it
-- was: a reply (on a ticket), a keyword (STOP/START: consent only) or an automatic reply.
CREATE TABLE inbound_messages (
    tenant_id           uuid        NOT NULL REFERENCES tenants (id),
    id                  uuid        NOT NULL,
    channel             text        NOT NULL,
    provider            text        NOT NULL,
    provider_message_id text        NOT NULL,
    contact_id          uuid,
    sender              text,
    recipient           text,
    body                text,
    media               jsonb       NOT NULL DEFAULT '[]',
    kind                text        NOT NULL DEFAULT 'reply',
    ticket_id           uuid,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT inbound_messages_once UNIQUE (tenant_id, channel, provider_message_id)
);
CREATE INDEX inbound_messages_by_contact ON inbound_messages (tenant_id, contact_id, id DESC);
