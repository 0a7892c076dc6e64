-- Runs, their steps and the attempts of each step (the same model as the SQLite store).
-- A running step is held by its lease_owner under the lease of its run: the owner renews
-- one row (the run's) however many steps it runs; when that lease lapses, all of them do.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    status           TEXT NOT NULL,
    plan             TEXT NOT NULL,
    workdir          TEXT NOT NULL DEFAULT '',
    created_at       DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION,
    owner            TEXT,
    lease_expires_at DOUBLE PRECISION,
    error            TEXT,
    total_steps      INTEGER NOT NULL
);
CREATE INDEX runs_by_created ON runs (created_at);
CREATE INDEX runs_by_status ON runs (status);
CREATE INDEX runs_by_owner ON runs (owner) WHERE owner IS NOT NULL;

CREATE TABLE steps (
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    step_id     TEXT NOT NULL,
    task        TEXT NOT NULL,
    wave        INTEGER NOT NULL,
    status      TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    not_before  DOUBLE PRECISION,
    output      TEXT,
    error       TEXT,
    started_at  DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE attempts (
    run_id      TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,
    started_at  DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    error       TEXT,
    owner       TEXT,
    PRIMARY KEY (run_id, idx, attempt),
    FOREIGN KEY (run_id, idx) REFERENCES steps (run_id, idx) ON DELETE CASCADE
);
