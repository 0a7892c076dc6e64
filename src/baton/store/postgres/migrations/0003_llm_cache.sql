-- The exact cache of model answers: shared by every run and worker on this database.
CREATE TABLE llm_cache (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION
);
