//! `dangjian-load`: see the crate's guide (`loadtest/src/lib.rs`) and docs/performance.md.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use loadtest::dangjian::Dangjian;
use loadtest::janus::Janus;
use loadtest::netns::{Netns, launch_dangjian, launch_janus};
use loadtest::report::Report;
use loadtest::scenario::{self, Plan, Scenario};
use loadtest::{cpu, plot};

#[derive(Parser)]
#[command(
    name = "dangjian-load",
    about = "Load tool for dangjian's media server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a running dangjian server.
    Run(RunArgs),
    /// Run the same load against dangjian and then Janus, each alone in a network namespace
    /// made for the run (needs root, iproute2 and `janus`: scripts/install-janus).
    Compare(CompareArgs),
}

#[derive(Args)]
struct CompareArgs {
    /// The dangjian binary to start (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/dangjian")]
    dangjian_bin: PathBuf,
    /// Where the servers' logs go.
    #[arg(long, default_value = "target/loadtest")]
    logs: PathBuf,
    /// The network namespace's name (and its veth pair's prefix).
    #[arg(long, default_value = "djbench")]
    netns: String,
    #[command(flatten)]
    load: Load,
}

#[derive(Args)]
struct Load {
    #[arg(long, value_enum, default_value = "livestream")]
    scenario: Scenario,
    /// Subscriber counts (livestream, audio) or participant counts (meeting), one step each.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100,200")]
    steps: Vec<usize>,
    /// Seconds measured per step.
    #[arg(long, default_value_t = 5)]
    step_secs: u64,
    /// Seconds waited after a step's joins before measuring.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 16)]
    join_concurrency: usize,
    #[arg(long, default_value = "load")]
    room: String,
    /// Write the report(s) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw CPU and throughput against subscribers here (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print a line for every second measured.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The server's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    url: String,
    /// The server's token key, hex (or use --key-file).
    #[arg(long, env = "DJLOAD_TOKEN_KEY", hide_env_values = true)]
    key: Option<String>,
    /// A file holding the token key in hex (the server's `DATA/token.key`).
    #[arg(long, default_value = "data/token.key")]
    key_file: PathBuf,
    /// The server's pid, for its CPU time (found by name when it runs here and is alone).
    #[arg(long)]
    server_pid: Option<u32>,
    /// The address the clients' sockets bind to.
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: IpAddr,
    #[command(flatten)]
    load: Load,
}

impl Load {
    fn plan(&self, client_ip: IpAddr, server_pid: Option<u32>) -> Plan {
        Plan {
            scenario: self.scenario,
            steps: self.steps.clone(),
            step_secs: self.step_secs,
            settle_secs: self.settle_secs,
            join_concurrency: self.join_concurrency,
            room: self.room.clone(),
            client_ip,
            server_pid,
            verbose: self.verbose,
        }
    }

    fn write(&self, json: &serde_json::Value, reports: &[&Report]) -> anyhow::Result<()> {
        if let Some(p) = &self.json {
            std::fs::write(p, serde_json::to_string_pretty(json)? + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
            println!("wrote {}", p.display());
        }
        if let Some(p) = &self.plot {
            std::fs::write(p, plot::svg(reports))
                .with_context(|| format!("writing {}", p.display()))?;
            println!("wrote {}", p.display());
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Compare(args) => compare(args).await,
        }
    })
}

fn tracing_subscriber_init() {}

async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.logs)?;
    let ns = Netns::create(&args.netns)?;
    println!(
        "network namespace {}: clients on {} ({}), servers on {} ({})",
        ns.name, ns.host_ip, ns.host_if, ns.ns_ip, ns.ns_if
    );
    let dangjian = {
        let log = args.logs.join("dangjian.log");
        let server = launch_dangjian(&ns, &args.dangjian_bin, &log)?;
        let key = server
            .token_key_hex
            .clone()
            .context("dangjian's token key")?;
        let target = Arc::new(Dangjian::new(&server.http.to_string(), &key)?);
        println!(
            "dangjian started (pid {}), log {}",
            server.pid,
            log.display()
        );
        let plan = args.load.plan(ns.host_ip, Some(server.pid));
        let report = scenario::run(target, &plan).await?;
        report.print();
        report
    };
    let janus = {
        let log = args.logs.join("janus.log");
        let server = launch_janus(&ns, &log)?;
        let target = Arc::new(Janus::at(server.http)?);
        println!("janus started (pid {}), log {}", server.pid, log.display());
        let plan = args.load.plan(ns.host_ip, Some(server.pid));
        let report = scenario::run(target, &plan).await?;
        report.print();
        report
    };
    drop(ns);
    let c = loadtest::compare::compare(dangjian, janus);
    c.print();
    args.load
        .write(&serde_json::to_value(&c)?, &[&c.dangjian, &c.janus])
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let key = match &args.key {
        Some(k) => k.clone(),
        None => std::fs::read_to_string(&args.key_file)
            .with_context(|| format!("token key: {}", args.key_file.display()))?,
    };
    let server_pid = args.server_pid.or_else(cpu::find_dangjian);
    if server_pid.is_none() {
        println!(
            "server CPU: not measured (no --server-pid, and no single local `dangjian` process)"
        );
    }
    let target = Arc::new(Dangjian::new(&args.url, &key)?);
    let plan = args.load.plan(args.client_ip, server_pid);
    let report = scenario::run(target, &plan).await?;
    report.print();
    loadtest::compare::print_checks(&loadtest::compare::checks_for(&report));
    args.load.write(&serde_json::to_value(&report)?, &[&report])
}
