"""The PostgreSQL store's schema, as numbered migrations applied in order at start.

A migration is applied once per schema, inside one transaction with the version it brings,
under an advisory lock: replicas starting together apply each exactly once, and a failed
one leaves nothing half done. Append new migrations; never edit one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: tasks, the replicas that own running ones, and the change feed.
    """
    CREATE TABLE tasks (
        pk              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id              TEXT NOT NULL UNIQUE,
        client_id       TEXT NOT NULL,
        type            TEXT NOT NULL,
        state           TEXT NOT NULL,
        priority        INTEGER NOT NULL,
        spec            TEXT NOT NULL,
        sequence        BIGINT NOT NULL,
        attempt         INTEGER NOT NULL,
        backend         TEXT NOT NULL,
        output          TEXT,
        error           TEXT,
        usage           TEXT,
        created_at      DOUBLE PRECISION NOT NULL,
        started_at      DOUBLE PRECISION,
        ended_at        DOUBLE PRECISION,
        deadline        DOUBLE PRECISION NOT NULL,
        not_before      DOUBLE PRECISION NOT NULL,
        idempotency_key TEXT,
        -- The replica whose dispatcher runs a RUNNING task; NULL in every other state.
        owner           TEXT
    );
    CREATE UNIQUE INDEX tasks_idempotency
        ON tasks (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX tasks_queue ON tasks (priority DESC, pk) WHERE state = 'QUEUED';
    CREATE INDEX tasks_unfinished
        ON tasks (deadline) WHERE state IN ('QUEUED', 'RUNNING');
    CREATE INDEX tasks_running ON tasks (owner) WHERE state = 'RUNNING';
    CREATE INDEX tasks_client ON tasks (client_id, pk);
    CREATE INDEX tasks_client_created ON tasks (client_id, created_at);
    CREATE INDEX tasks_created ON tasks (created_at);
    CREATE INDEX tasks_finished
        ON tasks (ended_at) WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');

    -- A replica's lease on the tasks it owns: renewed by its heartbeat, by the database's
    -- clock (replicas' clocks may disagree). A lapsed lease makes its tasks orphans.
    CREATE TABLE replicas (
        id           TEXT PRIMARY KEY,
        heartbeat_at TIMESTAMPTZ NOT NULL
    );

    -- Every stored change, announced to every replica (their Stream watchers and claim
    -- loops): small, as NOTIFY wants; a replica that cares reads the row. The channel is
    -- per schema, so schemas sharing a database do not hear each other.
    CREATE FUNCTION taskring_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify(
            'taskring_' || TG_TABLE_SCHEMA,
            NEW.id || ' ' || NEW.sequence || ' ' || NEW.state || ' '
                || coalesce(current_setting('taskring.replica', true), '')
        );
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER tasks_changed AFTER INSERT OR UPDATE ON tasks
        FOR EACH ROW EXECUTE FUNCTION taskring_notify();
    """,
    # 2: each task's ended attempts (codec.encode_attempts); NULL: none.
    """
    ALTER TABLE tasks ADD COLUMN attempts TEXT;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS taskring_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
