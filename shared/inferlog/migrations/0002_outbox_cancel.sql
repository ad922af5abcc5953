-- The outbox relay scans unpublished claims; cancellation is a durable flag on the ledger row.
CREATE INDEX requests_unpublished_idx ON requests (created_at) WHERE published = false;
ALTER TABLE requests ADD COLUMN cancel_requested_at double precision;
-- Listing a tenant's jobs newest first, with a keyset cursor on (created_at, request_id).
CREATE INDEX requests_tenant_created_idx ON requests (tenant, created_at DESC, request_id DESC);
