-- Messages queued by the rule engine and by the helpdesk are rendered by the worker that sends
-- them, not inside the transaction that queues them: a tenant's template may take up to the
-- sandbox's deadline, and no database connection is held while it runs. Until then the row
-- keeps the template variant chosen and the variables it sees; the worker writes the rendered
-- subject and bodies and clears this column. Erasure clears it too.
ALTER TABLE messages ADD COLUMN compose jsonb;
