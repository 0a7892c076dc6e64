-- What each budget scope of a run (the run itself, or one step) has spent, and what calls
-- under way have reserved. A reservation is granted only while spent + reserved stays
-- within the limit, in one transaction, so parallel calls cannot overspend together.
CREATE TABLE budget_ledger (
    run_id          TEXT NOT NULL,
    scope           TEXT NOT NULL,
    reserved_tokens BIGINT NOT NULL DEFAULT 0,
    reserved_usd    DOUBLE PRECISION NOT NULL DEFAULT 0,
    spent_tokens    BIGINT NOT NULL DEFAULT 0,
    spent_usd       DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, scope)
);
