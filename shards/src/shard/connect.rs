//! How a socket becomes a registered link: accept or dial, the preamble that names the peer,
//! the hand-over to the shard that owns the peer, TLS + WebSocket + handshake, and the
//! one-link-per-peer registry. The link then runs in `link::run` until it ends, and its end is
//! reported here.
//!
//! **Architecture Invariant:** the handshake runs on the shard that owns the peer
//! (`hash(peer) % N`); a socket accepted or dialed elsewhere crosses one ring as a duplicated
//! descriptor ([`AdoptedSocket`]) before anything but the preamble is read.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::{LinkEntry, Shard};
use crate::{
    command::{AdoptedSocket, ControlEvent, DialError, ShardInput},
    handshake::{PeerInfo, Role},
    link::{self, Lane, Outbox},
    ownership::{PREAMBLE_LEN, decode_preamble, encode_preamble},
    stats::LinkStats,
};

/// One connection in set-up, counted on the node-wide gauge for as long as it lives (a
/// guard, so every early return and cancellation gives the slot back).
struct HandshakeSlot(Arc<AtomicUsize>);

impl HandshakeSlot {
    fn take(shard: &Shard) -> Self {
        shard.handshakes.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(&shard.handshakes))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                if shard.stopping.get() {
                    return;
                }
                tracing::warn!(shard = shard.shard_id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.stopping.get() {
            return;
        }
        if shard.handshakes.load(Ordering::Relaxed) >= shard.config.max_pending_handshakes {
            shard.count_drop("handshake_backlog_full");
            continue;
        }
        glommio::spawn_local(accepted(Rc::clone(&shard), stream)).detach();
    }
}

/// Exchanges preambles: reads first when accepting, writes first when dialing.
async fn exchange_preamble(
    shard: &Shard,
    stream: &mut TcpStream,
    role: Role,
    deadline: Instant,
) -> Result<u64, DialError> {
    let ours = encode_preamble(shard.config.local.node_id);
    let mut theirs = [0u8; PREAMBLE_LEN];
    let io = async {
        if role == Role::Dialer {
            stream.write_all(&ours).await?;
            stream.read_exact(&mut theirs).await?;
        } else {
            stream.read_exact(&mut theirs).await?;
            stream.write_all(&ours).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    match link::timeout(left(deadline), io).await {
        None => return Err(DialError::Timeout),
        Some(Err(e)) => return Err(DialError::Setup(format!("preamble: {e}"))),
        Some(Ok(())) => {}
    }
    decode_preamble(&theirs)
        .ok_or_else(|| DialError::Refused("peer did not send a meshd preamble".into()))
}

/// Time left until `deadline`.
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

async fn accepted(shard: Rc<Shard>, mut stream: TcpStream) {
    // One deadline from accept to authenticated: a peer that stalls just short of each
    // stage's own timeout must not live several of them.
    let deadline = Instant::now() + shard.config.handshake_timeout;
    let _ = stream.set_nodelay(true);
    let remote_addr = link::peer_addr(&stream);
    let slot = HandshakeSlot::take(&shard);
    let hint = exchange_preamble(&shard, &mut stream, Role::Acceptor, deadline).await;
    drop(slot);
    match hint {
        Ok(peer_hint) => {
            let target = Target {
                peer_hint,
                remote_addr,
                dial_id: None,
                deadline,
            };
            route_socket(shard, stream, Role::Acceptor, target).await
        }
        Err(error) => {
            shard.count_drop("bad_preamble");
            tracing::info!(%remote_addr, %error, "refused an incoming connection");
        }
    }
}

pub(super) async fn dial(shard: Rc<Shard>, addr: SocketAddr, dial_id: u64) {
    let deadline = Instant::now() + shard.config.handshake_timeout;
    let connected = link::timeout(left(deadline), TcpStream::connect(addr)).await;
    let mut stream = match connected {
        Some(Ok(stream)) => stream,
        Some(Err(e)) => {
            return dial_failed(&shard, dial_id, addr, DialError::Connect(e.to_string())).await;
        }
        None => return dial_failed(&shard, dial_id, addr, DialError::Timeout).await,
    };
    let _ = stream.set_nodelay(true);
    match exchange_preamble(&shard, &mut stream, Role::Dialer, deadline).await {
        Ok(peer_hint) => {
            let target = Target {
                peer_hint,
                remote_addr: addr,
                dial_id: Some(dial_id),
                deadline,
            };
            route_socket(shard, stream, Role::Dialer, target).await
        }
        Err(error) => dial_failed(&shard, dial_id, addr, error).await,
    }
}

async fn dial_failed(shard: &Shard, dial_id: u64, addr: SocketAddr, error: DialError) {
    tracing::debug!(%addr, %error, "dial failed");
    shard
        .emit(ControlEvent::DialDone {
            dial_id,
            addr,
            result: Err(error),
        })
        .await;
}

/// Who a socket past its preamble claims to reach, and by when it must be set up.
struct Target {
    peer_hint: u64,
    remote_addr: SocketAddr,
    dial_id: Option<u64>,
    deadline: Instant,
}

/// Continues set-up here, or hands the socket to the shard that owns the peer.
async fn route_socket(shard: Rc<Shard>, stream: TcpStream, role: Role, target: Target) {
    let Target {
        peer_hint,
        remote_addr,
        dial_id,
        deadline,
    } = target;
    let owner = shard.owner(peer_hint);
    if owner == shard.shard_id {
        return establish(
            shard,
            stream,
            role,
            peer_hint,
            remote_addr,
            dial_id,
            deadline,
        )
        .await;
    }
    // SAFETY: the descriptor is valid for as long as `stream` lives; we only borrow it to dup.
    let duplicated = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned();
    drop(stream);
    let fd: OwnedFd = match duplicated {
        Ok(fd) => fd,
        Err(e) => {
            if let Some(dial_id) = dial_id {
                dial_failed(
                    &shard,
                    dial_id,
                    remote_addr,
                    DialError::Setup(format!("dup: {e}")),
                )
                .await;
            }
            return;
        }
    };
    let adopted = AdoptedSocket {
        fd,
        role,
        peer_hint,
        remote_addr,
        dial_id,
        deadline,
    };
    if shard.peers[owner]
        .push(ShardInput::Adopt(adopted))
        .await
        .is_err()
    {
        shard.count_drop("owner_shard_gone");
    }
}

pub(super) async fn establish(
    shard: Rc<Shard>,
    stream: TcpStream,
    role: Role,
    peer_hint: u64,
    remote_addr: SocketAddr,
    dial_id: Option<u64>,
    deadline: Instant,
) {
    // The hello carries the mesh id of this moment; a SetMesh during the handshake makes the
    // result stale (a guest link that outlives the join would carry nothing, ever).
    let mesh_at_start = shard.mesh_id.borrow().clone();
    let slot = HandshakeSlot::take(&shard);
    let set_up = link::timeout(
        left(deadline),
        link::set_up(&shard, stream, role, peer_hint, Lane::Data),
    )
    .await;
    drop(slot);
    let (socket, peer) = match set_up {
        Some(Ok(established)) => established,
        Some(Err(error)) => {
            tracing::info!(%remote_addr, ?role, %error, "link set-up failed");
            if let Some(dial_id) = dial_id {
                dial_failed(&shard, dial_id, remote_addr, error).await;
            }
            return;
        }
        None => {
            if let Some(dial_id) = dial_id {
                dial_failed(&shard, dial_id, remote_addr, DialError::Timeout).await;
            }
            return;
        }
    };
    if shard.stopping.get() {
        return;
    }
    let side = match Lane::from_hello(peer.lane) {
        Some(Lane::Data) => None,
        Some(side) => Some(Ok(side)),
        None => Some(Err(format!("lane {} is not a lane", peer.lane))),
    };
    if let Some(side) = side {
        // A side lane the peer dialed for a link it dialed before: bound to it, or refused.
        if dial_id.is_none() {
            return accept_side_lane(shard, socket, peer, side, remote_addr).await;
        }
        tracing::info!(
            peer = peer.node_id,
            lane = peer.lane,
            "a dialed peer answered as a side lane"
        );
        if let Some(dial_id) = dial_id {
            let error = DialError::Refused("the peer answered as a side lane".into());
            dial_failed(&shard, dial_id, remote_addr, error).await;
        }
        return;
    }
    if *shard.mesh_id.borrow() != mesh_at_start {
        tracing::debug!(
            peer = peer.node_id,
            "mesh changed during the handshake; closing the link"
        );
        shard.count_drop("mesh_changed_in_handshake");
        if let Some(dial_id) = dial_id {
            let error = DialError::Setup("mesh changed during the handshake".into());
            dial_failed(&shard, dial_id, remote_addr, error).await;
        }
        return;
    }
    let local = shard.config.local.node_id;
    let dialer = if role == Role::Dialer {
        local
    } else {
        peer.node_id
    };
    let conn_id = shard.next_conn_id.get();
    shard.next_conn_id.set(conn_id + 1);
    let outbox = Rc::new(Outbox::new(
        shard.config.link_queue_bytes,
        shard.config.max_payload_bytes,
    ));
    let stats = Rc::new(LinkStats::new(remote_addr, role, Instant::now()));

    let kept = register(
        &shard,
        peer.clone(),
        dialer,
        conn_id,
        Rc::clone(&outbox),
        Rc::clone(&stats),
    );
    if let Some(dial_id) = dial_id {
        shard
            .emit(ControlEvent::DialDone {
                dial_id,
                addr: remote_addr,
                result: Ok(peer.node_id),
            })
            .await;
    }
    if !kept {
        tracing::debug!(
            peer = peer.node_id,
            "duplicate link closed; the other one stays"
        );
        let (header, payload) = link::goodbye(local, peer.node_id, "duplicate link");
        let _ = outbox.push_now(&header, &payload);
        outbox.close("duplicate link".into());
        let _ = link::run(
            Rc::clone(&shard),
            socket,
            peer.node_id,
            peer.guest,
            outbox,
            stats,
            Lane::Data,
        )
        .await;
        return;
    }
    tracing::info!(peer = peer.node_id, %remote_addr, ?role, shard = shard.shard_id, "link up");
    shard
        .emit(ControlEvent::LinkUp {
            peer: peer.clone(),
            remote_addr,
            role,
            shard: shard.shard_id,
        })
        .await;

    if role == Role::Dialer && !peer.guest {
        for side in [Lane::Control, Lane::Priority] {
            if side.runs(shard.config.local.lanes, peer.lanes) {
                glommio::spawn_local(keep_side_lane(
                    Rc::clone(&shard),
                    peer.clone(),
                    side,
                    conn_id,
                    remote_addr,
                ))
                .detach();
            }
        }
    }

    let link::Ended { end, unconfirmed } = link::run(
        Rc::clone(&shard),
        socket,
        peer.node_id,
        peer.guest,
        Rc::clone(&outbox),
        stats,
        Lane::Data,
    )
    .await;

    let still_ours = shard
        .links
        .borrow()
        .get(&peer.node_id)
        .is_some_and(|l| l.conn_id == conn_id);
    if still_ours {
        shard.links.borrow_mut().remove(&peer.node_id);
        tracing::info!(peer = peer.node_id, reason = %end.describe(), "link down");
        let goodbye = match &end {
            link::LinkEnd::Goodbye(reason) => Some(reason.clone()),
            _ => None,
        };
        shard
            .emit(ControlEvent::LinkDown {
                peer: peer.node_id,
                reason: end.describe(),
                goodbye,
                guest: peer.guest,
            })
            .await;
    }
    // Nothing more lands in it; what it still holds goes another way or is reported.
    outbox.close(end.describe());
    shard
        .salvage(peer.node_id, outbox.drain(), unconfirmed)
        .await;
}

/// Records a new link, applying the one-link-per-peer rule; returns whether the new link stays.
fn register(
    shard: &Shard,
    peer: PeerInfo,
    dialer: u64,
    conn_id: u64,
    outbox: Rc<Outbox>,
    stats: Rc<LinkStats>,
) -> bool {
    let local = shard.config.local.node_id;
    let mut links = shard.links.borrow_mut();
    if let Some(existing) = links.get(&peer.node_id) {
        // A guest's id is only a claim (no certificate vouches for it): it never displaces a
        // member's link, and a member's link always displaces a guest's.
        let replace = if peer.guest != existing.peer.guest {
            !peer.guest
        } else {
            let peer_restarted = existing.peer.boot_id != peer.boot_id;
            let same_direction = existing.dialer == dialer;
            let preferred_dialer = local.min(peer.node_id);
            peer_restarted || same_direction || dialer == preferred_dialer
        };
        if !replace {
            return false;
        }
        let (header, payload) = link::goodbye(local, peer.node_id, "replaced by a newer link");
        let _ = existing.outbox.push_now(&header, &payload);
        existing.outbox.close("replaced by a newer link".into());
    }
    if !peer.guest {
        // Only certified members are remembered; a guest's key is never pinned, so a guest
        // claiming a member's id cannot lock that member out.
        shard.known.borrow_mut().insert(peer.node_id);
        shard
            .pinned
            .borrow_mut()
            .insert(peer.node_id, peer.public_key);
    }
    links.insert(
        peer.node_id,
        LinkEntry {
            conn_id,
            peer,
            dialer,
            outbox,
            stats,
            side: Default::default(),
        },
    );
    true
}

/// The link `conn_id` to `peer`'s outbox, while that link is the registered one and open.
fn link_outbox(shard: &Shard, peer: u64, conn_id: u64) -> Option<Rc<Outbox>> {
    shard
        .links
        .borrow()
        .get(&peer)
        .filter(|l| l.conn_id == conn_id && !l.outbox.is_closing())
        .map(|l| Rc::clone(&l.outbox))
}

/// The dialing side of a split link: dials a side lane (control or priority) to the address
/// the link was dialed at, runs it, and dials again (with backoff) whenever it ends, for as
/// long as the link lives. While the lane is not attached its traffic rides the data
/// connection, ahead of data.
async fn keep_side_lane(
    shard: Rc<Shard>,
    peer: PeerInfo,
    side: Lane,
    conn_id: u64,
    addr: SocketAddr,
) {
    let min_backoff = shard.config.heartbeat_interval;
    let max_backoff = Duration::from_secs(5);
    let mut backoff = min_backoff;
    while link_outbox(&shard, peer.node_id, conn_id).is_some() && !shard.stopping.get() {
        match dial_lane(&shard, addr, peer.node_id, side).await {
            Ok((socket, lane_peer)) => {
                let same_life = lane_peer.node_id == peer.node_id
                    && lane_peer.boot_id == peer.boot_id
                    && lane_peer.public_key == peer.public_key;
                if same_life {
                    let lived =
                        run_side_lane(&shard, socket, side, conn_id, addr, Role::Dialer).await;
                    if lived > Duration::from_secs(10) {
                        backoff = min_backoff;
                    }
                } else {
                    // The peer restarted: this link is about to be replaced.
                    tracing::debug!(
                        peer = peer.node_id,
                        lane = side.name(),
                        "side lane reached another life"
                    );
                }
            }
            Err(error) => {
                tracing::debug!(peer = peer.node_id, lane = side.name(), %addr, %error, "side lane dial failed");
            }
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// TCP, preamble, TLS, WebSocket and the handshake of a side lane to `peer` at `addr`.
async fn dial_lane(
    shard: &Rc<Shard>,
    addr: SocketAddr,
    peer: u64,
    side: Lane,
) -> Result<(link::LinkSocket, PeerInfo), DialError> {
    let limit = shard.config.handshake_timeout;
    let deadline = Instant::now() + limit;
    let slot = HandshakeSlot::take(shard);
    let set_up = link::timeout(limit, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| DialError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let hint = exchange_preamble(shard, &mut stream, Role::Dialer, deadline).await?;
        if hint != peer {
            return Err(DialError::Refused(format!(
                "node {hint} answered at {addr}, not node {peer}"
            )));
        }
        link::set_up(shard, stream, Role::Dialer, peer, side).await
    })
    .await;
    drop(slot);
    set_up.unwrap_or(Err(DialError::Timeout))
}

/// Why a side lane `side` from `peer` may not bind to its link, if it may not.
fn side_lane_refusal(
    shard: &Shard,
    peer: &PeerInfo,
    side: Result<&Lane, &String>,
) -> Option<String> {
    let links = shard.links.borrow();
    match (side, links.get(&peer.node_id)) {
        (Err(why), _) => Some(why.clone()),
        _ if peer.guest => Some("a guest has no side lane".into()),
        (Ok(side), _) if !side.runs(shard.config.local.lanes, u32::MAX) => {
            Some(format!("this node runs no {} lane", side.name()))
        }
        (_, None) => Some("no link to bind the lane to".into()),
        (_, Some(l)) if l.outbox.is_closing() => Some("the link is closing".into()),
        (_, Some(l))
            if l.peer.boot_id != peer.boot_id
                || l.peer.public_key != peer.public_key
                || l.dialer != peer.node_id =>
        {
            Some("the link was not dialed by this life of the peer".into())
        }
        (Ok(side), Some(l)) if l.side[*side as usize].is_some() => {
            Some(format!("the link has a {} lane", side.name()))
        }
        (Ok(_), Some(_)) => None,
    }
}

/// The accepting side: binds a side lane to the link the same peer dialed in this same life
/// (proven id, key and boot id), or refuses it with a goodbye that says why.
async fn accept_side_lane(
    shard: Rc<Shard>,
    mut socket: link::LinkSocket,
    peer: PeerInfo,
    side: Result<Lane, String>,
    remote_addr: SocketAddr,
) {
    let refusal = side_lane_refusal(&shard, &peer, side.as_ref());
    let side = match (refusal, side) {
        (None, Ok(side)) => side,
        (why, _) => {
            let why = why.unwrap_or_default();
            tracing::info!(peer = peer.node_id, %remote_addr, %why, "side lane refused");
            shard.count_drop("side_lane_refused");
            let (header, payload) = link::goodbye(shard.config.local.node_id, peer.node_id, &why);
            let mut frame = Vec::new();
            if crate::frame::encode_into(&mut frame, &header, &payload, usize::MAX).is_ok() {
                let send = socket.send(async_tungstenite::tungstenite::Message::Binary(
                    frame.into(),
                ));
                let _ = link::timeout(Duration::from_millis(200), send).await;
            }
            let _ = link::timeout(Duration::from_millis(200), socket.close(None)).await;
            return;
        }
    };
    let conn_id = shard
        .links
        .borrow()
        .get(&peer.node_id)
        .map_or(0, |l| l.conn_id);
    run_side_lane(&shard, socket, side, conn_id, remote_addr, Role::Acceptor).await;
}

/// Attaches a side lane to the link `conn_id`, runs it until it (or the link) ends, and
/// detaches it; returns how long it ran.
async fn run_side_lane(
    shard: &Rc<Shard>,
    socket: link::LinkSocket,
    side: Lane,
    conn_id: u64,
    remote_addr: SocketAddr,
    role: Role,
) -> Duration {
    let started = Instant::now();
    let attached = {
        let mut links = shard.links.borrow_mut();
        links
            .values_mut()
            .find(|l| {
                l.conn_id == conn_id && !l.outbox.is_closing() && l.side[side as usize].is_none()
            })
            .map(|l| {
                let stats = Rc::new(LinkStats::new(remote_addr, role, started));
                l.side[side as usize] = Some(Rc::clone(&stats));
                (l.peer.node_id, Rc::clone(&l.outbox), stats)
            })
    };
    let Some((peer, outbox, stats)) = attached else {
        return Duration::ZERO;
    };
    outbox.set_attached(side, true);
    tracing::info!(peer, %remote_addr, ?role, lane = side.name(), "side lane up");
    let lane = link::run(
        Rc::clone(shard),
        socket,
        peer,
        false,
        Rc::clone(&outbox),
        stats,
        side,
    );
    let link::Ended { end, unconfirmed } = if side == Lane::Control {
        // In the control task queue: picked before the data lanes' tasks whenever the
        // executor picks a queue, however busy they keep the shard.
        match glommio::spawn_local_into(lane, shard.control_queue) {
            Ok(task) => task.await,
            Err(error) => link::Ended {
                end: link::LinkEnd::Closed(format!("no control task queue: {error}")),
                unconfirmed: Vec::new(),
            },
        }
    } else {
        lane.await
    };
    outbox.set_attached(side, false);
    // What it wrote and the peer never confirmed: reports and acks go again (by the data
    // connection now), data is reported.
    shard.salvage(peer, Vec::new(), unconfirmed).await;
    if let Some(l) = shard.links.borrow_mut().get_mut(&peer)
        && l.conn_id == conn_id
    {
        l.side[side as usize] = None;
    }
    if !outbox.is_closing() {
        tracing::info!(peer, lane = side.name(), reason = %end.describe(), "side lane down; the data connection carries its traffic until it is back");
    }
    started.elapsed()
}
