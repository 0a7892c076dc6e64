-- A step's row is its last attempt: a plain success (no details to keep) is not written
-- again as a row of `attempts`; the step row keeps who ran it. One row less per job.
ALTER TABLE steps ADD COLUMN finished_by TEXT;
