-- Retention (`baton prune`, `baton worker --retention`): ended runs and ended standalone jobs
-- found by when they ended, expired cache entries by their expiry, and the idempotency keys
-- of a run by the run, so a batch of them is found without a scan. (The terms of the partial
-- indexes are said by the prune queries too: only a query that says them uses them. A job
-- has ended when it has finished_at and is not retrying; said so, rather than as a list of
-- three statuses, the index costs a job's finish much less.)
CREATE INDEX runs_finished ON runs (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX jobs_finished ON steps (finished_at)
    WHERE run_id IS NULL AND finished_at IS NOT NULL AND status <> 'retrying';
CREATE INDEX llm_cache_expiry ON llm_cache (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX run_requests_by_run ON run_requests (run_id);
