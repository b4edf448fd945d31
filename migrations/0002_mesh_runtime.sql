-- 0002_mesh_runtime.sql: the tables meshd itself reads and writes on the PostgreSQL backend.
--
-- Seed 001's runtime tables (mesh_messages, mesh_state, mesh_node_state, mesh_consensus_log,
-- mesh_routing_table, mesh_runtime_config), meshd's stream store (records, outbox, inbox,
-- delivery log: what `streams-<i>.redb` holds on the embedded backend), idempotency keys and
-- credit buckets.
--
-- Every table's key starts with `owner`, the node id (u64 as BIGINT, two's complement, like
-- 0001) of the meshd that wrote the row: several nodes may share one database, and each only
-- ever touches its own rows. (0001's stream tables have no such column, so two targets of one
-- stream sharing a database would collide on them; meshd keeps its streams here instead.)
-- Times meshd computes are ms since the Unix epoch (BIGINT); `updated` is the server's clock.

BEGIN;

SELECT pg_advisory_xact_lock(7235010001);

-- Seed 001's runtime tables ----------------------------------------------------------------

CREATE TABLE IF NOT EXISTS mesh_messages (
    owner      BIGINT NOT NULL,
    id         TEXT NOT NULL,
    from_node  BIGINT NOT NULL,
    to_node    BIGINT NOT NULL,
    content    BYTEA NOT NULL,
    ts_ms      BIGINT NOT NULL,
    created    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS idx_mesh_messages_ts ON mesh_messages (owner, ts_ms);
CREATE INDEX IF NOT EXISTS idx_mesh_messages_from ON mesh_messages (owner, from_node);
CREATE INDEX IF NOT EXISTS idx_mesh_messages_to ON mesh_messages (owner, to_node, ts_ms);

CREATE TABLE IF NOT EXISTS mesh_state (
    owner   BIGINT NOT NULL,
    key     TEXT NOT NULL,
    value   BYTEA NOT NULL,
    updated TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);

-- Each node's own row: health, mesh state, members, links (refreshed every storage.sync_ms).
CREATE TABLE IF NOT EXISTS mesh_node_state (
    owner   BIGINT NOT NULL,
    node_id BIGINT NOT NULL,
    state   JSONB NOT NULL,
    updated TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, node_id)
);

-- The control group's commit points as the owner saw them (the Raft log itself stays in redb).
CREATE TABLE IF NOT EXISTS mesh_consensus_log (
    owner     BIGINT NOT NULL,
    log_index BIGINT NOT NULL,
    term      BIGINT NOT NULL,
    entry     JSONB NOT NULL,
    created   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, log_index)
);
CREATE INDEX IF NOT EXISTS idx_mesh_consensus_log_term ON mesh_consensus_log (owner, term, log_index);

-- The owner's best routes now: destination -> next hop, cost, path.
CREATE TABLE IF NOT EXISTS mesh_routing_table (
    owner       BIGINT NOT NULL,
    destination BIGINT NOT NULL,
    route       JSONB NOT NULL,
    updated     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, destination)
);

-- The owner's settings in force (secrets left out).
CREATE TABLE IF NOT EXISTS mesh_runtime_config (
    owner   BIGINT NOT NULL,
    key     TEXT NOT NULL,
    value   JSONB NOT NULL,
    updated TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);

CREATE TABLE IF NOT EXISTS mesh_idempotency_keys (
    owner      BIGINT NOT NULL,
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (owner, scope, key)
);
CREATE INDEX IF NOT EXISTS idx_mesh_idempotency_expiry ON mesh_idempotency_keys (owner, expires_ms);

CREATE TABLE IF NOT EXISTS mesh_credits (
    owner        BIGINT NOT NULL,
    bucket       TEXT NOT NULL,
    tokens       DOUBLE PRECISION NOT NULL,
    refreshed_ms BIGINT NOT NULL,
    PRIMARY KEY (owner, bucket)
);

-- Streams (per stream worker `worker`, as the embedded backend's streams-<worker>.redb) ------

CREATE TABLE IF NOT EXISTS mesh_stream_records (
    owner         BIGINT NOT NULL,
    worker        INTEGER NOT NULL,
    stream_id     UUID NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('source', 'target')),
    tenant        TEXT NOT NULL,
    source        BIGINT NOT NULL,
    targets       BIGINT[] NOT NULL,
    quorum        INTEGER NOT NULL,
    ack_on_source BOOLEAN NOT NULL,
    high          BIGINT NOT NULL,             -- source: last seq published; target: all up to here stored
    low           BIGINT NOT NULL,             -- source: all up to here released; target: processed
    closed        BIGINT,                      -- closed at this seq
    priority      INTEGER NOT NULL,
    updated       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, worker, stream_id),
    CHECK (low <= high)
);

CREATE TABLE IF NOT EXISTS mesh_stream_outbox (
    owner     BIGINT NOT NULL,
    worker    INTEGER NOT NULL,
    stream_id UUID NOT NULL,
    seq       BIGINT NOT NULL,
    message   BYTEA NOT NULL,                  -- sealed (tenant key): the database never sees plaintext
    PRIMARY KEY (owner, worker, stream_id, seq)
);

CREATE TABLE IF NOT EXISTS mesh_stream_inbox (
    owner     BIGINT NOT NULL,
    worker    INTEGER NOT NULL,
    stream_id UUID NOT NULL,
    seq       BIGINT NOT NULL,
    message   BYTEA NOT NULL,
    PRIMARY KEY (owner, worker, stream_id, seq)
);

CREATE TABLE IF NOT EXISTS mesh_stream_delivery_log (
    owner        BIGINT NOT NULL,
    worker       INTEGER NOT NULL,
    stream_id    UUID NOT NULL,
    seq          BIGINT NOT NULL,
    delivered_ms BIGINT NOT NULL,              -- when the subscriber's acknowledgement was recorded
    PRIMARY KEY (owner, worker, stream_id, seq)
);

INSERT INTO schema_migrations (version, name) VALUES (2, '0002_mesh_runtime') ON CONFLICT (version) DO NOTHING;

COMMIT;
