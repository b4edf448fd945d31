-- 0001_init.sql: meshd application schema for the optional PostgreSQL backend (PostgreSQL >= 15).
-- Adapted from the seed's "PostgreSQL Tables" (seeds/002); see README.md for how to apply it.
--
-- Types, compared with the seed:
--   * Node ids are u64 in meshd, stored as BIGINT. Values >= 2^63 are stored as their two's
--     complement (the u64 cast to i64), so they read back negative: compare them for equality
--     only, never for order. The same holds for the other u64 columns (incarnation, LSA version,
--     seq numbers), which stay far below 2^63 in practice.
--   * Mesh ids and message ids are ULIDs: TEXT COLLATE "C" in canonical form (26 characters,
--     Crockford base32, upper case; the first is 0-7 as it holds the top 3 bits of the 48-bit
--     timestamp), checked by the same pattern on every such column, so byte order is time order.
--   * Stream ids (and tenant ids, as in the seed) are 128-bit: UUID.
--   * TIMESTAMP -> TIMESTAMPTZ; JSON -> JSONB; SERIAL -> BIGINT identity.
--   * The seed's inline ENUM(...) is not PostgreSQL: states are TEXT with a CHECK, which reads and
--     writes as a plain string from tokio-postgres and changes with ALTER TABLE ... CONSTRAINT.
--   * The application sets `updated = now()` itself on every UPDATE (no triggers).
--
-- Idempotent: every statement is IF NOT EXISTS / CREATE OR REPLACE / ON CONFLICT DO NOTHING.

BEGIN;

-- Two meshd nodes migrating the same database at once: the second waits here until the first
-- commits. The key is shared by every migration (README.md).
SELECT pg_advisory_xact_lock(7235010001);

-- Applied migrations, one row per file; each migration inserts its own row before COMMIT.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    BIGINT PRIMARY KEY,             -- the file's number: 1 for 0001_init.sql
    name       TEXT NOT NULL,                  -- the file's name without .sql
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Core mesh topology -------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS mesh (
    mesh_id       TEXT COLLATE "C" PRIMARY KEY
                  CHECK (mesh_id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),
    name          VARCHAR(255) NOT NULL,
    description   TEXT,
    allow_join    TEXT NOT NULL DEFAULT 'KEY_REQUIRED'
                  CHECK (allow_join IN ('OPEN', 'KEY_REQUIRED', 'CLOSED')),
    join_key_hash VARCHAR(255),                -- password hash (PHC string) of the join key, never the key
    status        TEXT NOT NULL DEFAULT 'ACTIVE'
                  CHECK (status IN ('ACTIVE', 'DEGRADED', 'CRITICAL')),
    created       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_mesh_status ON mesh (status);

CREATE TABLE IF NOT EXISTS nodes (
    node_id     BIGINT PRIMARY KEY,            -- u64; >= 2^63 stored as two's complement
    name        VARCHAR(255) NOT NULL,
    description TEXT,
    pubkey      BYTEA NOT NULL                 -- Ed25519 public key (the link Hello's public_key)
                CHECK (octet_length(pubkey) = 32),
    last_seen   TIMESTAMPTZ,
    status      TEXT NOT NULL DEFAULT 'ONLINE'
                CHECK (status IN ('ONLINE', 'SUSPECT', 'OFFLINE')),
    incarnation BIGINT NOT NULL DEFAULT 0,     -- SWIM incarnation (u64)
    meta        JSONB,
    platform    VARCHAR(50),
    version     VARCHAR(50),
    region_id   VARCHAR(50),
    ip_address  INET,
    port        INTEGER CHECK (port BETWEEN 1 AND 65535),
    created     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_nodes_status ON nodes (status);
CREATE INDEX IF NOT EXISTS idx_nodes_last_seen ON nodes (last_seen);

CREATE TABLE IF NOT EXISTS links (
    id             UUID PRIMARY KEY,
    a_node         BIGINT NOT NULL REFERENCES nodes (node_id),
    b_node         BIGINT NOT NULL REFERENCES nodes (node_id),
    latency_ms     DOUBLE PRECISION,
    bandwidth_mbps DOUBLE PRECISION,
    loss           DOUBLE PRECISION,           -- fraction, 0..1
    utilization    DOUBLE PRECISION,           -- fraction, 0..1
    status         TEXT NOT NULL DEFAULT 'UP'
                   CHECK (status IN ('UP', 'DOWN', 'DEGRADED')),
    meta           JSONB,
    updated        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Its index is the seed's idx_links_nodes (a_node, b_node); a second identical one would only cost writes.
    CONSTRAINT links_a_node_b_node_key UNIQUE (a_node, b_node),
    CHECK (a_node <> b_node)
);
-- Links by their far end (and the FK check when a node is deleted).
CREATE INDEX IF NOT EXISTS idx_links_b_node ON links (b_node);
CREATE INDEX IF NOT EXISTS idx_links_status ON links (status);

CREATE TABLE IF NOT EXISTS lsa_versions (
    node_id BIGINT NOT NULL REFERENCES nodes (node_id),
    version BIGINT NOT NULL,                   -- LSA sequence number (u64)
    hash    VARCHAR(64),                       -- hex digest of the LSA body
    created TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, version)
);

-- Stream management --------------------------------------------------------------------------

-- Not partitioned, unlike the seed: PostgreSQL requires a partitioned table's primary key to
-- contain the partition key, so PARTITION BY RANGE (created) would forbid PRIMARY KEY (id) and
-- with it the foreign key from stream_offsets. There is one row per stream, not per message.
CREATE TABLE IF NOT EXISTS streams (
    id        UUID PRIMARY KEY,
    tenant_id UUID NOT NULL,
    src_node  BIGINT REFERENCES nodes (node_id),
    dst_nodes BIGINT[] NOT NULL,               -- node ids (u64, two's complement)
    qos       TEXT NOT NULL DEFAULT 'BULK'
              CHECK (qos IN ('SYSTEM', 'PRIORITY', 'BULK')),
    priority  INTEGER NOT NULL DEFAULT 0,
    meta      JSONB,
    created   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS stream_offsets (
    stream_id     UUID NOT NULL REFERENCES streams (id),
    node_id       BIGINT NOT NULL REFERENCES nodes (node_id),
    committed_seq BIGINT NOT NULL,             -- highest seq processed by node_id (u64)
    updated       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, node_id)
);
CREATE INDEX IF NOT EXISTS idx_stream_offsets_updated ON stream_offsets (updated);

-- Delivery log: one row per (stream, message, target). Partitioned by month like the seed, but on
-- message_id: a ULID starts with its creation time, so a month is a range of ULIDs. That keeps the
-- seed's primary key valid (it contains the partition key), and unlike `updated` the key never
-- changes, so rows never move between partitions. Old months are dropped with
-- ALTER TABLE delivery_log DETACH PARTITION ... (90-day retention, README.md).
CREATE TABLE IF NOT EXISTS delivery_log (
    stream_id     UUID NOT NULL,
    message_id    TEXT COLLATE "C" NOT NULL
                  CHECK (message_id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),
    src_node      BIGINT REFERENCES nodes (node_id),
    dst_node      BIGINT NOT NULL REFERENCES nodes (node_id),
    state         TEXT NOT NULL DEFAULT 'received'
                  CHECK (state IN ('received', 'processing', 'done', 'failed')),
    error_message TEXT,
    updated       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, message_id, dst_node)
) PARTITION BY RANGE (message_id);
CREATE INDEX IF NOT EXISTS idx_delivery_log_state ON delivery_log (state);

-- Catches every message no monthly partition covers, so an insert never fails for want of one.
CREATE TABLE IF NOT EXISTS delivery_log_default PARTITION OF delivery_log DEFAULT;

-- The 10-character ULID time prefix of a timestamp (48-bit Unix milliseconds, Crockford base32).
CREATE OR REPLACE FUNCTION meshd_ulid_time_prefix(ts TIMESTAMPTZ) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE STRICT AS $fn$
DECLARE
    alphabet CONSTANT TEXT := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    ms BIGINT := floor(extract(epoch FROM ts) * 1000)::BIGINT;
    prefix TEXT := '';
BEGIN
    IF ms < 0 OR ms >= 281474976710656 THEN   -- 2^48
        RAISE EXCEPTION 'timestamp % is outside the ULID range', ts;
    END IF;
    FOR i IN 1..10 LOOP
        prefix := substr(alphabet, (ms % 32)::INTEGER + 1, 1) || prefix;
        ms := ms / 32;
    END LOOP;
    RETURN prefix;
END
$fn$;

-- Creates delivery_log_YYYY_MM for the UTC month containing `in_month` (no-op if it exists) and
-- returns its name. Create each month before it starts (e.g. monthly from cron, for next month):
-- attaching a month for which delivery_log_default already holds rows fails.
CREATE OR REPLACE FUNCTION meshd_create_delivery_log_partition(in_month TIMESTAMPTZ) RETURNS TEXT
LANGUAGE plpgsql AS $fn$
DECLARE
    lo TIMESTAMP := date_trunc('month', in_month AT TIME ZONE 'UTC');
    hi TIMESTAMP := lo + INTERVAL '1 month';
    part TEXT := 'delivery_log_' || to_char(lo, 'YYYY_MM');
BEGIN
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I PARTITION OF delivery_log FOR VALUES FROM (%L) TO (%L)',
        part,
        meshd_ulid_time_prefix(lo AT TIME ZONE 'UTC'),
        meshd_ulid_time_prefix(hi AT TIME ZONE 'UTC'));
    RETURN part;
END
$fn$;

-- Message queuing (outbox pattern) -----------------------------------------------------------

CREATE TABLE IF NOT EXISTS outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id    UUID NOT NULL,
    message_id   TEXT COLLATE "C" NOT NULL
                 CHECK (message_id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),
    payload      BYTEA,
    headers      JSONB,
    next_attempt TIMESTAMPTZ,
    attempts     INTEGER NOT NULL DEFAULT 0,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'sent', 'failed')),
    created      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A producer's retry of the same message is a no-op (INSERT ... ON CONFLICT DO NOTHING).
    CONSTRAINT outbox_stream_message_key UNIQUE (stream_id, message_id)
);
CREATE INDEX IF NOT EXISTS idx_outbox_next_attempt ON outbox (next_attempt) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS idx_outbox_stream_status ON outbox (stream_id, status);

CREATE TABLE IF NOT EXISTS inbox (
    stream_id  UUID NOT NULL,
    message_id TEXT COLLATE "C" NOT NULL
               CHECK (message_id ~ '^[0-7][0-9A-HJKMNP-TV-Z]{25}$'),
    payload    BYTEA,
    headers    JSONB,
    received   TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed  TIMESTAMPTZ,
    PRIMARY KEY (stream_id, message_id)        -- the dedupe key
);
-- Unprocessed messages, oldest first per stream. (The seed indexed `processed` itself under
-- WHERE processed IS NULL, where every key is NULL; this index answers the same query.)
CREATE INDEX IF NOT EXISTS idx_inbox_unprocessed ON inbox (stream_id, received) WHERE processed IS NULL;

-- Topology and configuration -----------------------------------------------------------------

CREATE TABLE IF NOT EXISTS topology_snapshots (
    version BIGINT PRIMARY KEY,
    graph   JSONB NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS config_kv (
    key     TEXT PRIMARY KEY,
    value   JSONB,
    updated TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO schema_migrations (version, name) VALUES (1, '0001_init') ON CONFLICT (version) DO NOTHING;

COMMIT;
