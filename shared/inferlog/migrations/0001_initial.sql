-- The ledger (one row per request ID: its claim, payload hash, current status and timings) and the
-- terminal results (first writer wins).
CREATE TABLE requests (
    request_id    text PRIMARY KEY,
    payload       jsonb,
    payload_hash  text,
    tenant        text,
    model         text,
    priority      text,
    status        text NOT NULL,
    status_rank   smallint NOT NULL,
    published     boolean NOT NULL DEFAULT false,
    deadline_at   double precision,
    timings       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Accepted-but-not-terminal requests: what admission counts and the outbox relay scans.
CREATE INDEX requests_open_idx ON requests (created_at) WHERE status_rank < 100;

CREATE TABLE results (
    request_id         text PRIMARY KEY,
    status             text NOT NULL,
    model              text,
    model_version      text,
    text               text,
    finish_reason      text,
    prompt_tokens      integer NOT NULL DEFAULT 0,
    completion_tokens  integer NOT NULL DEFAULT 0,
    error              jsonb,
    worker_id          text,
    tenant             text,
    timings            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now()
);
