-- `inferlog dlq redrive`: each re-driven dead letter and the new job it became. A dead letter is named by
-- its identity (stage, source position and the source value's hash: two copies of one dead letter are
-- one), so re-running a re-drive never makes a second job; the new job's key is derived from the
-- original's (`<id>.redrive-<n>`). Read both ways: the original's poll lists what it was re-driven as,
-- the new job's poll names its original.
CREATE TABLE dead_letter_redrives (
    dead_letter text PRIMARY KEY,
    original_key text NOT NULL,
    redriven_key text NOT NULL UNIQUE,
    dlq_position text NOT NULL,
    at double precision NOT NULL
);
CREATE INDEX dead_letter_redrives_original ON dead_letter_redrives (original_key);
