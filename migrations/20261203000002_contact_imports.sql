-- Contact imports (`POST /v1/contacts/imports`): the upload is parsed while it streams and
-- stored as chunks of up to 1,000 rows (`contact_import_chunks`, each with the line number of
-- every row) under an import that stays `receiving` (`locked_until` then is the upload's
-- deadline) until the whole file is in; a worker then applies the chunks in order, each in one
-- transaction with the import's counters and the chunk's deletion, so a restart resumes at
-- the first chunk left and nothing is written twice. The worker holds the import with a lease
-- (`holder`, `locked_until`), renewed by every chunk; `served_at` takes turns between
-- tenants' imports.
CREATE TABLE contact_imports (
    tenant_id       uuid        NOT NULL REFERENCES tenants (id),
    id              uuid        NOT NULL,
    filename        text,
    format          text        NOT NULL CHECK (format IN ('csv', 'ndjson')),
    mode            text        NOT NULL CHECK (mode IN ('upsert', 'create_only', 'update_only')),
    dry_run         boolean     NOT NULL,
    -- CSV: the field each column fills (`email`, `attributes.plan`, `consents.sms.marketing`),
    -- null for a column left out.
    columns         jsonb,
    -- CSV: the field separator (given, or guessed from the header).
    delimiter       text,
    idempotency_key text,
    status          text        NOT NULL
                    CHECK (status IN ('receiving', 'queued', 'running', 'completed', 'failed', 'cancelled')),
    rows_total      bigint      NOT NULL DEFAULT 0,
    rows_done       bigint      NOT NULL DEFAULT 0,
    created         bigint      NOT NULL DEFAULT 0,
    updated         bigint      NOT NULL DEFAULT 0,
    unchanged       bigint      NOT NULL DEFAULT 0,
    skipped         bigint      NOT NULL DEFAULT 0,
    failed          bigint      NOT NULL DEFAULT 0,
    -- The first 100 rows that failed: [{"line", "field", "message"}].
    errors          jsonb       NOT NULL DEFAULT '[]',
    -- The last failed attempt at a chunk, and how many failed in a row.
    error           text,
    failures        integer     NOT NULL DEFAULT 0,
    holder          uuid,
    locked_until    timestamptz,
    served_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX contact_imports_idempotency ON contact_imports (tenant_id, idempotency_key);
CREATE INDEX contact_imports_pending ON contact_imports (served_at NULLS FIRST, created_at)
    WHERE status IN ('queued', 'running');
CREATE INDEX contact_imports_by_tenant ON contact_imports (tenant_id, id DESC);

-- Rows are spread over a few parts by their external id, so that the parts can be written
-- at once on as many connections while the rows of one contact stay in file order.
CREATE TABLE contact_import_chunks (
    tenant_id uuid     NOT NULL,
    import_id uuid     NOT NULL,
    part      smallint NOT NULL,
    seq       integer  NOT NULL,
    -- The line of the file each row starts on.
    lines     bigint[] NOT NULL,
    -- The rows as the file has them (CSV records without the header, or NDJSON lines), in
    -- UTF-8, each ending in a newline.
    body      bytea    NOT NULL,
    PRIMARY KEY (tenant_id, import_id, part, seq),
    FOREIGN KEY (tenant_id, import_id) REFERENCES contact_imports (tenant_id, id) ON DELETE CASCADE
);
