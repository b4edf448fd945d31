//! `meshd mesh …`: the operator's side of the mesh lifecycle, a gRPC client of a running node's
//! `meshd.v1.MeshService`.

use std::{
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use meshd_proto::link::{
    EvictNodeRequest, GetMeshStatusRequest, JoinMeshRequest, JoinPolicy, LeaveMeshRequest,
    MemberState, MeshHealth, MeshStatus, SeedMeshRequest, StartMeshRequest, StopMeshRequest,
    mesh_service_client::MeshServiceClient,
};

use crate::topology::{self, Topology};

/// Who may join a seeded mesh.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Policy {
    /// Anyone who reaches a member.
    Open,
    /// Only with the join key.
    KeyRequired,
    /// No one.
    Closed,
}

/// What to do to the node's mesh.
#[derive(Debug, Subcommand)]
pub enum MeshAction {
    /// Print the mesh as the node sees it.
    Status,
    /// Create a new mesh with this node as its first member.
    Seed {
        /// Mesh name.
        #[arg(long)]
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Join policy.
        #[arg(long, value_enum, default_value = "key-required")]
        policy: Policy,
        /// File holding the join key (KEY_REQUIRED; at least 8 bytes; `-` reads standard
        /// input). Or set MESHD_JOIN_KEY. Never on the command line, where `ps` shows it.
        /// Stored only as an argon2 hash.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Join the mesh of the node whose link listener is at ADDR.
    Join {
        /// IP:port of a member's link listener.
        addr: String,
        /// File holding the mesh's join key (`-` reads standard input). Or set
        /// MESHD_JOIN_KEY. Never on the command line.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The mesh authority (64 hex digits, `status` on any member shows it): the key is
        /// sent only to a member that authority certified.
        #[arg(long, default_value = "")]
        authority: String,
    },
    /// Close every link with a goodbye and stop dialing (membership stays persisted).
    Stop,
    /// Link to the known members again after `stop`.
    Start,
    /// Leave the mesh for good.
    Leave,
    /// Remove a node from the mesh; members refuse it until it joins again.
    Evict {
        /// Its node id.
        node_id: u64,
    },
    /// The mesh as the node sees it: members, links with RTT and loss, routes; as text, or
    /// drawn as Graphviz DOT or SVG.
    Topology {
        /// What to print.
        #[arg(long, value_enum, default_value = "text")]
        format: TopologyFormat,
        /// Write it to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// How `meshd mesh topology` prints the mesh.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TopologyFormat {
    /// Lines of text.
    Text,
    /// Graphviz DOT.
    Dot,
    /// A self-contained SVG drawing.
    Svg,
}

/// Runs one action against the node serving gRPC at `grpc`.
pub fn run(grpc: &str, action: MeshAction) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach meshd's gRPC at {grpc}; fix: --grpc ADDR"))?;
        let mut client = MeshServiceClient::new(channel);
        let status = match action {
            MeshAction::Status => client.get_mesh_status(GetMeshStatusRequest {}).await?,
            MeshAction::Seed {
                name,
                description,
                policy,
                key_file,
            } => {
                let key = join_key(key_file.as_deref())?;
                let join_policy = match policy {
                    Policy::Open => JoinPolicy::Open,
                    Policy::KeyRequired => JoinPolicy::KeyRequired,
                    Policy::Closed => JoinPolicy::Closed,
                };
                let request = SeedMeshRequest {
                    name,
                    description,
                    join_policy: join_policy as i32,
                    join_key: key,
                };
                client.seed_mesh(request).await?
            }
            MeshAction::Join {
                addr,
                key_file,
                authority,
            } => {
                let key = join_key(key_file.as_deref())?;
                let request = JoinMeshRequest {
                    addr,
                    join_key: key,
                    timeout_seconds: 30,
                    mesh_authority: authority,
                };
                client.join_mesh(request).await?
            }
            MeshAction::Stop => client.stop_mesh(StopMeshRequest {}).await?,
            MeshAction::Start => client.start_mesh(StartMeshRequest {}).await?,
            MeshAction::Leave => {
                let answer = client.leave_mesh(LeaveMeshRequest {}).await?.into_inner();
                println!("{}", answer.message);
                return Ok(());
            }
            MeshAction::Topology { format, output } => {
                let status = client
                    .get_mesh_status(GetMeshStatusRequest {})
                    .await?
                    .into_inner();
                let mut control = meshd_proto::mesh::mesh_control_client::MeshControlClient::new(
                    endpoint.connect().await?,
                );
                let routes = control
                    .get_routing_table(meshd_proto::mesh::GetRoutingTableRequest {})
                    .await?
                    .into_inner()
                    .routes;
                let topology = topology_of(&status, &routes);
                let text = match format {
                    TopologyFormat::Text => topology.to_text(),
                    TopologyFormat::Dot => topology.to_dot(),
                    TopologyFormat::Svg => topology.to_svg(),
                };
                match output {
                    Some(path) => std::fs::write(&path, text)
                        .with_context(|| format!("cannot write {}", path.display()))?,
                    None => print!("{text}"),
                }
                return Ok(());
            }
            MeshAction::Evict { node_id } => {
                let request = EvictNodeRequest {
                    node_id,
                    reason: String::new(),
                };
                client.evict_node(request).await?
            }
        };
        print_status(&status.into_inner());
        Ok(())
    })
}

/// The join key from `--key-file` (`-`: standard input) or `MESHD_JOIN_KEY`, without its
/// trailing newline; "" when neither is given (an OPEN mesh needs none).
fn join_key(file: Option<&Path>) -> anyhow::Result<String> {
    let mut key = match file {
        Some(path) if path == Path::new("-") => {
            let mut key = String::new();
            std::io::stdin()
                .read_to_string(&mut key)
                .context("reading the join key from standard input")?;
            key
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the join key from {}; fix: --key-file PATH",
                path.display()
            )
        })?,
        None => std::env::var("MESHD_JOIN_KEY").unwrap_or_default(),
    };
    while key.ends_with('\n') || key.ends_with('\r') {
        key.pop();
    }
    Ok(key)
}

fn topology_of(status: &MeshStatus, routes: &[meshd_proto::mesh::RouteEntry]) -> Topology {
    Topology {
        local: status.local_node_id,
        health: health_name(status.health()).into(),
        members: status
            .members
            .iter()
            .map(|m| topology::Member {
                node: m.node_id,
                state: state_name(m.state()).into(),
                linked: m.linked,
            })
            .collect(),
        links: status
            .links
            .iter()
            .map(|l| topology::Link {
                from: l.from_node,
                to: l.to_node,
                rtt_us: l.rtt_us,
                loss_ppm: l.loss_ppm,
            })
            .collect(),
        routes: routes
            .iter()
            .map(|r| topology::Route {
                destination: r.dst_node,
                next_hops: r.next_hops.clone(),
                cost: r.cost,
            })
            .collect(),
    }
}

fn health_name(health: MeshHealth) -> &'static str {
    match health {
        MeshHealth::Healthy => "HEALTHY",
        MeshHealth::Degraded => "DEGRADED",
        MeshHealth::Critical => "CRITICAL",
        MeshHealth::Unspecified => "?",
    }
}

fn state_name(state: MemberState) -> &'static str {
    match state {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Dead => "dead",
        MemberState::Unspecified => "?",
    }
}

fn print_status(status: &MeshStatus) {
    let health = health_name(status.health());
    println!(
        "mesh {} {:?} ({}), node {}: {health}, {}/{} members online",
        if status.mesh_id.is_empty() {
            "-"
        } else {
            &status.mesh_id
        },
        status.mesh_name,
        status.mesh_state,
        status.local_node_id,
        status.online_members,
        status.total_members
    );
    if !status.mesh_authority.is_empty() {
        println!("  authority {}", status.mesh_authority);
    }
    for m in &status.members {
        let state = state_name(m.state());
        println!(
            "  node {:>6}  {state:<7}  gen {:<4} inc {:<4} {}  {:<12} {}",
            m.node_id,
            m.generation,
            m.incarnation,
            if m.linked { "linked" } else { "      " },
            m.name,
            m.capabilities.join(",")
        );
    }
    if !status.evicted.is_empty() {
        println!("  evicted: {:?}", status.evicted);
    }
}
