//! The `dangjian` command: `serve` (the default), `migrate`, `token`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dangjian::config::{Config, Layer, LogFormat, Secret};
use signaling::token::{Grants, TokenRequest};

#[derive(Parser)]
#[command(
    name = "dangjian",
    version,
    about = "Real-time video and collaboration server for Party organisations"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct Common {
    /// Configuration file (default: ./dangjian.toml when present)
    #[arg(long, global = true, env = "DANGJIAN_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP listen address
    #[arg(long, global = true)]
    http: Option<String>,
    /// Data directory (SQLite database, local object store, token key)
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// postgres://… or sqlite:… (default: SQLite in the data directory)
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// s3://BUCKET?endpoint=…&region=… (default: local disk in the data directory)
    #[arg(long, global = true)]
    storage_url: Option<String>,
    /// UDP address shared by all media peers (default 0.0.0.0:7882)
    #[arg(long, global = true)]
    rtc_udp: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default)
    Serve,
    /// Apply database migrations and exit
    Migrate,
    /// Print a media access token for a room
    Token(TokenArgs),
}

#[derive(Args)]
struct TokenArgs {
    #[arg(long)]
    room: String,
    #[arg(long)]
    identity: String,
    #[arg(long)]
    name: Option<String>,
    /// Comma-separated: publish, subscribe, data, admin, record
    #[arg(long, default_value = "publish,subscribe,data")]
    grant: String,
    /// Lifetime, e.g. 2h, 30m
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

fn load_config(c: &Common) -> anyhow::Result<Config> {
    let file = match &c.config {
        Some(p) => Layer::from_file(p, true)?,
        None => Layer::from_file(std::path::Path::new("dangjian.toml"), false)?,
    };
    let env = Layer::from_env(std::env::vars())?;
    let flags = Layer {
        http: c.http.clone(),
        data: c.data.clone(),
        database_url: c.database_url.clone().map(Secret::new),
        storage_url: c.storage_url.clone(),
        rtc_udp: c.rtc_udp.clone(),
        ..Layer::default()
    };
    file.merge(env).merge(flags).resolve()
}

/// The WebRTC engine warns about every odd packet a browser sends (unknown DTLS extensions, ICE
/// checks before the credentials arrive); those are not operators' business.
const DEFAULT_LOG: &str = "info,sqlx=warn,tower_http=info,rtc=error,rtc_dtls=error,rtc_ice=error,rtc_srtp=error,rtc_sctp=error,rtc_interceptor=error";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DANGJIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves at SIGTERM or Ctrl-C. The handlers are installed at once, when this is called (not
/// when first polled), so a signal that comes while the server is still starting is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    async move {
        let term = async {
            match term {
                Some(mut t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: finishing in-flight requests");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli.common)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_logging(config.log_format);
            let stop = shutdown_signal();
            let server = dangjian::start(config).await?;
            if let Some(pw) = &server.generated_admin_password {
                println!("首次启动：管理员账户 admin 的一次性密码是 {pw}（登录后须修改）");
                println!(
                    "first start: one-time password for user admin: {pw} (change it at first sign-in)"
                );
            }
            println!("listening on http://{}", server.addr);
            server.run_until(stop).await?;
            tracing::info!("stopped cleanly");
        }
        Command::Migrate => {
            init_logging(config.log_format);
            dangjian::open_database(&config).await?;
            println!("migrations applied");
        }
        Command::Token(t) => {
            let key = dangjian::load_token_key(&config, false)?;
            let grants: Grants = t.grant.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let token = key.mint(&TokenRequest {
                room: t.room,
                name: t.name.unwrap_or_else(|| t.identity.clone()),
                identity: t.identity,
                grants,
                ttl: t.ttl,
            })?;
            println!("{token}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dangjian: {e:#}");
            ExitCode::FAILURE
        }
    }
}
