-- Named queries of the SQLite store. Each block starts with "-- name: <name>".

-- name: insert_plan
INSERT INTO run_plans (run_id, plan) VALUES (:id, :plan);

-- name: insert_run
INSERT INTO runs (id, name, status, workdir, created_at, started_at, finished_at, error,
                  total_steps, step_base, max_parallel, barrier, run_timeout_s, queue, unfinished)
VALUES (:id, :name, :status, :workdir, :created_at, :started_at, :finished_at, :error,
        :total_steps, :step_base, :max_parallel, :barrier, :run_timeout_s, :queue, :unfinished);

-- name: next_step_base
SELECT COALESCE(MAX(id), 0) + 1 FROM steps;

-- name: insert_step
INSERT INTO steps (id, run_id, idx, step_id, task, wave, status, waiting, rank, queue, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: get_run
SELECT r.*, p.plan FROM runs r JOIN run_plans p ON p.run_id = r.id WHERE r.id = ?;

-- name: find_run_by_prefix
SELECT id FROM runs WHERE id LIKE ? || '%' ESCAPE '\' LIMIT 2;

-- name: list_runs
SELECT *, NULL AS plan FROM runs ORDER BY created_at DESC LIMIT ?;

-- name: list_runs_by_status
SELECT *, NULL AS plan FROM runs WHERE status = ? ORDER BY created_at DESC LIMIT ?;

-- name: get_run_header
SELECT *, NULL AS plan FROM runs WHERE id = ?;

-- name: run_exists
SELECT 1 FROM runs WHERE id = ?;

-- name: step_range
SELECT step_base, step_base + total_steps - 1 AS step_last FROM runs WHERE id = ?;

-- name: get_steps
-- What a StepRecord holds, and no more: a view of a run reads this often.
SELECT id, run_id, idx, step_id, task, wave, status, attempt, lease_owner, not_before, output, error,
       started_at, finished_at, waiting, rank
FROM steps WHERE id BETWEEN ? AND ? ORDER BY id;

-- name: get_attempts
-- The recorded attempts, and each plain success that lives only in its step row.
SELECT a.*, s.run_id, s.step_id FROM attempts a JOIN steps s ON s.id = a.step
WHERE a.step BETWEEN :first AND :last
UNION ALL
SELECT s.id, s.attempt, 'succeeded', s.started_at, s.finished_at, NULL, s.finished_by, NULL, s.run_id,
       s.step_id
FROM steps s
WHERE s.id BETWEEN :first AND :last AND s.status = 'succeeded'
  AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.step = s.id AND a.attempt = s.attempt)
ORDER BY 5, 1, 2;

-- name: insert_attempt
INSERT OR REPLACE INTO attempts (step, attempt, status, started_at, finished_at, error, owner, detail)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: finish_step
UPDATE steps SET status = ?, output = ?, error = ?, finished_at = ?, not_before = ?,
       finished_by = lease_owner, lease_owner = NULL
WHERE id = ? AND status = 'running' AND attempt = ? AND lease_owner = ?;

-- name: unblock_step
-- One need of the step succeeded; at 0 left, a pending step is ready (from now).
UPDATE steps SET waiting = waiting - :n,
       status = CASE WHEN status = 'pending' AND waiting <= :n THEN 'ready' ELSE status END,
       ready_at = CASE WHEN status = 'pending' AND waiting <= :n THEN :now ELSE ready_at END
WHERE id = :id;

-- name: now_ready
SELECT run_id, idx FROM steps WHERE id IN (SELECT value FROM json_each(?)) AND status = 'ready';

-- name: skip_step
UPDATE steps SET status = 'skipped', error = ?, finished_at = ? WHERE id = ? AND status = 'pending';

-- name: count_open_run
-- count_run for the common case, a run this turn does not end (no RETURNING to pay for).
UPDATE runs SET
    running = MAX(0, running - :done + :claimed),
    unfinished = unfinished - :finished,
    failed = failed + :failed
WHERE id = :id AND (unfinished > :finished OR status NOT IN ('pending', 'running', 'paused'));

-- name: count_run
-- A turn's effect on a run: steps done (slots freed), finished for good, failed, claimed.
UPDATE runs SET
    running = MAX(0, running - :done + :claimed),
    unfinished = unfinished - :finished,
    failed = failed + :failed
WHERE id = :id
RETURNING unfinished, failed, status, step_base, total_steps;

-- name: start_run
UPDATE runs SET
    status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
    started_at = :now,
    deadline = CASE WHEN run_timeout_s IS NOT NULL THEN :now + run_timeout_s END
WHERE id = :id AND started_at IS NULL;

-- name: failed_steps
SELECT step_id FROM steps WHERE id BETWEEN ? AND ? AND status = 'failed' ORDER BY id LIMIT 20;

-- name: end_run
UPDATE runs SET status = ?, error = ?, finished_at = ?
WHERE id = ? AND status IN ('pending', 'running', 'paused');

-- name: promote_scheduled
UPDATE steps SET status = 'ready'
WHERE run_id IS NULL AND status = 'pending' AND not_before <= ?;

-- name: runs_with_slots
SELECT id, step_base, step_base + total_steps - 1 AS step_last, max_parallel - running AS free,
       barrier, started_at
FROM runs INDEXED BY runs_active  -- in creation order, no sort (the planner picks runs_by_status)
WHERE status IN ('pending', 'running') AND unfinished > 0
  AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
ORDER BY created_at LIMIT 64;

-- name: ready_steps_of_run
-- (ready_at: since when the step could have started; ready_steps_of_barrier_run and
-- ready_jobs say the same.)
SELECT id, idx, task, attempt, error,
       CASE WHEN status = 'retrying' THEN COALESCE(not_before, finished_at)
            ELSE COALESCE(ready_at, not_before, created_at) END AS ready_at
FROM steps
WHERE run_id = :run AND status IN ('ready', 'retrying')
  AND (not_before IS NULL OR not_before <= :now)
  AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
ORDER BY priority DESC, rank DESC, id LIMIT :n;

-- name: ready_steps_of_barrier_run
SELECT id, idx, task, attempt, error,
       CASE WHEN status = 'retrying' THEN COALESCE(not_before, finished_at)
            ELSE COALESCE(ready_at, not_before, created_at) END AS ready_at
FROM steps
WHERE run_id = :run AND status IN ('ready', 'retrying')
  AND (not_before IS NULL OR not_before <= :now)
  AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
  AND wave <= (SELECT MIN(wave) FROM steps WHERE id BETWEEN :first AND :last
               AND status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled'))
ORDER BY priority DESC, rank DESC, id LIMIT :n;

-- name: claim_step
UPDATE steps SET status = 'running', attempt = attempt + 1, lease_owner = ?, started_at = ?,
       finished_at = NULL, not_before = NULL
WHERE id = ? AND status IN ('ready', 'retrying');

-- name: ready_jobs_of_queue
SELECT id, task, attempt, args, max_attempts + attempt_base AS max_attempts, timeout_s, error, role,
       CASE WHEN status = 'retrying' THEN COALESCE(not_before, finished_at)
            ELSE COALESCE(ready_at, not_before, created_at) END AS ready_at
FROM steps
WHERE run_id IS NULL AND queue = :queue AND status IN ('ready', 'retrying')
  AND (not_before IS NULL OR not_before <= :now)
  AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
ORDER BY priority DESC, id LIMIT :n;

-- name: ready_jobs
SELECT id, task, attempt, args, max_attempts + attempt_base AS max_attempts, timeout_s, error, role,
       CASE WHEN status = 'retrying' THEN COALESCE(not_before, finished_at)
            ELSE COALESCE(ready_at, not_before, created_at) END AS ready_at
FROM steps
WHERE run_id IS NULL AND status IN ('ready', 'retrying')
  AND (not_before IS NULL OR not_before <= :now)
  AND (:tasks IS NULL OR task IN (SELECT value FROM json_each(:tasks)))
ORDER BY priority DESC, id LIMIT :n;

-- name: set_run_status
UPDATE runs SET status = ?, error = COALESCE(?, error),
       finished_at = CASE WHEN ? THEN ? ELSE finished_at END
WHERE id = ? AND status IN (SELECT value FROM json_each(?));

-- name: cancel_idle_steps
UPDATE steps SET status = 'cancelled', error = ?, finished_at = ?
WHERE id BETWEEN ? AND ? AND status IN ('pending', 'ready', 'retrying');

-- name: uncount_run
UPDATE runs SET unfinished = unfinished - ? WHERE id = ?;

-- name: expire_run
UPDATE runs SET status = 'failed', finished_at = :now,
       error = 'run timed out after ' || run_timeout_s || 's'
WHERE id = :id AND status IN ('pending', 'running', 'paused');

-- name: overdue_runs
SELECT id FROM runs WHERE deadline < ? AND status IN ('pending', 'running', 'paused');

-- name: put_worker
INSERT OR REPLACE INTO workers (id, name, queues, concurrency, started_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?);

-- name: same_name_workers
SELECT id FROM workers WHERE name = ? AND id <> ?;

-- name: worker_live
SELECT 1 FROM workers WHERE id = ? AND expires_at >= ?;

-- name: renew_worker
UPDATE workers SET expires_at = ? WHERE id = ?;

-- name: delete_worker
DELETE FROM workers WHERE id = ?;

-- name: list_workers
SELECT w.*, (SELECT COUNT(*) FROM steps s WHERE s.status = 'running' AND s.lease_owner = w.id)
       AS running
FROM workers w ORDER BY started_at;

-- name: to_stop
-- Of the jobs a worker thinks it holds, those it must stop.
SELECT s.id FROM steps s LEFT JOIN runs r ON r.id = s.run_id
WHERE s.id IN (SELECT value FROM json_each(:held))
  AND (s.status <> 'running' OR s.lease_owner IS NOT :owner OR s.cancel_requested = 1
       OR r.status IN ('cancelled', 'failed', 'completed'));

-- name: orphaned_steps
-- Running attempts whose holder is not a live worker.
SELECT s.id, s.run_id, s.attempt, s.started_at, s.lease_owner, s.cancel_requested,
       r.status AS run_status
FROM steps s LEFT JOIN runs r ON r.id = s.run_id
WHERE s.status = 'running'
  AND (s.lease_owner IS NULL OR s.lease_owner IN (SELECT value FROM json_each(:dead))
       OR s.lease_owner NOT IN (SELECT id FROM workers WHERE expires_at >= :now));

-- name: expired_workers
SELECT id FROM workers WHERE expires_at < ?;

-- name: held_by
SELECT s.id, s.run_id, s.attempt, s.started_at, s.lease_owner, s.cancel_requested,
       r.status AS run_status
FROM steps s LEFT JOIN runs r ON r.id = s.run_id
WHERE s.status = 'running' AND s.lease_owner = ?;

-- name: requeue_step
-- Back to the queue: lost (counted, the attempt is recorded) or released (not counted).
UPDATE steps SET status = :status, lease_owner = NULL, attempt = attempt - :released,
       started_at = NULL, error = COALESCE(:error, error),
       finished_at = CASE WHEN :status = 'cancelled' THEN :now END, ready_at = :now
WHERE id = :id AND status = 'running';

-- name: outputs
SELECT idx, output FROM steps WHERE id IN (SELECT value FROM json_each(?)) AND status = 'succeeded';

-- name: attempt_detail
SELECT detail FROM attempts WHERE step = ? AND attempt = ?;

-- name: insert_job
INSERT INTO steps (run_id, idx, step_id, task, status, queue, priority, args, max_attempts,
                   timeout_s, unique_key, not_before, created_at, role)
VALUES (NULL, 0, :task, :task, :status, :queue, :priority, :args, :max_attempts, :timeout_s,
        :unique_key, :run_at, :now, :role)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING;

-- name: job_by_key
SELECT * FROM steps WHERE unique_key = ? AND run_id IS NULL;

-- name: get_job
SELECT * FROM steps WHERE id = ? AND run_id IS NULL;

-- name: list_jobs
SELECT * FROM steps
WHERE run_id IS NULL AND (:queue IS NULL OR queue = :queue)
  AND (:statuses IS NULL OR status IN (SELECT value FROM json_each(:statuses)))
ORDER BY id DESC LIMIT :limit;

-- name: job_attempts
SELECT a.*, s.run_id, s.step_id FROM attempts a JOIN steps s ON s.id = a.step
WHERE a.step = :id
UNION ALL
SELECT s.id, s.attempt, 'succeeded', s.started_at, s.finished_at, NULL, s.finished_by, NULL, s.run_id,
       s.step_id
FROM steps s
WHERE s.id = :id AND s.status = 'succeeded'
  AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.step = s.id AND a.attempt = s.attempt)
ORDER BY 2;

-- name: retry_job
UPDATE steps SET status = 'ready', not_before = NULL, finished_at = NULL, cancel_requested = 0,
       attempt_base = attempt, ready_at = ?
WHERE id = ? AND run_id IS NULL AND status IN ('failed', 'cancelled');

-- name: cancel_idle_job
UPDATE steps SET status = 'cancelled', error = 'cancelled by request', finished_at = ?
WHERE id = ? AND run_id IS NULL AND status IN ('pending', 'ready', 'retrying');

-- name: cancel_running_job
UPDATE steps SET cancel_requested = 1 WHERE id = ? AND run_id IS NULL AND status = 'running';

-- name: put_schedule
INSERT INTO schedules (name, task, cron, args, queue, priority, max_attempts, timeout_s,
                       catch_up_s, next_at)
VALUES (:name, :task, :cron, :args, :queue, :priority, :max_attempts, :timeout_s, :catch_up_s,
        :next_at)
ON CONFLICT (name) DO UPDATE SET
    task = excluded.task, args = excluded.args, queue = excluded.queue,
    priority = excluded.priority, max_attempts = excluded.max_attempts,
    timeout_s = excluded.timeout_s, catch_up_s = excluded.catch_up_s,
    next_at = CASE WHEN schedules.cron = excluded.cron THEN schedules.next_at
                   ELSE excluded.next_at END,
    cron = excluded.cron;

-- name: list_schedules
SELECT * FROM schedules ORDER BY name;

-- name: delete_schedule
DELETE FROM schedules WHERE name = ?;

-- name: move_schedule
UPDATE schedules SET next_at = ? WHERE name = ? AND next_at = ?;

-- name: cache_get
SELECT value FROM llm_cache WHERE key = ? AND (expires_at IS NULL OR expires_at >= ?);

-- name: llm_sources
-- (newest first by the attempts' primary key: no scan of the rest)
SELECT json_extract(a.detail, '$.source') AS source
FROM attempts a JOIN steps s ON s.id = a.step
WHERE s.task = 'llm.generate' AND a.detail IS NOT NULL
ORDER BY a.step DESC, a.attempt DESC LIMIT :limit;

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

-- name: run_request
SELECT fingerprint, run_id FROM run_requests WHERE key = ?;

-- name: put_run_request
INSERT INTO run_requests (key, fingerprint, run_id, created_at) VALUES (?, ?, ?, ?);

-- name: put_api_key
INSERT INTO api_keys (id, secret_hash, role, name, created_at) VALUES (?, ?, ?, ?, ?);

-- name: api_key_by_hash
SELECT * FROM api_keys WHERE secret_hash = ? AND revoked_at IS NULL;

-- name: list_api_keys
SELECT * FROM api_keys ORDER BY created_at, id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL;

-- name: audit_last_hash
SELECT hash FROM audit ORDER BY seq DESC LIMIT 1;

-- name: audit_insert
INSERT INTO audit (ts, actor, action, subject, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: audit_count
SELECT COUNT(*) FROM audit;

-- name: audit_newest
SELECT * FROM audit ORDER BY seq DESC LIMIT 1;

-- name: audit_entries
SELECT * FROM audit WHERE seq > :after AND (:subject IS NULL OR subject = :subject)
ORDER BY seq LIMIT :limit;

-- name: wave_progress
SELECT s.run_id, s.wave, COUNT(*) AS steps,
       SUM(s.status IN ('succeeded', 'failed', 'skipped', 'cancelled')) AS finished
FROM runs r JOIN steps s ON s.id BETWEEN r.step_base AND r.step_base + r.total_steps - 1
WHERE r.status IN ('running', 'paused')
GROUP BY s.run_id, s.wave
ORDER BY s.run_id, s.wave;

-- name: queue_depth
SELECT queue, status, COUNT(*) AS n FROM steps
WHERE status IN ('ready', 'retrying', 'running') OR (status = 'pending' AND run_id IS NULL)
GROUP BY queue, status;

-- retention --------------------------------------------------------------------------------
-- `baton prune` and a worker's --retention. Only ended runs and jobs, found by when they
-- ended: the literal terms are those of the partial indexes of 0010 (so the planner may use
-- them); :runs and :jobs (JSON lists) narrow them to what was asked. Deletes return the size
-- of the text each row held (its bytes).

-- name: prune_pick_runs
-- The oldest ended runs, nothing of them running, that ended before the cutoff.
SELECT id, step_base AS first, step_base + total_steps - 1 AS last, total_steps
FROM runs INDEXED BY runs_finished
WHERE status IN ('completed', 'failed', 'cancelled')
  AND status IN (SELECT value FROM json_each(:runs))
  AND finished_at < :before AND running = 0
ORDER BY finished_at LIMIT :limit;

-- name: prune_run
DELETE FROM runs WHERE id = :id AND status IN ('completed', 'failed', 'cancelled') AND running = 0
RETURNING id;

-- name: prune_run_steps
DELETE FROM steps WHERE id BETWEEN :first AND :last
RETURNING IFNULL(length(CAST(output AS BLOB)), 0) + IFNULL(length(CAST(error AS BLOB)), 0)
          + IFNULL(length(CAST(args AS BLOB)), 0) AS size;

-- name: prune_run_attempts
DELETE FROM attempts WHERE step BETWEEN :first AND :last
RETURNING IFNULL(length(CAST(error AS BLOB)), 0) + IFNULL(length(CAST(detail AS BLOB)), 0) AS size;

-- name: prune_run_plan
DELETE FROM run_plans WHERE run_id = :id RETURNING length(CAST(plan AS BLOB)) AS size;

-- name: prune_run_ledger
DELETE FROM budget_ledger WHERE run_id = :id;

-- name: prune_run_requests
DELETE FROM run_requests WHERE run_id = :id;

-- name: prune_jobs
-- The oldest standalone jobs that ended (completed, discarded, cancelled) before the cutoff.
DELETE FROM steps WHERE id IN (
    SELECT id FROM steps INDEXED BY jobs_finished
    WHERE run_id IS NULL AND finished_at IS NOT NULL AND status <> 'retrying'
      AND status IN ('succeeded', 'failed', 'cancelled')
      AND status IN (SELECT value FROM json_each(:jobs)) AND finished_at < :before
    ORDER BY finished_at LIMIT :limit)
RETURNING id, IFNULL(length(CAST(output AS BLOB)), 0) + IFNULL(length(CAST(error AS BLOB)), 0)
              + IFNULL(length(CAST(args AS BLOB)), 0) AS size;

-- name: prune_job_attempts
DELETE FROM attempts WHERE step IN (SELECT value FROM json_each(:ids))
RETURNING IFNULL(length(CAST(error AS BLOB)), 0) + IFNULL(length(CAST(detail AS BLOB)), 0) AS size;

-- name: prune_cache
DELETE FROM llm_cache WHERE key IN (
    SELECT key FROM llm_cache INDEXED BY llm_cache_expiry
    WHERE expires_at IS NOT NULL AND expires_at < :before LIMIT :limit)
RETURNING length(CAST(value AS BLOB)) AS size;

-- name: prune_count
-- What prune would remove, all of it (a dry run), as one row of counts.
WITH due_runs AS MATERIALIZED (
    SELECT id, step_base AS first, step_base + total_steps - 1 AS last
    FROM runs INDEXED BY runs_finished
    WHERE status IN ('completed', 'failed', 'cancelled')
      AND status IN (SELECT value FROM json_each(:runs))
      AND finished_at < :before AND running = 0
), due_steps AS MATERIALIZED (
    SELECT IFNULL(length(CAST(s.output AS BLOB)), 0) + IFNULL(length(CAST(s.error AS BLOB)), 0) AS size
    FROM due_runs r JOIN steps s ON s.id BETWEEN r.first AND r.last
), due_jobs AS MATERIALIZED (
    SELECT id, IFNULL(length(CAST(output AS BLOB)), 0) + IFNULL(length(CAST(error AS BLOB)), 0)
               + IFNULL(length(CAST(args AS BLOB)), 0) AS size
    FROM steps INDEXED BY jobs_finished
    WHERE run_id IS NULL AND finished_at IS NOT NULL AND status <> 'retrying'
      AND status IN ('succeeded', 'failed', 'cancelled')
      AND status IN (SELECT value FROM json_each(:jobs)) AND finished_at < :before
), due_attempts AS MATERIALIZED (
    SELECT IFNULL(length(CAST(a.error AS BLOB)), 0) + IFNULL(length(CAST(a.detail AS BLOB)), 0) AS size
    FROM due_runs r JOIN attempts a ON a.step BETWEEN r.first AND r.last
    UNION ALL
    SELECT IFNULL(length(CAST(error AS BLOB)), 0) + IFNULL(length(CAST(detail AS BLOB)), 0)
    FROM attempts WHERE step IN (SELECT id FROM due_jobs)
), due_cache AS MATERIALIZED (
    SELECT length(CAST(value AS BLOB)) AS size FROM llm_cache INDEXED BY llm_cache_expiry
    WHERE expires_at IS NOT NULL AND expires_at < :before
)
SELECT (SELECT COUNT(*) FROM due_runs) AS runs,
       (SELECT COUNT(*) FROM due_steps) AS steps,
       (SELECT COUNT(*) FROM due_jobs) AS jobs,
       (SELECT COUNT(*) FROM due_attempts) AS attempts,
       (SELECT COUNT(*) FROM due_cache) AS cache,
       (SELECT IFNULL(SUM(length(CAST(p.plan AS BLOB))), 0) FROM due_runs r JOIN run_plans p ON p.run_id = r.id)
       + (SELECT IFNULL(SUM(size), 0) FROM due_steps) + (SELECT IFNULL(SUM(size), 0) FROM due_jobs)
       + (SELECT IFNULL(SUM(size), 0) FROM due_attempts) + (SELECT IFNULL(SUM(size), 0) FROM due_cache)
       AS bytes;

-- name: vacuum
-- (reclaim: the space of deleted rows back to the file system)
VACUUM;

-- name: checkpoint
PRAGMA wal_checkpoint(TRUNCATE);

-- goals and their outcomes (baton.agents) -------------------------------------------------

-- name: insert_goal
INSERT INTO goals (run_id, text, request, task_type, language, complexity, method, confidence,
                   template_id, selection, created_at)
VALUES (:run_id, :text, :request, :task_type, :language, :complexity, :method, :confidence,
        :template_id, :selection, :created_at);

-- name: get_goal
SELECT * FROM goals WHERE run_id = :run_id;

-- name: goal_done_before
SELECT g.* FROM goals g JOIN runs r ON r.id = g.run_id
WHERE g.request = :request AND r.status = 'completed'
ORDER BY g.created_at DESC LIMIT 1;

-- name: list_goals
SELECT * FROM goals ORDER BY created_at DESC, run_id DESC LIMIT :limit;

-- name: pending_goals
SELECT g.* FROM goals g JOIN runs r ON r.id = g.run_id
WHERE g.collected_at IS NULL AND r.status IN ('completed', 'failed', 'cancelled')
ORDER BY g.created_at LIMIT :limit;

-- name: collect_goal
UPDATE goals SET collected_at = :now WHERE run_id = :run_id AND collected_at IS NULL;

-- name: insert_outcome
INSERT INTO outcomes (run_id, step_id, template_id, task_type, language, success, quality, time_s,
                      cost_usd, method, recorded_at)
VALUES (:run_id, :step_id, :template_id, :task_type, :language, :success, :quality, :time_s,
        :cost_usd, :method, :recorded_at);

-- name: outcomes
SELECT * FROM (
    SELECT * FROM outcomes WHERE :task_type IS NULL OR task_type = :task_type
    ORDER BY recorded_at DESC, run_id DESC, step_id DESC LIMIT :limit
) ORDER BY recorded_at, run_id, step_id;

-- sub-runs ------------------------------------------------------------------------------

-- name: insert_subrun
INSERT INTO subruns (child_run_id, parent_run_id, step_id) VALUES (:child, :parent, :step_id);

-- name: child_runs
SELECT s.child_run_id AS id, s.step_id, r.status FROM subruns s JOIN runs r ON r.id = s.child_run_id
WHERE s.parent_run_id = :parent ORDER BY s.child_run_id;
