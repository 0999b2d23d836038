//! The benchmark's network namespace and the servers launched in it.
//!
//! Janus's ICE skips loopback interfaces, so a fair comparison runs each server inside a network
//! namespace of the tool's own making, reached over a veth pair: the host end (`NAME0`, e.g.
//! 10.77.0.1/24) stays in the root namespace, where the load clients bind their sockets; the
//! other end (`NAME1`, 10.77.0.2/24) is the server's only interface besides `lo`. Nothing else
//! is addressed or routed: the servers cannot reach anything but the clients.
//!
//! Everything here is blocking (it runs `ip`, waits for a server to answer, and waits for it to
//! exit when dropped); from async code call it before the load starts or in `spawn_blocking`.
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2.
//!
//! Drop the [`Launched`] servers before their [`Netns`].

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// How long a server may take to answer its first HTTP request.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long a server has to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Janus's HTTP API port (inside the namespace).
pub const JANUS_HTTP_PORT: u16 = 8088;
/// Janus's HTTP API base path.
pub const JANUS_BASE_PATH: &str = "/janus";
/// dangjian's HTTP port and media (UDP) port inside the namespace.
pub const DANGJIAN_HTTP_PORT: u16 = 8080;
pub const DANGJIAN_RTC_PORT: u16 = 7882;

/// A network namespace with a veth pair to the root namespace. Dropping it deletes both.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The veth end in the root namespace (where the clients live).
    pub host_if: String,
    /// The veth end inside the namespace (the server's only interface besides `lo`).
    pub ns_if: String,
    /// The host end's address: bind the clients' sockets here.
    pub host_ip: IpAddr,
    /// The namespace end's address: the servers listen here.
    pub ns_ip: IpAddr,
}

impl Netns {
    /// Creates namespace `name` (letters, digits, `-`, `_`) with a veth pair `NAME0`/`NAME1`
    /// (shortened to fit Linux's 15 characters), after removing a stale namespace, veth and
    /// processes of the same name left by an earlier run. The subnet is the first free
    /// 10.77.X.0/24 (10.77.0.0/24 unless another namespace uses it); the root end gets .1, the
    /// namespace end .2.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("netns: `{name}` is not a usable namespace name (letters, digits, - and _)");
        }
        let (host_if, ns_if) = veth_names(name);
        remove_stale(name, &host_if);
        let octet = free_subnet()?;
        let host_ip = Ipv4Addr::new(10, 77, octet, 1);
        let ns_ip = Ipv4Addr::new(10, 77, octet, 2);
        // From here on, Drop cleans up whatever was made.
        let ns = Netns {
            name: name.to_string(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            host_ip: IpAddr::V4(host_ip),
            ns_ip: IpAddr::V4(ns_ip),
        };
        ip(&["netns", "add", name])
            .context("netns: cannot create a network namespace (this needs root and iproute2)")?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", name])?;
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", name, "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        inside(&["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NAME program`: add the program's arguments, environment, stdio. `ip netns
    /// exec` execs the program, so the child's pid is the program's own (its CPU time is in
    /// `/proc/PID/stat`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_namespace_processes(&self.name);
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Interface names from the namespace name, at most 15 characters: `NAME0`/`NAME1`, or for a
/// long name its first 9 characters and a hash of the whole name.
fn veth_names(name: &str) -> (String, String) {
    let stem = if name.len() <= 14 {
        name.to_string()
    } else {
        format!("{}{:04x}", &name[..9], fnv1a(name.as_bytes()) & 0xffff)
    };
    (format!("{stem}0"), format!("{stem}1"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `ip ARGS`; an error carries its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("netns: cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "netns: `ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kills (SIGKILL) whatever still runs in namespace `name`: only processes of a namespace this
/// tool made, e.g. a server left by a run that crashed.
fn kill_namespace_processes(name: &str) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|p| *p > 1)
    {
        // SAFETY: kill(2) on a pid; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn remove_stale(name: &str, host_if: &str) {
    let exists = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        })
        .unwrap_or(false);
    if exists {
        kill_namespace_processes(name);
        let _ = ip(&["netns", "del", name]);
    }
    let _ = Command::new("ip")
        .args(["link", "del", host_if])
        .stderr(Stdio::null())
        .status();
}

/// The third octet of the first 10.77.X.0/24 no interface in the root namespace uses.
fn free_subnet() -> anyhow::Result<u8> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("netns: cannot run `ip` (install iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let used: Vec<u8> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.77."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    (0..=255u8)
        .find(|o| !used.contains(o))
        .ok_or_else(|| anyhow!("netns: no free 10.77.X.0/24 subnet"))
}

/// A server running inside a [`Netns`]. Dropping it stops the server (SIGTERM, then SIGKILL
/// after 3 s) and removes its temporary directory (configuration, data).
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    /// The server's own pid (for `/proc/PID/stat`).
    pub pid: u32,
    /// Where its HTTP API listens (Janus: under [`JANUS_BASE_PATH`]).
    pub http: SocketAddr,
    /// dangjian's token signing key (hex), to mint access tokens; `None` for Janus.
    pub token_key_hex: Option<String>,
    /// The address its media (ICE host candidate) is on.
    pub media_ip: IpAddr,
    /// The temporary directory: Janus's configuration, or dangjian's data directory's parent.
    pub dir: PathBuf,
}

impl Launched {
    /// Whether the server is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stop_child(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A fresh, private temporary directory.
fn temp_dir(kind: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "dangjian-load-{kind}-{}-{nanos:08x}",
        std::process::id()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Raises our soft open-files limit to the hard one: the servers inherit it, and hundreds of
/// peer connections need sockets (Janus: one or more per handle) and HTTP connections.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// The log file's stdout and stderr handles.
fn log_stdio(log: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let g = f.try_clone()?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// The last lines of a log, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.is_empty() {
        format!("(nothing in {})", log.display())
    } else {
        format!("last lines of {}:\n{tail}", log.display())
    }
}

/// `GET path` over plain HTTP/1.0; whether it answered 200.
fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = String::from_utf8_lossy(&head[..n]);
    head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200")
}

/// Waits until `GET path` answers 200, the child exits, or [`START_LIMIT`] passes.
fn wait_ready(
    what: &str,
    child: &mut Child,
    addr: SocketAddr,
    path: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let until = Instant::now() + START_LIMIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited during startup ({status}); {}", log_tail(log));
        }
        if http_get_ok(addr, path) {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!(
                "{what} did not answer GET http://{addr}{path} within {} s; {}",
                START_LIMIT.as_secs(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the Debian package keeps Janus's modules, read from `/etc/janus/janus.jcfg` when it
/// names them.
struct JanusFolders {
    plugins: String,
    transports: String,
    events: String,
    loggers: String,
}

impl JanusFolders {
    fn find() -> JanusFolders {
        let stock = std::fs::read_to_string("/etc/janus/janus.jcfg").unwrap_or_default();
        let get = |key: &str, default: &str| {
            stock
                .lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    let rest = l.strip_prefix(key)?.trim_start().strip_prefix('=')?;
                    let v = rest.trim().strip_prefix('"')?;
                    Some(v[..v.find('"')?].to_string())
                })
                .unwrap_or_else(|| default.to_string())
        };
        let lib = "/usr/lib/x86_64-linux-gnu/janus";
        JanusFolders {
            plugins: get("plugins_folder", &format!("{lib}/plugins")),
            transports: get("transports_folder", &format!("{lib}/transports")),
            events: get("events_folder", &format!("{lib}/events")),
            loggers: get("loggers_folder", &format!("{lib}/loggers")),
        }
    }
}

/// The `.so` modules in `folder` except `keep`, comma-separated: Janus's `disable` lists.
fn modules_except(folder: &str, keep: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".so") && n != keep)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(",")
}

/// Janus's configuration for the benchmark: the core, the HTTP transport and the VideoRoom
/// plugin, nothing else.
fn janus_config(dir: &Path, ns: &Netns) -> anyhow::Result<()> {
    let f = JanusFolders::find();
    let dir_s = dir.display();
    let disabled_plugins = modules_except(&f.plugins, "libjanus_videoroom.so");
    let disabled_transports = modules_except(&f.transports, "libjanus_http.so");
    let disabled_events = modules_except(&f.events, "");
    let disabled_loggers = modules_except(&f.loggers, "");
    let core = format!(
        r#"# Written by dangjian-load for a benchmark run.
general: {{
	configs_folder = "{dir_s}"
	plugins_folder = "{plugins}"
	transports_folder = "{transports}"
	events_folder = "{events}"
	loggers_folder = "{loggers}"
	# Warnings and errors only: Janus logs through a separate thread, but at level 4+ it
	# writes lines per handle and per negotiation, and 5+ per packet.
	debug_level = 3
	debug_timestamps = true
	debug_colors = false
	# The address for the SDP's o=/c= lines (there is no default route to guess it from).
	interface = "{ns_ip}"
	# The load tool's long-poll loop is each session's keepalive.
	session_timeout = 60
	# event_loops unset: Janus's default, one event loop (thread) per handle.
	# No admin secret, API secret or token auth: the API only listens in the namespace.
	protected_folders = ["/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/sbin", "/sys", "/usr", "/var"]
}}
certificates: {{
	# None: Janus generates a self-signed ECDSA P-256 DTLS certificate at startup (browsers'
	# and dangjian's default kind too).
}}
media: {{
	# Defaults throughout, each of which costs per packet: a 200 ms minimum NACK queue per
	# sender (every outgoing packet is copied into it), TWCC feedback every 200 ms to publishers
	# that negotiate it, no DSCP, nack_optimizations off, no RTP port range.
	ipv6 = false
	# "No media" events (per handle, after 1 s without packets): off, they are signaling noise.
	no_media_timer = 0
	slowlink_threshold = 0
}}
nat: {{
	nice_debug = false
	# Half-trickle: Janus puts its candidates in its SDP; the clients put theirs in theirs and
	# say "trickle": false.
	full_trickle = false
	# Full ICE (Janus's default; not ICE-lite): costs only at connection setup and for
	# libnice's keepalives.
	ice_lite = false
	ice_tcp = false
	ignore_mdns = true
	# Gather only on the namespace's veth end: one host candidate, {ns_ip}. No STUN or TURN.
	ice_enforce_list = "{ns_if}"
}}
plugins: {{
	disable = "{disabled_plugins}"
}}
transports: {{
	disable = "{disabled_transports}"
}}
loggers: {{
	disable = "{disabled_loggers}"
}}
events: {{
	broadcast = false
	disable = "{disabled_events}"
	stats_period = 0
}}
"#,
        plugins = f.plugins,
        transports = f.transports,
        events = f.events,
        loggers = f.loggers,
        ns_ip = ns.ns_ip,
        ns_if = ns.ns_if,
    );
    let http = format!(
        r#"# Written by dangjian-load for a benchmark run.
general: {{
	events = false
	json = "compact"
	base_path = "{JANUS_BASE_PATH}"
	http = true
	port = {JANUS_HTTP_PORT}
	ip = "{ns_ip}"
	https = false
	# Every participant holds a long poll open; libmicrohttpd's default cap is about 1000.
	mhd_connection_limit = 4096
}}
admin: {{
	admin_http = false
	admin_https = false
}}
cors: {{
}}
certificates: {{
}}
"#,
        ns_ip = ns.ns_ip,
    );
    // No static rooms: the load tool creates its rooms through the API (no recording, no
    // audio-level events, no bitrate cap, no periodic FIR).
    let videoroom = r#"# Written by dangjian-load for a benchmark run.
general: {
	events = false
	string_ids = false
}
"#;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    write("janus.jcfg", &core)?;
    write("janus.transport.http.jcfg", &http)?;
    write("janus.plugin.videoroom.jcfg", videoroom)?;
    Ok(())
}

/// Starts Janus (`janus` on PATH, see `scripts/install-janus`) in `ns` with only the HTTP
/// transport (on `ns_ip:8088`, base path `/janus`) and the VideoRoom plugin, logging to `log`;
/// returns once `GET /janus/info` answers (at most 20 s).
pub fn launch_janus(ns: &Netns, log: &Path) -> anyhow::Result<Launched> {
    let dir = temp_dir("janus")?;
    let cleanup = |e: anyhow::Error| {
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    janus_config(&dir, ns).map_err(cleanup)?;
    raise_nofile_limit();
    let (out, err) = log_stdio(log).map_err(cleanup)?;
    let mut cmd = ns.command("janus");
    cmd.arg("--config")
        .arg(dir.join("janus.jcfg"))
        .arg("--configs-folder")
        .arg(&dir)
        .args(["--disable-colors", "--debug-level=3", "--debug-timestamps"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut child = cmd
        .spawn()
        .context("cannot start `ip netns exec … janus` (is Janus installed? scripts/install-janus)")
        .map_err(cleanup)?;
    let pid = child.id();
    let http = SocketAddr::new(ns.ns_ip, JANUS_HTTP_PORT);
    if let Err(e) = wait_ready(
        "janus",
        &mut child,
        http,
        &format!("{JANUS_BASE_PATH}/info"),
        log,
    ) {
        stop_child(&mut child);
        return Err(cleanup(e));
    }
    Ok(Launched {
        child,
        pid,
        http,
        token_key_hex: None,
        media_ip: ns.ns_ip,
        dir,
    })
}

/// Starts dangjian (`bin serve`) in `ns`: HTTP on `ns_ip:8080`, media on UDP `ns_ip:7882`, no
/// ICE-TCP, a fresh SQLite data directory, warnings only in the log; returns once `/healthz`
/// answers (at most 20 s), with the token key it generated.
pub fn launch_dangjian(ns: &Netns, bin: &Path, log: &Path) -> anyhow::Result<Launched> {
    let bin = std::fs::canonicalize(bin)
        .with_context(|| format!("no dangjian binary at {}", bin.display()))?;
    let dir = temp_dir("dangjian")?;
    let cleanup = |e: anyhow::Error| {
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    let data = dir.join("data");
    let http = SocketAddr::new(ns.ns_ip, DANGJIAN_HTTP_PORT);
    raise_nofile_limit();
    let (out, err) = log_stdio(log).map_err(cleanup)?;
    let mut cmd = ns.command(&bin);
    // Only our settings: none from the caller's environment or a dangjian.toml in its directory.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("DANGJIAN_") || k == "DATABASE_URL" {
            cmd.env_remove(&*k);
        }
    }
    cmd.arg("serve")
        .env("DANGJIAN_DATA", &data)
        .env("DANGJIAN_HTTP", http.to_string())
        .env(
            "DANGJIAN_RTC_UDP",
            SocketAddr::new(ns.ns_ip, DANGJIAN_RTC_PORT).to_string(),
        )
        .env("DANGJIAN_RTC_TCP", "off")
        .env("DANGJIAN_ADMIN_PASSWORD", "load-test-admin")
        // Warnings, and the media stack's errors only (as the server's default filter).
        .env(
            "DANGJIAN_LOG",
            "warn,rtc=error,rtc_dtls=error,rtc_ice=error,rtc_srtp=error,rtc_sctp=error,rtc_interceptor=error",
        )
        .env("RUST_LOG", "warn")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `ip netns exec … {}`", bin.display()))
        .map_err(cleanup)?;
    let pid = child.id();
    let ready = wait_ready("dangjian", &mut child, http, "/healthz", log).and_then(|()| {
        let p = data.join("token.key");
        let hex = std::fs::read_to_string(&p)
            .with_context(|| format!("dangjian started but {} is unreadable", p.display()))?;
        Ok(hex.trim().to_string())
    });
    match ready {
        Ok(hex) => Ok(Launched {
            child,
            pid,
            http,
            token_key_hex: Some(hex),
            media_ip: ns.ns_ip,
            dir,
        }),
        Err(e) => {
            stop_child(&mut child);
            Err(cleanup(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_and_differ() {
        assert_eq!(veth_names("djb"), ("djb0".into(), "djb1".into()));
        let (a, b) = veth_names("a-very-long-namespace-name");
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert_ne!(veth_names("a-very-long-namespace-one").0, a);
        assert_eq!(veth_names("exactly14chars").0.len(), 15);
    }

    #[test]
    fn modules_except_lists_the_rest() {
        let dir = temp_dir("modtest").unwrap();
        for n in ["libjanus_http.so", "libjanus_mqtt.so", "libjanus_mqtt.so.1"] {
            std::fs::write(dir.join(n), "").unwrap();
        }
        let got = modules_except(dir.to_str().unwrap(), "libjanus_http.so");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, "libjanus_mqtt.so");
    }
}
