-- Operators' re-publishing (`inferlog replay`, `inferlog redrive`): how many times a job's record was put
-- back on the log from its ledger payload, and when last. Neither changes what a job is or its status.
ALTER TABLE requests ADD COLUMN replays smallint NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN replayed_at double precision;
