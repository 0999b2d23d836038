//! The S3 server goes away for a minute in the middle of a recording: segments wait in the
//! local spool and reach the store once it is back, and the replay is complete. Its own test
//! binary, because it freezes the Garage server that other tests use.

mod common;

use std::time::{Duration, Instant};

use common::publisher::{join_at, publish};
use common::{Backend, TestApp};
use dangjian::config::{Layer, Secret};
use recorder::testmedia;
use serde_json::{Value, json};

const MARKS_MS: [i64; 3] = [5_000, 35_000, 65_000];
const CLIP_SECONDS: f64 = 72.0;
const OUTAGE: Duration = Duration::from_secs(60);

fn garage_pid() -> i32 {
    let file = std::env::var("DJTEST_GARAGE_PID_FILE").expect(
        "DJTEST_GARAGE_PID_FILE is not set: run the tests with scripts/test, which starts Garage",
    );
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Freezes Garage (it stops answering, as a dead or partitioned server does) until dropped.
struct Outage(i32);

impl Outage {
    fn begin() -> Outage {
        let pid = garage_pid();
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "cannot stop Garage"
        );
        Outage(pid)
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn spooled(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                spooled(&p)
            } else {
                usize::from(p.extension().is_some_and(|x| x == "seg"))
            }
        })
        .sum()
}

#[tokio::test]
async fn a_minute_without_s3_loses_nothing() {
    let s3 = Layer {
        storage_url: Some(std::env::var("DJTEST_S3_URL").expect("DJTEST_S3_URL (scripts/test)")),
        s3_access_key_id: std::env::var("DJTEST_S3_KEY_ID").ok(),
        s3_secret_access_key: std::env::var("DJTEST_S3_SECRET").ok().map(Secret::new),
        ..Layer::default()
    };
    let app = TestApp::spawn_with(Backend::Sqlite, s3).await;
    app.sign_in_admin().await;
    let r = app
        .post_json("/api/v1/rooms/rec-outage/recordings", json!({}))
        .await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ws = join_at(app.addr, &app.data_dir(), "rec-outage", "carol").await;
    let video = testmedia::vp8_clip(CLIP_SECONDS, 30, 320, 180, &MARKS_MS);
    let audio = testmedia::opus_clip(CLIP_SECONDS, &MARKS_MS);
    let publisher = publish(ws, false, video, audio).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    {
        let _outage = Outage::begin();
        tokio::time::sleep(OUTAGE).await;
        let waiting = spooled(&app.data_dir().join("spool"));
        assert!(
            waiting >= 4,
            "a minute of segments waits on local disk while S3 is down ({waiting} files)"
        );
    }
    publisher.finish().await;
    let r = app
        .post_json(&format!("/api/v1/recordings/{id}/stop"), json!({}))
        .await;
    assert!(r.status().is_success());
    let start = Instant::now();
    let rec = loop {
        let v: Value = app
            .get(&format!("/api/v1/recordings/{id}"))
            .await
            .json()
            .await
            .unwrap();
        match v["status"].as_str() {
            Some("ready") => break v,
            Some("failed") => panic!("the recording failed: {v}"),
            _ => {}
        }
        assert!(start.elapsed() < Duration::from_secs(180), "not ready: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let bytes = app
        .get(rec["media_url"].as_str().unwrap())
        .await
        .bytes()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.mp4");
    std::fs::write(&path, &bytes).unwrap();
    let a = testmedia::analyse(&path);
    assert!(
        (a.duration_ms - (CLIP_SECONDS * 1000.0) as i64).abs() <= 1_000,
        "the whole clip is there: {} ms",
        a.duration_ms
    );
    assert_eq!(a.flashes_ms.len(), MARKS_MS.len(), "{a:?}");
    assert_eq!(a.beeps_ms.len(), MARKS_MS.len(), "{a:?}");
    app.stop().await;
}
