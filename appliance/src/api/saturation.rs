//! Destinations whose subscribers are not keeping up, as their delivery reports say.
//!
//! A destination waits on a full subscriber at most briefly (`desk::SUBSCRIBER_WAIT`, 250 ms in all per second),
//! then turns that subscriber's messages away until it catches up (a longer wait would stop
//! the node reading its links' data, issue 23), and says so in its report frame
//! (`DeliveryReports.saturated`). The sender then holds its next sends to that destination
//! for [`HOLD`], so its callers are slowed to about the subscriber's pace instead of sending
//! messages that would be turned away. A send held past its patience is refused with
//! `RESOURCE_EXHAUSTED` ("destination saturated"), never queued to be lost. Client traffic
//! and system / DB traffic are held apart ([`Held`]): the destination delivers them through
//! pumps of their own and its report frames carry the class they answer, so a saturated client
//! subscriber never holds a DB update. Pure: the caller passes the time.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use meshd_shards::frame::TrafficClass;

/// What is held: a destination's client traffic, or its system and DB traffic (`true`).
pub(crate) type Held = (u64, bool);

/// The hold a message of `class` to `dst` is under.
pub(crate) fn held(dst: u64, class: TrafficClass) -> Held {
    (
        dst,
        matches!(class, TrafficClass::System | TrafficClass::DbUpdate),
    )
}

/// How long a "saturated" report holds sends to its destination. Each report that still
/// says so renews it; when it lapses the held callers go, and their verdicts say whether
/// the queue has room again.
pub(crate) const HOLD: Duration = Duration::from_millis(200);

/// Destinations remembered at once. Only nodes this node sends to report to it, and a lapsed
/// entry is dropped when the map is full, so this is never reached in an honest mesh.
pub(crate) const MAX_HELD: usize = 4096;

/// Destinations held, with the end of their hold.
#[derive(Debug, Default)]
pub(crate) struct Saturation {
    held: HashMap<Held, Instant>,
}

impl Saturation {
    /// A report frame from `dst` arrived: `saturated` starts or renews its hold, a frame
    /// without it ends the hold at once (the queue has room again).
    pub(crate) fn on_report(&mut self, dst: Held, saturated: bool, now: Instant) {
        if !saturated {
            self.held.remove(&dst);
            return;
        }
        if self.held.len() >= MAX_HELD && !self.held.contains_key(&dst) {
            self.held.retain(|_, until| *until > now);
            if self.held.len() >= MAX_HELD {
                return;
            }
        }
        self.held.insert(dst, now + HOLD);
    }

    /// Until when sends to `dst` are held, if they are.
    pub(crate) fn held_until(&mut self, dst: Held, now: Instant) -> Option<Instant> {
        match self.held.get(&dst) {
            Some(&until) if until > now => Some(until),
            Some(_) => {
                self.held.remove(&dst);
                None
            }
            None => None,
        }
    }

    /// Destinations held now.
    #[cfg(test)]
    pub(crate) fn held(&self, now: Instant) -> usize {
        self.held.values().filter(|until| **until > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saturated_report_holds_its_destination_until_it_lapses_or_room_is_reported() {
        let t0 = Instant::now();
        let mut s = Saturation::default();
        assert_eq!(s.held_until((7, false), t0), None);
        s.on_report((7, false), true, t0);
        assert_eq!(s.held_until((7, false), t0), Some(t0 + HOLD));
        assert_eq!(
            s.held_until((8, false), t0),
            None,
            "only the reporting destination"
        );
        // Renewed by the next saturated report, lapses without one.
        s.on_report((7, false), true, t0 + HOLD / 2);
        assert_eq!(
            s.held_until((7, false), t0 + HOLD),
            Some(t0 + HOLD / 2 + HOLD)
        );
        assert_eq!(s.held_until((7, false), t0 + 2 * HOLD), None);
        // A report without the flag ends the hold at once.
        s.on_report((7, false), true, t0);
        s.on_report((7, false), false, t0);
        assert_eq!(s.held_until((7, false), t0), None);
        assert_eq!(s.held(t0), 0);
    }

    #[test]
    fn a_saturated_client_subscriber_never_holds_system_or_db_traffic() {
        let t0 = Instant::now();
        let mut s = Saturation::default();
        s.on_report(held(7, TrafficClass::Client), true, t0);
        assert!(s.held_until(held(7, TrafficClass::Client), t0).is_some());
        assert_eq!(s.held_until(held(7, TrafficClass::DbUpdate), t0), None);
        assert_eq!(s.held_until(held(7, TrafficClass::System), t0), None);
        s.on_report(held(7, TrafficClass::DbUpdate), true, t0);
        assert!(s.held_until(held(7, TrafficClass::System), t0).is_some());
    }

    #[test]
    fn the_map_stays_bounded_and_lapsed_entries_make_room() {
        let t0 = Instant::now();
        let mut s = Saturation::default();
        for dst in 0..MAX_HELD as u64 {
            s.on_report((dst, false), true, t0);
        }
        s.on_report((u64::MAX, false), true, t0);
        assert_eq!(
            s.held_until((u64::MAX, false), t0),
            None,
            "full: not remembered"
        );
        assert_eq!(s.held(t0), MAX_HELD);
        let later = t0 + HOLD;
        s.on_report((u64::MAX, false), true, later);
        assert_eq!(s.held_until((u64::MAX, false), later), Some(later + HOLD));
        assert_eq!(s.held(later), 1);
    }
}
