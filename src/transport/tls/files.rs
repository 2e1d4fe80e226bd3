//! TLS material named by file paths, so a configuration file can say where a node's
//! certificate, key and trusted CAs are ([`TlsFiles`]). Owns reading those files and
//! nothing else: parsing and checking is [`TlsConfig::from_pem`]'s.

use super::{TlsConfig, TlsConfigError};
use std::path::{Path, PathBuf};

/// Where a node's TLS material lives, as PEM files: the serde-readable counterpart of
/// [`TlsConfig`] (which holds parsed keys and is built in code). Load it with
/// [`TlsFiles::load`] and pass the result to `NodeBuilder::tls`.
///
/// In TOML:
///
/// ```toml
/// [tls]
/// cert_chain = "/etc/myservice/node.pem"
/// key = "/etc/myservice/node.key"
/// trusted_roots = "/etc/myservice/ca.pem"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file with this node's certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// PEM file with this node's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file with one or more CA certificates whose chains this node accepts.
    pub trusted_roots: PathBuf,
}

/// Why [`TlsFiles::load`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFilesError {
    /// A file could not be read. Check the path and its permissions.
    #[error("reading {path}: {source}", path = path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The files were read but do not make a TLS configuration (bad PEM, a key that
    /// does not match the certificate, no CA). See [`TlsConfigError`].
    #[error(transparent)]
    Config(#[from] TlsConfigError),
}

impl TlsFiles {
    /// Reads the three files and builds the [`TlsConfig`].
    pub fn load(&self) -> Result<TlsConfig, TlsFilesError> {
        let chain = read(&self.cert_chain)?;
        let key = read(&self.key)?;
        let roots = read(&self.trusted_roots)?;
        Ok(TlsConfig::from_pem(&chain, &key, &roots)?)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFilesError> {
    std::fs::read(path).map_err(|source| TlsFilesError::Read {
        path: path.to_path_buf(),
        source,
    })
}
