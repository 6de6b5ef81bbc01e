-- Messages to agents about a contact (a low-rating alert, a campaign's hand-off) quote the
-- contact; erasure finds them by this column. No foreign key: erasure keeps the contact row,
-- and a message about a contact must not block anything.
ALTER TABLE messages ADD COLUMN about_contact_id uuid;
CREATE INDEX messages_about_contact ON messages (tenant_id, about_contact_id)
    WHERE about_contact_id IS NOT NULL;
