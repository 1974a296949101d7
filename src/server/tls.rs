//! TLS for an API, with rustls (the same rustls and aws-lc-rs the Azure SDK's HTTP client already
//! links: no second TLS stack). The certificate chain and key are PEM files; they are read again
//! when they change ([`CERT_POLL_INTERVAL`]), so a renewed certificate (cert-manager, certbot)
//! is served from the next handshake on without a restart. A renewal that cannot be loaded
//! leaves the certificate in force and is logged.

use crate::config::TlsFiles;
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_rustls::rustls::crypto::{aws_lc_rs, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// How often the certificate and key files are read for changes.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_secs(30);

/// The certificate served, swapped when the files change.
pub struct CertStore {
    api: &'static str,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// Digest of the two files' content last seen, loaded or not.
    seen: Mutex<[u8; 32]>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("api", &self.api).field("files", &self.files).finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn files_digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_le_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// Parses the PEM chain and key and checks they belong together. Errors name the files, never
/// the key material.
fn load(
    api: &str,
    files: &TlsFiles,
    cert: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let (cert_path, key_path) = (files.cert.display(), files.key.display());
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{api}.tls_cert_file {cert_path}: not a PEM certificate chain ({e})"))?;
    if chain.is_empty() {
        return Err(format!(
            "{api}.tls_cert_file {cert_path}: holds no certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
        format!("{api}.tls_key_file {key_path}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        format!("{api}.tls_key_file {key_path}: cannot be used with the certificate in {cert_path} ({e})")
    })
}

impl CertStore {
    /// Reads the files and builds the acceptor; the error is for the configuration report.
    pub fn acceptor(api: &'static str, files: &TlsFiles) -> Result<(TlsAcceptor, Arc<CertStore>), String> {
        let read = |path: &std::path::Path, key: &str| {
            std::fs::read(path).map_err(|e| format!("{api}.{key} {}: cannot read it ({e})", path.display()))
        };
        let (cert, key) = (read(&files.cert, "tls_cert_file")?, read(&files.key, "tls_key_file")?);
        let provider = Arc::new(aws_lc_rs::default_provider());
        let certified = load(api, files, &cert, &key, &provider)?;
        let store = Arc::new(CertStore {
            api,
            files: files.clone(),
            provider: provider.clone(),
            current: ArcSwap::from_pointee(certified),
            seen: Mutex::new(files_digest(&cert, &key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{api}: TLS cannot be set up: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        // twinroute speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((TlsAcceptor::from(Arc::new(config)), store))
    }

    /// Takes changed files into use if they load; returns whether the certificate changed.
    pub fn reload(&self, cert: std::io::Result<Vec<u8>>, key: std::io::Result<Vec<u8>>) -> bool {
        let api = self.api;
        let (cert, key) = match (cert, key) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                // Mid-renewal or gone: keep serving; log when the state changes.
                let failure = files_digest(format!("unreadable: {e}").as_bytes(), b"");
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                if *seen != failure {
                    *seen = failure;
                    tracing::error!(api, error = %e, "the TLS certificate or key file cannot be read; the certificate in force stays in force");
                    metrics::counter!("twinroute_api_credentials_reloads_total", "api" => api, "kind" => "tls", "result" => "error").increment(1);
                }
                return false;
            }
        };
        let now = files_digest(&cert, &key);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match load(api, &self.files, &cert, &key, &self.provider) {
            Ok(certified) => {
                self.current.store(Arc::new(certified));
                tracing::info!(api, cert = %self.files.cert.display(), "TLS certificate reloaded");
                metrics::counter!("twinroute_api_credentials_reloads_total", "api" => api, "kind" => "tls", "result" => "success").increment(1);
                true
            }
            Err(problem) => {
                // A renewal writes two files: the first poll may see one new and one old.
                tracing::error!(api, problem = %problem, "the TLS files changed but cannot be loaded; the certificate in force stays in force");
                metrics::counter!("twinroute_api_credentials_reloads_total", "api" => api, "kind" => "tls", "result" => "error").increment(1);
                false
            }
        }
    }

    /// Reads the files every [`CERT_POLL_INTERVAL`]; runs until aborted.
    pub async fn watch(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(CERT_POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let cert = tokio::fs::read(&self.files.cert).await;
            let key = tokio::fs::read(&self.files.key).await;
            self.reload(cert, key);
        }
    }

    /// The end-entity certificate in force (DER), for tests and diagnostics.
    pub fn current_certificate(&self) -> Vec<u8> {
        self.current.load().cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and key from openssl, in `dir`, named after `cn`.
    pub(crate) fn self_signed(dir: &std::path::Path, cn: &str) -> TlsFiles {
        let (cert, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
            ])
            .args(["-subj", &format!("/CN={cn}"), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success());
        TlsFiles { cert, key }
    }

    #[test]
    fn certificates_load_reload_and_bad_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let first = self_signed(dir.path(), "first");
        let (_, store) = CertStore::acceptor("ingest", &first).unwrap();
        let served = store.current_certificate();
        let read = |f: &TlsFiles| (std::fs::read(&f.cert), std::fs::read(&f.key));
        let (c, k) = read(&first);
        assert!(!store.reload(c, k), "unchanged");

        // Renewal: new files at the same paths.
        let second = self_signed(dir.path(), "second");
        std::fs::copy(&second.cert, &first.cert).unwrap();
        std::fs::copy(&second.key, &first.key).unwrap();
        let (c, k) = read(&first);
        assert!(store.reload(c, k));
        assert_ne!(store.current_certificate(), served);

        // A key that does not match, a missing file: the certificate in force stays.
        let third = self_signed(dir.path(), "third");
        std::fs::copy(&third.key, &first.key).unwrap();
        let in_force = store.current_certificate();
        let (c, k) = read(&first);
        assert!(!store.reload(c, k));
        assert_eq!(store.current_certificate(), in_force);
        let err = CertStore::acceptor("ingest", &first).err().unwrap();
        assert!(
            err.contains("ingest.tls_key_file") && err.contains("cannot be used with the certificate"),
            "{err}"
        );
        assert!(!store.reload(Err(std::io::ErrorKind::NotFound.into()), std::fs::read(&first.key)));

        std::fs::write(&first.cert, "not pem").unwrap();
        let err = CertStore::acceptor("admin", &first).err().unwrap();
        assert!(err.contains("admin.tls_cert_file") && err.contains("no certificate"), "{err}");
        let err =
            CertStore::acceptor("admin", &TlsFiles { cert: dir.path().join("nope"), key: first.key.clone() })
                .err()
                .unwrap();
        assert!(err.contains("cannot read"), "{err}");
        // The key file's content never appears in an error.
        std::fs::copy(&third.cert, &first.cert).unwrap();
        std::fs::write(
            &first.key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = CertStore::acceptor("admin", &first).err().unwrap();
        assert!(!err.contains("c2VjcmV0"), "{err}");
    }
}
