//! TLS settings of meshd links.
//!
//! Every node has its own self-signed certificate (made once by the appliance and kept in its
//! control database). TLS gives confidentiality and integrity; *who* the peer is gets proven one
//! layer up, by the link handshake, whose signed transcript includes this session's TLS exporter
//! value (see `handshake`). That is why the client side accepts any well-formed certificate here
//! but still checks that the server's handshake signature matches the certificate it presented:
//! the session is bound to a key, and the handshake binds that session to a node id.
//!
//! TLS 1.3 only: its exporter is safe to use for channel binding without extra extensions.

use std::sync::Arc;

use rustls::{
    ClientConfig, DigitallySignedStruct, Error, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};

/// The exporter label of meshd links (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshd-link-v1";

/// The server name a dialer puts in its ClientHello; certificates are not checked against it.
pub const SERVER_NAME: &str = "meshd.link";

/// A node's TLS certificate and key, DER encoded.
#[derive(Clone)]
pub struct TlsIdentity {
    /// Self-signed X.509 certificate.
    pub cert_der: Vec<u8>,
    /// PKCS#8 private key.
    pub key_der: Vec<u8>,
}

/// Builds the configs for both directions of a node's links.
pub fn configs(identity: &TlsIdentity) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), Error> {
    let provider = Arc::new(ring::default_provider());
    let cert = CertificateDer::from(identity.cert_der.clone());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
    let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok((Arc::new(server), client_config()?))
}

/// The config for dialing: TLS 1.3, any certificate whose handshake signature checks out.
pub fn client_config() -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(AnyCertSignedSession {
        algorithms: provider.signature_verification_algorithms,
    });
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(client))
}

/// The server name to dial with.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME)
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// Accepts any server certificate but checks the TLS handshake signature against it.
#[derive(Debug)]
struct AnyCertSignedSession {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertSignedSession {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Identity is proven by the link handshake over this session's exporter, not by a CA.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Returns the crypto provider links use, for callers that build their own configs (tests).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}
