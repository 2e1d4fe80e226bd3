//! Mutual TLS 1.3 for the TCP transport, and the identity a certificate proves.
//!
//! Owns the rustls configuration of both connection directions and the rule that binds
//! a [`NodeId`] to a certificate. Must not know about frames, acks or dedup: the TCP
//! transport wraps each socket in TLS before the ackwire handshake and checks, after
//! it, that the node id the peer claims is the one its certificate names.
//!
//! # Identity encoding
//!
//! Node `n` is the holder of a certificate, chained to one of the configured CA roots,
//! whose subject alternative names include the DNS name [`node_dns_name`]`(n)`:
//! `n<decimal id>.node.ackwire` (node 7: `n7.node.ackwire`). A DNS SAN (not a URI SAN)
//! so that any CA tooling can issue it and so that the standard WebPKI name check
//! verifies it, on both sides:
//!
//! - the dialer verifies the server certificate against the name of the node it dialed
//!   (plain rustls server-name verification);
//! - the acceptor verifies the client certificate's chain during the TLS handshake, then
//!   checks that the certificate is valid for the node id the peer claims in the
//!   ackwire handshake. A mismatch closes the connection, counted as
//!   `rejected_identity_mismatch`.
//!
//! A wildcard SAN `*.node.ackwire` matches every node id: a certificate carrying it can
//! speak for any node. Do not issue one unless that is what you mean.
//!
//! Only TLS 1.3 is offered. The crypto provider is `ring` (builds with a Rust toolchain
//! and a C compiler; `aws-lc-rs` would also need cmake).

use crate::id::NodeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::sync::Arc;

pub use rustls;

mod files;
pub use files::{TlsFiles, TlsFilesError};

/// The DNS subject alternative name that identifies `node` (see the module docs).
///
/// ```
/// assert_eq!(ackwire::transport::tls::node_dns_name(ackwire::NodeId(7)), "n7.node.ackwire");
/// ```
pub fn node_dns_name(node: NodeId) -> String {
    format!("n{}.node.ackwire", node.0)
}

/// A node's TLS identity and the CAs it trusts, ready for both connection directions.
///
/// Both sides of every connection present a certificate and verify the other's:
/// a peer without a certificate, with one from an untrusted CA, an expired one, or one
/// for another node id is refused (each counted under its own `TcpStats` reason).
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
    leaf: CertificateDer<'static>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// A configuration from DER: this node's certificate chain (leaf first), its
    /// private key, and the CA certificates whose chains it accepts from peers.
    pub fn new(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trusted_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsConfigError> {
        let leaf = cert_chain
            .first()
            .cloned()
            .ok_or(TlsConfigError::NoCertificate)?;
        let mut roots = RootCertStore::empty();
        for root in trusted_roots {
            roots.add(root).map_err(TlsConfigError::Rustls)?;
        }
        if roots.is_empty() {
            return Err(TlsConfigError::NoTrustedRoots);
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsConfigError::Rustls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(cert_chain.clone(), key.clone_key())
            .map_err(TlsConfigError::Rustls)?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsConfigError::Rustls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(cert_chain, key)
            .map_err(TlsConfigError::Rustls)?;
        // No session resumption, either way: a resumed TLS 1.3 session takes the
        // peer's certificate chain from the ticket without verifying it again, so a
        // certificate that expired (or whose key was stolen and then replaced) since
        // a first connection kept working as long as the node that issued the ticket
        // ran (tests/integration/tls.rs). Connections are long-lived; a full handshake on each
        // reconnect costs a few milliseconds.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfig {
            server: Arc::new(server),
            client: Arc::new(client),
            leaf,
        })
    }

    /// A configuration from PEM text: the certificate chain (leaf first), the private
    /// key (PKCS#8, PKCS#1 or SEC1), and one or more trusted CA certificates.
    pub fn from_pem(
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        trusted_roots_pem: &[u8],
    ) -> Result<Self, TlsConfigError> {
        let pem = |e: rustls::pki_types::pem::Error| TlsConfigError::Pem(e.to_string());
        let chain = CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem)?;
        let roots = CertificateDer::pem_slice_iter(trusted_roots_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem)?;
        Self::new(chain, key, roots)
    }

    /// Is this node's own certificate valid for `node`? Checked when the transport
    /// starts, so a node given another node's certificate fails early.
    pub fn certifies(&self, node: NodeId) -> bool {
        cert_names_node(&self.leaf, node)
    }
}

/// An invalid [`TlsConfig`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The certificate chain is empty. Pass at least the node's own certificate.
    #[error("no certificate in the chain")]
    NoCertificate,
    /// No trusted CA root was given. Pass the CA(s) that sign your nodes' certificates.
    #[error("no trusted CA roots")]
    NoTrustedRoots,
    /// PEM input did not parse. Check the files.
    #[error("pem: {0}")]
    Pem(String),
    /// The client-certificate verifier could not be built (e.g. unusable roots).
    #[error("verifier: {0}")]
    Verifier(String),
    /// rustls refused the certificate, key or roots (e.g. a key not matching the
    /// certificate, or an unsupported key type).
    #[error("tls: {0}")]
    Rustls(#[source] rustls::Error),
}

/// Why a TLS handshake failed, as the refusing side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlsRefusal {
    /// The peer presented no certificate.
    NoCertificate,
    /// The peer's chain does not lead to a trusted root.
    UntrustedIssuer,
    /// The peer's certificate (or one in its chain) has expired or is not yet valid.
    Expired,
    /// The dialed peer's certificate does not name the node we dialed.
    NotForNode,
    /// Anything else (protocol error, bad signature, alert from the peer…).
    Other,
}

impl TlsRefusal {
    /// Classify the error of a failed `accept`/`connect`.
    pub(crate) fn of(e: &std::io::Error) -> Self {
        use rustls::{CertificateError as C, Error as E};
        match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
            Some(E::NoCertificatesPresented) => TlsRefusal::NoCertificate,
            Some(E::InvalidCertificate(C::UnknownIssuer)) => TlsRefusal::UntrustedIssuer,
            Some(E::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            )) => TlsRefusal::Expired,
            Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
                TlsRefusal::NotForNode
            }
            _ => TlsRefusal::Other,
        }
    }
}

impl std::fmt::Display for TlsRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsRefusal::NoCertificate => "peer presented no certificate",
            TlsRefusal::UntrustedIssuer => "peer certificate from an untrusted issuer",
            TlsRefusal::Expired => "peer certificate expired or not yet valid",
            TlsRefusal::NotForNode => "peer certificate does not name the dialed node",
            TlsRefusal::Other => "tls handshake failed",
        })
    }
}

/// The server name a dialer verifies when it dials `node`.
pub(crate) fn server_name(node: NodeId) -> ServerName<'static> {
    ServerName::try_from(node_dns_name(node)).expect("n<u64>.node.ackwire is a valid DNS name")
}

/// Does the (already chain-verified) certificate `leaf` name `node`?
pub(crate) fn cert_names_node(leaf: &CertificateDer<'_>, node: NodeId) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&server_name(node))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    fn ca_and_node(
        node: NodeId,
    ) -> (
        CertificateDer<'static>,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![node_dns_name(node)])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (
            ca.der().clone(),
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    #[test]
    fn a_certificate_names_exactly_its_node() {
        let (ca, cert, key) = ca_and_node(NodeId(42));
        assert!(cert_names_node(&cert, NodeId(42)));
        assert!(!cert_names_node(&cert, NodeId(4)));
        assert!(!cert_names_node(&cert, NodeId(420)));
        assert!(!cert_names_node(
            &CertificateDer::from(vec![1u8, 2, 3]),
            NodeId(42)
        ));
        let cfg = TlsConfig::new(vec![cert], key, vec![ca]).unwrap();
        assert!(cfg.certifies(NodeId(42)) && !cfg.certifies(NodeId(43)));
    }

    #[test]
    fn incomplete_configurations_are_refused() {
        let (ca, cert, key) = ca_and_node(NodeId(1));
        assert!(matches!(
            TlsConfig::new(vec![], key.clone_key(), vec![ca.clone()]),
            Err(TlsConfigError::NoCertificate)
        ));
        assert!(matches!(
            TlsConfig::new(vec![cert.clone()], key.clone_key(), vec![]),
            Err(TlsConfigError::NoTrustedRoots)
        ));
        // A key that does not belong to the certificate.
        let (_, _, other_key) = ca_and_node(NodeId(1));
        assert!(TlsConfig::new(vec![cert], other_key, vec![ca]).is_err());
        assert!(TlsConfig::from_pem(b"junk", b"junk", b"junk").is_err());
    }
}
