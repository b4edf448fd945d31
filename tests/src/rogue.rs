//! A misbehaving peer for tests: speaks meshd's link set-up by hand (blocking sockets) and can
//! lie about its mesh, its version or its key.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use meshd_proto::link::{Auth, Goodbye, Hello, Refuse, RefuseReason};
use meshd_shards::{
    credential::MeshAuthority,
    frame::{self, FrameReader, FrameType, Header, TrafficClass},
    handshake::{PROTOCOL_VERSION, Role, sign_transcript, transcript_digest},
    ownership::{PREAMBLE_LEN, decode_preamble, encode_preamble},
    tls,
};
use prost::Message as _;
use rand::RngCore;
use tungstenite::Message;

/// What the rogue says about itself.
#[derive(Clone, Debug)]
pub struct RogueOptions {
    /// Claimed node id.
    pub node_id: u64,
    /// Claimed mesh.
    pub mesh_id: String,
    /// Link protocol version in the Hello.
    pub protocol_version: u32,
    /// Version byte of every frame.
    pub frame_version: u8,
    /// Sign the transcript with a key other than the one in the Hello.
    pub bad_signature: bool,
    /// The mesh secret, if the rogue has it: it then certifies its own id and key. Without
    /// it the Hello carries no certificate.
    pub mesh_secret: Option<[u8; 32]>,
    /// A certificate to present instead (captured from another node, or forged).
    pub certificate: Option<Vec<u8>>,
    /// `Hello.lane`: 1 claims the connection is a control lane of an existing link.
    pub lane: u32,
    /// The identity key's secret; a fresh random key per connection when `None`.
    pub key: Option<[u8; 32]>,
}

impl RogueOptions {
    /// An honest peer of mesh `mesh_id`.
    pub fn honest(node_id: u64, mesh_id: &str) -> Self {
        Self {
            node_id,
            mesh_id: mesh_id.into(),
            protocol_version: PROTOCOL_VERSION,
            frame_version: frame::FRAME_VERSION,
            bad_signature: false,
            mesh_secret: None,
            certificate: None,
            lane: 0,
            key: None,
        }
    }

    /// An honest member of mesh `mesh_id`, holding its secret.
    pub fn member(node_id: u64, mesh_id: &str, mesh_secret: [u8; 32]) -> Self {
        Self {
            mesh_secret: Some(mesh_secret),
            ..Self::honest(node_id, mesh_id)
        }
    }
}

/// How the node answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RogueOutcome {
    /// The node refused, with its reason.
    Refused(RefuseReason, String),
    /// The node accepted the rogue and started heartbeats.
    Accepted,
    /// The handshake completed, then the node said goodbye (this reason) and closed.
    Goodbye(String),
}

pub type Ws = tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

fn frame_bytes(options: &RogueOptions, frame_type: FrameType, payload: &[u8]) -> Vec<u8> {
    let header = Header::new(frame_type, TrafficClass::Control, options.node_id, 0);
    let mut out = Vec::new();
    frame::encode_into(&mut out, &header, payload, 1 << 20).expect("small frame");
    // The version is checked before the CRC, so patching it is enough to look like another
    // protocol generation.
    out[0] = options.frame_version;
    out
}

fn read_frame(ws: &mut Ws, deadline: Instant) -> anyhow::Result<Option<(FrameType, Vec<u8>)>> {
    loop {
        if Instant::now() > deadline {
            return Ok(None);
        }
        match ws.read() {
            Ok(Message::Binary(bytes)) => {
                let frames: Vec<_> = FrameReader::new(&bytes, 1 << 20).collect();
                if let Some(Ok(frame)) = frames.into_iter().next() {
                    return Ok(Some((frame.header.frame_type, frame.payload.to_vec())));
                }
            }
            Ok(Message::Close(_)) => return Ok(None),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(None);
            }
            Err(e) => bail!("reading: {e}"),
        }
    }
}

/// Dials `addr` and runs the link handshake as `options` says.
pub fn handshake(addr: SocketAddr, options: &RogueOptions) -> anyhow::Result<RogueOutcome> {
    dial(addr, options).map(|(outcome, _)| outcome)
}

/// An accepted rogue link, held open.
pub struct RogueLink {
    ws: Ws,
    options: RogueOptions,
    key: SigningKey,
    peer: Hello,
    certificate: Vec<u8>,
}

impl RogueLink {
    /// Dials and completes the handshake; fails unless the node accepts.
    pub fn connect(addr: SocketAddr, options: &RogueOptions) -> anyhow::Result<Self> {
        match dial(addr, options)? {
            (RogueOutcome::Accepted, Some((ws, key, peer, certificate))) => Ok(Self {
                ws,
                options: options.clone(),
                key,
                peer,
                certificate,
            }),
            (outcome, _) => bail!("the node did not accept the rogue: {outcome:?}"),
        }
    }

    /// The rogue's identity key and the certificate it presented (a real one, for its own id).
    pub fn identity(&self) -> (&SigningKey, &[u8]) {
        (&self.key, &self.certificate)
    }

    /// The node's Hello (its id, key and certificate).
    pub fn peer_hello(&self) -> &Hello {
        &self.peer
    }

    /// The pair key the rogue (a certified member) really shares with the node it dialed: what
    /// it tags its own routed frames with.
    pub fn pair_key_with_peer(&self) -> anyhow::Result<[u8; 32]> {
        let public = <[u8; 32]>::try_from(self.peer.public_key.as_ref())?;
        meshd_shards::origin::pair_key(&self.key, self.options.node_id, self.peer.node_id, &public)
            .context("the node's key gives no pair key")
    }

    /// Sends one frame exactly as given (any src, dst, type; the payload unchanged).
    pub fn send_frame(&mut self, header: &Header, payload: &[u8]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        frame::encode_into(&mut out, header, payload, 1 << 20)?;
        self.ws.send(Message::Binary(out.into()))?;
        Ok(())
    }

    /// One heartbeat, so the node keeps the link while the rogue is busy lying.
    pub fn beat(&mut self) -> anyhow::Result<()> {
        let beat = frame_bytes(&self.options, FrameType::Heartbeat, &[]);
        self.ws.send(Message::Binary(beat.into()))?;
        Ok(())
    }

    /// Reads whatever the node sent for up to `limit` (so its writes never back up), answering
    /// nothing; false once the node closed the link.
    pub fn drain(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match read_frame(&mut self.ws, deadline) {
                Ok(Some(_)) => {}
                Ok(None) => return Instant::now() >= deadline,
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends a heartbeat every `every` and never reads a byte, so the node's writes fill the
    /// socket. Returns how long the node kept the connection open (None: still open after
    /// `limit`).
    pub fn heartbeat_without_reading(
        &mut self,
        every: Duration,
        limit: Duration,
    ) -> Option<Duration> {
        let start = Instant::now();
        let beat = frame_bytes(&self.options, FrameType::Heartbeat, &[]);
        let _ = self
            .ws
            .get_mut()
            .get_mut()
            .set_write_timeout(Some(Duration::from_secs(1)));
        while start.elapsed() < limit {
            if self.ws.send(Message::Binary(beat.clone().into())).is_err() {
                return Some(start.elapsed());
            }
            std::thread::sleep(every);
        }
        None
    }
}

/// TCP, preamble, TLS and the WebSocket upgrade: a socket ready for the link handshake, and
/// the TLS exporter value the handshake signs.
pub fn open_ws(addr: SocketAddr, node_id: u64) -> anyhow::Result<(Ws, [u8; 32])> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(Duration::from_millis(100)))?;
    tcp.write_all(&encode_preamble(node_id))?;
    let mut theirs = [0u8; PREAMBLE_LEN];
    tcp.read_exact(&mut theirs)?;
    decode_preamble(&theirs).context("node sent no preamble")?;

    let config = tls::client_config()?;
    let mut conn = rustls::ClientConnection::new(config, tls::server_name())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let exporter = conn.export_keying_material([0u8; 32], tls::EXPORTER_LABEL, None)?;
    let stream = rustls::StreamOwned::new(conn, tcp);
    let url = format!("wss://{}/mesh/v1", tls::SERVER_NAME);
    let (ws, _) = match tungstenite::client(url.as_str(), stream) {
        Ok(ok) => ok,
        Err(tungstenite::HandshakeError::Interrupted(mid)) => match mid.handshake() {
            Ok(ok) => ok,
            Err(tungstenite::HandshakeError::Interrupted(_)) => {
                bail!("websocket handshake stalled")
            }
            Err(tungstenite::HandshakeError::Failure(e)) => bail!("websocket: {e}"),
        },
        Err(tungstenite::HandshakeError::Failure(e)) => bail!("websocket: {e}"),
    };
    Ok((ws, exporter))
}

/// Opens a link socket as node `node_id` and, before any handshake message, starts one
/// WebSocket message that claims `claimed` bytes and sends `sent` of them without finishing
/// it. Returns the connection (hold it to keep the node's buffers) or `None` when the node
/// closed it before everything was written.
pub fn unfinished_message(
    addr: SocketAddr,
    node_id: u64,
    claimed: u64,
    sent: usize,
) -> anyhow::Result<Option<HeldSocket>> {
    let (mut ws, _) = open_ws(addr, node_id)?;
    let socket = ws.get_mut();
    socket
        .get_mut()
        .set_write_timeout(Some(Duration::from_secs(2)))?;
    // FIN + binary; masked (client frames must be); 64-bit length; mask key 0.
    let mut header = vec![0x82u8, 0x80 | 127];
    header.extend_from_slice(&claimed.to_be_bytes());
    header.extend_from_slice(&[0u8; 4]);
    if socket.write_all(&header).is_err() {
        return Ok(None);
    }
    let chunk = vec![0x5au8; 16 * 1024];
    let mut written = 0;
    while written < sent {
        let n = chunk.len().min(sent - written);
        if socket
            .write_all(&chunk[..n])
            .and_then(|()| socket.flush())
            .is_err()
        {
            return Ok(None);
        }
        written += n;
    }
    Ok(Some(HeldSocket(ws)))
}

/// A connection kept open until dropped.
pub struct HeldSocket(Ws);

impl HeldSocket {
    /// Whether the node closes the connection within `limit`.
    pub fn closed_by_node_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.0.get_mut().read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

impl Drop for HeldSocket {
    fn drop(&mut self) {
        let _ = self
            .0
            .get_mut()
            .get_mut()
            .shutdown(std::net::Shutdown::Both);
    }
}

type Linked = (Ws, SigningKey, Hello, Vec<u8>);

fn dial(
    addr: SocketAddr,
    options: &RogueOptions,
) -> anyhow::Result<(RogueOutcome, Option<Linked>)> {
    let (mut ws, exporter) = open_ws(addr, options.node_id)?;

    let secret = options.key.unwrap_or_else(|| {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        secret
    });
    let key = SigningKey::from_bytes(&secret);
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let public_key = key.verifying_key().to_bytes();
    let certificate = match (&options.certificate, options.mesh_secret) {
        (Some(certificate), _) => certificate.clone(),
        (None, Some(secret)) => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            MeshAuthority::from_secret(&secret).issue(
                &options.mesh_id,
                options.node_id,
                public_key,
                now_ms,
            )
        }
        (None, None) => Vec::new(),
    };
    let presented = certificate.clone();
    let hello = Hello {
        protocol_version: options.protocol_version,
        mesh_id: options.mesh_id.clone(),
        node_id: options.node_id,
        nonce: nonce.to_vec().into(),
        public_key: key.verifying_key().to_bytes().to_vec().into(),
        boot_id: 1,
        listen_addr: String::new(),
        software_version: "rogue".into(),
        certificate: certificate.into(),
        lane: options.lane,
        // Collapsed: the node never dials it a control lane.
        lanes: 1,
    };
    let hello_bytes = hello.encode_to_vec();
    ws.send(Message::Binary(
        frame_bytes(options, FrameType::Hello, &hello_bytes).into(),
    ))?;

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peer_hello = None;
    loop {
        let Some((frame_type, payload)) = read_frame(&mut ws, deadline)? else {
            bail!("node closed the connection without a refusal");
        };
        match frame_type {
            FrameType::Refuse => {
                let refuse = Refuse::decode(payload.as_slice())?;
                let reason = RefuseReason::try_from(refuse.reason)
                    .unwrap_or(RefuseReason::RefuseUnspecified);
                return Ok((RogueOutcome::Refused(reason, refuse.detail), None));
            }
            FrameType::Hello => {
                peer_hello = Some(payload);
                let digest = transcript_digest(
                    &exporter,
                    &hello_bytes,
                    peer_hello.as_deref().unwrap_or_default(),
                );
                let signer = if options.bad_signature {
                    SigningKey::from_bytes(&[7u8; 32])
                } else {
                    key.clone()
                };
                let auth = Auth {
                    signature: sign_transcript(&signer, Role::Dialer, &digest)
                        .to_vec()
                        .into(),
                };
                ws.send(Message::Binary(
                    frame_bytes(options, FrameType::Auth, &auth.encode_to_vec()).into(),
                ))?;
            }
            FrameType::Auth => {}
            FrameType::Goodbye => {
                let goodbye = Goodbye::decode(payload.as_slice())?;
                return Ok((RogueOutcome::Goodbye(goodbye.reason), None));
            }
            FrameType::Heartbeat if peer_hello.is_some() => {
                let peer = Hello::decode(peer_hello.as_deref().unwrap_or_default())?;
                return Ok((RogueOutcome::Accepted, Some((ws, key, peer, presented))));
            }
            _ => {}
        }
    }
}

/// Opens a TCP connection, sends `bytes`, and reports whether the node closed it within 3 s.
pub fn send_garbage(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<bool> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    tcp.write_all(bytes)?;
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match tcp.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}
