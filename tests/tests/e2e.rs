//! Tenant end-to-end encryption across real processes: A → relay B → C. C's subscriber gets
//! the plaintext; B's memory never holds it (its whole writable memory is scanned), while a
//! plaintext send's marker is found there, which proves the scan sees what passes through.

use std::time::{Duration, Instant};

use meshd_proto::mesh::{Header, MessageStatus, SendMode, SendRequest, SendResponse};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tokio_stream::StreamExt;

const SETTLE: Duration = Duration::from_secs(10);

fn serving(mut spec: NodeSpec, tenants: &str) -> NodeSpec {
    spec.extra = format!("tenants = [{tenants}]");
    spec
}

fn request(dst: u64, payload: Vec<u8>, tenant: Option<&str>) -> SendRequest {
    SendRequest {
        dst_node: dst,
        payload: payload.into(),
        mode: SendMode::WaitForDelivery as i32,
        timeout_seconds: 5,
        end_to_end_encrypt: tenant.is_some(),
        headers: tenant
            .map(|t| {
                vec![Header {
                    key: "tenant".into(),
                    value: t.as_bytes().to_vec().into(),
                }]
            })
            .unwrap_or_default(),
        ..SendRequest::default()
    }
}

/// Whether `needle` stands anywhere in the writable memory of process `pid`.
fn memory_holds(pid: u32, needle: &[u8]) -> anyhow::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16)?,
            u64::from_str_radix(end, 16)?,
        );
        let mut region = vec![0u8; usize::try_from(end - start)?];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        if region.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[meshd_tests::test]
async fn an_encrypted_send_crosses_a_relay_as_ciphertext_only() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        serving(NodeSpec::listener(1), "\"acme\""),
        serving(NodeSpec::listener(2).dialing(vec![0]), ""),
        serving(NodeSpec::behind_nat(3, vec![1]), "\"acme\""),
    ])?;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    a.wait_for_routes(&[3], SETTLE).await?;
    let mut inbox = c.inbox().await?;
    let mut client = a.data().await?;

    // 300 encrypted messages of 4 KiB, each full of one marker.
    let secret_marker: Vec<u8> = format!("E2E-SECRET-{:016x}", rand::random::<u64>()).into();
    let payload: Vec<u8> = secret_marker.iter().copied().cycle().take(4096).collect();
    for _ in 0..300 {
        let reply = client
            .send(request(3, payload.clone(), Some("acme")))
            .await?
            .into_inner();
        assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
        let got = tokio::time::timeout(SETTLE, inbox.next())
            .await?
            .expect("stream open")?;
        assert_eq!(
            got.payload.as_ref(),
            payload.as_slice(),
            "C got the plaintext"
        );
    }
    // The same through the relay in plaintext, with another marker: the scan must find it.
    let plain_marker: Vec<u8> = format!("E2E-PLAIN-{:016x}", rand::random::<u64>()).into();
    let plain: Vec<u8> = plain_marker.iter().copied().cycle().take(4096).collect();
    for _ in 0..300 {
        let reply = client
            .send(request(3, plain.clone(), None))
            .await?
            .into_inner();
        assert_eq!(reply.status(), MessageStatus::Delivered, "{reply:?}");
        inbox.next().await;
    }
    let pid = b.pid().expect("relay running");
    let scanned = Instant::now();
    let secret_seen = memory_holds(pid, &secret_marker)?;
    let plain_seen = memory_holds(pid, &plain_marker)?;
    println!(
        "relay memory scanned in {} ms: encrypted marker found {secret_seen}, plaintext marker \
         found {plain_seen}",
        scanned.elapsed().as_millis()
    );
    assert!(
        plain_seen,
        "the scan must see what a relay carries in clear"
    );
    assert!(
        !secret_seen,
        "the relay's memory holds an encrypted message's plaintext"
    );
    Ok(())
}

#[meshd_tests::test]
async fn a_node_without_the_tenant_key_says_so_and_nothing_is_delivered() -> anyhow::Result<()> {
    let _serial = exclusive().await;
    let cluster = Cluster::start(vec![
        serving(NodeSpec::listener(1), "\"acme\""),
        serving(NodeSpec::listener(2).dialing(vec![0]), "\"globex\""),
    ])?;
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.wait_for_routes(&[2], SETTLE).await?;
    let mut inbox = b.inbox().await?;
    let mut client = a.data().await?;

    // The destination does not serve the tenant: not delivered, and the sender is told why.
    let reply: SendResponse = client
        .send(request(2, b"for acme".to_vec(), Some("acme")))
        .await?
        .into_inner();
    println!("to a node without acme's key: {reply:?}");
    assert_eq!(reply.status(), MessageStatus::PendingClient, "{reply:?}");
    assert!(reply.status_message.contains("tenant"), "{reply:?}");
    let nothing = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await;
    assert!(nothing.is_err(), "something was delivered: {nothing:?}");

    // The sender does not serve the tenant: refused at call time.
    let refused = client
        .send(request(2, b"x".to_vec(), Some("globex")))
        .await
        .unwrap_err();
    println!("sending for a tenant this node does not serve: {refused:?}");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    // No tenant named: a clear error.
    let mut unnamed = request(2, b"x".to_vec(), None);
    unnamed.end_to_end_encrypt = true;
    let refused = client.send(unnamed).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    Ok(())
}
