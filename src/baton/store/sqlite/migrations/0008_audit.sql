-- The audit trail: append-only, each entry chained to the one before by hash
-- (baton.store.base.audit_hash), so an edit or a removal shows when the chain is verified.
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        REAL NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_by_subject ON audit (subject, seq);
