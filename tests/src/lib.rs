//! The cluster harness: starts real `meshd` processes on loopback (or each in a network
//! namespace, see [`netns`]) and drives them over gRPC.
//!
//! Every node gets a generated TOML config in a temporary directory and port 0 for its
//! listeners; the harness reads the bound addresses from the node's `meshd ready` line and
//! pins them in the config, so a restarted node comes back on the same ports.
//! Used by the integration tests in `tests/tests/` and by `loadgen local`.

pub mod dbs;
pub mod deadline;
pub mod netns;
pub mod rogue;
pub mod saturate;
pub mod streams_support;

/// `#[meshd_tests::test]`, `#[meshd_tests::test(limit = SECONDS)]`: a `#[tokio::test]` with an
/// overall deadline ([`deadline`]).
pub use meshd_test_macros::test;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_proto::mesh::{
    GetSessionsRequest, SessionInfo, mesh_control_client::MeshControlClient,
    mesh_data_client::MeshDataClient,
};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig},
};

/// The cargo profile the harness builds `meshd` with: `harness` (release without LTO, quicker
/// to build) unless a benchmark asked for `release` first.
static PROFILE: OnceLock<&'static str> = OnceLock::new();

/// Makes this process run the `release` build of meshd (LTO, one codegen unit): for figures.
/// Call before the first cluster starts; later calls change nothing.
pub fn measure_with_release_build() {
    let _ = PROFILE.set("release");
}

/// The `meshd` binary the harness runs, built once per process (profile `harness`, or
/// `release` after [`measure_with_release_build`]).
///
/// `TEST_MESHD_BIN` overrides it (a prebuilt binary; not `MESHD_…`, which meshd reads as config).
pub fn meshd_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| build_meshd().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build_meshd() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("TEST_MESHD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let target_dir = target_dir()?;
    let profile = *PROFILE.get_or_init(|| "harness");
    // A test binary of the harness profile runs under a `cargo test` that holds that profile's
    // build lock: a nested build there would wait for it for ever. (`cargo run` of loadgen
    // holds no lock while it runs.)
    let exe = std::env::current_exe()?;
    if profile == "harness" && exe.starts_with(target_dir.join(profile)) {
        bail!(
            "this test runs from the `{profile}` profile without TEST_MESHD_BIN: run it through \
             tests/run (e.g. `tests/run --test links`), which builds meshd and sets it"
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    // The harness profile is built exactly as `tests/run` builds it (the whole workspace, every
    // target): any other selection resolves features differently and would rebuild half the
    // tree on the next `tests/run`. `release -p meshd` resolves as `release --workspace` does
    // (appliance/Cargo.toml's feature alignment), so loadgen shares one release build.
    let args: &[&str] = if profile == "harness" {
        &[
            "test",
            "--workspace",
            "--all-targets",
            "--profile",
            "harness",
            "--no-run",
        ]
    } else {
        &[
            "build",
            "--profile",
            profile,
            "-p",
            "meshd",
            "--bin",
            "meshd",
        ]
    };
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args(args)
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .context("running cargo build for meshd")?;
    if !status.success() {
        bail!("cargo build of meshd failed");
    }
    Ok(target_dir.join(profile).join("meshd"))
}

fn target_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // target/<profile>/deps/<test-binary> or target/<profile>/<binary>
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors() {
        if dir.file_name().is_some_and(|n| n == "target") {
            return Ok(dir.to_path_buf());
        }
    }
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// How one node is set up.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The node id.
    pub node_id: u64,
    /// Whether it accepts links (false: "behind NAT", dials only).
    pub listens: bool,
    /// Indexes (into the cluster) of nodes it dials at start.
    pub dials: Vec<usize>,
    /// Extra TOML lines appended to the config (e.g. `mesh_id = "x"` or a `[network]` key).
    pub extra: String,
    /// Environment overrides (`MESHD_SECTION__KEY`), for keys the harness writes itself.
    pub env: Vec<(String, String)>,
    /// The network namespace it runs in (None: the test's own, on loopback).
    pub netns: Option<netns::Place>,
}

impl NodeSpec {
    /// A node that listens and dials nobody.
    pub fn listener(node_id: u64) -> Self {
        Self {
            node_id,
            listens: true,
            dials: Vec::new(),
            extra: String::new(),
            env: Vec::new(),
            netns: None,
        }
    }

    /// A node without a listener that dials `dials`.
    pub fn behind_nat(node_id: u64, dials: Vec<usize>) -> Self {
        Self {
            node_id,
            listens: false,
            dials,
            extra: String::new(),
            env: Vec::new(),
            netns: None,
        }
    }

    /// Sets a config key through the environment (`MESHD_NETWORK__WRITE_TIMEOUT_MS`, say).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds nodes to dial.
    pub fn dialing(mut self, dials: Vec<usize>) -> Self {
        self.dials = dials;
        self
    }

    /// Runs the node in `place`: links on its mesh address, the api on its mgmt address.
    pub fn in_netns(mut self, place: netns::Place) -> Self {
        self.netns = Some(place);
        self
    }
}

/// What a client needs to call a node's api: plaintext on loopback; anywhere else meshd
/// serves it only with TLS and a bearer token, so the client needs the certificate and token.
#[derive(Clone, Debug)]
pub struct Api {
    /// The api's address.
    pub addr: SocketAddr,
    secret: Option<Arc<ApiSecret>>,
}

/// The TLS identity and token a cluster gives the apis it puts off loopback.
#[derive(Debug)]
struct ApiSecret {
    cert_pem: String,
    cert_path: PathBuf,
    key_path: PathBuf,
    token_path: PathBuf,
    token: MetadataValue<Ascii>,
}

/// The certificate's name; clients check it instead of the (per-node) address.
const API_SERVER_NAME: &str = "meshd-api.test";

impl ApiSecret {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec![API_SERVER_NAME.to_owned()])?;
        let token: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let secret = Self {
            cert_pem: certified.cert.pem(),
            cert_path: dir.join("api.pem"),
            key_path: dir.join("api.key"),
            token_path: dir.join("api.token"),
            token: format!("Bearer {token}").parse()?,
        };
        std::fs::write(&secret.cert_path, &secret.cert_pem)?;
        std::fs::write(&secret.key_path, certified.signing_key.serialize_pem())?;
        std::fs::write(&secret.token_path, token)?;
        for private in [&secret.key_path, &secret.token_path] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(secret)
    }
}

/// The longest a test waits for a node's answer to one call (or a stream's headers); the
/// slowest calls (a supervisor `Stop` with its grace, a join) take seconds.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A stream's HTTP/2 pings: a node that answers none for `KEEPALIVE_TIMEOUT` (frozen longer
/// than any test freezes one on purpose, or wedged) ends the stream with an error.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Adds a node's bearer token to every call (nothing for an api on loopback).
#[derive(Clone, Debug, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A connection to a node's api, with its token on every call.
pub type ApiChannel = InterceptedService<Channel, Auth>;

impl Api {
    /// Connects, giving up after `timeout`.
    pub async fn connect(&self, timeout: Duration) -> anyhow::Result<ApiChannel> {
        let channel = match &self.secret {
            None => Channel::from_shared(format!("http://{}", self.addr))?,
            Some(secret) => Channel::from_shared(format!("https://{}", self.addr))?.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&secret.cert_pem))
                    .domain_name(API_SERVER_NAME),
            )?,
        }
        .connect_timeout(timeout)
        // No call waits on a node for ever: unary calls (and a stream's opening) get
        // `CALL_TIMEOUT`, and a stream whose node stops answering HTTP/2 pings ends.
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await?;
        Ok(InterceptedService::new(
            channel,
            Auth(self.secret.as_ref().map(|s| s.token.clone())),
        ))
    }
}

/// One running (or stopped) `meshd` process.
pub struct Node {
    /// Its spec.
    pub spec: NodeSpec,
    /// Config file path.
    pub config_path: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Where its stderr log goes.
    pub log_path: PathBuf,
    /// Bound gRPC address.
    pub grpc: SocketAddr,
    /// Bound link address (None behind NAT).
    pub listen: Option<SocketAddr>,
    /// Bound metrics address (when the node's config sets `[metrics] listen`).
    pub metrics: Option<SocketAddr>,
    child: Option<Child>,
    peers: Vec<SocketAddr>,
    mesh_secret: [u8; 32],
    api_secret: Option<Arc<ApiSecret>>,
}

/// A set of nodes in one temporary directory.
pub struct Cluster {
    /// The nodes, in spec order.
    pub nodes: Vec<Node>,
    dir: tempfile::TempDir,
    mesh_secret: [u8; 32],
    /// Made for the first node whose api is off loopback.
    api_secret: Option<Arc<ApiSecret>>,
}

const READY_TIMEOUT: Duration = Duration::from_secs(20);

impl Cluster {
    /// Starts the nodes in order; a node may only dial nodes listed before it.
    pub fn start(specs: Vec<NodeSpec>) -> anyhow::Result<Self> {
        let mut dir = tempfile::Builder::new()
            .prefix("meshd-cluster-")
            .tempdir()?;
        // Debugging aid: configs, data and logs stay on disk after the run.
        if std::env::var_os("TEST_KEEP_CLUSTER_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping the cluster directory {}", dir.path().display());
        }
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
            mesh_secret: rand::random(),
            api_secret: None,
        };
        for spec in specs {
            cluster.add(spec)?;
        }
        Ok(cluster)
    }

    /// The last `n` log lines of every node, `first` (an index) first: a failure in one
    /// node's view is often caused by another's.
    pub fn log_tails(&self, first: usize, n: usize) -> String {
        let order = std::iter::once(first).chain((0..self.nodes.len()).filter(|&i| i != first));
        order
            .map(|i| {
                let node = &self.nodes[i];
                format!("--- node {} ---\n{}", node.spec.node_id, node.log_tail(n))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts one more node.
    pub fn add(&mut self, spec: NodeSpec) -> anyhow::Result<usize> {
        let mut peers = Vec::new();
        for &i in &spec.dials {
            let target = self
                .nodes
                .get(i)
                .context("a node may only dial nodes started before it")?;
            peers.push(
                target
                    .listen
                    .context("cannot dial a node without a listener")?,
            );
        }
        let index = self.nodes.len();
        let data_dir = self.dir.path().join(format!("node{index}"));
        let (grpc_ip, listen_ip) = spec
            .netns
            .as_ref()
            .map_or(([127, 0, 0, 1].into(), [127, 0, 0, 1].into()), |place| {
                (place.mgmt.into(), place.mesh.into())
            });
        let api_secret = match (&spec.netns, &self.api_secret) {
            (None, _) => None,
            (Some(_), Some(secret)) => Some(Arc::clone(secret)),
            (Some(_), None) => {
                let secret = Arc::new(ApiSecret::create(self.dir.path())?);
                self.api_secret = Some(Arc::clone(&secret));
                Some(secret)
            }
        };
        let mut node = Node {
            config_path: self.dir.path().join(format!("node{index}.toml")),
            log_path: self.dir.path().join(format!("node{index}.log")),
            data_dir,
            grpc: SocketAddr::new(grpc_ip, 0),
            listen: spec.listens.then(|| SocketAddr::new(listen_ip, 0)),
            metrics: None,
            child: None,
            peers,
            spec,
            mesh_secret: self.mesh_secret,
            api_secret,
        };
        node.start()?;
        self.nodes.push(node);
        Ok(index)
    }

    /// The secret of the configured mesh every node of this cluster is given: what a rogue
    /// needs to pass for a member (and lacks when a test says so).
    pub fn mesh_secret(&self) -> [u8; 32] {
        self.mesh_secret
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Node `i`, mutably (to kill or restart it).
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// The directory holding configs, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Node {
    fn write_config(&self) -> anyhow::Result<()> {
        let peers: Vec<String> = self.peers.iter().map(|p| format!("\"{p}\"")).collect();
        let mut text = format!(
            "node_id = {}\ndata_dir = \"{}\"\n",
            self.spec.node_id,
            self.data_dir.display()
        );
        // Top-level keys of `extra` must come before the first table.
        let (top, tables): (Vec<&str>, Vec<&str>) = {
            let mut top = Vec::new();
            let mut tables = Vec::new();
            let mut in_table = false;
            for line in self.spec.extra.lines() {
                if line.trim_start().starts_with('[') {
                    in_table = true;
                }
                if in_table {
                    tables.push(line);
                } else {
                    top.push(line);
                }
            }
            (top, tables)
        };
        // Every node gets the cluster's secret; it only counts for the configured mesh id.
        text.push_str(&format!(
            "mesh_secret = \"{}\"\n",
            meshd_shards::credential::format_secret(&self.mesh_secret)
        ));
        for line in top {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("[network]\n");
        if let Some(listen) = self.listen {
            text.push_str(&format!("listen = \"{listen}\"\n"));
        }
        text.push_str(&format!("peers = [{}]\n", peers.join(", ")));
        text.push_str("reconnect_max_ms = 1000\n");
        text.push_str(&format!("[grpc]\nlisten = \"{}\"\n", self.grpc));
        if let Some(secret) = &self.api_secret {
            text.push_str(&format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntoken_file = \"{}\"\n",
                secret.cert_path.display(),
                secret.key_path.display(),
                secret.token_path.display()
            ));
        }
        text.push_str("[runtime]\nshards = 2\n");
        for line in tables {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&self.config_path, text)?;
        Ok(())
    }

    /// Starts the process and waits for its ready line; pins the bound ports in its config.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.child.is_none(),
            "node {} is already running",
            self.spec.node_id
        );
        self.write_config()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut command = match &self.spec.netns {
            // `ip netns exec` execs meshd in place, so the child's pid is meshd's own and
            // `signal`, `kill` and `stop` reach it.
            Some(place) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &place.ns])
                    .arg(meshd_binary()?);
                command
            }
            None => Command::new(meshd_binary()?),
        };
        let mut child = command
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,meshd_shards=debug,meshd::control=debug")
            .env_remove("MESH_ROUTING_ID")
            .envs(self.spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning meshd")?;
        let stdout = child.stdout.take().context("meshd stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if line.starts_with("meshd ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let Ok(line) = rx.recv_timeout(READY_TIMEOUT) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "node {} did not become ready; log:\n{}",
                self.spec.node_id,
                self.log_tail(30)
            );
        };
        for field in line.split_whitespace() {
            if let Some(addr) = field.strip_prefix("grpc=") {
                self.grpc = addr.parse()?;
            }
            if let Some(addr) = field.strip_prefix("listen=")
                && addr != "none"
            {
                self.listen = Some(addr.parse()?);
            }
            if let Some(addr) = field.strip_prefix("metrics=") {
                self.metrics = if addr == "none" {
                    None
                } else {
                    Some(addr.parse()?)
                };
            }
        }
        deadline::register(&self.log_path, self.spec.node_id, Some(child.id()));
        self.child = Some(child);
        self.write_config()?;
        Ok(())
    }

    /// Replaces the addresses the node dials (applied at its next start).
    pub fn set_peers(&mut self, peers: Vec<SocketAddr>) {
        self.peers = peers;
    }

    /// SIGKILL: the process dies at once, saying nothing to its peers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            deadline::register(&self.log_path, self.spec.node_id, None);
        }
    }

    /// Sends a signal to the running process (SIGSTOP, SIGCONT, SIGTERM…).
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) with a pid we spawned and still own.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited with success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        deadline::register(&self.log_path, self.spec.node_id, None);
        // SAFETY: as in `signal`.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the process in bytes (Linux `/proc/<pid>/status`, VmRSS).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How to reach its api.
    pub fn api(&self) -> Api {
        Api {
            addr: self.grpc,
            secret: self.api_secret.clone(),
        }
    }

    /// A `MeshData` client.
    pub async fn data(&self) -> anyhow::Result<MeshDataClient<ApiChannel>> {
        Ok(MeshDataClient::new(self.channel().await?))
    }

    /// A `MeshControl` client.
    /// Waits until this node has a route to every node in `destinations`; returns its routes
    /// (destination → next hops).
    pub async fn wait_for_routes(
        &self,
        destinations: &[u64],
        limit: Duration,
    ) -> anyhow::Result<std::collections::BTreeMap<u64, Vec<u64>>> {
        let deadline = Instant::now() + limit;
        let mut control = self.control().await?;
        loop {
            let table = control
                .get_routing_table(meshd_proto::mesh::GetRoutingTableRequest {})
                .await?
                .into_inner();
            let routes: std::collections::BTreeMap<u64, Vec<u64>> = table
                .routes
                .into_iter()
                .map(|r| (r.dst_node, r.next_hops))
                .collect();
            if destinations.iter().all(|d| routes.contains_key(d)) {
                return Ok(routes);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} has routes to {:?}, wanted {destinations:?}; log:\n{}",
                    self.spec.node_id,
                    routes.keys().collect::<Vec<_>>(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A `Subscribe` stream of every message for this node (no filters).
    pub async fn inbox(&self) -> anyhow::Result<tonic::Streaming<meshd_proto::mesh::Received>> {
        Ok(self
            .data()
            .await?
            .subscribe(meshd_proto::mesh::SubscribeRequest::default())
            .await?
            .into_inner())
    }

    pub async fn control(&self) -> anyhow::Result<MeshControlClient<ApiChannel>> {
        Ok(MeshControlClient::new(self.channel().await?))
    }

    /// A `meshd.v1.MeshService` client.
    pub async fn mesh(
        &self,
    ) -> anyhow::Result<meshd_proto::link::mesh_service_client::MeshServiceClient<ApiChannel>> {
        Ok(meshd_proto::link::mesh_service_client::MeshServiceClient::new(self.channel().await?))
    }

    /// A `meshd.v1.MeshDataService` client (the control group's update streams).
    pub async fn updates(
        &self,
    ) -> anyhow::Result<
        meshd_proto::link::mesh_data_service_client::MeshDataServiceClient<ApiChannel>,
    > {
        Ok(
            meshd_proto::link::mesh_data_service_client::MeshDataServiceClient::new(
                self.channel().await?,
            ),
        )
    }

    /// The control group as this node sees it (`GetConsensusState`).
    pub async fn consensus(&self) -> anyhow::Result<meshd_proto::mesh::ConsensusState> {
        Ok(self
            .control()
            .await?
            .get_consensus_state(meshd_proto::mesh::GetConsensusStateRequest {})
            .await?
            .into_inner()
            .consensus_state
            .unwrap_or_default())
    }

    /// A connection to its api (calls carry [`CALL_TIMEOUT`]), for any generated client.
    pub async fn channel(&self) -> anyhow::Result<ApiChannel> {
        self.api().connect(Duration::from_secs(5)).await
    }

    /// The node's live sessions.
    pub async fn sessions(&self) -> anyhow::Result<Vec<SessionInfo>> {
        Ok(self
            .control()
            .await?
            .get_sessions(GetSessionsRequest {})
            .await?
            .into_inner()
            .sessions)
    }

    /// Waits until the node's session peers are exactly `peers` (order ignored).
    pub async fn wait_for_peers(
        &self,
        peers: &[u64],
        limit: Duration,
    ) -> anyhow::Result<Vec<SessionInfo>> {
        let mut want: Vec<u64> = peers.to_vec();
        want.sort_unstable();
        let deadline = Instant::now() + limit;
        let mut client = self.control().await?;
        loop {
            let sessions = client
                .get_sessions(GetSessionsRequest {})
                .await?
                .into_inner()
                .sessions;
            let mut have: Vec<u64> = sessions.iter().map(|s| s.peer_node_id).collect();
            have.sort_unstable();
            if have == want {
                return Ok(sessions);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} has peers {have:?}, wanted {want:?}; log:\n{}",
                    self.spec.node_id,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failing test (or one past its limit) kills at once: a frozen node would make a
        // clean stop wait its full 10 s, per node.
        if std::thread::panicking() {
            self.kill();
        } else if self.child.is_some() {
            let _ = self.stop();
        }
        deadline::unregister(&self.log_path);
    }
}

/// Serialises tests that must not overlap: on a 2-core machine, two clusters at once would
/// starve each other's heartbeats.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The status `node` reports through `meshd.v1.MeshService/GetMeshStatus`.
pub async fn mesh_status(node: &Node) -> anyhow::Result<meshd_proto::link::MeshStatus> {
    let request = meshd_proto::link::GetMeshStatusRequest {};
    Ok(node
        .mesh()
        .await?
        .get_mesh_status(request)
        .await?
        .into_inner())
}

/// The state of member `node` in `status`, if it is listed.
pub fn member_state(
    status: &meshd_proto::link::MeshStatus,
    node: u64,
) -> Option<meshd_proto::link::MemberState> {
    status
        .members
        .iter()
        .find(|m| m.node_id == node)
        .map(|m| m.state())
}

/// Waits until `check` holds for the mesh status of every node in `nodes` (indexes); the
/// error shows the first view that did not and every node's log tail. With
/// `TEST_HOLD_ON_FAILURE` set, a failing wait keeps the nodes running for 15 minutes first.
pub async fn wait_for_mesh(
    cluster: &Cluster,
    nodes: &[usize],
    what: &str,
    limit: Duration,
    check: impl Fn(&meshd_proto::link::MeshStatus) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let mut failing = None;
        for &i in nodes {
            let status = mesh_status(cluster.node(i)).await?;
            if !check(&status) {
                failing = Some((i, status));
                break;
            }
        }
        let Some((i, status)) = failing else {
            return Ok(start.elapsed());
        };
        if start.elapsed() > limit {
            if std::env::var_os("TEST_HOLD_ON_FAILURE").is_some() {
                // Debugging aid: the nodes stay up for gdb, the CLI or a look at their data.
                eprintln!(
                    "holding the cluster in {} for 15 min: node {} never saw {what}",
                    cluster.dir().display(),
                    cluster.node(i).spec.node_id
                );
                tokio::time::sleep(Duration::from_secs(900)).await;
            }
            bail!(
                "node {} never saw {what} in {limit:?}: {status:#?}\n{}",
                cluster.node(i).spec.node_id,
                cluster.log_tails(i, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP GET of a node's metrics port (test-side client): the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: meshd\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    Ok((code, body.to_owned()))
}

/// A node's Prometheus text (`GET /metrics`).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (code, body) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "GET /metrics answered {code}");
    Ok(body)
}
