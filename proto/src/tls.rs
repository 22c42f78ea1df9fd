//! TLS for shoal's ports (issue 17, first part): rustls with the ring provider, one
//! place for every server and client. A server's certificate and the CA it trusts for
//! client certificates are read from PEM files and re-read when they change
//! ([`ServerTls::reload`]), so certificates rotate without a restart; connections are
//! accepted by [`incoming`], which runs each handshake in a task of its own under a
//! timeout and a bound on handshakes in flight (a client that never finishes one holds
//! a permit for at most [`HANDSHAKE_TIMEOUT`], and no more than
//! [`MAX_HANDSHAKES`] wait at once). Internal ports require a client certificate from
//! the cluster's CA (mutual TLS); the public port may ask for none.
//! [`dev`] makes a local CA and certificates for `shoal dev` and the tests.
//!
//! A process with TLS configured ([`Tls::load`]) serves its internal ports with
//! mutual TLS and its public port with TLS, and opens every client connection
//! ([`crate::channel`]) over TLS with its own certificate ([`use_for_clients`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight per listener; further connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;

/// Where a process finds its certificate, its key and the CA it trusts (PEM files;
/// in a config file, a `[tls]` table with `ca`, `cert` and `key`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three files in `dir` as [`dev::Ca::write`] names them.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    fn stamps(&self) -> Option<[SystemTime; 3]> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some([m(&self.ca)?, m(&self.cert)?, m(&self.key)?])
    }
}

/// What went wrong reading or using TLS files: names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a server asks for the client's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Internal ports: only holders of a certificate from the cluster's CA connect.
    Required,
    /// The public port: clients without a certificate connect too (keys, issue 17's
    /// second part, say who they are).
    Optional,
}

/// A server's TLS configuration, re-read from its files when they change.
pub struct ServerTls {
    files: TlsFiles,
    auth: ClientAuth,
    current: RwLock<(Arc<ServerConfig>, Option<[SystemTime; 3]>)>,
}

impl ServerTls {
    pub fn load(files: TlsFiles, auth: ClientAuth) -> Result<Arc<Self>, TlsError> {
        let stamps = files.stamps();
        let config = Self::build(&files, auth)?;
        Ok(Arc::new(Self {
            files,
            auth,
            current: RwLock::new((config, stamps)),
        }))
    }

    fn build(files: &TlsFiles, auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certs(&files.ca)? {
            roots.add(c).map_err(|e| file_error(&files.ca, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let verifier = match auth {
            ClientAuth::Required => verifier.build(),
            ClientAuth::Optional => verifier.allow_unauthenticated().build(),
        }
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&files.cert)?, key(&files.key)?)
            .map_err(|e| file_error(&files.cert, format!("certificate and key: {e}")))?;
        // The public port also serves the HTTP/JSON API (issue 23) to HTTP/1.1 clients.
        config.alpn_protocols = match auth {
            ClientAuth::Required => vec![b"h2".to_vec()],
            ClientAuth::Optional => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Ok(Arc::new(config))
    }

    /// Re-reads the files if any changed since they were last read; returns whether
    /// the configuration changed. Files that do not make a valid configuration (a
    /// rotation half-written) leave the one in use and return the error.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let stamps = self.files.stamps();
        if stamps.is_some() && stamps == self.current.read().expect("not poisoned").1 {
            return Ok(false);
        }
        let config = Self::build(&self.files, self.auth)?;
        *self.current.write().expect("not poisoned") = (config, stamps);
        Ok(true)
    }

    /// Re-reads the files every `every` until the process ends (logs a failure and
    /// keeps the configuration in use).
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(tls) = me.upgrade() else { return };
                match tls.reload() {
                    Ok(true) => {
                        tracing::info!(cert = %tls.files.cert.display(), "TLS certificates reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificates not reloaded; the ones in use stay")
                    }
                }
            }
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("not poisoned").0.clone())
    }
}

/// A bound listener as a server's stream of TLS connections (with `TCP_NODELAY`, as
/// [`crate::incoming`]): each handshake in its own task, under [`HANDSHAKE_TIMEOUT`],
/// at most [`MAX_HANDSHAKES`] at once, with the configuration current when the
/// connection arrived. A failed handshake (a plaintext client, a certificate from
/// another CA) closes that connection only.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A process's TLS, from its files: the internal ports' server side (mutual TLS), the
/// public port's (client certificates optional), and the client side for every
/// connection it opens (its own certificate shown).
#[derive(Clone)]
pub struct Tls {
    pub internal: Arc<ServerTls>,
    pub public: Arc<ServerTls>,
    pub client: tonic::transport::ClientTlsConfig,
}

/// How often a process re-reads its certificate files.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            internal: ServerTls::load(files.clone(), ClientAuth::Required)?,
            public: ServerTls::load(files.clone(), ClientAuth::Optional)?,
            client: client_config(&files.ca, Some((&files.cert, &files.key)), None)?,
        })
    }

    /// Loads, starts re-reading the files every [`RELOAD_EVERY`] and makes every
    /// client connection of this process use TLS ([`use_for_clients`]).
    pub fn start(files: &TlsFiles) -> Result<Self, TlsError> {
        let tls = Self::load(files)?;
        tls.internal.watch(RELOAD_EVERY);
        tls.public.watch(RELOAD_EVERY);
        use_for_clients(tls.client.clone());
        Ok(tls)
    }
}

/// A process's TLS from its optional files ([`Tls::start`]); without them, a warning
/// that `what` serves plaintext, and `None`.
pub fn start_or_plaintext(files: Option<&TlsFiles>, what: &str) -> Result<Option<Tls>, TlsError> {
    match files {
        Some(f) => Tls::start(f).map(Some),
        None => {
            tracing::warn!("TLS is off: every port of this {what} takes plaintext from anyone");
            Ok(None)
        }
    }
}

static CLIENT: OnceLock<tonic::transport::ClientTlsConfig> = OnceLock::new();

/// Every client connection this process opens from now on ([`crate::channel`]) uses
/// TLS with `config` (set once, at start; later calls are ignored).
pub fn use_for_clients(config: tonic::transport::ClientTlsConfig) {
    let _ = CLIENT.set(config);
}

/// The client side of this process's TLS, when it has one.
pub fn for_clients() -> Option<tonic::transport::ClientTlsConfig> {
    CLIENT.get().cloned()
}

/// Serves a tonic router on a bound listener until `shutdown`: over TLS when `tls`
/// is `Some(Arc<ServerTls>)` ([`incoming`]), else plain TCP ([`crate::incoming`]).
#[macro_export]
macro_rules! serve {
    ($router:expr, $listener:expr, $tls:expr, $shutdown:expr) => {{
        let router = $router;
        match $tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown($crate::tls::incoming($listener, tls), $shutdown)
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown($crate::incoming($listener), $shutdown)
                    .await
            }
        }
    }};
}

/// A client's TLS: the CA it trusts, and the certificate it shows (every shoal
/// process shows one; an operator's tool may go without). `domain`: the name the
/// server's certificate must carry (the cluster's certificates name the hosts they
/// run on; `dev::Ca` adds "localhost" and 127.0.0.1).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    domain: Option<&str>,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| file_error(p, e));
    certs(ca)?;
    let mut c = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    if let Some((cert, key_file)) = identity {
        certs(cert)?;
        key(key_file)?;
        c = c.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key_file)?,
        ));
    }
    if let Some(d) = domain {
        c = c.domain_name(d);
    }
    Ok(c)
}

/// The first certificate of a PEM file, DER.
pub fn certificate_in(path: &Path) -> Result<Vec<u8>, TlsError> {
    Ok(certs(path)?.swap_remove(0).to_vec())
}

/// The certificate a server at `addr` presents on a TLS handshake (DER), verified
/// against the CA file `ca` for the name "localhost": which certificate a process
/// serves right now (an operator's check after a rotation, and the rotation test's).
/// For ports that take clients without a certificate (the public ones).
pub async fn served_certificate(addr: &str, ca: &Path) -> Result<Vec<u8>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| file_error(ca, e))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost")
            .expect("a valid name")
            .to_owned();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    };
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| TlsError::Config(format!("{addr}: the handshake timed out")))?
        .map_err(|e| TlsError::Config(format!("{addr}: {e}")))?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| TlsError::Config(format!("{addr} presented no certificate")))
}

/// [`crate::channel`] over TLS with `tls` (whatever the process's own).
pub fn channel(
    addr: &str,
    request_timeout: Option<Duration>,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut e = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(crate::CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tls_config(tls)?;
    if let Some(t) = request_timeout {
        e = e.timeout(t);
    }
    Ok(e.connect_lazy())
}

/// A local certificate authority, for `shoal dev` and the tests (never for a
/// deployment: its key sits next to the certificates it signs).
pub mod dev {
    use std::path::Path;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    pub struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A certificate and its key, PEM.
    pub struct Leaf {
        pub cert: String,
        pub key: String,
    }

    impl Ca {
        /// A new CA named `name`.
        pub fn new(name: &str) -> Result<Self, rcgen::Error> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate()?;
            let pem = params.self_signed(&key)?.pem();
            Ok(Self {
                pem,
                issuer: Issuer::new(params, key),
            })
        }

        pub fn pem(&self) -> &str {
            &self.pem
        }

        /// A certificate for `names` (host names or IP addresses, plus "localhost" and
        /// 127.0.0.1), good for serving and for client authentication.
        pub fn issue(&self, names: &[&str]) -> Result<Leaf, rcgen::Error> {
            let mut all: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            for n in ["localhost", "127.0.0.1"] {
                if !all.iter().any(|a| a == n) {
                    all.push(n.to_string());
                }
            }
            let mut params = CertificateParams::new(all)?;
            params.distinguished_name.push(
                DnType::CommonName,
                names.first().copied().unwrap_or("shoal"),
            );
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &self.issuer)?.pem();
            Ok(Leaf {
                cert,
                key: key.serialize_pem(),
            })
        }

        /// Writes `ca.pem` and, per name, `NAME.pem` and `NAME.key` into `dir` (each
        /// certificate for that name, "localhost" and 127.0.0.1); the layout
        /// [`super::TlsFiles::in_dir`] reads.
        pub fn write(&self, dir: &Path, names: &[&str]) -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("ca.pem"), &self.pem)?;
            for n in names {
                let leaf = self.issue(&[n]).map_err(std::io::Error::other)?;
                write_leaf(dir, n, &leaf)?;
            }
            Ok(())
        }
    }

    /// Writes `NAME.pem` and `NAME.key` (the key readable by its owner only), each
    /// replaced whole (a reader never sees half a file).
    pub fn write_leaf(dir: &Path, name: &str, leaf: &Leaf) -> std::io::Result<()> {
        let put = |file: String, body: &str| -> std::io::Result<()> {
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, body)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if file.ends_with(".key") {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            std::fs::rename(&tmp, dir.join(file))
        };
        put(format!("{name}.key"), &leaf.key)?;
        put(format!("{name}.pem"), &leaf.cert)
    }
}
