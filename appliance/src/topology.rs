//! The mesh drawn for an operator (`meshd mesh topology`): as text, as Graphviz DOT, or as a
//! self-contained SVG (members on a circle, links as edges labelled with their RTT and loss).
//! Pure: the command fills a [`Topology`] from the node's rpcs and prints what this renders.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

/// A member as the node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its node id.
    pub node: u64,
    /// "alive", "suspect" or "dead".
    pub state: String,
    /// Whether the viewing node has a direct link to it.
    pub linked: bool,
}

/// A directed link of the link-state database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// One end.
    pub from: u64,
    /// The other.
    pub to: u64,
    /// Its round-trip time.
    pub rtt_us: u64,
    /// Its loss, parts per million.
    pub loss_ppm: u32,
}

/// A route of the viewing node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Where to.
    pub destination: u64,
    /// Through which neighbours.
    pub next_hops: Vec<u64>,
    /// Its cost (the routing table's units).
    pub cost: u32,
}

/// The mesh as one node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// The viewing node.
    pub local: u64,
    /// Its health ("HEALTHY", "DEGRADED", "CRITICAL").
    pub health: String,
    /// Every member.
    pub members: Vec<Member>,
    /// Every link.
    pub links: Vec<Link>,
    /// Its routes.
    pub routes: Vec<Route>,
}

impl Topology {
    /// Undirected links, each once (the lower id first), with the worse figures of its two
    /// directions.
    fn edges(&self) -> Vec<Link> {
        let mut edges: Vec<Link> = Vec::new();
        for l in &self.links {
            let (a, b) = (l.from.min(l.to), l.from.max(l.to));
            match edges.iter_mut().find(|e| e.from == a && e.to == b) {
                Some(e) => {
                    e.rtt_us = e.rtt_us.max(l.rtt_us);
                    e.loss_ppm = e.loss_ppm.max(l.loss_ppm);
                }
                None => edges.push(Link {
                    from: a,
                    to: b,
                    rtt_us: l.rtt_us,
                    loss_ppm: l.loss_ppm,
                }),
            }
        }
        edges.sort_by_key(|e| (e.from, e.to));
        edges
    }

    fn label(link: &Link) -> String {
        format!(
            "{:.2} ms, {:.2} % loss",
            link.rtt_us as f64 / 1000.0,
            f64::from(link.loss_ppm) / 10_000.0
        )
    }

    /// Members, links and routes as lines of text.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "node {} sees the mesh {}", self.local, self.health);
        let _ = writeln!(out, "members:");
        for m in &self.members {
            let _ = writeln!(
                out,
                "  {:>8}  {:<7}  {}{}",
                m.node,
                m.state,
                if m.linked { "linked" } else { "" },
                if m.node == self.local {
                    "(this node)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(out, "links:");
        for e in self.edges() {
            let _ = writeln!(out, "  {:>8} — {:<8}  {}", e.from, e.to, Self::label(&e));
        }
        let _ = writeln!(out, "routes:");
        for r in &self.routes {
            let hops: Vec<String> = r.next_hops.iter().map(u64::to_string).collect();
            let _ = writeln!(
                out,
                "  to {:>8} via {:<16} cost {}",
                r.destination,
                hops.join(","),
                r.cost
            );
        }
        out
    }

    /// Graphviz DOT (`dot -Tsvg` draws it).
    pub fn to_dot(&self) -> String {
        let mut out = String::from("graph mesh {\n  node [shape=circle, style=filled];\n");
        for m in &self.members {
            let _ = writeln!(
                out,
                "  n{} [label=\"{}\", fillcolor=\"{}\"{}];",
                m.node,
                m.node,
                color(&m.state),
                if m.node == self.local {
                    ", penwidth=3"
                } else {
                    ""
                }
            );
        }
        for e in self.edges() {
            let _ = writeln!(
                out,
                "  n{} -- n{} [label=\"{}\"];",
                e.from,
                e.to,
                Self::label(&e)
            );
        }
        out.push_str("}\n");
        out
    }

    /// A self-contained SVG: members on a circle, links as labelled edges.
    pub fn to_svg(&self) -> String {
        const SIZE: f64 = 480.0;
        const RADIUS: f64 = 180.0;
        let mut nodes: Vec<&Member> = self.members.iter().collect();
        nodes.sort_by_key(|m| m.node);
        let n = nodes.len().max(1) as f64;
        let at = |node: u64| -> Option<(f64, f64)> {
            let i = nodes.iter().position(|m| m.node == node)? as f64;
            let angle = 2.0 * std::f64::consts::PI * i / n - std::f64::consts::FRAC_PI_2;
            Some((
                SIZE / 2.0 + RADIUS * angle.cos(),
                SIZE / 2.0 + RADIUS * angle.sin(),
            ))
        };
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SIZE}\" height=\"{SIZE}\" \
             viewBox=\"0 0 {SIZE} {SIZE}\" font-family=\"sans-serif\" font-size=\"12\">\n"
        );
        for e in self.edges() {
            let (Some((x1, y1)), Some((x2, y2))) = (at(e.from), at(e.to)) else {
                continue;
            };
            let _ = writeln!(
                out,
                "  <line id=\"edge-{}-{}\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" \
                 y2=\"{y2:.1}\" stroke=\"#4a5568\" stroke-width=\"2\"/>",
                e.from, e.to
            );
            let _ = writeln!(
                out,
                "  <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#4a5568\">{}</text>",
                (x1 + x2) / 2.0,
                (y1 + y2) / 2.0 - 4.0,
                Self::label(&e)
            );
        }
        for m in &nodes {
            let Some((x, y)) = at(m.node) else { continue };
            let _ = writeln!(
                out,
                "  <circle id=\"vertex-{}\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"22\" fill=\"{}\" \
                 stroke=\"#222\" stroke-width=\"{}\"/>",
                m.node,
                color(&m.state),
                if m.node == self.local { 4 } else { 1 }
            );
            let _ = writeln!(
                out,
                "  <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                y + 4.0,
                m.node
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

fn color(state: &str) -> &'static str {
    match state {
        "alive" => "#9ae6b4",
        "suspect" => "#faf089",
        "dead" => "#feb2b2",
        _ => "#e2e8f0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Topology {
        let member = |node, state: &str, linked| Member {
            node,
            state: state.into(),
            linked,
        };
        let link = |from, to, rtt_us, loss_ppm| Link {
            from,
            to,
            rtt_us,
            loss_ppm,
        };
        Topology {
            local: 1,
            health: "DEGRADED".into(),
            members: vec![
                member(1, "alive", false),
                member(2, "alive", true),
                member(3, "dead", false),
            ],
            links: vec![link(1, 2, 800, 0), link(2, 1, 1200, 100)],
            routes: vec![Route {
                destination: 2,
                next_hops: vec![2],
                cost: 10,
            }],
        }
    }

    #[test]
    fn both_directions_of_a_link_are_one_edge_with_the_worse_figures() {
        let edges = sample().edges();
        assert_eq!(edges.len(), 1);
        assert_eq!((edges[0].rtt_us, edges[0].loss_ppm), (1200, 100));
    }

    #[test]
    fn dot_names_every_member_and_edge() {
        let dot = sample().to_dot();
        assert!(dot.starts_with("graph mesh {"));
        for needle in [
            "n1 [",
            "n2 [",
            "n3 [",
            "n1 -- n2",
            "1.20 ms, 0.01 % loss",
            "#feb2b2",
        ] {
            assert!(dot.contains(needle), "{needle} in {dot}");
        }
        assert!(!dot.contains("n2 -- n1"));
    }

    #[test]
    fn svg_draws_every_member_and_edge() {
        let svg = sample().to_svg();
        for needle in [
            "vertex-1", "vertex-2", "vertex-3", "edge-1-2", "<svg", "</svg>",
        ] {
            assert!(svg.contains(needle), "{needle}");
        }
        assert!(!svg.contains("edge-1-3"));
    }

    #[test]
    fn text_lists_members_links_and_routes() {
        let text = sample().to_text();
        assert!(text.contains("node 1 sees the mesh DEGRADED"));
        assert!(text.contains("dead"));
        assert!(text.contains("to        2 via 2"));
    }
}
