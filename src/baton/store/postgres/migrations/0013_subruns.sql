-- Sub-runs: a step of a run (task: plan) runs a plan as a child run. The child is found
-- again after a crash by its idempotency key; this says whose it is, so that a pause,
-- resume or cancel of the parent reaches it.
CREATE TABLE subruns (
    child_run_id  TEXT PRIMARY KEY,
    parent_run_id TEXT NOT NULL,
    step_id       TEXT NOT NULL
);
CREATE INDEX subruns_parent ON subruns (parent_run_id);
