-- The audit trail (the same model as the SQLite store's 0008): append-only, each entry
-- chained to the one before by hash (baton.store.base.audit_hash, computed by the store in
-- Python so both backends hash alike), so an edit or a removal shows when the chain is
-- verified. Appends are serialized by an advisory lock (audit_lock), and seq is drawn while
-- it is held: seq order is the order of the chain.
CREATE TABLE audit (
    seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts        DOUBLE PRECISION NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_by_subject ON audit (subject, seq);
