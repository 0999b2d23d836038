//! The load tool against a real server: what it reports must be what a viewer got. Small loads
//! (a handful of clients for a few seconds); the figures come from `dangjian-load` runs, see
//! docs/performance.md.

mod common;

use std::sync::Arc;

use common::{Backend, TestApp};
use loadtest::dangjian::Dangjian;
use loadtest::report::Report;
use loadtest::scenario::{self, Plan, Scenario};

async fn load(app: &TestApp, scenario: Scenario, steps: Vec<usize>) -> Report {
    let key = std::fs::read_to_string(app.data_dir().join("token.key")).unwrap();
    let target = Arc::new(Dangjian::new(&app.addr.to_string(), &key).unwrap());
    let plan = Plan {
        scenario,
        steps,
        step_secs: 3,
        settle_secs: 1,
        join_concurrency: 8,
        room: "load".into(),
        client_ip: "127.0.0.1".parse().unwrap(),
        // The server runs inside this test process: its CPU is not the server's alone.
        server_pid: None,
        verbose: false,
    };
    let report = scenario::run(target, &plan).await.unwrap();
    report.print();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    report
}

/// One 720p simulcast camera to 2, then 4 viewers: each viewer gets the full layer and the
/// microphone (about 210 + 50 packets a second), 30 frames a second, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livestream_viewers_get_every_frame_of_the_top_layer() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let report = load(&app, Scenario::Livestream, vec![2, 4]).await;
    for (step, viewers) in report.steps.iter().zip([2usize, 4]) {
        assert_eq!(step.subscribers, viewers);
        assert_eq!(step.connected, viewers);
        let per_viewer = step.packets_per_second / viewers as f64;
        assert!(
            (230.0..330.0).contains(&per_viewer),
            "{per_viewer} packets/s per viewer"
        );
        // 1.7 Mbit/s of video payload and the audio, plus headers.
        let mbps = step.megabits_per_second / viewers as f64;
        assert!((1.6..2.4).contains(&mbps), "{mbps} Mbit/s per viewer");
        assert!(
            (27.0..33.0).contains(&step.fps_per_subscriber),
            "{} fps",
            step.fps_per_subscriber
        );
        assert_eq!(step.loss_ratio, 0.0);
        assert_eq!(step.joins_pending, 0);
        assert!(
            step.latency_ms_p50 > 0.0 && step.latency_ms_p50 < 50.0,
            "{}",
            step.latency_ms_p50
        );
    }
    assert!(
        report.join_ms_p50 > 0.0 && report.join_ms_p99 < 5_000.0,
        "{}",
        report.join_ms_p99
    );
    let json = serde_json::to_value(&report).unwrap();
    for key in [
        "packets_forwarded_per_cpu_second",
        "loss_ratio",
        "join_ms_p50",
        "join_ms_p99",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    app.stop().await;
}

/// Three people meet: each receives the other two's camera and microphone, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meeting_participants_receive_everyone_else() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let report = load(&app, Scenario::Meeting, vec![3]).await;
    let step = &report.steps[0];
    assert_eq!(
        (step.publishers, step.subscribers, step.connected),
        (3, 3, 3)
    );
    // Two cameras at 30 fps each.
    assert!(
        (54.0..66.0).contains(&step.fps_per_subscriber),
        "{} fps",
        step.fps_per_subscriber
    );
    // Each camera is one 360p layer (two packets a frame, eight a keyframe every 2 s: ≈ 63 a
    // second), each microphone 50.
    let per = step.packets_per_second / 3.0;
    assert!(
        (200.0..260.0).contains(&per),
        "{per} packets/s per participant"
    );
    assert_eq!(step.loss_ratio, 0.0);
    app.stop().await;
}

/// Ten speakers and five listeners: every listener hears all ten (50 packets a second each),
/// every speaker the other nine; no video anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_room_listeners_hear_all_speakers() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let report = load(&app, Scenario::Audio, vec![5]).await;
    let step = &report.steps[0];
    assert_eq!(
        (step.publishers, step.subscribers, step.connected),
        (10, 15, 15)
    );
    let expected = 5.0 * 10.0 * 50.0 + 10.0 * 9.0 * 50.0;
    let ratio = step.packets_per_second / expected;
    assert!(
        (0.9..1.1).contains(&ratio),
        "{} packets/s, {expected} expected",
        step.packets_per_second
    );
    assert_eq!(step.fps_per_subscriber, 0.0);
    assert_eq!(step.loss_ratio, 0.0);
    app.stop().await;
}

/// The comparison end to end, small: dangjian and then Janus, each alone in a network namespace
/// the test makes, the same three viewers of one camera. Both must deliver every frame; the
/// report must name both servers' CPU per packet and their ratio. Needs root (network
/// namespaces) and Janus (scripts/test installs it); `DJTEST_SKIP_NETNS=1` skips it on a
/// machine without them, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janus_and_dangjian_side_by_side_in_a_namespace() {
    use loadtest::netns::{Netns, launch_dangjian, launch_janus};
    if std::env::var_os("DJTEST_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED: DJTEST_SKIP_NETNS is set");
        return;
    }
    let logs = tempfile::tempdir().unwrap();
    let ns = Netns::create("djtest-cmp").expect("a network namespace (needs root and iproute2)");
    let plan = |pid| Plan {
        scenario: Scenario::Livestream,
        steps: vec![3],
        step_secs: 3,
        settle_secs: 1,
        join_concurrency: 4,
        room: "cmp".into(),
        client_ip: ns.host_ip,
        server_pid: Some(pid),
        verbose: false,
    };
    let ours = {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_dangjian"));
        let server = launch_dangjian(&ns, bin, &logs.path().join("dangjian.log")).unwrap();
        let key = server.token_key_hex.clone().unwrap();
        let target = Arc::new(Dangjian::new(&server.http.to_string(), &key).unwrap());
        scenario::run(target, &plan(server.pid)).await.unwrap()
    };
    let janus = {
        let server = launch_janus(&ns, &logs.path().join("janus.log"))
            .expect("Janus (scripts/install-janus)");
        let target = Arc::new(loadtest::janus::Janus::at(server.http).unwrap());
        scenario::run(target, &plan(server.pid)).await.unwrap()
    };
    drop(ns);
    let c = loadtest::compare::compare(ours, janus);
    c.print();
    for r in [&c.dangjian, &c.janus] {
        assert!(r.problems.is_empty(), "{}: {:?}", r.server, r.problems);
        let s = &r.steps[0];
        assert_eq!(s.connected, 3, "{}", r.server);
        assert!(
            (27.0..33.0).contains(&s.fps_per_subscriber),
            "{}: {} fps",
            r.server,
            s.fps_per_subscriber
        );
        assert_eq!(s.loss_ratio, 0.0, "{}", r.server);
        assert!(
            s.server_cpu_seconds.is_some_and(|c| c > 0.0),
            "{}: server CPU read from /proc",
            r.server
        );
    }
    // Same load on both: the same packets reached the viewers (within a frame's worth).
    let (d, j) = (
        c.steps[0].dangjian_packets_per_second,
        c.steps[0].janus_packets_per_second,
    );
    assert!(
        (d - j).abs() / d < 0.1,
        "dangjian {d} vs janus {j} packets/s"
    );
    assert!(
        c.janus_cpu_ratio.is_some_and(|r| r > 0.0),
        "{:?}",
        c.janus_cpu_ratio
    );
    let json = serde_json::to_value(&c).unwrap();
    assert!(json["janus_cpu_ratio"].is_number(), "{json}");
}
