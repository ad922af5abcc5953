-- `inferlog dlq redrive`: one job is re-driven once, however many dead letters it left (two copies of one
-- record on the requests topic, or one job refused at two stages, are two dead letters). A reservation
-- records the hash of the payload it re-drives (`payload_hash` of the request), and a dead letter of the
-- same original job with the same payload is the same re-drive.
ALTER TABLE dead_letter_redrives ADD COLUMN payload_hash text;
CREATE INDEX dead_letter_redrives_payload ON dead_letter_redrives (original_key, payload_hash);
-- Re-drives made before this migration: their new job's payload hash is the original payload's (a re-drive
-- changes only the ID, timings and deadline, which `payload_hash` leaves out), so the dedup covers them too.
UPDATE dead_letter_redrives d SET payload_hash = q.payload_hash
  FROM requests q WHERE q.request_id = d.redriven_key AND d.payload_hash IS NULL;
