-- Campaigns: rules written once (versioned definitions), journeys (one contact's run through
-- one campaign version, claimed by wake_at like the outbox), the inbox of events the rule
-- engine has still to consume, and the marketing sends that frequency caps count.

CREATE TABLE campaigns (
    tenant_id    uuid        NOT NULL REFERENCES tenants (id),
    id           uuid        NOT NULL,
    name         text        NOT NULL,
    -- draft -> active <-> paused -> archived
    status       text        NOT NULL,
    -- The version new journeys start on; every update adds one.
    version      integer     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    archived_at  timestamptz,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX campaigns_running ON campaigns (tenant_id) WHERE status IN ('active', 'paused');

CREATE TABLE campaign_versions (
    tenant_id   uuid        NOT NULL,
    campaign_id uuid        NOT NULL,
    version     integer     NOT NULL,
    -- The validated definition: trigger, audience, steps, exit_on, policies.
    definition  jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, campaign_id, version),
    FOREIGN KEY (tenant_id, campaign_id) REFERENCES campaigns (tenant_id, id)
);

CREATE TABLE journeys (
    tenant_id        uuid        NOT NULL,
    id               uuid        NOT NULL,
    campaign_id      uuid        NOT NULL,
    version          integer     NOT NULL,
    contact_id       uuid        NOT NULL,
    -- active -> completed | exited
    status           text        NOT NULL,
    -- Where the journey stands: [step] or [step, on_timeout step] (a path into the steps).
    position         integer[]   NOT NULL,
    -- When the worker looks at the journey next (clock time); NULL once it has ended.
    wake_at          timestamptz,
    -- The end of the current wait or wait_for, once the journey has reached it.
    wait_until       timestamptz,
    -- Since when the current send has been held back by an open ticket.
    held_since       timestamptz,
    -- Deduplicates enrolments: 'once', 'birthday:<year>', or the trigger event id.
    enrol_key        text        NOT NULL,
    trigger_event_id uuid,
    -- The trigger event, as the templates and conditions of later steps see it.
    trigger_event    jsonb       NOT NULL DEFAULT '{}',
    -- The last message this journey queued (wait_for on message.* events matches it).
    last_message_id  uuid,
    enrolled_at      timestamptz NOT NULL,
    ended_at         timestamptz,
    exit_reason      text,
    -- Exited on one of the campaign's exit_on (goal) events.
    converted        boolean     NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, campaign_id) REFERENCES campaigns (tenant_id, id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id),
    FOREIGN KEY (tenant_id, campaign_id, version)
        REFERENCES campaign_versions (tenant_id, campaign_id, version)
);
CREATE UNIQUE INDEX journeys_enrolment ON journeys (tenant_id, campaign_id, contact_id, enrol_key);
-- A contact runs through a campaign at most once at a time, whatever the reentry policy.
CREATE UNIQUE INDEX journeys_one_active ON journeys (tenant_id, campaign_id, contact_id)
    WHERE status = 'active';
CREATE INDEX journeys_due ON journeys (wake_at) WHERE status = 'active';
CREATE INDEX journeys_of_contact ON journeys (tenant_id, contact_id) WHERE status = 'active';
CREATE INDEX journeys_of_campaign ON journeys (tenant_id, campaign_id, status);

-- Events the rule engine has not consumed yet, in arrival order. Written by the same
-- statement that appends the event, only while the tenant has a running campaign.
CREATE TABLE campaign_inbox (
    tenant_id  uuid    NOT NULL,
    seq        bigserial,
    contact_id uuid    NOT NULL,
    event_id   uuid    NOT NULL,
    -- Failed evaluations of this event; it is set aside after a few.
    failures   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, seq),
    FOREIGN KEY (tenant_id, event_id) REFERENCES events (tenant_id, id)
);
CREATE INDEX campaign_inbox_order ON campaign_inbox (seq);
CREATE INDEX campaign_inbox_contact ON campaign_inbox (tenant_id, contact_id, seq);

-- Schedule occurrences already looked at (enrolled or not, e.g. outside the audience), so a
-- birthday is evaluated once a year per campaign and contact.
CREATE TABLE schedule_marks (
    tenant_id   uuid NOT NULL,
    campaign_id uuid NOT NULL,
    contact_id  uuid NOT NULL,
    occurrence  text NOT NULL,
    PRIMARY KEY (tenant_id, campaign_id, contact_id, occurrence),
    FOREIGN KEY (tenant_id, campaign_id) REFERENCES campaigns (tenant_id, id)
);

-- Marketing messages campaigns queued, at clock time: what frequency caps count.
CREATE TABLE marketing_sends (
    tenant_id   uuid        NOT NULL,
    contact_id  uuid        NOT NULL,
    sent_at     timestamptz NOT NULL,
    message_id  uuid        NOT NULL,
    campaign_id uuid        NOT NULL,
    PRIMARY KEY (tenant_id, contact_id, sent_at, message_id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id)
);

-- Messages know the campaign and journey that queued them (stats, wait_for).
ALTER TABLE messages
    ADD COLUMN campaign_id uuid,
    ADD COLUMN journey_id  uuid;
CREATE INDEX messages_by_campaign ON messages (tenant_id, campaign_id) WHERE campaign_id IS NOT NULL;
