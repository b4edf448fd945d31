//! One slow consumer must not take the mesh down (issue 23), across real processes.
//!
//! Three nodes A, B, C, fully linked, one control group; on B a subscriber that reads one
//! message every 20 ms (or, second test, as fast as it can); A floods B with 64 KiB
//! fire-and-forget messages from 16 senders while C writes to the control group 20 times a
//! second (`meshd_tests::saturate`, the scenario `loadgen saturate` prints). Before the fix
//! (issue 23's report, and `loadgen results` of that day) every node suspected every other
//! within 2 s, B declared C dead, the A–B link was cut and re-made, the control group refused
//! writes and fire-and-forget messages were lost silently.
//!
//! Asserted: no member is ever seen SUSPECT or DEAD, no link is re-made, C is untouched, no
//! control-group write is refused, every status poll is answered, and every accepted message
//! that did not arrive has A's status PENDING_CLIENT (B turned it away and said so) or
//! PENDING_NODE (a relay, or A's own shard, dropped it at a congested next hop and said so),
//! and every internal DB update A sends B meanwhile (`qos_class = 2`, to B's other
//! subscriber, on the priority lane) is delivered. Printed with generous bounds: the control lanes' RTT p99, the
//! commit p99 against the idle ones, and the DB updates' delivery p99.

use meshd_tests::{
    exclusive,
    saturate::{self, Phase, SaturateReport, Scenario},
};

fn scenario(slow_ms: u64) -> Scenario {
    Scenario {
        slow_ms,
        size: 64 << 10,
        in_flight: 16,
        idle: 3,
        duration: 8,
        writes: 20,
        collapsed: false,
    }
}

fn print(report: &SaturateReport) {
    for phase in &report.phases {
        let (rtt, link) = phase.worst_rtt_p99();
        let (p50, p99) = phase.commit_us();
        let (db, db_p50, db_p99) = phase.db_us();
        println!(
            "{}: suspected {:?}, dead {:?}, re-made {:?}, worst link RTT p99 {:.1} ms ({link:?}), \
             commit p50 {:.1} ms p99 {:.1} ms, writes {} ok {:?} refused, {} polls unanswered, \
             DB updates A→B {db} delivered {} failed, p50 {:.1} ms p99 {:.1} ms",
            phase.name,
            phase.suspected,
            phase.dead,
            phase.remade,
            rtt as f64 / 1000.0,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            phase.writes_ok,
            phase.writes_refused,
            phase.unanswered_polls,
            phase.db_failed,
            db_p50 as f64 / 1000.0,
            db_p99 as f64 / 1000.0
        );
    }
    let f = &report.flood;
    println!(
        "flood: answers {:?}, refused calls {:?}; accepted {}, delivered {}, not delivered by \
         status at A {:?}",
        f.answers, f.refused, f.accepted, f.delivered, f.undelivered
    );
}

/// What every phase must show, idle or flooded.
fn assert_live(phase: &Phase, idle: &Phase) {
    let name = phase.name;
    assert!(
        phase.suspected.is_empty(),
        "{name}: members seen SUSPECT (observer, member): {:?}",
        phase.suspected
    );
    assert!(
        phase.dead.is_empty(),
        "{name}: members seen DEAD: {:?}",
        phase.dead
    );
    assert!(!phase.c_touched(), "{name}: C was touched");
    assert!(
        phase.remade.is_empty(),
        "{name}: links re-made (observer, peer): {:?}",
        phase.remade
    );
    assert!(
        phase.writes_refused.is_empty(),
        "{name}: control-group writes refused: {:?}",
        phase.writes_refused
    );
    assert!(phase.writes_ok >= 20, "{name}: {} writes", phase.writes_ok);
    assert_eq!(phase.unanswered_polls, 0, "{name}: status polls unanswered");
    // Issue 23's target is 5 ms. Measured 1.4-1.8 ms with the data loops' time slices
    // (`shards::slice`); without them (glommio's 100 ms preemption timer alone) 9-19 ms and
    // up to 101 ms, which this bound fails. The commit bound is generous (a loaded CI machine
    // is noisier): a regression towards the melt-down (seconds, writes refused) fails it.
    let (rtt, _) = phase.worst_rtt_p99();
    assert!(rtt < 10_000, "{name}: control lane RTT p99 {rtt} µs");
    let (_, p99) = phase.commit_us();
    let (_, idle_p99) = idle.commit_us();
    assert!(
        p99 < (10 * idle_p99).max(500_000),
        "{name}: commit p99 {p99} µs (idle {idle_p99} µs)"
    );
    // A DB update never waits behind the client flood: its own lane, outbox bound, parking
    // lot and saturation hold at A, its own delivery pump at B. Measured 1.3 ms p50 and 72-93
    // ms p99 under the slow subscriber's flood (10-15 ms p50 under the fast one); with one
    // delivery pump at B and class-blind holds and parking at A, 176-206 ms p50 and 220-257
    // ms p99, which the p50 bound fails. Generous, as above.
    let (db, db_p50, db_p99) = phase.db_us();
    assert_eq!(phase.db_failed, 0, "{name}: DB updates A→B not delivered");
    assert!(db >= 20, "{name}: {db} DB updates");
    assert!(db_p50 < 100_000, "{name}: DB update p50 {db_p50} µs");
    assert!(db_p99 < 1_000_000, "{name}: DB update p99 {db_p99} µs");
}

fn assert_nothing_lost_silently(report: &SaturateReport) {
    let f = &report.flood;
    assert!(f.accepted > 100, "the flood hardly ran: {f:?}");
    assert_eq!(
        f.lost_silently(),
        0,
        "accepted messages that neither arrived nor were reported turned away or dropped: {:?}",
        f.undelivered
    );
}

/// Runs the scenario and checks every phase and the flood.
async fn run_and_check(slow_ms: u64) -> anyhow::Result<()> {
    let report = saturate::run(&scenario(slow_ms)).await?;
    print(&report);
    let idle = &report.phases[0];
    for phase in &report.phases {
        assert_live(phase, idle);
    }
    assert_nothing_lost_silently(&report);
    Ok(())
}

#[meshd_tests::test(limit = 180)]
async fn a_slow_subscriber_holds_back_only_its_own_traffic_and_the_mesh_stays_live()
-> anyhow::Result<()> {
    let _serial = exclusive().await;
    run_and_check(20).await
}

#[meshd_tests::test(limit = 180)]
async fn a_flood_to_a_fast_subscriber_keeps_heartbeats_and_commits_on_time() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    run_and_check(0).await
}
