-- How many times a request was in the engine when the engine itself failed (its thread crashed or hung).
-- Workers read it before each attempt: a request that keeps taking engines down ends `failed`
-- (`engine_error`) after INFERLOG_WORKER_MAX_ENGINE_FAILURES attempts instead of crash-looping the fleet.
ALTER TABLE requests ADD COLUMN engine_failures smallint NOT NULL DEFAULT 0;
