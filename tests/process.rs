//! The binary as an operator runs it: configuration errors, an unreachable database, signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn dangjian(data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dangjian"));
    c.current_dir(data)
        .env_remove("DATABASE_URL")
        .env("DANGJIAN_RTC_UDP", "127.0.0.1:0")
        .arg("--data")
        .arg(data);
    c
}

fn fails_with(mut cmd: Command, needle: &str) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
}

#[test]
fn unknown_key_in_the_config_file_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dangjian.toml"),
        "http = \"127.0.0.1:0\"\nstorage_ulr = \"s3://x\"\n",
    )
    .unwrap();
    let mut cmd = dangjian(dir.path());
    cmd.arg("serve");
    fails_with(cmd, "storage_ulr");
}

#[test]
fn unknown_or_bad_environment_keys_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = dangjian(dir.path());
    cmd.env("DANGJIAN_HTTP_PORT", "9000");
    fails_with(cmd, "DANGJIAN_HTTP_PORT");
    let mut cmd = dangjian(dir.path());
    cmd.env("DANGJIAN_HTTP", "everywhere");
    fails_with(cmd, "`http`");
}

#[test]
fn a_missing_named_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = dangjian(dir.path());
    cmd.args(["--config", "nope.toml", "serve"]);
    fails_with(cmd, "nope.toml");
}

#[test]
fn unreachable_database_fails_fast_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut cmd = dangjian(dir.path());
    cmd.env(
        "DATABASE_URL",
        format!("postgres://postgres:secretpw@127.0.0.1:{port}/x"),
    )
    .arg("serve");
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot connect to the Postgres database"),
        "{err}"
    );
    assert!(
        !err.contains("secretpw"),
        "the password stays out of messages: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn migrate_applies_the_schema_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dangjian(dir.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    assert!(dir.path().join("dangjian.db").exists());
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = dangjian(dir.path())
        .args(["serve", "--http", "127.0.0.1:0"])
        .env("DANGJIAN_ADMIN_PASSWORD", "sigterm-test-pw")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.to_string();
        }
    };
    // It answers, then SIGTERM stops it with status 0 after a clean shutdown.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("stopped cleanly"), "{err}");
    assert!(!err.contains("sigterm-test-pw"), "no secrets in the log");
}
