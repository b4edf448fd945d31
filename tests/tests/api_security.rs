//! The gRPC api off loopback: a node refuses to serve it there without TLS and a token, and
//! with them refuses calls that lack the token (real processes, real sockets).

use std::time::Duration;

use meshd_proto::mesh::{GetSessionsRequest, mesh_control_client::MeshControlClient};
use meshd_tests::{Cluster, NodeSpec, exclusive};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig},
};

const TOKEN: &str = "a-long-random-api-token-0123456789";

#[meshd_tests::test]
async fn an_api_reachable_from_other_hosts_needs_tls_and_a_token() -> anyhow::Result<()> {
    let _serial = exclusive().await;

    // Off loopback without TLS and a token: the node does not start, and says why.
    let refused = Cluster::start(vec![
        NodeSpec::listener(1).with_env("MESHD_GRPC__LISTEN", "0.0.0.0:0"),
    ]);
    let error = format!(
        "{:#}",
        refused.err().expect("an open plaintext api was served")
    );
    println!(
        "plaintext api on 0.0.0.0: {}",
        error.lines().last().unwrap_or_default()
    );
    assert!(error.contains("grpc.listen"), "{error}");

    // With TLS and a token.
    let dir = tempfile::tempdir()?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert_pem = certified.cert.pem();
    let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    std::fs::write(&cert, &cert_pem)?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    let spec = || {
        NodeSpec::listener(1)
            .with_env("MESHD_GRPC__LISTEN", "0.0.0.0:0")
            .with_env("MESHD_GRPC__TLS_CERT_FILE", &cert.display().to_string())
            .with_env("MESHD_GRPC__TLS_KEY_FILE", &key.display().to_string())
            .with_env("MESHD_GRPC__TOKEN", TOKEN)
    };
    // A key every user of the host can read (the umask's 0644): refused, with the fix.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
        let refused = Cluster::start(vec![spec()]);
        let error = format!(
            "{:#}",
            refused.err().expect("a world-readable key was used")
        );
        assert!(
            error.contains("grpc.tls_key_file") && error.contains("chmod 600"),
            "{error}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    let cluster = Cluster::start(vec![spec()])?;
    let port = cluster.node(0).grpc.port();

    // Plaintext to a TLS port: no answer.
    let plaintext = async {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        MeshControlClient::new(channel)
            .get_sessions(GetSessionsRequest {})
            .await?;
        anyhow::Ok(())
    };
    let plaintext = tokio::time::timeout(Duration::from_secs(5), plaintext).await;
    assert!(
        !matches!(plaintext, Ok(Ok(()))),
        "a plaintext call was answered"
    );

    let tls = Channel::from_shared(format!("https://localhost:{port}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cert_pem))
                .domain_name("localhost"),
        )?
        .connect_timeout(Duration::from_secs(5))
        .timeout(meshd_tests::CALL_TIMEOUT)
        .connect()
        .await?;
    // TLS without the token, and with a wrong one: UNAUTHENTICATED.
    for given in [None, Some("Bearer not-the-token-at-all-0000000")] {
        let mut client = MeshControlClient::with_interceptor(
            tls.clone(),
            move |mut request: tonic::Request<()>| {
                if let Some(value) = given {
                    request
                        .metadata_mut()
                        .insert("authorization", value.parse().expect("ascii"));
                }
                Ok(request)
            },
        );
        let status = client
            .get_sessions(GetSessionsRequest {})
            .await
            .expect_err("a call without the token was answered");
        println!("token {given:?}: {:?} {}", status.code(), status.message());
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // TLS with the token: served.
    let mut client = MeshControlClient::with_interceptor(tls, |mut request: tonic::Request<()>| {
        let value = format!("Bearer {TOKEN}");
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ascii"));
        Ok(request)
    });
    let sessions = client
        .get_sessions(GetSessionsRequest {})
        .await?
        .into_inner();
    println!("with the token: {} sessions", sessions.sessions.len());
    Ok(())
}

#[meshd_tests::test]
async fn the_data_directory_is_private_whatever_the_umask() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _serial = exclusive().await;
    // The harness runs with the usual umask (022): files and directories it creates are
    // world-readable unless meshd says otherwise.
    let cluster = Cluster::start(vec![NodeSpec::listener(1)])?;
    let dir = &cluster.node(0).data_dir;
    let mode = |p: &std::path::Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(dir)?, 0o700, "data dir {}", dir.display());
    let mut files = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files += 1;
            assert_eq!(mode(&entry.path())?, 0o600, "{}", entry.path().display());
        }
    }
    assert!(
        files >= 3,
        "control, raft and stream databases: {files} files"
    );
    Ok(())
}
