-- Jobs are keyed per tenant (inferlog.identity.job_key): a named tenant's rows move from the client's ID
-- to "<tenant>/<id>" (or "#<digest>/<id>" for a tenant name that is not a plain token), and a default-tenant
-- ID containing "/" to "/<id>". The expression below is job_key() in SQL; a test checks that they agree.
CREATE FUNCTION inferlog_job_key(tenant text, client_id text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN tenant IS NULL THEN
            CASE WHEN strpos(client_id, '/') > 0 THEN '/' || client_id ELSE client_id END
        WHEN tenant ~ '^[A-Za-z0-9._:~-]{1,64}$' THEN tenant || '/' || client_id
        ELSE '#' || left(encode(sha256(convert_to(tenant, 'UTF8')), 'hex'), 24) || '/' || client_id
    END
$$;

-- A primary key is checked row by row, so a row may move onto a key another row still holds (tenant
-- "alice"'s "x" becomes "alice/x" while a default-tenant "alice/x" has not yet become "/alice/x"): drop the
-- keys, re-key every row, add them back (the derivation is injective, so the new keys are unique).
ALTER TABLE results DROP CONSTRAINT results_pkey;
ALTER TABLE requests DROP CONSTRAINT requests_pkey;
-- Results first: their ledger row still has the old key to join on.
UPDATE results r SET request_id = inferlog_job_key(q.tenant, r.request_id)
  FROM requests q
 WHERE q.request_id = r.request_id AND inferlog_job_key(q.tenant, q.request_id) <> q.request_id;
UPDATE requests SET request_id = inferlog_job_key(tenant, request_id)
 WHERE inferlog_job_key(tenant, request_id) <> request_id;
ALTER TABLE requests ADD PRIMARY KEY (request_id);
ALTER TABLE results ADD PRIMARY KEY (request_id);

-- What the client sent, hashed (the payload hash covers the record with the gateway's defaults filled in):
-- an identical keyed retry after a change of defaults is the same job, not a 422.
ALTER TABLE requests ADD COLUMN request_hash text;
