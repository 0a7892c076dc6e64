-- A step's row is its last attempt: a plain success (no details to keep) is not written
-- again as a row of `attempts`; the step row keeps who ran it. One page less per step.
ALTER TABLE steps ADD COLUMN finished_by TEXT;
