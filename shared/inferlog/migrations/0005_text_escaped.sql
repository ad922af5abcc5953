-- Generated text is stored faithfully whatever its characters. Postgres text cannot hold NUL (the tiny
-- and real models can both generate it: SmolLM2's token 190 decodes to "\x00"), nor can asyncpg send a
-- lone surrogate: such a text is stored JSON-escaped (pure ASCII) and flagged, and readers unescape it.
ALTER TABLE results ADD COLUMN text_escaped boolean NOT NULL DEFAULT false;
