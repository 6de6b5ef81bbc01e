-- The low-score alert of a survey rating waits a little for the customer's comment: the
-- rating keeps the alert's message, so a comment that comes in time is folded into it, and
-- one that comes later is told to the agent separately.
ALTER TABLE ratings ADD COLUMN alert_message_id uuid;
