//! TLS client settings of both binaries. A `FROM scratch` image has no system trust
//! store, so the roots are assembled explicitly: the public web roots, plus CA bundles
//! the caller names (the cluster CA, an operator's extra bundle).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA bundle {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA bundle {}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("no certificate found in {}", .0.display())]
    Empty(PathBuf),
    #[error("TLS protocol versions: {0}")]
    Protocols(#[source] rustls::Error),
}

/// A client configuration (ring provider, safe protocol versions) trusting the public web
/// roots and every certificate of the PEM bundles `extra`.
pub fn client_config(extra: &[&Path]) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra {
        add_pem(&mut roots, path)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn add_pem(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(read)? {
        roots
            .add(cert.map_err(read)?)
            .map_err(|source| TlsError::Certificate {
                path: path.to_path_buf(),
                source,
            })?;
        added += 1;
    }
    if added == 0 {
        return Err(TlsError::Empty(path.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_without_certificates_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        assert!(matches!(client_config(&[&empty]), Err(TlsError::Empty(_))));
        assert!(client_config(&[]).is_ok());
    }
}
