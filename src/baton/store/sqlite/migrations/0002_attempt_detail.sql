-- What a handler recorded about an attempt (for model calls: prompt, answer, issues,
-- tokens, latency), as JSON.
ALTER TABLE attempts ADD COLUMN detail TEXT;
