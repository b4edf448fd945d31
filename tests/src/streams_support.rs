//! What the client data stream tests share: opening a stream, a subscriber that records what
//! it was given, a publisher that records what it was told, and the checks comparing the two.
//! The same helpers drive nodes on loopback (`tests/streams.rs`) and in network namespaces
//! (`tests/streams_netns.rs`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use meshd_proto::link::{
    ClientData, ClientDataAck, OpenClientDataStreamRequest, PublishClientDataRequest,
    StreamMessage, StreamSelector, SubscribeClientDataRequest,
    mesh_data_service_client::MeshDataServiceClient, mesh_service_client::MeshServiceClient,
    subscribe_client_data_request::Request as SubRequest,
};
use prost::bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{Api, ApiChannel, Cluster, Node, NodeSpec, netns::Netns};

/// How long a fresh cluster may take to have its routes.
pub const SETTLE: Duration = Duration::from_secs(15);
/// The tenant every stream of the tests belongs to.
pub const TENANT: &str = "acme";

/// `spec`, serving the tests' tenant.
pub fn serving(mut spec: NodeSpec) -> NodeSpec {
    spec.extra = format!("tenants = [\"{TENANT}\"]\n{}", spec.extra);
    spec
}

/// A connection to `api`, given up after 2 s (a node being restarted refuses at once).
pub async fn channel(api: &Api) -> anyhow::Result<ApiChannel> {
    api.connect(Duration::from_secs(2)).await
}

/// A `meshd.v1.MeshService` client without message size limits (for the 64 MiB message).
pub async fn mesh_client(api: &Api) -> anyhow::Result<MeshServiceClient<ApiChannel>> {
    Ok(MeshServiceClient::new(channel(api).await?)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// Opens a stream from `node` to `targets`; publishes are answered once `quorum` of them
/// stored them (0: all).
pub async fn open(node: &Node, targets: &[u64], quorum: u32) -> anyhow::Result<Bytes> {
    open_with(node, targets, quorum, false).await
}

/// Opens a stream from `node` to `targets` whose publishes are answered on the source's own
/// fsync: publishing goes on while the targets are cut off.
pub async fn open_acked_on_source(node: &Node, targets: &[u64]) -> anyhow::Result<Bytes> {
    open_with(node, targets, 0, true).await
}

async fn open_with(
    node: &Node,
    targets: &[u64],
    quorum: u32,
    ack_on_source: bool,
) -> anyhow::Result<Bytes> {
    Ok(mesh_client(&node.api())
        .await?
        .open_client_data_stream(OpenClientDataStreamRequest {
            tenant: TENANT.into(),
            targets: targets.to_vec(),
            quorum,
            ack_on_source,
            priority: 0,
        })
        .await?
        .into_inner()
        .stream_id)
}

/// The payload of `seq`: each message says which it is, so a mix-up shows.
pub fn payload_of(seq: u64) -> Bytes {
    Bytes::from(format!("message {seq} ").repeat(4))
}

/// What one target's subscriber saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Stream → seq → payload (the last copy).
    pub messages: BTreeMap<Bytes, BTreeMap<u64, Bytes>>,
    /// Deliveries of a seq already delivered (after a restart or a new subscription).
    pub redelivered: u64,
    /// A seq that was not the next one of its stream within one subscription: (stream, got,
    /// expected).
    pub out_of_order: Vec<(u64, u64)>,
    /// Subscriptions made.
    pub subscriptions: u64,
}

/// Subscribes at `api` (again after every failure, as a client of a restarting node would),
/// records every delivery and acknowledges each after recording it.
pub fn subscriber(
    api: Api,
    window: u32,
    seen: Arc<Mutex<Seen>>,
    delay: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = subscribe_once(&api, window, &seen, delay).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn subscribe_once(
    api: &Api,
    window: u32,
    seen: &Arc<Mutex<Seen>>,
    delay: Duration,
) -> anyhow::Result<()> {
    let mut client =
        MeshDataServiceClient::new(channel(api).await?).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(1024);
    tx.send(SubscribeClientDataRequest {
        request: Some(SubRequest::Select(StreamSelector {
            tenant: TENANT.into(),
            stream_ids: Vec::new(),
            window,
        })),
    })
    .await?;
    let mut deliveries = client
        .subscribe_client_data(ReceiverStream::new(rx))
        .await?
        .into_inner();
    seen.lock().unwrap().subscriptions += 1;
    let mut last: BTreeMap<Bytes, u64> = BTreeMap::new();
    while let Some(data) = deliveries.next().await {
        let ClientData {
            stream_id,
            seq,
            payload,
            ..
        } = data?;
        {
            let mut seen = seen.lock().unwrap();
            let stream = seen.messages.entry(stream_id.clone()).or_default();
            if stream.insert(seq, payload).is_some() {
                seen.redelivered += 1;
            }
            // Within one subscription a stream's seqs are consecutive.
            if let Some(prev) = last.get(&stream_id)
                && seq != prev + 1
            {
                seen.out_of_order.push((seq, prev + 1));
            }
        }
        last.insert(stream_id.clone(), seq);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        tx.send(SubscribeClientDataRequest {
            request: Some(SubRequest::Ack(ClientDataAck { stream_id, seq })),
        })
        .await?;
    }
    Ok(())
}

/// Publishes seqs `from..=total` in batches of `batch`, claiming each batch's first seq, and
/// starts over from the first unanswered batch after any failure (a restarted source): what
/// it was told, seq by seq.
pub async fn publish_all(
    api: Api,
    stream_id: Bytes,
    (from, total): (u64, u64),
    batch: u64,
    acked: Arc<Mutex<BTreeMap<u64, u64>>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next = from;
    while next <= total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "publishing stalled at seq {next}"
        );
        let result: anyhow::Result<()> = async {
            let mut client = mesh_client(&api).await?;
            let (tx, rx) = mpsc::channel(16);
            let mut answers = client
                .publish_client_data(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let mut sent = next;
            let mut in_flight = 0;
            while next <= total {
                while in_flight < 8 && sent <= total {
                    let last = (sent + batch - 1).min(total);
                    tx.send(PublishClientDataRequest {
                        stream_id: stream_id.clone(),
                        messages: (sent..=last)
                            .map(|seq| StreamMessage {
                                payload: payload_of(seq),
                            })
                            .collect(),
                        first_seq: sent,
                    })
                    .await?;
                    sent = last + 1;
                    in_flight += 1;
                }
                let answer = answers.next().await.context("answers ended")??;
                in_flight -= 1;
                if answer.code != 0 {
                    bail!("batch from {next}: code {} {}", answer.code, answer.error);
                }
                anyhow::ensure!(
                    answer.first_seq == next,
                    "answered {}..={} while {next} was due",
                    answer.first_seq,
                    answer.last_seq
                );
                let mut acked = acked.lock().unwrap();
                for seq in answer.first_seq..=answer.last_seq {
                    *acked.entry(seq).or_default() += 1;
                }
                next = answer.last_seq + 1;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            println!("publisher: {e:#}; starting again from seq {next}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Waits until `seen` holds every seq of `stream` up to `total`.
pub async fn wait_complete(
    seen: &Arc<Mutex<Seen>>,
    stream: &Bytes,
    total: u64,
    limit: Duration,
    who: &str,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let have = seen
            .lock()
            .unwrap()
            .messages
            .get(stream)
            .map_or(0, BTreeMap::len) as u64;
        if have >= total {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{who} has {have} of {total} messages after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that `seen` holds seqs 1..=`total` of `stream`, each with its own payload, and
/// that no subscription got them out of order.
pub fn check_exact(seen: &Seen, stream: &Bytes, total: u64, who: &str) {
    let messages = &seen.messages[stream];
    assert_eq!(
        messages.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "{who}: every seq once"
    );
    for (seq, payload) in messages {
        assert_eq!(
            payload,
            &payload_of(*seq),
            "{who}: seq {seq} carries its own message"
        );
    }
    assert!(
        seen.out_of_order.is_empty(),
        "{who}: out of order {:?}",
        seen.out_of_order
    );
}

/// Node 1 ← node 2 ← node 3 (behind NAT): 1 and 3 reach each other only through 2. With
/// `netns`, node i runs in its place i.
pub async fn relay_chain(netns: Option<&Netns>) -> anyhow::Result<Cluster> {
    let specs = [
        serving(NodeSpec::listener(1)),
        serving(NodeSpec::listener(2).dialing(vec![0])),
        serving(NodeSpec::behind_nat(3, vec![1])),
    ];
    let cluster = Cluster::start(
        specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| match netns {
                Some(netns) => spec.in_netns(netns.place(i).clone()),
                None => spec,
            })
            .collect(),
    )?;
    cluster.node(0).wait_for_routes(&[3], SETTLE).await?;
    cluster.node(2).wait_for_routes(&[1], SETTLE).await?;
    Ok(cluster)
}
