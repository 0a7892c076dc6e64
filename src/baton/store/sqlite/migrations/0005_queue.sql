-- One queue for every kind of work. A job is a row of `steps`: a step of a run, or, with
-- run_id NULL, a standalone task call (enqueued, scheduled or a cron tick). Workers claim
-- ready rows; a worker that finishes a step counts it towards its dependents' `waiting`
-- and marks those that reach 0 ready, in the same transaction. Runs are no longer held by
-- a process: a running attempt is held by its worker (lease_owner) under that worker's
-- lease (the `workers` table); when the lease lapses, its attempts are rescued.
CREATE TABLE steps_v5 (
    id               INTEGER PRIMARY KEY,
    run_id           TEXT,
    idx              INTEGER NOT NULL DEFAULT 0,
    step_id          TEXT NOT NULL,
    task             TEXT NOT NULL,
    wave             INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    not_before       REAL,
    output           TEXT,
    error            TEXT,
    started_at       REAL,
    finished_at      REAL,
    waiting          INTEGER NOT NULL DEFAULT 0,
    rank             REAL NOT NULL DEFAULT 0,
    queue            TEXT NOT NULL DEFAULT 'default',
    priority         INTEGER NOT NULL DEFAULT 0,
    args             TEXT,
    max_attempts     INTEGER NOT NULL DEFAULT 1,
    attempt_base     INTEGER NOT NULL DEFAULT 0,
    timeout_s        REAL,
    unique_key       TEXT,
    created_at       REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
INSERT INTO steps_v5 (id, run_id, idx, step_id, task, wave, status, attempt, lease_owner,
                      not_before, output, error, started_at, finished_at)
SELECT id, run_id, idx, step_id, task, wave, status, attempt, lease_owner, not_before, output,
       error, started_at, finished_at
FROM steps;
DROP TABLE steps;
ALTER TABLE steps_v5 RENAME TO steps;

-- A run's plan lives apart from its row: the row's counters change with every finished
-- step, and rewriting a large plan with them would cost more than the step.
CREATE TABLE run_plans (
    run_id TEXT PRIMARY KEY,
    plan   TEXT NOT NULL
);
INSERT INTO run_plans (run_id, plan) SELECT id, plan FROM runs;

-- Runs written before this version: count each pending step's needs that have not
-- succeeded yet (the plan has them), and the run's counters.
UPDATE steps SET waiting = (
    SELECT COUNT(*) FROM run_plans r, json_each(r.plan, '$.steps[' || steps.idx || '].needs') n
    JOIN steps s2 ON s2.run_id = steps.run_id AND s2.step_id = n.value
    WHERE r.run_id = steps.run_id AND s2.status <> 'succeeded'
)
WHERE status = 'pending';
-- Version 4 wrote every step of a new run pending; those with nothing to wait for are ready.
UPDATE steps SET status = 'ready' WHERE status = 'pending' AND waiting = 0;

ALTER TABLE runs DROP COLUMN owner;
ALTER TABLE runs DROP COLUMN lease_expires_at;
ALTER TABLE runs ADD COLUMN max_parallel INTEGER NOT NULL DEFAULT 8;
ALTER TABLE runs ADD COLUMN barrier INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN run_timeout_s REAL;
ALTER TABLE runs ADD COLUMN deadline REAL;
ALTER TABLE runs ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
ALTER TABLE runs ADD COLUMN running INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN unfinished INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET
    max_parallel = COALESCE(json_extract(plan, '$.policy.max_parallel'), 8),
    barrier = COALESCE(json_extract(plan, '$.policy.barrier') = 'wave', 0),
    run_timeout_s = json_extract(plan, '$.policy.run_timeout_s'),
    running = (SELECT COUNT(*) FROM steps s WHERE s.run_id = runs.id AND s.status = 'running'),
    unfinished = (SELECT COUNT(*) FROM steps s WHERE s.run_id = runs.id
                  AND s.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled')),
    failed = (SELECT COUNT(*) FROM steps s WHERE s.run_id = runs.id AND s.status = 'failed');
ALTER TABLE runs DROP COLUMN plan;

CREATE INDEX runs_active ON runs (created_at) WHERE status IN ('pending', 'running');
CREATE INDEX runs_deadline ON runs (deadline) WHERE deadline IS NOT NULL
    AND status IN ('pending', 'running', 'paused');
CREATE UNIQUE INDEX steps_of_run ON steps (run_id, idx) WHERE run_id IS NOT NULL;
-- Claims: a run's ready steps, longest remaining path first.
CREATE INDEX steps_ready ON steps (run_id, priority DESC, rank DESC, id)
    WHERE status IN ('ready', 'retrying') AND run_id IS NOT NULL;
-- Claims: standalone jobs by queue (or any queue), highest priority, then oldest.
CREATE INDEX jobs_ready ON steps (queue, priority DESC, id)
    WHERE status IN ('ready', 'retrying') AND run_id IS NULL;
CREATE INDEX jobs_ready_any ON steps (priority DESC, id)
    WHERE status IN ('ready', 'retrying') AND run_id IS NULL;
-- Scheduled jobs (run_at in the future) wait as pending until due.
CREATE INDEX jobs_scheduled ON steps (not_before) WHERE status = 'pending' AND run_id IS NULL;
CREATE UNIQUE INDEX jobs_unique ON steps (unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX jobs_listed ON steps (id) WHERE run_id IS NULL;
-- Rescue: every running attempt, by holder.
CREATE INDEX steps_running ON steps (lease_owner) WHERE status = 'running';

CREATE TABLE workers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    queues      TEXT,
    concurrency INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX workers_by_name ON workers (name);

CREATE TABLE schedules (
    name         TEXT PRIMARY KEY,
    task         TEXT NOT NULL,
    cron         TEXT NOT NULL,
    args         TEXT NOT NULL,
    queue        TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    timeout_s    REAL,
    catch_up_s   REAL NOT NULL,
    next_at      REAL NOT NULL
);
