//! Validation: every value checked, addresses parsed, secrets read, with an error that names
//! the key and says how to fix it.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::Path,
};

use super::{Config, ConfigError, ROUTED_CLASSES, Resolved, RuntimeConfig, ShardCount, invalid};

impl Config {
    /// Checks every value; returns the parsed forms.
    pub fn validate(&self) -> Result<Resolved, ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "is empty", "give a directory path"));
        }
        if self.mesh_id.len() > 128 {
            return Err(invalid(
                "mesh_id",
                "must be at most 128 characters",
                "use the mesh's id, or \"\" to seed or join one later",
            ));
        }
        let mesh_secret = self.mesh_secret()?;
        if let Some(bad) = self
            .tenants
            .iter()
            .find(|t| t.is_empty() || t.len() > crate::api::tenant::MAX_TENANT_LEN)
        {
            return Err(invalid(
                "tenants",
                format!("{bad:?} is empty or longer than 128 bytes"),
                "list tenant names of 1 to 128 bytes",
            ));
        }
        let net = &self.network;
        let listen = match &net.listen {
            Some(text) if !text.is_empty() => Some(parse_addr("network.listen", text)?),
            _ => None,
        };
        let mut peers = Vec::with_capacity(net.peers.len());
        for text in &net.peers {
            let addr = parse_addr("network.peers", text)?;
            if Some(addr) == listen {
                return Err(invalid(
                    "network.peers",
                    format!("{text} is this node's own listen address"),
                    "list other nodes' addresses only",
                ));
            }
            peers.push(addr);
        }
        if !(10..=60_000).contains(&net.heartbeat_ms) {
            return Err(invalid(
                "network.heartbeat_ms",
                format!("{} is outside 10..=60000", net.heartbeat_ms),
                "use 100 (the default) unless links are slow",
            ));
        }
        if !(2..=100).contains(&net.heartbeat_misses) {
            return Err(invalid(
                "network.heartbeat_misses",
                format!("{} is outside 2..=100", net.heartbeat_misses),
                "use 3 (the default)",
            ));
        }
        if net.reconnect_min_ms == 0 || net.reconnect_min_ms > net.reconnect_max_ms {
            return Err(invalid(
                "network.reconnect_min_ms",
                "must be positive and not above network.reconnect_max_ms",
                "use 50 and 5000 (the defaults)",
            ));
        }
        if net.handshake_timeout_ms < 100 {
            return Err(invalid(
                "network.handshake_timeout_ms",
                format!("{} ms is too short for TLS", net.handshake_timeout_ms),
                "use 5000 (the default)",
            ));
        }
        if !(500..=60_000).contains(&net.write_timeout_ms) {
            return Err(invalid(
                "network.write_timeout_ms",
                format!("{} ms is outside 500..=60000", net.write_timeout_ms),
                "use 3000 (the default)",
            ));
        }
        if !(1024..=(64 << 20)).contains(&net.max_payload_bytes) {
            return Err(invalid(
                "network.max_payload_bytes",
                format!("{} is outside 1 KiB..=64 MiB", net.max_payload_bytes),
                "use 4194304 (the default)",
            ));
        }
        if !(4096..=(256 << 20)).contains(&net.link_queue_bytes) {
            return Err(invalid(
                "network.link_queue_bytes",
                format!("{} is outside 4 KiB..=256 MiB", net.link_queue_bytes),
                "use 1048576 (the default)",
            ));
        }
        if !(64 << 10..=1 << 30).contains(&net.lane_window_bytes) {
            return Err(invalid(
                "network.lane_window_bytes",
                format!("{} is outside 64 KiB..=1 GiB", net.lane_window_bytes),
                "use 16777216 (the default)",
            ));
        }
        if net.max_pending_handshakes == 0 {
            return Err(invalid(
                "network.max_pending_handshakes",
                "must be positive",
                "use 256",
            ));
        }
        let grpc_listen = parse_addr("grpc.listen", &self.grpc.listen)?;
        let metrics_listen = if self.metrics.listen.is_empty() {
            None
        } else {
            Some(parse_addr("metrics.listen", &self.metrics.listen)?)
        };
        let (grpc_tls, grpc_token) = self.grpc_security(grpc_listen)?;
        if self.grpc.subscriber_queue == 0 {
            return Err(invalid(
                "grpc.subscriber_queue",
                "must be positive",
                "use 4096",
            ));
        }
        if self.grpc.tracked_messages < 16 {
            return Err(invalid(
                "grpc.tracked_messages",
                "must be at least 16",
                "use 100000",
            ));
        }
        if self.grpc.default_timeout_seconds == 0 {
            return Err(invalid(
                "grpc.default_timeout_seconds",
                "must be positive",
                "use 30",
            ));
        }
        let routing = &self.routing;
        if !(1..=16).contains(&routing.k_paths) {
            return Err(invalid(
                "routing.k_paths",
                format!("{} is outside 1..=16", routing.k_paths),
                "use 3",
            ));
        }
        if routing.recompute_debounce_ms > 10_000 {
            return Err(invalid(
                "routing.recompute_debounce_ms",
                "is above 10 s",
                "use 20",
            ));
        }
        if routing.lsa_refresh_s == 0
            || routing.lsa_max_age_s < routing.lsa_refresh_s.saturating_mul(3)
        {
            return Err(invalid(
                "routing.lsa_max_age_s",
                "must be at least 3 × routing.lsa_refresh_s (and the refresh positive)",
                "use lsa_refresh_s = 30 and lsa_max_age_s = 95",
            ));
        }
        if !(10..=60_000).contains(&routing.lsa_retransmit_ms) {
            return Err(invalid(
                "routing.lsa_retransmit_ms",
                "is outside 10..=60000",
                "use 200",
            ));
        }
        for (key, value) in [
            ("routing.alpha", routing.alpha),
            ("routing.beta", routing.beta),
            ("routing.gamma", routing.gamma),
            ("routing.delta", routing.delta),
            ("routing.epsilon", routing.epsilon),
        ] {
            if !value.is_finite() || !(0.0..=1e6).contains(&value) {
                return Err(invalid(
                    key,
                    format!("{value} is not in 0..=1e6"),
                    "use the default",
                ));
            }
        }
        if routing.epsilon <= 0.0 {
            return Err(invalid("routing.epsilon", "must be positive", "use 0.1"));
        }
        for name in routing.classes.keys() {
            if !ROUTED_CLASSES.iter().any(|(known, _)| known == name) {
                return Err(invalid(
                    "routing.classes",
                    format!("{name:?} is not a traffic class"),
                    "use system, db_update or client",
                ));
            }
        }
        for (class, weights) in routing.class_weights() {
            let names = ["alpha", "beta", "gamma", "delta", "epsilon"];
            for (name, value) in names.iter().zip(weights) {
                if !value.is_finite()
                    || !(0.0..=1e6).contains(&value)
                    || (*name == "epsilon" && value <= 0.0)
                {
                    return Err(invalid(
                        "routing.classes",
                        format!("{class:?}.{name} = {value} is not in 0..=1e6 (epsilon above 0)"),
                        "leave it out to use the [routing] value",
                    ));
                }
            }
        }
        let membership = &self.membership;
        if !(50..=60_000).contains(&membership.probe_period_ms) {
            return Err(invalid(
                "membership.probe_period_ms",
                "is outside 50..=60000",
                "use 500",
            ));
        }
        if membership.probe_rtt_ms == 0 || membership.probe_rtt_ms >= membership.probe_period_ms {
            return Err(invalid(
                "membership.probe_rtt_ms",
                "must be positive and below membership.probe_period_ms",
                "use 200 with a 500 ms probe period",
            ));
        }
        if membership.suspect_to_down_ms < membership.probe_period_ms {
            return Err(invalid(
                "membership.suspect_to_down_ms",
                "is below membership.probe_period_ms, so every lost packet would kill a member",
                "use 3000",
            ));
        }
        if !(10..=60_000).contains(&membership.gossip_period_ms) {
            return Err(invalid(
                "membership.gossip_period_ms",
                "is outside 10..=60000",
                "use 200",
            ));
        }
        let streams = &self.streams;
        if streams.workers > 64 {
            return Err(invalid(
                "streams.workers",
                "is above 64",
                "use 0 (one per shard)",
            ));
        }
        if !(1..=1 << 30).contains(&streams.max_message_bytes) {
            return Err(invalid(
                "streams.max_message_bytes",
                "is outside 1..=1073741824",
                "use 67108864 (64 MiB)",
            ));
        }
        if streams.chunk_bytes < 4096 || streams.chunk_bytes + 4096 > self.network.max_payload_bytes
        {
            return Err(invalid(
                "streams.chunk_bytes",
                "must be at least 4096 and 4096 below network.max_payload_bytes",
                "use 1048576",
            ));
        }
        if streams.max_message_bytes.div_ceil(streams.chunk_bytes) > usize::from(u16::MAX) {
            return Err(invalid(
                "streams.max_message_bytes",
                "needs more than 65535 chunks of chunk_bytes",
                "raise streams.chunk_bytes",
            ));
        }
        if streams.reassembly_bytes < streams.max_message_bytes as u64 {
            return Err(invalid(
                "streams.reassembly_bytes",
                "is below streams.max_message_bytes",
                "use 4 × max_message_bytes",
            ));
        }
        if streams.max_streams == 0
            || !(1..=1 << 24).contains(&streams.max_outstanding)
            || !(1..=1 << 24).contains(&streams.max_backlog)
        {
            return Err(invalid(
                "streams.max_streams",
                "max_streams, max_outstanding and max_backlog must be positive (the last two at most 16777216)",
                "use 10000, 65536 and 8192",
            ));
        }
        if !(10..=600_000).contains(&streams.retransmit_ms)
            || !(100..=3_600_000).contains(&streams.publish_timeout_ms)
        {
            return Err(invalid(
                "streams.retransmit_ms",
                "retransmit_ms must be in 10..=600000 and publish_timeout_ms in 100..=3600000",
                "use 400 and 10000",
            ));
        }
        if !(1..=65_536).contains(&streams.max_groups)
            || !(1..=10_000).contains(&streams.group_flush_ms)
        {
            return Err(invalid(
                "streams.max_groups",
                "max_groups must be in 1..=65536 and group_flush_ms in 1..=10000",
                "use 256 and 20",
            ));
        }
        if self.supervisor.enabled
            && (self.supervisor.address.trim().is_empty()
                || !(100..=600_000).contains(&self.supervisor.heartbeat_ms))
        {
            return Err(invalid(
                "supervisor.address",
                "an enabled supervisor needs an address and heartbeat_ms in 100..=600000",
                "use address = \"localhost:50000\" and heartbeat_ms = 5000",
            ));
        }
        let storage = &self.storage;
        if storage.backend == super::BackendChoice::Postgres
            && storage.url.as_ref().is_none_or(|u| u.0.trim().is_empty())
        {
            return Err(invalid(
                "storage.url",
                "backend = \"postgres\" needs a connection URL",
                "set url = \"postgres://user:password@host:5432/meshd\" (or MESHD_STORAGE__URL)",
            ));
        }
        if !(1..=64).contains(&storage.pool_size)
            || !(100..=600_000).contains(&storage.connect_timeout_ms)
            || !(100..=600_000).contains(&storage.timeout_ms)
            || !(100..=3_600_000).contains(&storage.sync_ms)
        {
            return Err(invalid(
                "storage.pool_size",
                "pool_size must be in 1..=64, connect_timeout_ms and timeout_ms in 100..=600000, sync_ms in 100..=3600000",
                "use 4, 3000, 5000 and 1000",
            ));
        }
        if let Some(url) = storage.redis_url.as_ref().filter(|u| !u.0.is_empty())
            && !(url.0.starts_with("redis://")
                || url.0.starts_with("rediss://")
                || url.0.starts_with("redis+unix://")
                || url.0.starts_with("unix://"))
        {
            return Err(invalid(
                "storage.redis_url",
                "is not a redis:// URL",
                "use redis_url = \"redis://127.0.0.1:6379/0\"",
            ));
        }
        let consensus = &self.consensus;
        if consensus.max_voters == 0
            || consensus.max_voters > 9
            || consensus.max_voters.is_multiple_of(2)
        {
            return Err(invalid(
                "consensus.max_voters",
                "must be odd and in 1..=9",
                "use 5",
            ));
        }
        if !(20..=10_000).contains(&consensus.heartbeat_ms) {
            return Err(invalid(
                "consensus.heartbeat_ms",
                "is outside 20..=10000",
                "use 200",
            ));
        }
        if consensus.election_timeout_ms < 3 * consensus.heartbeat_ms
            || consensus.election_timeout_ms > 60_000
        {
            return Err(invalid(
                "consensus.election_timeout_ms",
                "must be at least 3 heartbeats and at most 60000",
                "use 1000 with a 200 ms heartbeat",
            ));
        }
        if consensus.snapshot_every == 0 || consensus.keep_behind_snapshot > 1_000_000 {
            return Err(invalid(
                "consensus.snapshot_every",
                "must be positive (and keep_behind_snapshot at most 1000000)",
                "use 5000 and 1000",
            ));
        }
        if consensus.retain_updates < 100 {
            return Err(invalid(
                "consensus.retain_updates",
                "is below 100",
                "use 1000000",
            ));
        }
        if !(100..=600_000).contains(&consensus.write_deadline_ms) {
            return Err(invalid(
                "consensus.write_deadline_ms",
                "is outside 100..=600000",
                "use 5000",
            ));
        }
        if membership.name.len() > 255 {
            return Err(invalid(
                "membership.name",
                "is longer than 255 bytes",
                "use a shorter name",
            ));
        }
        let n_shards = self.runtime.shard_count()?;
        if !(16..=(1 << 20)).contains(&self.runtime.ring_capacity) {
            return Err(invalid(
                "runtime.ring_capacity",
                format!("{} is outside 16..=1048576", self.runtime.ring_capacity),
                "use 4096 (the default)",
            ));
        }
        if self.runtime.io_memory_bytes < (256 << 10) {
            return Err(invalid(
                "runtime.io_memory_bytes",
                "must be at least 256 KiB",
                "use 2097152 (the default)",
            ));
        }
        if !(-20..=19).contains(&self.runtime.control_nice) {
            return Err(invalid(
                "runtime.control_nice",
                format!(
                    "{} is not a nice value (-20..=19)",
                    self.runtime.control_nice
                ),
                "use -5 (the default), or 0 to leave thread priorities alone",
            ));
        }
        Ok(Resolved {
            listen,
            peers,
            grpc_listen,
            metrics_listen,
            grpc_tls,
            grpc_token,
            n_shards,
            mesh_secret,
        })
    }

    /// The api's TLS identity and token; refuses an address off loopback without both.
    #[allow(clippy::type_complexity)]
    fn grpc_security(
        &self,
        listen: SocketAddr,
    ) -> Result<(Option<(Vec<u8>, Vec<u8>)>, Option<String>), ConfigError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                invalid(
                    key,
                    format!("cannot be read ({}): {e}", path.display()),
                    "point it at a readable file",
                )
            })
        };
        // What proves this node (its api's TLS key, the token clients must show).
        let read_secret = |key: &'static str, path: &Path| {
            not_world_readable(key, path)?;
            read(key, path)
        };
        let grpc = &self.grpc;
        let tls = match (&grpc.tls_cert_file, &grpc.tls_key_file) {
            (Some(cert), Some(key)) => Some((
                read("grpc.tls_cert_file", cert)?,
                read_secret("grpc.tls_key_file", key)?,
            )),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "grpc.tls_cert_file",
                    "is set without grpc.tls_key_file, or the other way round",
                    "set both (PEM files) or neither",
                ));
            }
        };
        let from_env = grpc.token.as_ref().map(|t| t.0.trim().to_owned());
        let token = match (from_env.filter(|t| !t.is_empty()), &grpc.token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "grpc.token",
                    "is set together with grpc.token_file",
                    "keep one of the two",
                ));
            }
            (Some(token), None) => Some(token),
            (None, Some(path)) => Some(
                String::from_utf8_lossy(&read_secret("grpc.token_file", path)?)
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid(
                "grpc.token",
                "is shorter than 16 characters",
                "use a long random token, e.g. `openssl rand -hex 32`",
            ));
        }
        if !listen.ip().is_loopback() && (tls.is_none() || token.is_none()) {
            return Err(invalid(
                "grpc.listen",
                format!("{listen} is reachable from other hosts, but the api has no TLS and token"),
                "listen on 127.0.0.1 (core runs on this host), or set grpc.tls_cert_file, \
                 grpc.tls_key_file and grpc.token_file (clients send `authorization: Bearer \
                 <token>`)",
            ));
        }
        Ok((tls, token))
    }

    /// The configured mesh secret, parsed (the text itself never appears in an error).
    fn mesh_secret(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        use meshd_shards::credential::parse_secret;
        const FIX: &str = "give 64 hex digits (`meshd init --mesh-secret-file PATH` writes a \
                           new one; every node of the mesh needs the same one)";
        // An empty value (`MESHD_MESH_SECRET=`) means none.
        let text = self
            .mesh_secret
            .as_ref()
            .map(|t| t.0.as_str())
            .filter(|t| !t.trim().is_empty());
        match (text, &self.mesh_secret_file) {
            (Some(_), Some(_)) => Err(invalid(
                "mesh_secret",
                "is set together with mesh_secret_file",
                "keep one of the two",
            )),
            (Some(text), None) => parse_secret(text)
                .map(Some)
                .ok_or_else(|| invalid("mesh_secret", "is not 64 hex digits", FIX)),
            (None, Some(path)) => {
                not_world_readable("mesh_secret_file", path)?;
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "mesh_secret_file",
                        format!("cannot be read ({}): {e}", path.display()),
                        "point it at a readable file holding the mesh secret",
                    )
                })?;
                parse_secret(&text).map(Some).ok_or_else(|| {
                    invalid(
                        "mesh_secret_file",
                        format!("{} does not hold 64 hex digits", path.display()),
                        FIX,
                    )
                })
            }
            (None, None) => Ok(None),
        }
    }
}

impl RuntimeConfig {
    pub(super) fn shard_count(&self) -> Result<usize, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let count = match &self.shards {
            ShardCount::Count(n) => *n,
            ShardCount::Named(text) if text == "auto" => {
                // Leave a core for the control and api threads once there are cores to spare.
                if cores > 2 { cores - 1 } else { cores }
            }
            ShardCount::Named(text) => text.trim().parse().map_err(|_| {
                invalid(
                    "runtime.shards",
                    format!("{text:?} is neither \"auto\" nor a number"),
                    "write shards = \"auto\" or a count such as 2",
                )
            })?,
        };
        if !(1..=256).contains(&count) {
            return Err(invalid(
                "runtime.shards",
                format!("{count} is outside 1..=256"),
                "write shards = \"auto\"",
            ));
        }
        Ok(count)
    }
}

fn parse_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            invalid(
                key,
                format!("{text:?} is not an address"),
                "write IP:port, for example 127.0.0.1:7400",
            )
        })
}

/// Refuses a secret file every user of the host may read: the key, token or mesh secret in
/// it would be anyone's. Group-readable is allowed (a `meshd` group).
fn not_world_readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        // Missing or unreadable: the read that follows says so.
        return Ok(());
    };
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(invalid(
            key,
            format!(
                "{} is readable by every user of this host (mode {:o})",
                path.display(),
                mode & 0o777
            ),
            format!(
                "chmod 600 {} (or 640 and a group for meshd)",
                path.display()
            ),
        ));
    }
    Ok(())
}
