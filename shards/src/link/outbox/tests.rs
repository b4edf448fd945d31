use super::*;
use crate::frame::{FrameType, TrafficClass};

fn header(frame_type: FrameType) -> Header {
    Header::new(frame_type, TrafficClass::Client, 1, 2)
}

/// What the data lane's writer would send next: the frame types of one WebSocket message.
fn next_message(outbox: &Outbox) -> Vec<FrameType> {
    next_on(outbox, Lane::Data)
}

/// What `lane`'s writer would send next.
fn next_on(outbox: &Outbox, lane: Lane) -> Vec<FrameType> {
    let Some(Take::Batch(batch, frames) | Take::Beats(batch, frames)) = outbox.try_take(lane, true)
    else {
        return Vec::new();
    };
    let mut types = Vec::new();
    let mut rest = &batch[..];
    while !rest.is_empty() {
        let (frame, used) = frame::decode(rest, 4 << 20).expect("a frame the outbox encoded");
        types.push(frame.header.frame_type);
        rest = &rest[used..];
    }
    assert_eq!(types.len() as u64, frames);
    types
}

#[test]
fn heartbeats_raft_and_reports_overtake_queued_data_in_their_own_order() {
    use FrameType::{AppAck, Data, DeliveryReport, Goodbye, Heartbeat, Raft};
    let outbox = Outbox::new(1 << 20, 4 << 20);
    // 600 KiB of data first: three WebSocket messages' worth.
    for _ in 0..3 {
        outbox.try_push(&header(Data), &[0; 200 << 10]).unwrap();
    }
    outbox.push_beat(Lane::Data, &header(Heartbeat)).unwrap();
    outbox.try_push(&header(Raft), b"append").unwrap();
    outbox.try_push(&header(Data), b"late").unwrap();
    outbox.try_push(&header(DeliveryReport), b"run").unwrap();
    outbox.push_now(&header(Goodbye), b"bye").unwrap();
    outbox.try_push(&header(AppAck), b"ack").unwrap();

    // The lane's own heartbeat alone (it measures this connection), then the rest.
    assert_eq!(next_message(&outbox), [Heartbeat]);
    assert_eq!(next_message(&outbox), [Raft, DeliveryReport, AppAck]);
    // Then the data, in order, the goodbye after everything queued before it.
    let mut rest = Vec::new();
    loop {
        let message = next_message(&outbox);
        if message.is_empty() {
            break;
        }
        rest.extend(message);
    }
    assert_eq!(rest, [Data, Data, Data, Data, Goodbye]);
}

#[test]
fn served_first_frames_get_the_control_allowance_when_data_fills_the_outbox() {
    use FrameType::{Data, Gossip, Raft};
    let outbox = Outbox::new(64 << 10, 4 << 20);
    while outbox.try_push(&header(Data), &[0; 8 << 10]).is_ok() {}
    assert_eq!(
        outbox.try_push(&header(Data), b"more"),
        Err(OutboxError::Full)
    );
    outbox.try_push(&header(Raft), &[0; 1024]).unwrap();
    outbox.try_push(&header(Gossip), &[0; 1024]).unwrap();
    // The allowance is a bound too: a flood of them stops at it.
    let mut queued = 0;
    while outbox.try_push(&header(Raft), &[0; 1024]).is_ok() {
        queued += 1;
        assert!(
            queued < 100,
            "served-first frames grew the outbox unbounded"
        );
    }
    assert_eq!(next_message(&outbox)[0], Raft);
}

#[test]
fn with_a_control_lane_attached_served_first_frames_leave_by_it_and_come_back_when_it_goes() {
    use FrameType::{Data, DeliveryReport, Goodbye, Heartbeat, HeartbeatAck, Raft};
    let outbox = Outbox::new(1 << 20, 4 << 20);
    outbox.set_attached(Lane::Control, true);
    outbox.try_push(&header(Data), &[0; 1000]).unwrap();
    outbox.try_push(&header(Raft), b"vote").unwrap();
    outbox.push_beat(Lane::Control, &header(Heartbeat)).unwrap();
    outbox.push_beat(Lane::Data, &header(HeartbeatAck)).unwrap();
    // A served-first frame too big for the control lane rides with the data.
    outbox
        .try_push(&header(Raft), &[0; CONTROL_LANE_MAX_PAYLOAD + 1])
        .unwrap();
    assert_eq!(outbox.queued_for(Lane::Control), 2 * frame::HEADER_LEN + 4);
    // Each lane's own beats first, then its queue; neither writer sees the other's.
    assert_eq!(next_on(&outbox, Lane::Control), [Heartbeat]);
    assert_eq!(next_on(&outbox, Lane::Control), [Raft]);
    assert!(next_on(&outbox, Lane::Control).is_empty());
    assert_eq!(next_on(&outbox, Lane::Data), [HeartbeatAck]);
    assert_eq!(next_on(&outbox, Lane::Data), [Data, Raft]);
    // The control lane goes: what is queued for it is the data lane's again.
    outbox.try_push(&header(DeliveryReport), b"run").unwrap();
    outbox.set_attached(Lane::Control, false);
    assert_eq!(next_on(&outbox, Lane::Data), [DeliveryReport]);
    // Closing: each lane flushes its queue, then sees the end.
    outbox.set_attached(Lane::Control, true);
    outbox.try_push(&header(Raft), b"last").unwrap();
    outbox.push_now(&header(Goodbye), b"bye").unwrap();
    outbox.close("shutdown".into());
    assert_eq!(next_on(&outbox, Lane::Data), [Goodbye]);
    assert_eq!(next_on(&outbox, Lane::Control), [Raft]);
    assert!(matches!(
        outbox.try_take(Lane::Control, true),
        Some(Take::Closed(_))
    ));
    assert!(matches!(
        outbox.try_take(Lane::Data, true),
        Some(Take::Closed(_))
    ));
}

#[test]
fn system_and_db_traffic_takes_the_priority_lane_and_never_waits_behind_client_data() {
    use FrameType::{Data, DataBatch, Heartbeat, Raft};
    let of = |class| Header::new(Data, class, 1, 2);
    let outbox = Outbox::new(64 * 1024, 4 << 20);
    // Client data fills the data bound; a DB update still finds room.
    while outbox.try_push(&header(Data), &[0; 4096]).is_ok() {}
    outbox.try_push(&of(TrafficClass::DbUpdate), b"db").unwrap();
    // Without a priority lane, the data lane writes it before any client data.
    assert_eq!(next_on(&outbox, Lane::Data), [Data]);
    outbox.set_attached(Lane::Priority, true);
    outbox
        .try_push(&Header::new(DataBatch, TrafficClass::System, 1, 2), b"sys")
        .unwrap();
    // A big Raft message (over the control cap) of the system class rides priority too.
    outbox
        .try_push(
            &Header::new(Raft, TrafficClass::System, 1, 2),
            &[0; CONTROL_LANE_MAX_PAYLOAD + 1],
        )
        .unwrap();
    outbox
        .push_beat(Lane::Priority, &header(Heartbeat))
        .unwrap();
    assert_eq!(next_on(&outbox, Lane::Priority), [Heartbeat]);
    assert_eq!(next_on(&outbox, Lane::Priority), [DataBatch, Raft]);
    assert!(next_on(&outbox, Lane::Priority).is_empty());
    // Client data never leaves on the priority lane.
    while let Some(Take::Batch(..) | Take::Beats(..)) = outbox.try_take(Lane::Data, true) {}
    outbox.try_push(&header(Data), b"client").unwrap();
    assert!(next_on(&outbox, Lane::Priority).is_empty());
    assert_eq!(next_on(&outbox, Lane::Data), [Data]);
    // The priority lane goes: the data lane takes its queue back, ahead of client data.
    outbox.try_push(&header(Data), b"client").unwrap();
    outbox.try_push(&of(TrafficClass::DbUpdate), b"db").unwrap();
    outbox.set_attached(Lane::Priority, false);
    assert_eq!(next_on(&outbox, Lane::Data), [Data]);
    assert_eq!(outbox.queued_for(Lane::Priority), 0);
}

#[test]
fn a_side_lane_reader_takes_only_its_own_traffic() {
    use FrameType::{Data, Goodbye, Gossip, Heartbeat, Raft};
    let frame = |t, class| Header::new(t, class, 1, 2);
    let client = frame(Data, TrafficClass::Client);
    let db = frame(Data, TrafficClass::DbUpdate);
    let gossip = frame(Gossip, TrafficClass::System);
    assert!(Lane::Data.accepts(&client, 100) && Lane::Data.accepts(&gossip, 100));
    assert!(!Lane::Priority.accepts(&client, 100));
    assert!(Lane::Priority.accepts(&db, 100));
    assert!(
        !Lane::Priority.accepts(&gossip, 100),
        "served first: control"
    );
    assert!(Lane::Priority.accepts(&frame(Raft, TrafficClass::System), 1 << 20));
    assert!(!Lane::Control.accepts(&frame(Raft, TrafficClass::System), 1 << 20));
    assert!(!Lane::Control.accepts(&db, 100));
    for lane in Lane::ALL {
        assert!(lane.accepts(&frame(Heartbeat, TrafficClass::Control), 0));
        assert!(lane.accepts(&frame(Goodbye, TrafficClass::Control), 10));
    }
    assert_eq!(Lane::from_hello(2), Some(Lane::Priority));
    assert_eq!(Lane::from_hello(3), None);
    assert!(Lane::Priority.runs(3, 3) && !Lane::Priority.runs(3, 2));
    assert!(Lane::Control.runs(2, 3) && !Lane::Control.runs(1, 3));
}

#[test]
fn a_lanes_own_beats_are_bounded() {
    let outbox = Outbox::new(1 << 20, 4 << 20);
    let mut queued = 0;
    while outbox
        .push_beat(Lane::Control, &header(FrameType::Heartbeat))
        .is_ok()
    {
        queued += 1;
        assert!(queued < 1000, "beats grew unbounded");
    }
    assert!(queued * frame::HEADER_LEN >= BEATS_BOUND_BYTES);
}

#[test]
fn without_credit_a_writer_writes_only_its_beats_and_a_closing_outbox_waits_for_credit() {
    use FrameType::{Data, Heartbeat};
    let outbox = Outbox::new(1 << 20, 4 << 20);
    outbox.try_push(&header(Data), b"one").unwrap();
    outbox.push_beat(Lane::Data, &header(Heartbeat)).unwrap();
    outbox.close("shutdown".into());
    assert!(matches!(
        outbox.try_take(Lane::Data, false),
        Some(Take::Beats(_, 1))
    ));
    // Data is queued: no credit means wait, not "closed" (that would drop it).
    assert!(outbox.try_take(Lane::Data, false).is_none());
    assert!(matches!(
        outbox.try_take(Lane::Data, true),
        Some(Take::Batch(_, 1))
    ));
    assert!(matches!(
        outbox.try_take(Lane::Data, false),
        Some(Take::Closed(_))
    ));
}

#[test]
fn a_drained_outbox_hands_over_every_queued_frame_once_and_frees_its_room() {
    use FrameType::{Data, DeliveryReport, Heartbeat};
    let outbox = Outbox::new(64 * 1024, 4 << 20);
    let db = Header::new(Data, TrafficClass::DbUpdate, 1, 2);
    while outbox.try_push(&header(Data), &[0; 4096]).is_ok() {}
    outbox.try_push(&db, b"db").unwrap();
    outbox.try_push(&header(DeliveryReport), b"run").unwrap();
    outbox.push_beat(Lane::Data, &header(Heartbeat)).unwrap();
    let written = next_message(&outbox);
    assert_eq!(written, [Heartbeat]);
    outbox.close("broken".into());
    let drained = outbox.drain();
    let mut types = Vec::new();
    for batch in &drained {
        for frame in frame::FrameReader::new(batch, 4 << 20) {
            types.push(frame.expect("a frame the outbox encoded").header.frame_type);
        }
    }
    let data = types.iter().filter(|&&t| t == Data).count();
    assert_eq!(data, 64 * 1024 / (4096 + frame::HEADER_LEN) + 1 + 1);
    assert!(types.contains(&DeliveryReport));
    assert_eq!(outbox.queued_for(Lane::Data), 0);
    assert!(outbox.drain().is_empty());
    assert!(matches!(
        outbox.try_take(Lane::Data, true),
        Some(Take::Closed(_))
    ));
}
