//! Test PKI generated at run time with rcgen: a CA and node certificates (valid,
//! expired, for another node, from another CA). No key is ever committed.

use ackwire::transport::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use ackwire::transport::tls::{node_dns_name, rustls, TlsConfig};
use ackwire::NodeId;
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use std::sync::Arc;

/// A certificate authority.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// A node certificate and its key.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A certificate naming `node`, valid now.
    pub fn issue(&self, node: NodeId) -> Issued {
        self.issue_with(node, false)
    }

    /// A certificate naming `node` that expired years ago.
    pub fn issue_expired(&self, node: NodeId) -> Issued {
        self.issue_with(node, true)
    }

    /// A certificate naming `node`, valid from a day ago until `valid_for` from now.
    pub fn issue_expiring(&self, node: NodeId, valid_for: std::time::Duration) -> Issued {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
        let mut params = CertificateParams::new(vec![node_dns_name(node)]).unwrap();
        params.not_before = now - std::time::Duration::from_secs(24 * 3600);
        params.not_after = now + valid_for;
        self.sign(params)
    }

    fn issue_with(&self, node: NodeId, expired: bool) -> Issued {
        let mut params = CertificateParams::new(vec![node_dns_name(node)]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A ready TLS configuration for `node`, trusting this CA.
    pub fn node(&self, node: NodeId) -> TlsConfig {
        let i = self.issue(node);
        TlsConfig::new(i.chain, i.key, vec![self.root()]).unwrap()
    }
}

/// A raw rustls client configuration presenting `cert` (or none), trusting `ca`:
/// for impostors that do not go through the ackwire transport.
pub fn raw_client(ca: &Ca, cert: Option<Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match cert {
        Some(i) => b.with_client_auth_cert(i.chain, i.key).unwrap(),
        None => b.with_no_client_auth(),
    })
}
