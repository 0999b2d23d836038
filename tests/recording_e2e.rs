//! Recording end to end through the real server: a Rust WebRTC client publishes really encoded
//! media (VP8 camera with white flash frames, Opus microphone with beeps at the same instants),
//! the recorder captures it as a hidden subscriber, and the replay served by the API must have
//! one audio and one video stream of the right length with every beep on its flash. Then the
//! failures: the server killed mid-recording, and (in `recording_outage.rs`) the S3 server down.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::publisher::{join_at, publish};
use common::{Backend, TestApp};
use dangjian::config::{Layer, Secret};
use recorder::testmedia;
use serde_json::{Value, json};

/// Where the synthetic clips flash and beep.
const MARKS_MS: [i64; 3] = [5_000, 15_000, 25_000];
const CLIP_SECONDS: f64 = 30.0;

async fn start_recording(client: &reqwest::Client, base: &str, room: &str) -> String {
    let r = client
        .post(format!("{base}/api/v1/rooms/{room}/recordings"))
        .json(&json!({"title": "支部党员大会"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "start: {}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().expect("an id").to_string()
}

async fn stop_recording(client: &reqwest::Client, base: &str, id: &str) {
    let r = client
        .post(format!("{base}/api/v1/recordings/{id}/stop"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "stop: {}", r.status());
}

/// Polls the catalogue until the recording is `ready` (or fails the test).
async fn wait_ready(client: &reqwest::Client, base: &str, id: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let v: Value = client
            .get(format!("{base}/api/v1/recordings/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match v["status"].as_str() {
            Some("ready") => return v,
            Some("failed") => panic!("the recording failed: {v}"),
            _ => {}
        }
        assert!(start.elapsed() < limit, "not ready after {limit:?}: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Downloads the replay through its `media_url` and decodes it.
async fn fetch_and_analyse(
    client: &reqwest::Client,
    base: &str,
    rec: &Value,
) -> testmedia::Analysis {
    let url = rec["media_url"].as_str().expect("a media_url once ready");
    let url = if url.starts_with('/') {
        format!("{base}{url}")
    } else {
        url.to_string()
    };
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.mp4");
    std::fs::write(&path, &bytes).unwrap();
    testmedia::analyse(&path)
}

/// Every flash has its beep within 100 ms, and there are as many as were sent.
fn assert_in_sync(a: &testmedia::Analysis, expected: usize) {
    assert_eq!(a.flashes_ms.len(), expected, "flashes: {a:?}");
    assert_eq!(a.beeps_ms.len(), expected, "beeps: {a:?}");
    for (f, b) in a.flashes_ms.iter().zip(&a.beeps_ms) {
        assert!(
            (f - b).abs() <= 100,
            "audio and video {} ms apart (flash at {f} ms, beep at {b} ms)",
            (f - b).abs()
        );
    }
}

fn clips(seconds: f64) -> (Vec<recorder::segment::Frame>, Vec<recorder::segment::Frame>) {
    let marks: Vec<i64> = MARKS_MS
        .iter()
        .copied()
        .filter(|m| (*m as f64) < seconds * 1000.0)
        .collect();
    (
        testmedia::vp8_clip(seconds, 30, 640, 360, &marks),
        testmedia::opus_clip(seconds, &marks),
    )
}

/// The real S3 server that `scripts/test` starts.
fn garage() -> Layer {
    Layer {
        storage_url: Some(
            std::env::var("DJTEST_S3_URL")
                .expect("DJTEST_S3_URL is not set: run the tests with scripts/test (Garage)"),
        ),
        s3_access_key_id: std::env::var("DJTEST_S3_KEY_ID").ok(),
        s3_secret_access_key: std::env::var("DJTEST_S3_SECRET").ok().map(Secret::new),
        ..Layer::default()
    }
}

/// On Garage; the crash test below runs on local disk.
#[tokio::test]
async fn thirty_seconds_recorded_replay_in_sync() {
    let app = TestApp::spawn_with(Backend::Sqlite, garage()).await;
    app.sign_in_admin().await;
    let base = app.url("");
    let id = start_recording(&app.client, &base, "rec-sync").await;
    let ws = join_at(app.addr, &app.data_dir(), "rec-sync", "alice").await;
    let (video, audio) = clips(CLIP_SECONDS);
    publish(ws, false, video, audio).await.finish().await;
    stop_recording(&app.client, &base, &id).await;
    let rec = wait_ready(&app.client, &base, &id, Duration::from_secs(120)).await;
    let a = fetch_and_analyse(&app.client, &base, &rec).await;
    assert_eq!((a.video_streams, a.audio_streams), (1, 1), "{a:?}");
    assert_eq!(
        (a.video_codec.as_str(), a.audio_codec.as_str()),
        ("h264", "aac")
    );
    assert!(
        (a.duration_ms - 30_000).abs() <= 1_000,
        "replay lasts {} ms, the clip 30 s",
        a.duration_ms
    );
    assert_in_sync(&a, MARKS_MS.len());
    assert!(
        (rec["duration_ms"].as_i64().unwrap() - a.duration_ms).abs() <= 500,
        "the catalogue's duration matches the file: {rec}"
    );
    assert!(rec["size_bytes"].as_i64().unwrap() > 10_000, "{rec}");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------------------------

struct Proc {
    child: Child,
    addr: SocketAddr,
}

fn serve(data: &Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dangjian"))
        .current_dir(data)
        .env_remove("DATABASE_URL")
        .env("DANGJIAN_ADMIN_PASSWORD", "crash-test-pw")
        .args(["--data"])
        .arg(data)
        .args(["serve", "--http", "127.0.0.1:0", "--rtc-udp", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.parse().unwrap();
        }
    };
    // Keep reading stdout so that the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc { child, addr }
}

async fn admin(addr: SocketAddr) -> reqwest::Client {
    let c = common::client();
    let r = c
        .post(format!("http://{addr}/api/v1/session"))
        .json(&json!({"username": "admin", "password": "crash-test-pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c
}

#[tokio::test]
async fn a_killed_server_finishes_the_recording_after_restart_losing_at_most_ten_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = serve(dir.path());
    let base = format!("http://{}", p.addr);
    let c = admin(p.addr).await;
    let id = start_recording(&c, &base, "rec-crash").await;
    let ws = join_at(p.addr, dir.path(), "rec-crash", "bob").await;
    let (video, audio) = clips(CLIP_SECONDS);
    let publisher = publish(ws, false, video, audio).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(24)).await;
    p.child.kill().unwrap(); // SIGKILL: no chance to flush anything
    p.child.wait().unwrap();
    let recorded = started.elapsed();
    publisher
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.finish().await;

    let mut p = serve(dir.path());
    let base = format!("http://{}", p.addr);
    let c = admin(p.addr).await;
    let rec = wait_ready(&c, &base, &id, Duration::from_secs(120)).await;
    let a = fetch_and_analyse(&c, &base, &rec).await;
    assert_eq!((a.video_streams, a.audio_streams), (1, 1), "{a:?}");
    let lost = recorded.as_millis() as i64 - a.duration_ms;
    assert!(
        lost <= 10_500,
        "recorded {recorded:?} before the kill, the replay lasts {} ms",
        a.duration_ms
    );
    // The marks before the last segment boundary survived, in sync.
    let kept = MARKS_MS
        .iter()
        .filter(|m| **m < a.duration_ms - 200)
        .count();
    assert_in_sync(&a, kept);
    assert!(kept >= 1, "at least the first flash survives: {a:?}");
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

/// An H.264 room: the recorder depacketises H.264 (FU-A, STAP-A) back into access units and the
/// replay is remuxed, still in sync.
#[tokio::test]
async fn an_h264_publisher_is_recorded_in_sync() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.sign_in_admin().await;
    let base = app.url("");
    let id = start_recording(&app.client, &base, "rec-h264").await;
    let ws = join_at(app.addr, &app.data_dir(), "rec-h264", "dave").await;
    let marks = [3_000, 9_000];
    let video = testmedia::h264_clip(12.0, 30, 640, 360, &marks);
    let audio = testmedia::opus_clip(12.0, &marks);
    publish(ws, true, video, audio).await.finish().await;
    stop_recording(&app.client, &base, &id).await;
    let rec = wait_ready(&app.client, &base, &id, Duration::from_secs(60)).await;
    let a = fetch_and_analyse(&app.client, &base, &rec).await;
    assert_eq!((a.video_streams, a.audio_streams), (1, 1), "{a:?}");
    assert_eq!(a.video_codec, "h264");
    assert!((a.duration_ms - 12_000).abs() <= 1_000, "{a:?}");
    assert_in_sync(&a, marks.len());
    app.stop().await;
}
