//! `loadgen saturate`: the liveness of a mesh whose data path is saturated (issue 23's
//! scenario, `meshd_tests::saturate`, printed as a table).

use std::collections::BTreeSet;

use meshd_tests::saturate::{A, B, C, SaturateReport, Scenario};

/// Flags of `loadgen saturate`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SaturateArgs {
    /// Milliseconds B's subscriber waits between two messages (0: a fast subscriber).
    #[arg(long, default_value_t = 20)]
    pub(crate) slow_ms: u64,
    /// Payload bytes of A's messages to B.
    #[arg(long, default_value_t = 65536)]
    pub(crate) size: usize,
    /// A's concurrent senders.
    #[arg(long, default_value_t = 16)]
    pub(crate) in_flight: usize,
    /// Seconds of the idle baseline.
    #[arg(long, default_value_t = 3)]
    pub(crate) idle: u64,
    /// Seconds of the flood.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Control-group writes per second from C, in both phases.
    #[arg(long, default_value_t = 20)]
    pub(crate) writes: u64,
    /// Run every link collapsed (one connection, no control lane): the comparison row.
    #[arg(long)]
    pub(crate) collapsed: bool,
}

impl SaturateArgs {
    pub(crate) fn scenario(&self) -> Scenario {
        Scenario {
            slow_ms: self.slow_ms,
            size: self.size,
            in_flight: self.in_flight,
            idle: self.idle,
            duration: self.duration,
            writes: self.writes,
            collapsed: self.collapsed,
        }
    }
}

/// Runs the scenario on a fresh local mesh.
pub(crate) async fn run(args: &SaturateArgs) -> anyhow::Result<SaturateReport> {
    meshd_tests::saturate::run(&args.scenario()).await
}

fn pairs(set: &BTreeSet<(u64, u64)>) -> String {
    if set.is_empty() {
        return "none".into();
    }
    set.iter()
        .map(|(observer, member)| format!("{}→{}", name(*observer), name(*member)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn name(id: u64) -> &'static str {
    match id {
        A => "A",
        B => "B",
        C => "C",
        _ => "?",
    }
}

/// The table's head.
pub(crate) const HEAD: &str = "| subscriber | phase | seen SUSPECT (observer→member) | seen DEAD | C touched | links re-made | worst link RTT p99 | commit p50 / p99 | writes ok / refused | DB updates A→B: delivered (failed), p50 / p99 | polls unanswered | flood: accepted / delivered / turned away or dropped, said to A (PENDING_CLIENT, PENDING_NODE) / lost silently |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |";

/// One table row per phase.
pub(crate) fn rows(args: &SaturateArgs, report: &SaturateReport) -> Vec<String> {
    let lanes = if args.collapsed { "collapsed" } else { "split" };
    let subscriber = if args.slow_ms == 0 {
        format!("fast, {lanes}")
    } else {
        format!("1 per {} ms, {lanes}", args.slow_ms)
    };
    let f = &report.flood;
    let mut rows = Vec::new();
    for phase in &report.phases {
        let (rtt, link) = phase.worst_rtt_p99();
        let (p50, p99) = phase.commit_us();
        let (db_delivered, db_p50, db_p99) = phase.db_us();
        let c_touched = phase.c_touched();
        let refused: u64 = phase.writes_refused.values().sum();
        let flood = if phase.name == "flood" {
            format!(
                "{} / {} / {} / {}",
                f.accepted,
                f.delivered,
                f.reported_undelivered(),
                f.lost_silently()
            )
        } else {
            "-".into()
        };
        rows.push(format!(
            "| {subscriber} | {} | {} | {} | {} | {} | {:.1} ms ({}) | {:.1} / {:.1} ms | {} / {}{} | {db_delivered} ({}), {:.1} / {:.1} ms | {} | {flood} |",
            phase.name,
            pairs(&phase.suspected),
            pairs(&phase.dead),
            if c_touched { "yes" } else { "no" },
            pairs(&phase.remade),
            rtt as f64 / 1000.0,
            link.map_or("-".into(), |(a, b)| format!("{}–{}", name(a), name(b))),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            phase.writes_ok,
            refused,
            if phase.writes_refused.is_empty() {
                String::new()
            } else {
                format!(" {:?}", phase.writes_refused)
            },
            phase.db_failed,
            db_p50 as f64 / 1000.0,
            db_p99 as f64 / 1000.0,
            phase.unanswered_polls
        ));
    }
    rows
}

/// Prints the report as a table and the flood's answers.
pub(crate) fn print(args: &SaturateArgs, report: &SaturateReport) {
    println!("\n{HEAD}");
    for row in rows(args, report) {
        println!("{row}");
    }
    let f = &report.flood;
    println!(
        "\nflood A → B: answers {:?}, refused calls {:?}; accepted {}, delivered {}, not delivered {} (their status at A: {:?}; PENDING_CLIENT = turned away by B's full queue, PENDING_NODE = dropped at a congested next hop, each said to A)",
        f.answers,
        f.refused,
        f.accepted,
        f.delivered,
        f.accepted.saturating_sub(f.delivered),
        f.undelivered
    );
}
