-- Named queries of the PostgreSQL store. Each block starts with "-- name: <name>".
-- Batches go in as arrays (unnest) or a JSON object keyed by job id, so one statement
-- applies a whole worker turn, and guarded updates say through RETURNING which rows they
-- applied to.
--
-- Locking discipline (no deadlocks, no waits in claims): whoever changes a step of a run
-- holds that run's row lock first (finishes, sweeps and control lock runs FOR UPDATE in id
-- order; claims lock runs FOR UPDATE SKIP LOCKED and so never wait). Standalone jobs have no
-- run: claims take them FOR UPDATE SKIP LOCKED, everything else locks them in id order.

-- name: migration_lock
SELECT pg_advisory_xact_lock(hashtext('baton:migrations:' || current_schema()));

-- name: create_version_table
CREATE TABLE IF NOT EXISTS baton_schema_version (version INTEGER NOT NULL);

-- name: schema_version
SELECT COALESCE(MAX(version), 0) AS version FROM baton_schema_version;

-- name: record_version
INSERT INTO baton_schema_version (version) VALUES (%(version)s);

-- name: notify
SELECT pg_notify(%(channel)s, '');

-- runs ----------------------------------------------------------------------------------

-- name: insert_run
INSERT INTO runs (id, name, status, plan, workdir, created_at, started_at, finished_at, error,
                  total_steps, max_parallel, barrier, run_timeout_s, queue, unfinished)
VALUES (%(id)s, %(name)s, %(status)s, %(plan)s, %(workdir)s, %(created_at)s, %(started_at)s,
        %(finished_at)s, %(error)s, %(total_steps)s, %(max_parallel)s, %(barrier)s,
        %(run_timeout_s)s, %(queue)s, %(unfinished)s);

-- name: insert_steps
INSERT INTO steps (run_id, idx, step_id, task, wave, status, waiting, rank, queue, created_at)
SELECT %(run_id)s, u.idx, u.step_id, u.task, u.wave, u.status, u.waiting, u.rank, %(queue)s,
       %(now)s
FROM unnest(%(idx)s::int[], %(step_id)s::text[], %(task)s::text[], %(wave)s::int[],
            %(status)s::text[], %(waiting)s::int[], %(rank)s::float8[])
     AS u (idx, step_id, task, wave, status, waiting, rank)
ORDER BY u.idx
RETURNING id, idx;

-- An idempotency key is claimed in the transaction that inserts the run. A concurrent claim
-- of the same key waits for that transaction: when it commits, this inserts nothing (and
-- run_request, a statement of its own with a newer snapshot, reads the committed row); when
-- it rolls back, this inserts.
-- name: put_run_request
INSERT INTO run_requests (key, fingerprint, run_id, created_at)
VALUES (%(key)s, %(fingerprint)s, %(run_id)s, %(now)s)
ON CONFLICT (key) DO NOTHING
RETURNING run_id;

-- name: run_request
SELECT fingerprint, run_id FROM run_requests WHERE key = %(key)s;

-- name: run_exists
SELECT 1 FROM runs WHERE id = %(id)s;

-- name: find_run_by_prefix
SELECT id FROM runs WHERE starts_with(id, %(prefix)s) LIMIT 2;

-- name: get_run
SELECT * FROM runs WHERE id = %(id)s;

-- name: get_run_header
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, error,
       total_steps, max_parallel, barrier, run_timeout_s, deadline, queue, running, unfinished,
       failed
FROM runs WHERE id = %(id)s;

-- name: list_runs
SELECT id, name, status, NULL AS plan, workdir, created_at, started_at, finished_at, error,
       total_steps, max_parallel, barrier, run_timeout_s, deadline, queue, running, unfinished,
       failed
FROM runs WHERE %(status)s::text IS NULL OR status = %(status)s
ORDER BY created_at DESC LIMIT %(limit)s;

-- name: get_steps
SELECT * FROM steps WHERE run_id = %(id)s ORDER BY idx;

-- name: get_attempts
-- The recorded attempts, and each plain success that lives only in its step row.
SELECT a.step, a.attempt, a.status, a.started_at, a.finished_at, a.error, a.owner, a.detail,
       s.run_id, s.step_id, s.idx
FROM attempts a JOIN steps s ON s.id = a.step
WHERE s.run_id = %(id)s
UNION ALL
SELECT s.id, s.attempt, 'succeeded', s.started_at, s.finished_at, NULL, s.finished_by, NULL,
       s.run_id, s.step_id, s.idx
FROM steps s
WHERE s.run_id = %(id)s AND s.status = 'succeeded'
  AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.step = s.id AND a.attempt = s.attempt)
ORDER BY finished_at, idx, attempt;

-- name: outputs
SELECT idx, output FROM steps
WHERE run_id = %(id)s AND idx = ANY(%(idxs)s::int[]) AND status = 'succeeded';

-- name: attempt_detail
SELECT detail FROM attempts WHERE step = %(id)s AND attempt = %(attempt)s;

-- the turn: finishes ---------------------------------------------------------------------

-- name: lock_runs
-- The runs a turn's finishes touch, locked in id order (the caller sorts the ids).
SELECT id FROM runs WHERE id = ANY(%(ids)s::text[]) ORDER BY id FOR UPDATE;

-- A turn is assembled from the fragments below: "<part>_ctes" are WITH-list entries and
-- "<part>_rows" their share of one result set, (kind, id, run_id, idx, task, attempt, args,
-- max_attempts, timeout_s, error, status, k1, k2, k3, queue), where kind is a(pplied
-- finish), e(nded run), c(laimed job), n(otified) or l(ost: the worker's lease lapsed).

-- name: finish_jobs_ctes
-- Finished attempts of standalone jobs: fenced by holder and attempt, recorded. `done` is a
-- JSON object: job id -> {a: attempt, s: status, o: outcome, out: output, e: error,
-- sa: started_at, fa: finished_at, nb: not_before, dt: detail, r: run id, sr: skip reason}.
-- (Looked up by key rather than joined: a join of the batch with `steps` is at the mercy of
-- row estimates, and a nested loop over the batch per row costs batch size squared.)
fin AS (
    UPDATE steps s
    SET status = %(done)s::jsonb -> s.id::text ->> 's',
        output = %(done)s::jsonb -> s.id::text ->> 'out',
        error = %(done)s::jsonb -> s.id::text ->> 'e',
        finished_at = (%(done)s::jsonb -> s.id::text ->> 'fa')::float8,
        not_before = (%(done)s::jsonb -> s.id::text ->> 'nb')::float8,
        finished_by = s.lease_owner,
        lease_owner = NULL
    WHERE s.id = ANY(%(done_ids)s::bigint[]) AND s.status = 'running'
      AND s.lease_owner = %(owner)s
      AND s.attempt = (%(done)s::jsonb -> s.id::text ->> 'a')::int
      AND s.run_id IS NOT DISTINCT FROM %(done)s::jsonb -> s.id::text ->> 'r'
    RETURNING s.id, s.run_id, s.status, s.attempt
), recorded AS (
    INSERT INTO attempts (step, attempt, status, started_at, finished_at, error, owner, detail)
    SELECT fin.id, fin.attempt, v.d ->> 'o', (v.d ->> 'sa')::float8, (v.d ->> 'fa')::float8,
           v.d ->> 'e', %(owner)s, v.d ->> 'dt'
    FROM fin, LATERAL (SELECT %(done)s::jsonb -> fin.id::text AS d) v
    -- (a plain success is on record in its step row: see get_attempts)
    WHERE fin.status <> 'succeeded' OR v.d ->> 'dt' IS NOT NULL
    ON CONFLICT (step, attempt) DO UPDATE
    SET status = excluded.status, started_at = excluded.started_at,
        finished_at = excluded.finished_at, error = excluded.error, owner = excluded.owner,
        detail = excluded.detail
)

-- name: finish_jobs_rows
SELECT 'a' AS kind, id, NULL::text AS run_id, 0 AS idx, NULL::text AS task, 0 AS attempt,
       NULL::text AS args, 0 AS max_attempts, NULL::float8 AS timeout_s, NULL::text AS error,
       NULL::text AS status, NULL::float8 AS k1, NULL::float8 AS k2, NULL::int AS k3,
       NULL::text AS queue, NULL::float8 AS ready_at, NULL::text AS role
FROM fin

-- name: finish_steps_ctes
-- What finished steps (finish_jobs_ctes, which handles steps of runs too) do to their runs:
-- dependents unblocked (ready at 0 needs left) or skipped, and the runs' counters. The runs
-- are locked already (lock_runs, an earlier statement of the same transaction), so this
-- statement's snapshot is the truth about their steps.
deps AS (
    -- per dependent: how many of its needs succeeded now, and whether one did not
    SELECT x.run_id, x.idx,
           COUNT(*) FILTER (WHERE NOT x.skip) AS unblocked,
           BOOL_OR(x.skip) AS skip,
           (ARRAY_AGG(COALESCE(%(done)s::jsonb -> x.done::text ->> 'sr',
                               'a step it needs did not succeed') ORDER BY x.ord)
               FILTER (WHERE x.skip))[1] AS reason
    FROM unnest(%(dep_of)s::bigint[], %(dep_run)s::text[], %(dep_idx)s::int[],
                %(dep_skip)s::bool[]) WITH ORDINALITY AS x (done, run_id, idx, skip, ord)
    WHERE x.done = ANY(ARRAY(SELECT id FROM fin))
    GROUP BY x.run_id, x.idx
), marked AS (
    UPDATE steps s
    SET waiting = s.waiting - deps.unblocked,
        status = CASE WHEN s.status <> 'pending' THEN s.status
                      WHEN deps.skip THEN 'skipped'
                      WHEN s.waiting <= deps.unblocked THEN 'ready'
                      ELSE s.status END,
        error = CASE WHEN s.status = 'pending' AND deps.skip THEN deps.reason ELSE s.error END,
        finished_at = CASE WHEN s.status = 'pending' AND deps.skip THEN %(now)s
                           ELSE s.finished_at END,
        ready_at = CASE WHEN s.status = 'pending' AND NOT deps.skip
                             AND s.waiting <= deps.unblocked THEN %(now)s
                        ELSE s.ready_at END
    FROM deps JOIN steps was ON was.run_id = deps.run_id AND was.idx = deps.idx
    WHERE s.id = was.id AND (deps.unblocked > 0 OR (deps.skip AND s.status = 'pending'))
    RETURNING s.run_id, s.idx, s.status, was.status AS was
), counts AS (
    SELECT run_id, SUM(running) AS running, SUM(finished) AS finished, SUM(failed) AS failed
    FROM (
        SELECT run_id, 1 AS running,
               CASE WHEN status IN ('succeeded', 'failed', 'cancelled', 'skipped') THEN 1
                    ELSE 0 END AS finished,
               CASE WHEN status = 'failed' THEN 1 ELSE 0 END AS failed
        FROM fin WHERE run_id IS NOT NULL
        UNION ALL
        SELECT run_id, 0, 1, 0 FROM marked WHERE status = 'skipped' AND was = 'pending'
    ) c
    GROUP BY run_id
), counted AS (
    UPDATE runs r
    SET running = GREATEST(0, r.running - c.running), unfinished = r.unfinished - c.finished,
        failed = r.failed + c.failed
    FROM counts c WHERE r.id = c.run_id
), finish_notified AS (
    -- A turn that claims nothing leaves what it made ready (or the slots it freed) to others.
    SELECT pg_notify(%(channel)s, '') FROM (
        SELECT 1 WHERE %(claimless)s AND (
            EXISTS (SELECT 1 FROM marked WHERE status = 'ready' AND was = 'pending')
            OR EXISTS (SELECT 1 FROM fin WHERE run_id IS NOT NULL))
    ) x
)

-- name: finish_steps_rows
SELECT 'a' AS kind, id, NULL::text AS run_id, 0 AS idx, NULL::text AS status FROM fin
UNION ALL
SELECT 'm', 0, run_id, idx, status FROM marked
WHERE was = 'pending' AND (status = 'skipped' OR (status = 'ready' AND %(report)s))
UNION ALL
SELECT 'n', 0, NULL, 0, NULL FROM finish_notified

-- name: end_runs_ctes
-- Runs with nothing left unfinished end: failed if a step failed, completed otherwise.
ended AS (
    UPDATE runs r
    SET status = CASE WHEN r.failed > 0 THEN 'failed' ELSE 'completed' END,
        finished_at = %(now)s,
        error = CASE WHEN r.failed > 0 THEN (
            SELECT string_agg(f.step_id || ': failed', '; ' ORDER BY f.idx)
            FROM (SELECT step_id, idx FROM steps WHERE run_id = r.id AND status = 'failed'
                  ORDER BY idx LIMIT 20) f
        ) END
    WHERE r.id = ANY(%(ids)s::text[]) AND r.unfinished <= 0
      AND r.status IN ('pending', 'running', 'paused')
    RETURNING r.id, r.status
)

-- name: end_runs_rows
SELECT 'e' AS kind, 0::bigint AS id, id AS run_id, 0 AS idx, NULL::text AS task, 0 AS attempt,
       NULL::text AS args, 0 AS max_attempts, NULL::float8 AS timeout_s, NULL::text AS error,
       status, NULL::float8 AS k1, NULL::float8 AS k2, NULL::int AS k3, NULL::text AS queue,
       NULL::float8 AS ready_at, NULL::text AS role
FROM ended

-- name: claim_ctes
-- Up to n attempts, for a worker whose lease holds: first the ready steps of runs with free slots (oldest run first; in a
-- run, highest priority, longest remaining path first; a barrier run only its lowest
-- unfinished wave), then standalone jobs (per queue in the worker's order, or any queue;
-- highest priority, then oldest; scheduled jobs that are due count as available, and those
-- not claimed become so; all that only when the turn asks for jobs). Runs are locked SKIP LOCKED: a run another worker is claiming from
-- or finishing in is passed over, never waited for; a locked run's steps change only under
-- its lock, so they need no row locks of their own before the update. Jobs are locked SKIP
-- LOCKED themselves.
live AS (
    -- a worker whose lease lapsed claims nothing (others may have taken its jobs over)
    SELECT EXISTS (SELECT 1 FROM workers WHERE id = %(owner)s AND expires_at >= %(now)s) AS ok
), due AS (
    SELECT id, queue, task, priority FROM steps
    WHERE %(jobs)s AND (SELECT ok FROM live)
      AND run_id IS NULL AND status = 'pending' AND not_before <= %(now)s
    ORDER BY not_before
    FOR UPDATE SKIP LOCKED
), open_runs AS (
    SELECT r.id, r.created_at, r.max_parallel - r.running AS free,
           CASE WHEN r.barrier THEN (
               SELECT MIN(w.wave) FROM steps w
               WHERE w.run_id = r.id
                 AND w.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled'))
           END AS wave_cap
    FROM runs r
    WHERE (SELECT ok FROM live)
      AND r.status IN ('pending', 'running') AND r.running < r.max_parallel AND r.unfinished > 0
      AND (%(queues)s::text[] IS NULL OR r.queue = ANY(%(queues)s::text[]))
      AND EXISTS (
          SELECT 1 FROM steps s
          WHERE s.run_id = r.id AND s.status IN ('ready', 'retrying')
            AND (s.not_before IS NULL OR s.not_before <= %(now)s)
            AND (%(tasks)s::text[] IS NULL OR s.task = ANY(%(tasks)s::text[])))
    ORDER BY r.created_at
    LIMIT 64
    FOR UPDATE OF r SKIP LOCKED
), candidates AS (
    SELECT o.id AS run_id, o.created_at, c.id, c.rn
    FROM open_runs o
    CROSS JOIN LATERAL (
        SELECT s.id, row_number() OVER (ORDER BY s.priority DESC, s.rank DESC, s.id) AS rn
        FROM steps s
        WHERE s.run_id = o.id AND s.status IN ('ready', 'retrying')
          AND (s.not_before IS NULL OR s.not_before <= %(now)s)
          AND (%(tasks)s::text[] IS NULL OR s.task = ANY(%(tasks)s::text[]))
          AND (o.wave_cap IS NULL OR s.wave <= o.wave_cap)
        ORDER BY s.priority DESC, s.rank DESC, s.id
        LIMIT LEAST(o.free, %(n)s + 1)
    ) c
), picked AS (
    SELECT id FROM candidates ORDER BY created_at, run_id, rn LIMIT %(n)s
), claimed_steps AS (
    -- (SET reads the row as it was: ready_at becomes since when the step could have started)
    UPDATE steps s
    SET status = 'running', attempt = s.attempt + 1, lease_owner = %(owner)s,
        started_at = %(now)s, finished_at = NULL, not_before = NULL,
        ready_at = CASE WHEN s.status = 'retrying' THEN COALESCE(s.not_before, s.finished_at)
                        ELSE COALESCE(s.ready_at, s.not_before, s.created_at) END
    WHERE s.id = ANY(ARRAY(SELECT id FROM picked)) AND s.status IN ('ready', 'retrying')
    RETURNING s.id, s.run_id, s.idx, s.task, s.attempt, s.error, s.created_at, s.priority,
              s.rank, s.ready_at
), slots AS (
    UPDATE runs r
    SET running = r.running + c.n, status = 'running',
        started_at = COALESCE(r.started_at, %(now)s),
        deadline = CASE WHEN r.run_timeout_s IS NULL THEN NULL
                        ELSE COALESCE(r.deadline, COALESCE(r.started_at, %(now)s) + r.run_timeout_s)
                   END
    FROM (SELECT run_id, COUNT(*) AS n FROM claimed_steps GROUP BY run_id) c
    WHERE r.id = c.run_id
), any_queue AS (
    SELECT s.id, s.priority, 0::bigint AS ord FROM steps s
    WHERE %(queues)s::text[] IS NULL AND %(jobs)s AND (SELECT ok FROM live)
      AND s.run_id IS NULL AND s.status IN ('ready', 'retrying')
      AND (s.not_before IS NULL OR s.not_before <= %(now)s)
      AND (%(tasks)s::text[] IS NULL OR s.task = ANY(%(tasks)s::text[]))
    ORDER BY s.priority DESC, s.id
    LIMIT (SELECT GREATEST(0, %(n)s - COUNT(*)) FROM claimed_steps)
    FOR UPDATE OF s SKIP LOCKED
), by_queue AS (
    SELECT j.id, j.priority, q.ord
    FROM unnest(%(queues)s::text[]) WITH ORDINALITY AS q (name, ord)
    JOIN live ON live.ok AND %(jobs)s
    CROSS JOIN LATERAL (
        SELECT s.id, s.priority FROM steps s
        WHERE s.run_id IS NULL AND s.queue = q.name AND s.status IN ('ready', 'retrying')
          AND (s.not_before IS NULL OR s.not_before <= %(now)s)
          AND (%(tasks)s::text[] IS NULL OR s.task = ANY(%(tasks)s::text[]))
        ORDER BY s.priority DESC, s.id
        LIMIT (SELECT GREATEST(0, %(n)s - COUNT(*)) FROM claimed_steps)
        FOR UPDATE OF s SKIP LOCKED
    ) j
), due_claimable AS (
    SELECT d.id, d.priority, COALESCE(array_position(%(queues)s::text[], d.queue), 0)::bigint AS ord
    FROM due d
    WHERE (%(queues)s::text[] IS NULL OR d.queue = ANY(%(queues)s::text[]))
      AND (%(tasks)s::text[] IS NULL OR d.task = ANY(%(tasks)s::text[]))
), picked_jobs AS (
    SELECT id
    FROM (SELECT * FROM any_queue UNION ALL SELECT * FROM by_queue
          UNION ALL SELECT * FROM due_claimable) j
    ORDER BY ord, priority DESC, id
    LIMIT (SELECT GREATEST(0, %(n)s - COUNT(*)) FROM claimed_steps)
), claimed_jobs AS (
    UPDATE steps s
    SET status = 'running', attempt = s.attempt + 1, lease_owner = %(owner)s,
        started_at = %(now)s, finished_at = NULL, not_before = NULL,
        ready_at = CASE WHEN s.status = 'retrying' THEN COALESCE(s.not_before, s.finished_at)
                        ELSE COALESCE(s.ready_at, s.not_before, s.created_at) END
    WHERE s.id = ANY(ARRAY(SELECT id FROM picked_jobs))
      AND s.status IN ('ready', 'retrying', 'pending')
    RETURNING s.id, s.task, s.attempt, s.args, s.max_attempts + s.attempt_base AS max_attempts,
              s.timeout_s, s.error, s.queue, s.priority, s.ready_at, s.role
), promoted AS (
    -- due jobs this turn does not claim become available to others
    UPDATE steps s SET status = 'ready'
    FROM due WHERE s.id = due.id AND due.id NOT IN (SELECT id FROM picked_jobs)
    RETURNING s.id
), claim_notified AS (
    -- Jobs made available, or claimable steps of open runs left behind (more than this turn
    -- could take): wake the workers, who may have passed over these runs while this turn
    -- held them.
    SELECT pg_notify(%(channel)s, '') FROM (
        SELECT 1 FROM promoted
        UNION ALL
        SELECT 1 FROM (SELECT run_id, COUNT(*) AS n FROM candidates GROUP BY run_id) c
        LEFT JOIN (SELECT run_id, COUNT(*) AS n FROM claimed_steps GROUP BY run_id) t
               ON t.run_id = c.run_id
        WHERE c.n > COALESCE(t.n, 0)
        LIMIT 1
    ) x
)

-- name: claim_rows
-- (The caller orders the claims: a run's steps by run, priority and rank, jobs by queue and
-- priority; k1/k2 carry what it needs.)
SELECT 'c' AS kind, id, run_id, idx, task, attempt, NULL::text AS args, 1 AS max_attempts,
       NULL::float8 AS timeout_s, error, NULL::text AS status, created_at AS k1,
       rank AS k2, priority AS k3, NULL::text AS queue, ready_at, NULL::text AS role
FROM claimed_steps
UNION ALL
SELECT 'c', id, NULL, 0, task, attempt, args, max_attempts, timeout_s, error, NULL, NULL, NULL,
       priority, queue, ready_at, role
FROM claimed_jobs
UNION ALL
SELECT 'n', 0, NULL, 0, NULL, 0, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM claim_notified
UNION ALL
SELECT 'l', 0, NULL, 0, NULL, 0, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM live WHERE NOT ok

-- workers ---------------------------------------------------------------------------------

-- name: put_worker
INSERT INTO workers (id, name, queues, concurrency, started_at, expires_at)
VALUES (%(id)s, %(name)s, %(queues)s, %(concurrency)s, %(started_at)s, %(expires_at)s)
ON CONFLICT (id) DO UPDATE
SET name = excluded.name, queues = excluded.queues, concurrency = excluded.concurrency,
    started_at = excluded.started_at, expires_at = excluded.expires_at;

-- name: same_name_workers
SELECT id FROM workers WHERE name = %(name)s AND id <> %(id)s;

-- name: heartbeat
-- Renew the worker's lease (kind r); of the jobs it thinks it holds, those it must stop (s).
WITH renewed AS (
    UPDATE workers SET expires_at = %(expires)s WHERE id = %(owner)s RETURNING id
)
SELECT 'r' AS kind, 0::bigint AS id FROM renewed
UNION ALL
SELECT 's', s.id FROM steps s LEFT JOIN runs r ON r.id = s.run_id
WHERE s.id = ANY(%(held)s::bigint[])
  AND (s.status <> 'running' OR s.lease_owner IS DISTINCT FROM %(owner)s OR s.cancel_requested
       OR r.status IN ('cancelled', 'failed', 'completed'));

-- name: delete_workers
DELETE FROM workers WHERE id = ANY(%(ids)s::text[]);

-- name: list_workers
SELECT w.*, (SELECT COUNT(*) FROM steps s WHERE s.status = 'running' AND s.lease_owner = w.id)
       AS running
FROM workers w ORDER BY started_at;

-- name: sweep_scan
-- What a sweep has to do: running attempts whose holder is not a live worker (or is one of
-- `dead`), expired workers, and runs past their deadline.
SELECT 'o' AS kind, s.id, s.run_id FROM steps s
WHERE s.status = 'running'
  AND (s.lease_owner IS NULL OR s.lease_owner = ANY(%(dead)s::text[])
       OR s.lease_owner NOT IN (SELECT id FROM workers WHERE expires_at >= %(now)s))
UNION ALL
SELECT 'w', 0, id FROM workers WHERE expires_at < %(now)s
UNION ALL
SELECT 'r', 0, id FROM runs
WHERE deadline < %(now)s AND status IN ('pending', 'running', 'paused');

-- name: held_by
SELECT id, run_id FROM steps
WHERE status = 'running' AND lease_owner = %(owner)s
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]));

-- name: requeue
-- Running attempts back to the queue (their runs are locked already): lost ones are
-- recorded and counted; released ones are not (their attempt number is given back). Those of
-- a run that ended, or a job cancelled, are cancelled.
WITH held AS (
    SELECT s.id, s.run_id, s.attempt, s.started_at, s.lease_owner,
           COALESCE(r.status IN ('cancelled', 'failed', 'completed'), FALSE)
               OR s.cancel_requested AS stop,
           r.status AS run_status
    FROM steps s LEFT JOIN runs r ON r.id = s.run_id
    WHERE s.id = ANY(%(ids)s::bigint[]) AND s.status = 'running'
      AND CASE WHEN %(owner)s::text IS NOT NULL THEN s.lease_owner = %(owner)s
               -- rescue: still not held by a live worker
               ELSE s.lease_owner IS NULL OR s.lease_owner = ANY(%(dead)s::text[])
                    OR s.lease_owner NOT IN (SELECT id FROM workers WHERE expires_at >= %(now)s)
          END
    ORDER BY s.id
    FOR UPDATE OF s
), recorded AS (
    INSERT INTO attempts (step, attempt, status, started_at, finished_at, error, owner, detail)
    -- how many attempts its worker held when it was lost: one alone says which job the
    -- worker died running (baton.engine.executor counts those towards the job's attempts)
    SELECT id, attempt, 'lost', started_at, %(now)s,
           'lost: its worker stopped or its lease expired', lease_owner,
           json_build_object('held', (SELECT COUNT(*) FROM steps x
                                      WHERE x.status = 'running' AND x.lease_owner = held.lease_owner))::text
    FROM held WHERE %(lost)s
    ON CONFLICT (step, attempt) DO UPDATE
    SET status = excluded.status, started_at = excluded.started_at,
        finished_at = excluded.finished_at, error = excluded.error, owner = excluded.owner,
        detail = excluded.detail
), requeued AS (
    UPDATE steps s
    SET status = CASE WHEN h.stop THEN 'cancelled' ELSE 'ready' END,
        lease_owner = NULL,
        attempt = s.attempt - CASE WHEN %(lost)s THEN 0 ELSE 1 END,
        started_at = NULL,
        error = COALESCE(CASE WHEN h.stop AND h.run_status = 'cancelled' THEN 'run cancelled'
                              WHEN h.stop THEN 'cancelled'
                              WHEN %(lost)s THEN 'lost: its worker stopped or its lease expired'
                         END, s.error),
        finished_at = CASE WHEN h.stop THEN %(now)s END,
        ready_at = %(now)s
    FROM held h
    WHERE s.id = h.id
    RETURNING s.id, s.run_id, s.status
), counted AS (
    UPDATE runs r
    SET running = GREATEST(0, r.running - c.running), unfinished = r.unfinished - c.finished
    FROM (SELECT run_id, COUNT(*) AS running, COUNT(*) FILTER (WHERE status = 'cancelled')
                 AS finished
          FROM requeued WHERE run_id IS NOT NULL GROUP BY run_id) c
    WHERE r.id = c.run_id
), notified AS (
    SELECT pg_notify(%(channel)s, '') FROM (
        SELECT 1 FROM requeued WHERE status = 'ready' LIMIT 1) x
)
SELECT id, run_id, status, (SELECT COUNT(*) FROM notified) AS notified FROM requeued;

-- control ---------------------------------------------------------------------------------

-- name: lock_run
SELECT status FROM runs WHERE id = %(id)s FOR UPDATE;

-- name: set_run_status
UPDATE runs SET status = %(status)s, error = COALESCE(%(error)s, error),
       finished_at = CASE WHEN %(terminal)s THEN %(now)s ELSE finished_at END
WHERE id = %(id)s AND status = ANY(%(sources)s::text[])
RETURNING id;

-- name: cancel_idle_steps
-- A run that ended from outside: its steps not running are cancelled, and no longer count
-- as unfinished.
WITH cancelled AS (
    UPDATE steps SET status = 'cancelled', error = %(error)s, finished_at = %(now)s
    WHERE run_id = %(id)s AND status IN ('pending', 'ready', 'retrying')
    RETURNING 1
)
UPDATE runs SET unfinished = unfinished - (SELECT count(*) FROM cancelled) WHERE id = %(id)s;

-- name: expire_run
UPDATE runs SET status = 'failed', finished_at = %(now)s,
       error = 'run timed out after '
               || CASE WHEN run_timeout_s = trunc(run_timeout_s) AND abs(run_timeout_s) < 1e15
                       THEN trunc(run_timeout_s)::bigint::text || '.0'
                       ELSE run_timeout_s::text END
               || 's'
WHERE id = %(id)s AND status IN ('pending', 'running', 'paused')
RETURNING error;

-- standalone jobs ------------------------------------------------------------------------

-- name: insert_jobs
WITH inserted AS (
    INSERT INTO steps (run_id, idx, step_id, task, status, queue, priority, args, max_attempts,
                       timeout_s, unique_key, not_before, created_at, role)
    SELECT NULL, 0, u.task, u.task, u.status, u.queue, u.priority, u.args, u.max_attempts,
           u.timeout_s, u.unique_key, u.run_at, %(now)s, u.role
    FROM unnest(%(task)s::text[], %(status)s::text[], %(queue)s::text[], %(priority)s::int[],
                %(args)s::text[], %(max_attempts)s::int[], %(timeout_s)s::float8[],
                %(unique_key)s::text[], %(run_at)s::float8[], %(role)s::text[]) WITH ORDINALITY
         AS u (task, status, queue, priority, args, max_attempts, timeout_s, unique_key, run_at,
               role, ord)
    ORDER BY u.ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
    RETURNING *
), notified AS (
    SELECT pg_notify(%(channel)s, '') FROM (
        SELECT 1 FROM inserted WHERE status = 'ready' LIMIT 1) x
)
SELECT i.*, (SELECT COUNT(*) FROM notified) AS notified FROM inserted i ORDER BY i.id;

-- name: jobs_by_key
SELECT * FROM steps WHERE unique_key = ANY(%(keys)s::text[]) AND run_id IS NULL;

-- name: get_job
SELECT * FROM steps WHERE id = %(id)s AND run_id IS NULL;

-- name: list_jobs
SELECT * FROM steps
WHERE run_id IS NULL AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
ORDER BY id DESC LIMIT %(limit)s;

-- name: job_attempts
SELECT a.step, a.attempt, a.status, a.started_at, a.finished_at, a.error, a.owner, a.detail,
       s.run_id, s.step_id
FROM attempts a JOIN steps s ON s.id = a.step
WHERE a.step = %(id)s
UNION ALL
SELECT s.id, s.attempt, 'succeeded', s.started_at, s.finished_at, NULL, s.finished_by, NULL,
       s.run_id, s.step_id
FROM steps s
WHERE s.id = %(id)s AND s.status = 'succeeded'
  AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.step = s.id AND a.attempt = s.attempt)
ORDER BY attempt;

-- name: retry_job
WITH retried AS (
    UPDATE steps SET status = 'ready', not_before = NULL, finished_at = NULL,
           cancel_requested = FALSE, attempt_base = attempt, ready_at = %(now)s
    WHERE id = %(id)s AND run_id IS NULL AND status IN ('failed', 'cancelled')
    RETURNING *
), notified AS (
    SELECT pg_notify(%(channel)s, '') FROM retried
)
SELECT r.*, (SELECT COUNT(*) FROM notified) AS notified FROM retried r;

-- name: cancel_job
-- An idle job is cancelled; a running one is asked to stop (its worker learns by heartbeat).
UPDATE steps
SET status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    error = CASE WHEN status = 'running' THEN error ELSE 'cancelled by request' END,
    finished_at = CASE WHEN status = 'running' THEN finished_at ELSE %(now)s END,
    cancel_requested = cancel_requested OR status = 'running'
WHERE id = %(id)s AND run_id IS NULL
  AND status IN ('pending', 'ready', 'retrying', 'running')
RETURNING *;

-- cron --------------------------------------------------------------------------------------

-- name: put_schedule
INSERT INTO schedules (name, task, cron, args, queue, priority, max_attempts, timeout_s,
                       catch_up_s, next_at)
VALUES (%(name)s, %(task)s, %(cron)s, %(args)s, %(queue)s, %(priority)s, %(max_attempts)s,
        %(timeout_s)s, %(catch_up_s)s, %(next_at)s)
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
DELETE FROM schedules WHERE name = %(name)s RETURNING name;

-- name: move_schedule
UPDATE schedules SET next_at = %(next_at)s
WHERE name = %(name)s AND next_at = %(expected)s
RETURNING name;

-- cache and budgets ---------------------------------------------------------------------------

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

-- API keys ------------------------------------------------------------------------------------

-- name: put_api_key
INSERT INTO api_keys (id, secret_hash, role, name, created_at)
VALUES (%(id)s, %(secret_hash)s, %(role)s, %(name)s, %(created_at)s);

-- name: api_key_by_hash
SELECT * FROM api_keys WHERE secret_hash = %(secret_hash)s AND revoked_at IS NULL;

-- name: list_api_keys
SELECT * FROM api_keys ORDER BY created_at, id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = %(now)s WHERE id = %(id)s AND revoked_at IS NULL
RETURNING id;

-- the audit trail ------------------------------------------------------------------------

-- Appends take this lock first (held to the end of their transaction): one at a time per
-- schema, so each reads the hash the one before it committed (read committed: a statement
-- after the lock sees it) and the chain never forks. Keyed by the schema, as migration_lock:
-- stores in different schemas keep chains of their own and do not wait for each other.
-- name: audit_lock
SELECT pg_advisory_xact_lock(hashtext('baton:audit:' || current_schema()));

-- name: audit_last_hash
SELECT hash FROM audit ORDER BY seq DESC LIMIT 1;

-- name: audit_insert
INSERT INTO audit (ts, actor, action, subject, detail, prev_hash, hash)
VALUES (%(ts)s, %(actor)s, %(action)s, %(subject)s, %(detail)s, %(prev_hash)s, %(hash)s)
RETURNING seq;

-- Two statements rather than one with "subject IS NULL OR": each keeps a plan that uses its
-- index (the primary key, audit_by_subject) when psycopg prepares it.
-- name: llm_sources
SELECT a.detail::jsonb ->> 'source' AS source
FROM attempts a JOIN steps s ON s.id = a.step
WHERE s.task = 'llm.generate' AND a.detail IS NOT NULL
ORDER BY a.step DESC, a.attempt DESC LIMIT %(limit)s;

-- name: audit_tail
SELECT (SELECT COUNT(*) FROM audit) AS entries, a.*
FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT * FROM audit ORDER BY seq DESC LIMIT 1) a ON true;

-- name: audit_entries
SELECT * FROM audit WHERE seq > %(after)s ORDER BY seq LIMIT %(limit)s;

-- name: audit_entries_of_subject
SELECT * FROM audit WHERE subject = %(subject)s AND seq > %(after)s ORDER BY seq LIMIT %(limit)s;

-- name: wave_progress
SELECT s.run_id, s.wave, COUNT(*) AS steps,
       COUNT(*) FILTER (WHERE s.status IN ('succeeded', 'failed', 'skipped', 'cancelled')) AS finished
FROM runs r JOIN steps s ON s.run_id = r.id
WHERE r.status IN ('running', 'paused')
GROUP BY s.run_id, s.wave
ORDER BY s.run_id, s.wave;

-- name: queue_depth
SELECT queue, status, COUNT(*) AS n FROM steps
WHERE status IN ('ready', 'retrying', 'running') OR (status = 'pending' AND run_id IS NULL)
GROUP BY queue, status;

-- retention ------------------------------------------------------------------------------------
-- `baton prune` and a worker's --retention. Only ended runs and jobs, found by when they
-- ended: the literal terms are those of the partial indexes of 0010 (so even a generic
-- plan may use them); %(runs)s and %(jobs)s narrow them to what was asked. Sizes
-- are those of the text the rows held, in bytes.

-- name: prune_pick_runs
-- The oldest ended runs, nothing of them running, that ended before the cutoff.
SELECT id, total_steps FROM runs
WHERE status IN ('completed', 'failed', 'cancelled') AND status = ANY(%(runs)s::text[])
  AND finished_at < %(before)s AND running = 0
ORDER BY finished_at LIMIT %(limit)s;

-- name: prune_runs
-- The picked runs and everything of theirs, in one statement. Each run is locked first (id
-- order, as everyone locks runs) and taken only if it is still ended with nothing running:
-- another prune that took it first leaves nothing to take. (Its steps go here, before the
-- cascade from runs would take them, so that their attempts can go with them.)
WITH picked AS (
    SELECT id FROM runs
    WHERE id = ANY(%(ids)s::text[]) AND status IN ('completed', 'failed', 'cancelled')
      AND running = 0
    ORDER BY id
    FOR UPDATE
), gone_runs AS (
    DELETE FROM runs r USING picked p WHERE r.id = p.id
    RETURNING COALESCE(octet_length(r.plan), 0) AS size
), gone_steps AS (
    DELETE FROM steps WHERE run_id IN (SELECT id FROM picked)
    RETURNING id, COALESCE(octet_length(output), 0) + COALESCE(octet_length(error), 0) AS size
), gone_attempts AS (
    DELETE FROM attempts WHERE step IN (SELECT id FROM gone_steps)
    RETURNING COALESCE(octet_length(error), 0) + COALESCE(octet_length(detail), 0) AS size
), gone_ledger AS (
    DELETE FROM budget_ledger WHERE run_id IN (SELECT id FROM picked)
), gone_requests AS (
    DELETE FROM run_requests WHERE run_id IN (SELECT id FROM picked)
)
SELECT (SELECT COUNT(*) FROM gone_runs) AS runs, (SELECT COUNT(*) FROM gone_steps) AS steps,
       (SELECT COUNT(*) FROM gone_attempts) AS attempts,
       (SELECT COALESCE(SUM(size), 0) FROM gone_runs) + (SELECT COALESCE(SUM(size), 0) FROM gone_steps)
       + (SELECT COALESCE(SUM(size), 0) FROM gone_attempts) AS bytes;

-- name: prune_jobs
-- The oldest standalone jobs that ended (completed, discarded, cancelled) before the cutoff,
-- with their attempts. SKIP LOCKED: a job being retried or read for update is left for later.
WITH gone_jobs AS (
    DELETE FROM steps WHERE id IN (
        SELECT id FROM steps
        WHERE run_id IS NULL AND finished_at IS NOT NULL AND status <> 'retrying'
          AND status IN ('succeeded', 'failed', 'cancelled')
          AND status = ANY(%(jobs)s::text[]) AND finished_at < %(before)s
        ORDER BY finished_at LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING id, COALESCE(octet_length(output), 0) + COALESCE(octet_length(error), 0)
                  + COALESCE(octet_length(args), 0) AS size
), gone_attempts AS (
    DELETE FROM attempts WHERE step IN (SELECT id FROM gone_jobs)
    RETURNING COALESCE(octet_length(error), 0) + COALESCE(octet_length(detail), 0) AS size
)
SELECT (SELECT COUNT(*) FROM gone_jobs) AS jobs, (SELECT COUNT(*) FROM gone_attempts) AS attempts,
       (SELECT COALESCE(SUM(size), 0) FROM gone_jobs) + (SELECT COALESCE(SUM(size), 0) FROM gone_attempts)
       AS bytes;

-- name: prune_cache
WITH gone AS (
    DELETE FROM llm_cache WHERE key IN (
        SELECT key FROM llm_cache WHERE expires_at IS NOT NULL AND expires_at < %(before)s
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING octet_length(value) AS size
)
SELECT COUNT(*) AS cache, COALESCE(SUM(size), 0) AS bytes FROM gone;

-- name: prune_count
-- What prune would remove, all of it (a dry run), as one row of counts.
WITH due_runs AS (
    SELECT id, COALESCE(octet_length(plan), 0) AS size FROM runs
    WHERE status IN ('completed', 'failed', 'cancelled') AND status = ANY(%(runs)s::text[])
      AND finished_at < %(before)s AND running = 0
), due_steps AS (
    SELECT id, COALESCE(octet_length(output), 0) + COALESCE(octet_length(error), 0) AS size
    FROM steps WHERE run_id IN (SELECT id FROM due_runs)
), due_jobs AS (
    SELECT id, COALESCE(octet_length(output), 0) + COALESCE(octet_length(error), 0)
               + COALESCE(octet_length(args), 0) AS size
    FROM steps
    WHERE run_id IS NULL AND finished_at IS NOT NULL AND status <> 'retrying'
      AND status IN ('succeeded', 'failed', 'cancelled')
      AND status = ANY(%(jobs)s::text[]) AND finished_at < %(before)s
), due_attempts AS (
    SELECT COALESCE(octet_length(error), 0) + COALESCE(octet_length(detail), 0) AS size
    FROM attempts WHERE step IN (SELECT id FROM due_steps UNION ALL SELECT id FROM due_jobs)
), due_cache AS (
    SELECT octet_length(value) AS size FROM llm_cache
    WHERE expires_at IS NOT NULL AND expires_at < %(before)s
)
SELECT (SELECT COUNT(*) FROM due_runs) AS runs, (SELECT COUNT(*) FROM due_steps) AS steps,
       (SELECT COUNT(*) FROM due_jobs) AS jobs, (SELECT COUNT(*) FROM due_attempts) AS attempts,
       (SELECT COUNT(*) FROM due_cache) AS cache,
       (SELECT COALESCE(SUM(size), 0) FROM due_runs) + (SELECT COALESCE(SUM(size), 0) FROM due_steps)
       + (SELECT COALESCE(SUM(size), 0) FROM due_jobs) + (SELECT COALESCE(SUM(size), 0) FROM due_attempts)
       + (SELECT COALESCE(SUM(size), 0) FROM due_cache) AS bytes;

-- goals and their outcomes (baton.agents) -------------------------------------------------

-- name: insert_goal
INSERT INTO goals (run_id, text, request, task_type, language, complexity, method, confidence,
                   template_id, selection, created_at)
VALUES (%(run_id)s, %(text)s, %(request)s, %(task_type)s, %(language)s, %(complexity)s, %(method)s,
        %(confidence)s, %(template_id)s, %(selection)s, %(created_at)s);

-- name: get_goal
SELECT * FROM goals WHERE run_id = %(run_id)s;

-- name: goal_done_before
SELECT g.* FROM goals g JOIN runs r ON r.id = g.run_id
WHERE g.request = %(request)s AND r.status = 'completed'
ORDER BY g.created_at DESC LIMIT 1;

-- name: list_goals
SELECT * FROM goals ORDER BY created_at DESC, run_id DESC LIMIT %(limit)s;

-- name: pending_goals
SELECT g.* FROM goals g JOIN runs r ON r.id = g.run_id
WHERE g.collected_at IS NULL AND r.status IN ('completed', 'failed', 'cancelled')
ORDER BY g.created_at LIMIT %(limit)s;

-- name: collect_goal
UPDATE goals SET collected_at = %(now)s WHERE run_id = %(run_id)s AND collected_at IS NULL
RETURNING run_id;

-- name: insert_outcome
INSERT INTO outcomes (run_id, step_id, template_id, task_type, language, success, quality, time_s,
                      cost_usd, method, recorded_at)
VALUES (%(run_id)s, %(step_id)s, %(template_id)s, %(task_type)s, %(language)s, %(success)s,
        %(quality)s, %(time_s)s, %(cost_usd)s, %(method)s, %(recorded_at)s);

-- name: outcomes
SELECT * FROM (
    SELECT * FROM outcomes WHERE %(task_type)s::text IS NULL OR task_type = %(task_type)s::text
    ORDER BY recorded_at DESC, run_id DESC, step_id DESC LIMIT %(limit)s
) o ORDER BY recorded_at, run_id, step_id;

-- sub-runs ------------------------------------------------------------------------------

-- name: insert_subrun
INSERT INTO subruns (child_run_id, parent_run_id, step_id) VALUES (%(child)s, %(parent)s, %(step_id)s);

-- name: child_runs
SELECT s.child_run_id AS id, s.step_id, r.status FROM subruns s JOIN runs r ON r.id = s.child_run_id
WHERE s.parent_run_id = %(parent)s ORDER BY s.child_run_id;
