-- Named queries of the PostgreSQL store. Each block starts with "-- name: <name>".
-- Batches go in as arrays (unnest) so one statement applies a whole executor turn, and
-- guarded updates say through RETURNING which rows they applied to.

-- name: migration_lock
SELECT pg_advisory_xact_lock(hashtext('baton:migrations:' || current_schema()));

-- name: create_version_table
CREATE TABLE IF NOT EXISTS baton_schema_version (version INTEGER NOT NULL);

-- name: schema_version
SELECT COALESCE(MAX(version), 0) AS version FROM baton_schema_version;

-- name: record_version
INSERT INTO baton_schema_version (version) VALUES (%(version)s);

-- name: insert_run
INSERT INTO runs (id, name, status, plan, workdir, created_at, started_at, finished_at,
                  owner, lease_expires_at, error, total_steps)
VALUES (%(id)s, %(name)s, %(status)s, %(plan)s, %(workdir)s, %(created_at)s, %(started_at)s,
        %(finished_at)s, %(owner)s, %(lease_expires_at)s, %(error)s, %(total_steps)s);

-- name: copy_steps
COPY steps (run_id, idx, step_id, task, wave, status) FROM STDIN;

-- name: run_exists
SELECT 1 FROM runs WHERE id = %(id)s;

-- name: find_run_by_prefix
SELECT id FROM runs WHERE starts_with(id, %(prefix)s) LIMIT 2;

-- name: get_run
SELECT * FROM runs WHERE id = %(id)s;

-- name: get_run_header
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, owner,
       lease_expires_at, error, total_steps
FROM runs WHERE id = %(id)s;

-- name: list_runs
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, owner,
       lease_expires_at, error, total_steps
FROM runs WHERE %(status)s::text IS NULL OR status = %(status)s
ORDER BY created_at DESC LIMIT %(limit)s;

-- name: get_steps
SELECT * FROM steps WHERE run_id = %(id)s ORDER BY idx;

-- name: get_attempts
SELECT a.*, s.step_id FROM attempts a JOIN steps s ON s.run_id = a.run_id AND s.idx = a.idx
WHERE a.run_id = %(id)s ORDER BY a.finished_at, a.idx, a.attempt;

-- name: take_run
UPDATE runs SET owner = %(owner)s, lease_expires_at = %(expires)s,
       status = 'running', started_at = COALESCE(started_at, %(now)s)
WHERE id = %(id)s AND status IN ('pending', 'running')
  AND (owner IS NULL OR owner = %(owner)s OR lease_expires_at < %(now)s
       OR owner = %(dead)s::text)
RETURNING id;

-- name: requeue_lost_steps
WITH lost AS (
    SELECT idx, attempt, started_at, lease_owner FROM steps
    WHERE run_id = %(id)s AND status = 'running'
      AND (lease_owner IS NULL OR lease_owner <> %(owner)s)
    FOR UPDATE
), requeued AS (
    UPDATE steps s SET status = 'ready', lease_owner = NULL
    FROM lost WHERE s.run_id = %(id)s AND s.idx = lost.idx
)
INSERT INTO attempts (run_id, idx, attempt, status, started_at, finished_at, error, owner)
SELECT %(id)s, idx, attempt, 'lost', started_at, %(now)s,
       'lost: its worker stopped or its lease expired', lease_owner
FROM lost
ON CONFLICT (run_id, idx, attempt) DO UPDATE
SET status = excluded.status, finished_at = excluded.finished_at, error = excluded.error;

-- name: release_run
UPDATE runs SET owner = NULL, lease_expires_at = NULL WHERE id = %(id)s AND owner = %(owner)s;

-- name: orphan_running_steps
UPDATE steps SET lease_owner = NULL
WHERE run_id = %(id)s AND lease_owner = %(owner)s AND status = 'running';

-- name: renew_runs
UPDATE runs SET lease_expires_at = %(expires)s WHERE owner = %(owner)s;

-- name: runs_control
SELECT id, status, owner FROM runs WHERE id = ANY(%(ids)s);

-- name: lock_run
SELECT status, owner, lease_expires_at FROM runs WHERE id = %(id)s FOR UPDATE;

-- name: finish_steps
UPDATE steps s
SET status = u.status, output = u.output, error = u.error, finished_at = u.finished_at,
    not_before = u.not_before, lease_owner = NULL
FROM unnest(%(idx)s::int[], %(attempt)s::int[], %(status)s::text[], %(output)s::text[],
            %(error)s::text[], %(finished_at)s::float8[], %(not_before)s::float8[])
     AS u (idx, attempt, status, output, error, finished_at, not_before)
WHERE s.run_id = %(id)s AND s.idx = u.idx AND s.status = 'running' AND s.attempt = u.attempt
  AND s.lease_owner = %(owner)s
RETURNING s.idx;

-- name: insert_attempts
INSERT INTO attempts (run_id, idx, attempt, status, started_at, finished_at, error, owner, detail)
SELECT %(id)s, u.idx, u.attempt, u.status, u.started_at, u.finished_at, u.error, %(owner)s, u.detail
FROM unnest(%(idx)s::int[], %(attempt)s::int[], %(status)s::text[], %(started_at)s::float8[],
            %(finished_at)s::float8[], %(error)s::text[], %(detail)s::text[])
     AS u (idx, attempt, status, started_at, finished_at, error, detail)
ON CONFLICT (run_id, idx, attempt) DO UPDATE
SET status = excluded.status, finished_at = excluded.finished_at, error = excluded.error,
    detail = excluded.detail;

-- name: mark_steps
UPDATE steps s
SET status = %(status)s, error = COALESCE(u.error, s.error),
    finished_at = CASE WHEN %(terminal)s THEN %(now)s ELSE s.finished_at END
FROM unnest(%(idx)s::int[], %(error)s::text[]) AS u (idx, error)
WHERE s.run_id = %(id)s AND s.idx = u.idx AND s.status = ANY(%(sources)s);

-- name: claim_steps
UPDATE steps s
SET status = 'running', attempt = u.attempt, lease_owner = %(owner)s, started_at = u.started_at,
    finished_at = NULL, not_before = NULL
FROM unnest(%(idx)s::int[], %(attempt)s::int[], %(started_at)s::float8[])
     AS u (idx, attempt, started_at)
WHERE s.run_id = %(id)s AND s.idx = u.idx AND s.status IN ('pending', 'ready', 'retrying')
  AND s.attempt = u.attempt - 1
RETURNING s.idx;

-- name: set_run_status
UPDATE runs SET status = %(status)s, error = COALESCE(%(error)s, error),
       finished_at = CASE WHEN %(terminal)s THEN %(now)s ELSE finished_at END
WHERE id = %(id)s AND status = ANY(%(sources)s)
RETURNING id;

-- name: cancel_idle_steps
UPDATE steps SET status = 'cancelled', error = 'run cancelled', finished_at = %(now)s
WHERE run_id = %(id)s AND status IN ('pending', 'ready', 'retrying');

-- name: cancel_orphan_running_steps
UPDATE steps SET status = 'cancelled', error = 'run cancelled', finished_at = %(now)s,
       lease_owner = NULL
WHERE run_id = %(id)s AND status = 'running';

-- name: orphaned_runs
SELECT id FROM runs
WHERE status = 'running' AND (owner IS NULL OR lease_expires_at < %(now)s)
ORDER BY created_at;

-- name: cache_get
SELECT value FROM llm_cache WHERE key = %(key)s AND (expires_at IS NULL OR expires_at >= %(now)s);

-- name: cache_put
INSERT INTO llm_cache (key, value, created_at, expires_at)
VALUES (%(key)s, %(value)s, %(now)s, %(expires_at)s)
ON CONFLICT (key) DO UPDATE
SET value = excluded.value, created_at = excluded.created_at, expires_at = excluded.expires_at;

-- name: ledger_open
INSERT INTO budget_ledger (run_id, scope) VALUES (%(run_id)s, %(scope)s) ON CONFLICT DO NOTHING;

-- name: ledger_get
SELECT * FROM budget_ledger WHERE run_id = %(run_id)s AND scope = %(scope)s FOR UPDATE;

-- name: ledger_reserve
UPDATE budget_ledger SET reserved_tokens = reserved_tokens + %(tokens)s, reserved_usd = reserved_usd + %(usd)s
WHERE run_id = %(run_id)s AND scope = %(scope)s;

-- name: ledger_settle
UPDATE budget_ledger
SET reserved_tokens = GREATEST(0, reserved_tokens - %(reserved_tokens)s),
    reserved_usd = GREATEST(0.0, reserved_usd - %(reserved_usd)s),
    spent_tokens = spent_tokens + %(tokens)s, spent_usd = spent_usd + %(usd)s
WHERE run_id = %(run_id)s AND scope = %(scope)s;

-- name: ledger_of_run
SELECT * FROM budget_ledger WHERE run_id = %(run_id)s ORDER BY scope;
