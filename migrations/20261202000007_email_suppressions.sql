-- Addresses that refused mail for good (a hard bounce): no more email goes to them, for any
-- contact, until the contact's address changes to another.
CREATE TABLE email_suppressions (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id),
    address    text        NOT NULL,
    reason     text        NOT NULL,
    contact_id uuid,
    message_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, address)
);
CREATE INDEX email_suppressions_by_contact ON email_suppressions (tenant_id, contact_id);
