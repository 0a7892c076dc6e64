-- Goals (baton.agents): the run that carries each out, how its task was read and the
-- template chosen, with the draw that chose it (recovery never draws again); and the
-- outcome of each of its sub-tasks, recorded exactly once (the goal's collected_at is set
-- in the same transaction), which template selection learns from. Outcomes outlive the
-- runs a prune deletes: they are the learning.
CREATE TABLE goals (
    run_id       TEXT PRIMARY KEY,
    text         TEXT NOT NULL,
    -- the request's fingerprint (text, language, complexity, context): a repeat finds it
    request      TEXT NOT NULL,
    task_type    TEXT NOT NULL,
    language     TEXT,
    complexity   TEXT,
    method       TEXT NOT NULL,
    confidence   REAL NOT NULL,
    template_id  TEXT NOT NULL,
    selection    TEXT NOT NULL,
    created_at   REAL NOT NULL,
    collected_at REAL
);
CREATE INDEX goals_request ON goals (request, created_at);
CREATE INDEX goals_uncollected ON goals (created_at) WHERE collected_at IS NULL;
CREATE TABLE outcomes (
    run_id      TEXT NOT NULL,
    step_id     TEXT NOT NULL,
    template_id TEXT NOT NULL,
    task_type   TEXT NOT NULL,
    language    TEXT,
    success     INTEGER NOT NULL,
    quality     REAL NOT NULL,
    time_s      REAL NOT NULL,
    cost_usd    REAL NOT NULL,
    method      TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (run_id, step_id)
);
CREATE INDEX outcomes_by_type ON outcomes (task_type, recorded_at);
CREATE INDEX outcomes_by_time ON outcomes (recorded_at);
