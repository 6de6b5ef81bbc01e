-- Delivery feedback: receipts find messages by the provider's id; opens and clicks are stamped
-- once. service_keys holds the random key that signs tracking and unsubscribe links, shared by
-- every process of one database.
ALTER TABLE messages
    ADD COLUMN opened_at  timestamptz,
    ADD COLUMN clicked_at timestamptz;
CREATE INDEX messages_provider_message_id ON messages (tenant_id, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

CREATE TABLE service_keys (
    name       text        PRIMARY KEY,
    value      bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
