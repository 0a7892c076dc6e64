-- API keys (kept as the hash of their secret) and the idempotency keys of run requests (the
-- same model as the SQLite store's 0007).
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION
);

-- A request repeated with the same Idempotency-Key gets the run the first one made. The key
-- is claimed in the transaction that inserts the run: a concurrent request with the same key
-- waits on it, then reads the run it made.
CREATE TABLE run_requests (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL
);
