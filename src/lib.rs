//! # dangjian — the binary's wiring
//!
//! Reads the configuration ([`config`]), opens the database and the object store, makes sure an
//! administrator exists, and serves the portal's HTTP application. Nothing else lives here: the
//! behaviour is in the `portal`, `signaling`, `sfu` and `recorder` crates.

pub mod config;

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use portal::AppState;
use portal::db::Db;
use portal::storage::{S3Keys, Storage};
use signaling::protocol::IceServer;
use signaling::room::{Rooms, RoomsConfig};
use signaling::token::TokenKey;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::Config;

/// The signing key: from configuration, else `token.key` in the data directory (made on first use).
pub fn load_token_key(config: &Config, create: bool) -> anyhow::Result<TokenKey> {
    if let Some(k) = &config.token_key {
        return TokenKey::from_hex(k.expose()).map_err(|e| anyhow::anyhow!("token_key: {e}"));
    }
    let path = config.data_dir.join("token.key");
    match std::fs::read_to_string(&path) {
        Ok(hex) => TokenKey::from_hex(&hex).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let key = TokenKey::generate();
            write_private(&path, &key.to_hex())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot read the token key {} (start the server once, or set token_key)",
                path.display()
            )
        }),
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

pub async fn open_database(config: &Config) -> anyhow::Result<Db> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    Ok(Db::connect(config.database_url.expose()).await?)
}

pub fn open_storage(config: &Config) -> anyhow::Result<Storage> {
    Ok(match &config.storage_url {
        Some(url) => Storage::s3(
            url,
            &S3Keys {
                access_key_id: config.s3_access_key_id.clone(),
                secret_access_key: config
                    .s3_secret_access_key
                    .as_ref()
                    .map(|s| s.expose().to_string()),
            },
        )?,
        None => Storage::local(&config.data_dir.join("objects"))?,
    })
}

/// A running server: its address, and how to stop it.
pub struct Server {
    pub addr: SocketAddr,
    /// Where clients send media.
    pub media_addr: SocketAddr,
    /// Set on first start when the admin password was generated; print it once.
    pub generated_admin_password: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Stops accepting, lets in-flight requests finish, closes the database.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await?
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            r = &mut self.task => return r?,
            () = signal => {}
        }
        self.stop().await
    }
}

/// Opens everything and starts serving on `config.http` (port 0 picks a free one).
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let db = open_database(&config).await?;
    let storage = open_storage(&config)?;
    let tokens = load_token_key(&config, true)?;
    let generated_admin_password =
        portal::bootstrap_admin(&db, config.admin_password.as_ref().map(|p| p.expose())).await?;
    let public_ip = config
        .rtc_public_ip
        .or_else(|| config.rtc_udp.ip().is_unspecified().then(primary_ip));
    let (sfu, sfu_events) = sfu::driver::start(config.rtc_udp, public_ip, config.rtc_tcp)
        .await
        .with_context(|| format!("cannot open the media socket {}", config.rtc_udp))?;
    let ice_servers = config
        .ice_servers
        .iter()
        .map(|s| IceServer {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.as_ref().map(|c| c.expose().to_string()),
        })
        .collect();
    let rooms = Rooms::new(
        RoomsConfig {
            ice_servers,
            ..RoomsConfig::default()
        },
        tokens.clone(),
        sfu.clone(),
    );
    tokio::spawn(rooms.clone().run_events(sfu_events));
    let listener = TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.http))?;
    let addr = listener.local_addr()?;
    let spool_dir = config.data_dir.join("spool");
    std::fs::create_dir_all(&spool_dir)
        .with_context(|| format!("cannot create {}", spool_dir.display()))?;
    // The recorder joins rooms through this server's own WebSocket, like any participant.
    let (recorder, recorder_events) = recorder::Recorder::new(recorder::RecorderConfig {
        rtc_url: format!("ws://{}/rtc", loopback(addr)),
        tokens: tokens.clone(),
        store: storage.store.clone(),
        spool_dir,
    });
    let mut state = AppState::new(
        db.clone(),
        storage.clone(),
        tokens,
        config.secure_cookies,
        rooms,
        recorder,
    )
    .await?;
    state.recording_retention = config.recording_retention;
    // Recordings a previous process left unfinished, then the catalogue's long-running tasks.
    let mut background = vec![tokio::spawn(portal::recordings::resume_unfinished(
        state.clone(),
    ))];
    background.extend(portal::recordings::spawn_background(
        &state,
        recorder_events,
    ));
    tracing::info!(%addr, media = %sfu.advertised(), storage = %storage.describe, database = ?db.backend, "serving");
    // Expired sign-in sessions are useless rows: clear them out now and then.
    let purge_db = db.clone();
    let purge = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            match portal::auth::purge_expired_sessions(&purge_db).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "purged expired sessions"),
                Err(e) => tracing::warn!(error = %e, "cannot purge expired sessions"),
            }
        }
    });
    let (tx, rx) = oneshot::channel::<()>();
    let app = portal::app(state).into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .context("HTTP server failed")?;
        purge.abort();
        for task in background {
            task.abort();
        }
        db.pool.close().await;
        Ok(())
    });
    Ok(Server {
        addr,
        media_addr: sfu.advertised(),
        generated_admin_password,
        shutdown: Some(tx),
        task,
    })
}

/// `addr` as this machine reaches it: a wildcard bind is reached on loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// The address of the interface that holds the default route, for advertising a socket bound to
/// all interfaces. Connecting a UDP socket only consults the routing table; nothing is sent.
fn primary_ip() -> std::net::IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}
