-- API keys (kept as the hash of their secret) and the idempotency keys of run requests.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);

-- A request repeated with the same Idempotency-Key gets the run the first one made.
CREATE TABLE run_requests (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    created_at  REAL NOT NULL
);
