-- A message's history (GET /v1/messages/{id}) read every event of the tenant to find the few
-- about that message. Index only those: API events and campaign decisions are not in it.
CREATE INDEX events_about_message ON events (tenant_id, subject_id)
    WHERE subject_type = 'message';
