-- When a step became ready by other means than its creation, a schedule or a retry's
-- backoff: its last need succeeded, its worker was lost, its job was retried. With those,
-- a claim knows how long the step waited in the queue (enqueue -> start).
ALTER TABLE steps ADD COLUMN ready_at REAL;
