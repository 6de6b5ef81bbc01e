-- Segments: a named CEL condition over the contact, evaluated by Rapport (never by SQL).
CREATE TABLE segments (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id),
    id         uuid        NOT NULL,
    name       text        NOT NULL,
    condition  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- Broadcasts: one message to every contact of a segment (or audience). A worker walks the
-- tenant's contacts in id order, a page per transaction: the page's members get their message
-- (queued, deferred or suppressed with the reason) and `cursor` moves past the page in that
-- same transaction, under the worker's lease (`holder`, `locked_until`): a crash loses at
-- most the page in flight, which the next holder does again. The unique index on
-- (broadcast_id, contact_id) below makes a second message for one contact impossible.
CREATE TABLE broadcasts (
    tenant_id     uuid        NOT NULL REFERENCES tenants (id),
    id            uuid        NOT NULL,
    name          text        NOT NULL,
    segment_id    uuid,
    -- The condition when no segment is named.
    audience      text,
    template_key  text        NOT NULL,
    channels      text[]      NOT NULL,
    purpose       text        NOT NULL CHECK (purpose IN ('marketing', 'transactional')),
    send_at       timestamptz,
    -- A wall-clock time, in each contact's own time zone.
    send_at_local timestamp,
    per_second    integer     CHECK (per_second > 0),
    -- `{start, end}` in the contact's time zone; `{max, per}` across marketing sends.
    quiet_hours   jsonb,
    frequency_cap jsonb,
    suppress_while_ticket_open boolean NOT NULL DEFAULT true,
    variables     jsonb       NOT NULL DEFAULT '{}',
    status        text        NOT NULL
                  CHECK (status IN ('draft', 'scheduled', 'running', 'paused', 'completed', 'cancelled', 'failed')),
    -- When the walk over contacts starts (for `send_at_local`, before the earliest zone).
    starts_at     timestamptz,
    -- The last contact id the walk has decided on.
    cursor        uuid,
    -- The next free send slot when `per_second` paces the broadcast.
    next_slot     timestamptz,
    scanned       bigint      NOT NULL DEFAULT 0,
    targeted      bigint      NOT NULL DEFAULT 0,
    queued        bigint      NOT NULL DEFAULT 0,
    deferred      bigint      NOT NULL DEFAULT 0,
    -- Suppressed members by reason: {"no_consent": 12, "ticket_open": 3}.
    suppressed    jsonb       NOT NULL DEFAULT '{}',
    error         text,
    holder        uuid,
    locked_until  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    scheduled_at  timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, segment_id) REFERENCES segments (tenant_id, id)
);
CREATE INDEX broadcasts_by_tenant ON broadcasts (tenant_id, id DESC);
CREATE INDEX broadcasts_due ON broadcasts (starts_at) WHERE status IN ('scheduled', 'running');

ALTER TABLE messages ADD COLUMN broadcast_id uuid;
CREATE UNIQUE INDEX messages_broadcast_member ON messages (tenant_id, broadcast_id, contact_id)
    WHERE broadcast_id IS NOT NULL;

-- Frequency caps count broadcasts' marketing sends with campaigns'.
ALTER TABLE marketing_sends ALTER COLUMN campaign_id DROP NOT NULL;
ALTER TABLE marketing_sends ADD COLUMN broadcast_id uuid;

-- Send pacing per tenant and channel, shared by every worker process: a channel with a row
-- here is sent through a generic cell rate algorithm (`tat`, the theoretical arrival time of
-- the next message) at `per_second` (null: no rate, only the pause a provider's 429 asked
-- for). Messages of other channels never look here.
CREATE TABLE channel_pacing (
    tenant_id  uuid        NOT NULL REFERENCES tenants (id),
    channel    text        NOT NULL,
    per_second double precision CHECK (per_second > 0),
    tat        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, channel)
);

-- When the contact's last event of each type happened, for conditions such as "no purchase
-- in 30 days" (`now - contact.last_event_at.purchase_completed > duration('720h')`).
ALTER TABLE contact_event_counts ADD COLUMN last_at timestamptz;
-- A paced channel's due messages, found without walking every tenant's queue.
CREATE INDEX messages_due_by_channel ON messages (tenant_id, channel, next_attempt_at)
    WHERE status = 'queued';
