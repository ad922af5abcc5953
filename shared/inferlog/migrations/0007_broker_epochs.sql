-- The broker epochs this ledger has seen (inferlog.epoch): one row per log started by `inferlog topics`.
-- `requests.redriven_epoch`: the epoch `inferlog redrive` last re-published a job into (a second re-drive
-- into the same epoch skips it).
CREATE TABLE broker_epochs (
    epoch text PRIMARY KEY,
    bootstrap text NOT NULL,
    layout jsonb NOT NULL,
    written_at double precision NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE requests ADD COLUMN redriven_epoch text;
