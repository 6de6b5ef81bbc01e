-- A customer's message on a ticket names the inbound record it came from (the whole email,
-- its quoted history included, stays retrievable there); an email's subject is kept with it.
ALTER TABLE ticket_messages ADD COLUMN inbound_id uuid;
ALTER TABLE inbound_messages ADD COLUMN subject text;
