//! Nodes in their own network namespaces, so a partition can be made in the network itself
//! rather than asked of meshd (DropLink) or faked with a frozen process (SIGSTOP).
//!
//! One namespace per node, reached over two bridges in the root namespace: "mgmt", which the
//! test process (in the root namespace) uses to call each node's gRPC api, and "mesh", which
//! carries the links between nodes. Cutting a node's mesh port leaves its api reachable, so a
//! subscriber or publisher sees the partition only through meshd.
//!
//! Needs root and iproute2 (`ip`, `bridge`). Every name carries the test's pid, so runs side by
//! side do not collide; everything is deleted in `Drop`, also when the test panics.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, bail};

/// Where one node lives: its namespace and its addresses on the two bridges.
#[derive(Clone, Debug)]
pub struct Place {
    /// The namespace (`ip netns exec <ns>` runs meshd there).
    pub ns: String,
    /// The node's address on the mgmt bridge: its gRPC api listens here.
    pub mgmt: Ipv4Addr,
    /// The node's address on the mesh bridge: its link listener binds here.
    pub mesh: Ipv4Addr,
    /// The root-namespace end of its mesh veth (a port of the mesh bridge).
    mesh_port: String,
}

/// The namespaces, veths and bridges of one test, deleted on drop.
pub struct Netns {
    places: Vec<Place>,
    /// Root-namespace interfaces made so far (bridges and veth ends), for `Drop`.
    links: Vec<String>,
}

/// Inside every namespace the mesh veth has this name (names are per namespace).
const MESH_IF: &str = "mesh";
const MGMT_IF: &str = "mgmt";

impl Netns {
    /// Creates `nodes` namespaces wired to a fresh mgmt and mesh bridge.
    pub fn new(nodes: usize) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=200).contains(&nodes), "1 to 200 nodes, not {nodes}");
        let pid = std::process::id();
        let subnet = free_subnet(pid)?;
        // Interface names are at most 15 bytes: "md" + pid (≤ 7 digits) + a letter + index.
        let tag = format!("md{pid}");
        let mut net = Self {
            places: Vec::new(),
            links: Vec::new(),
        };
        for i in 0..nodes {
            let ns = format!("meshd-{pid}-{i}");
            if let Err(e) = ip(&["netns", "add", &ns]) {
                bail!(
                    "cannot create network namespace {ns}: this test needs root and iproute2 \
                     (`ip netns add`): {e:#}"
                );
            }
            let host = u8::try_from(i + 1).context("host number")?;
            net.places.push(Place {
                ns,
                mgmt: Ipv4Addr::new(10, 231, subnet, host),
                mesh: Ipv4Addr::new(10, 232, subnet, host),
                mesh_port: format!("{tag}m{i}"),
            });
        }
        let mgmt_bridge = format!("{tag}g");
        let mesh_bridge = format!("{tag}m");
        for bridge in [&mgmt_bridge, &mesh_bridge] {
            ip(&["link", "add", bridge, "type", "bridge"])?;
            net.links.push(bridge.clone());
            ip(&["link", "set", bridge, "up"])?;
        }
        // The root namespace's own foot on mgmt: the route by which the test reaches the apis.
        ip(&[
            "addr",
            "add",
            &format!("10.231.{subnet}.254/24"),
            "dev",
            &mgmt_bridge,
        ])?;
        for (i, place) in net.places.clone().iter().enumerate() {
            let ns = &place.ns;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            for (port, bridge, inner, addr) in [
                (format!("{tag}g{i}"), &mgmt_bridge, MGMT_IF, place.mgmt),
                (place.mesh_port.clone(), &mesh_bridge, MESH_IF, place.mesh),
            ] {
                // The inner end is made inside the namespace, so its name only has to be
                // unique there.
                ip(&[
                    "link", "add", &port, "type", "veth", "peer", "name", inner, "netns", ns,
                ])?;
                net.links.push(port.clone());
                ip(&["link", "set", &port, "master", bridge, "up"])?;
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", inner])?;
                ip(&["-n", ns, "link", "set", inner, "up"])?;
            }
        }
        Ok(net)
    }

    /// Node `i`'s place.
    pub fn place(&self, i: usize) -> &Place {
        &self.places[i]
    }

    /// A silent partition of node `i`: the mesh bridge stops forwarding to and from its port,
    /// while both ends of its veth stay up with carrier. Nothing tells meshd; it has to notice
    /// from silence (missed heartbeats, unanswered connects).
    ///
    /// (netem loss 100% would do the same on the interface itself, but kernels without
    /// sch_netem exist; a disabled bridge port needs nothing beyond the bridge.)
    pub fn silence(&self, i: usize) -> anyhow::Result<()> {
        bridge_port_state(&self.places[i].mesh_port, "disabled")
    }

    /// A hard partition of node `i`: both ends of its mesh veth go down, as a pulled cable
    /// would; the node's mesh address stays configured but its subnet becomes unreachable.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        let place = &self.places[i];
        ip(&["link", "set", &place.mesh_port, "down"])?;
        ip(&["-n", &place.ns, "link", "set", MESH_IF, "down"])
    }

    /// Undoes `silence` and `cut` of node `i`.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        let place = &self.places[i];
        ip(&["-n", &place.ns, "link", "set", MESH_IF, "up"])?;
        ip(&["link", "set", &place.mesh_port, "up"])?;
        bridge_port_state(&place.mesh_port, "forwarding")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for place in &self.places {
            // A meshd still running in the namespace (its node was leaked) keeps the namespace
            // and its veths alive after `ip netns del`; only processes this test started can
            // be in a namespace named after its pid.
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &place.ns])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a pid read from our own namespace.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            if let Err(e) = ip(&["netns", "del", &place.ns]) {
                eprintln!("netns cleanup: {e:#}");
            }
        }
        // Deleting a namespace deletes its veth ends and with them their peers, so most of
        // these are gone already; the bridges are not.
        for link in self.links.iter().rev() {
            let exists = Command::new("ip")
                .args(["link", "show", "dev", link])
                .output()
                .is_ok_and(|o| o.status.success());
            if exists && let Err(e) = ip(&["link", "del", link]) {
                eprintln!("netns cleanup: {e:#}");
            }
        }
    }
}

/// Runs `ip args…`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn bridge_port_state(port: &str, state: &str) -> anyhow::Result<()> {
    run("bridge", &["link", "set", "dev", port, "state", state])
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An x for 10.231.x.0/24 (mgmt) and 10.232.x.0/24 (mesh) that no route of the root namespace
/// overlaps: the mgmt subnet gets a root-namespace address, so it must not shadow a real
/// network or another run's.
fn free_subnet(pid: u32) -> anyhow::Result<u8> {
    let start = pid % 250;
    for step in 0..250 {
        let x = u8::try_from((start + step) % 250 + 1).context("subnet")?;
        let overlapping = ["10.231", "10.232"].iter().any(|net| {
            let prefix = format!("{net}.{x}.0/24");
            // `root`: routes inside the prefix; `match`: routes containing it.
            ["root", "match"].iter().any(|how| {
                Command::new("ip")
                    .args(["-4", "route", "show", "table", "all", how, &prefix])
                    .output()
                    .map_or(true, |o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .any(|l| !l.starts_with("default"))
                    })
            })
        });
        if !overlapping {
            return Ok(x);
        }
    }
    bail!("no free 10.231.x.0/24 and 10.232.x.0/24 subnet (or `ip route` does not run)")
}
