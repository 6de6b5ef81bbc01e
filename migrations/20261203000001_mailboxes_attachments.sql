-- Customers' attachments: an email's files (stored here, up to the per-message limit; beyond
-- it listed with `dropped` and no content) and the media a provider hosts (an MMS picture, a
-- Viber photo: listed with their `url`). Listed on the ticket message of their inbound message.
CREATE TABLE inbound_attachments (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id),
    id           uuid        NOT NULL,
    inbound_id   uuid        NOT NULL,
    position     integer     NOT NULL,
    filename     text,
    content_type text        NOT NULL,
    size         bigint,
    content      bytea,
    url          text,
    dropped      text,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, inbound_id) REFERENCES inbound_messages (tenant_id, id)
);
CREATE INDEX inbound_attachments_by_message ON inbound_attachments (tenant_id, inbound_id, position);

-- The IMAP mailbox of a tenant's email channel, as the worker reads it: which worker process
-- holds it (a lease renewed every round, so two workers never read one mailbox at once),
-- where it stopped (the last UID committed, under the folder's UIDVALIDITY, in the mailbox
-- `source` names: host, port, user and folder) and how the last round went.
CREATE TABLE inbound_mailboxes (
    tenant_id      uuid        NOT NULL REFERENCES tenants (id),
    holder         uuid,
    source         text,
    lease_until    timestamptz,
    uid_validity   bigint,
    last_uid       bigint      NOT NULL DEFAULT 0,
    fetched        bigint      NOT NULL DEFAULT 0,
    skipped        bigint      NOT NULL DEFAULT 0,
    last_polled_at timestamptz,
    last_error     text,
    PRIMARY KEY (tenant_id)
);

-- A ticket opened by a customer's reply to a closed one names the ticket it follows.
ALTER TABLE tickets ADD COLUMN follows_ticket_id uuid;
ALTER TABLE tickets ADD CONSTRAINT tickets_follows_fk
    FOREIGN KEY (tenant_id, follows_ticket_id) REFERENCES tickets (tenant_id, id);
