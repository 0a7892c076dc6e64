-- The step role a standalone job runs under: set for the jobs of API key holders, whose
-- programs run confined (baton.sandbox); NULL for local callers' jobs and for run steps
-- (a run's plan says its steps' roles).
ALTER TABLE steps ADD COLUMN role TEXT;
