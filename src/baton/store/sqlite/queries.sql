-- Named queries of the SQLite store. Each block starts with "-- name: <name>".

-- name: insert_run
INSERT INTO runs (id, name, status, plan, workdir, created_at, started_at, finished_at,
                  owner, lease_expires_at, error, total_steps, step_base)
VALUES (:id, :name, :status, :plan, :workdir, :created_at, :started_at, :finished_at,
        :owner, :lease_expires_at, :error, :total_steps, :step_base);

-- name: next_step_base
SELECT COALESCE(MAX(id), 0) + 1 FROM steps;

-- name: insert_step
INSERT INTO steps (id, run_id, idx, step_id, task, wave, status)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: get_run
SELECT * FROM runs WHERE id = ?;

-- name: find_run_by_prefix
SELECT id FROM runs WHERE id LIKE ? || '%' ESCAPE '\' LIMIT 2;

-- name: list_runs
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, owner, lease_expires_at, error, total_steps
FROM runs ORDER BY created_at DESC LIMIT ?;

-- name: list_runs_by_status
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, owner, lease_expires_at, error, total_steps
FROM runs WHERE status = ? ORDER BY created_at DESC LIMIT ?;

-- name: get_run_header
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, owner, lease_expires_at, error, total_steps
FROM runs WHERE id = ?;

-- name: step_range
SELECT step_base, step_base + total_steps - 1 AS step_last FROM runs WHERE id = ?;

-- name: get_steps
SELECT * FROM steps WHERE id BETWEEN ? AND ? ORDER BY id;

-- name: get_attempts
SELECT a.*, s.run_id, s.step_id FROM attempts a JOIN steps s ON s.id = a.step
WHERE a.step BETWEEN ? AND ? ORDER BY a.finished_at, a.step, a.attempt;

-- name: take_run
UPDATE runs SET owner = :owner, lease_expires_at = :expires,
       status = 'running', started_at = COALESCE(started_at, :now)
WHERE id = :id AND status IN ('pending', 'running')
  AND (owner IS NULL OR owner = :owner OR lease_expires_at < :now OR owner = :dead);

-- name: lost_running_steps
SELECT id, attempt, started_at, lease_owner FROM steps
WHERE id BETWEEN ? AND ? AND status = 'running' AND (lease_owner IS NULL OR lease_owner != ?);

-- name: requeue_lost_step
UPDATE steps SET status = 'ready', lease_owner = NULL
WHERE id = ? AND status = 'running' AND attempt = ?;

-- name: insert_attempt
INSERT OR REPLACE INTO attempts (step, attempt, status, started_at, finished_at, error, owner, detail)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: release_run
UPDATE runs SET owner = NULL, lease_expires_at = NULL WHERE id = ? AND owner = ?;

-- name: orphan_running_steps
UPDATE steps SET lease_owner = NULL
WHERE id BETWEEN ? AND ? AND lease_owner = ? AND status = 'running';

-- name: renew_runs
UPDATE runs SET lease_expires_at = ? WHERE owner = ?;

-- name: run_control
SELECT status, owner, step_base FROM runs WHERE id = ?;

-- name: finish_step
UPDATE steps SET status = ?, output = ?, error = ?, finished_at = ?, not_before = ?,
       lease_owner = NULL
WHERE id = ? AND status = 'running' AND attempt = ? AND lease_owner = ?;

-- name: claim_step
UPDATE steps SET status = 'running', attempt = ?, lease_owner = ?,
       started_at = ?, finished_at = NULL, not_before = NULL
WHERE id = ? AND status IN ('pending', 'ready', 'retrying') AND attempt = ?;

-- name: set_run_status
UPDATE runs SET status = ?, error = COALESCE(?, error),
       finished_at = CASE WHEN ? THEN ? ELSE finished_at END
WHERE id = ? AND status IN (SELECT value FROM json_each(?));

-- name: cancel_idle_steps
UPDATE steps SET status = 'cancelled', error = 'run cancelled', finished_at = ?
WHERE id BETWEEN ? AND ? AND status IN ('pending', 'ready', 'retrying');

-- name: cancel_orphan_running_steps
UPDATE steps SET status = 'cancelled', error = 'run cancelled', finished_at = ?, lease_owner = NULL
WHERE id BETWEEN ? AND ? AND status = 'running';

-- name: orphaned_runs
SELECT id FROM runs
WHERE status = 'running' AND (owner IS NULL OR lease_expires_at < ?)
ORDER BY created_at;

-- name: mark_ready
-- Many at once (a fan-out makes thousands ready together): ids as one JSON array.
UPDATE steps SET status = 'ready'
WHERE id IN (SELECT value FROM json_each(?)) AND status = 'pending';

-- name: mark_step
UPDATE steps SET status = ?, error = COALESCE(?, error),
       finished_at = CASE WHEN ? THEN ? ELSE finished_at END
WHERE id = ? AND status IN (SELECT value FROM json_each(?));

-- name: cache_get
SELECT value FROM llm_cache WHERE key = ? AND (expires_at IS NULL OR expires_at >= ?);

-- name: cache_put
INSERT OR REPLACE INTO llm_cache (key, value, created_at, expires_at) VALUES (?, ?, ?, ?);

-- name: ledger_open
INSERT OR IGNORE INTO budget_ledger (run_id, scope) VALUES (?, ?);

-- name: ledger_get
SELECT * FROM budget_ledger WHERE run_id = ? AND scope = ?;

-- name: ledger_reserve
UPDATE budget_ledger SET reserved_tokens = reserved_tokens + ?, reserved_usd = reserved_usd + ?
WHERE run_id = ? AND scope = ?;

-- name: ledger_settle
UPDATE budget_ledger
SET reserved_tokens = MAX(0, reserved_tokens - ?), reserved_usd = MAX(0.0, reserved_usd - ?),
    spent_tokens = spent_tokens + ?, spent_usd = spent_usd + ?
WHERE run_id = ? AND scope = ?;

-- name: ledger_of_run
SELECT * FROM budget_ledger WHERE run_id = ? ORDER BY scope;
