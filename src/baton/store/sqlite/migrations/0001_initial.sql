-- Runs, their steps and the attempts of each step.
-- A run's steps get consecutive integer ids from step_base on, so the executor's writes
-- find a step by its rowid (one b-tree descent) and a run's steps are one id range.
-- A running step is held by its lease_owner under the lease of its run: the owner renews
-- one row (the run's) however many steps it runs; when that lease lapses, all of them do.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    status           TEXT NOT NULL,
    plan             TEXT NOT NULL,
    workdir          TEXT NOT NULL DEFAULT '',
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    owner            TEXT,
    lease_expires_at REAL,
    error            TEXT,
    total_steps      INTEGER NOT NULL,
    step_base        INTEGER NOT NULL
);
CREATE INDEX runs_by_created ON runs (created_at);
CREATE INDEX runs_by_status ON runs (status);

CREATE TABLE steps (
    id               INTEGER PRIMARY KEY,
    run_id           TEXT NOT NULL,
    idx              INTEGER NOT NULL,
    step_id          TEXT NOT NULL,
    task             TEXT NOT NULL,
    wave             INTEGER NOT NULL,
    status           TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    not_before       REAL,
    output           TEXT,
    error            TEXT,
    started_at       REAL,
    finished_at      REAL
);

CREATE TABLE attempts (
    step        INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,
    started_at  REAL,
    finished_at REAL,
    error       TEXT,
    owner       TEXT,
    PRIMARY KEY (step, attempt)
) WITHOUT ROWID;
