//! Composition end to end on real encoded media: segments in, a replay out, decoded back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use recorder::compose::{ComposeError, TrackInput, compose};
use recorder::segment::{self, Codec, Frame, Kind, TrackMeta};
use recorder::testmedia::{self, Analysis};

const FPS: u32 = 30;
const W: u32 = 320;
const H: u32 = 240;

fn meta(track: &str, participant: &str, kind: Kind, source: &str, codec: Codec) -> TrackMeta {
    TrackMeta {
        track: track.into(),
        participant: participant.into(),
        kind,
        source: source.into(),
        codec,
    }
}

/// Cuts `frames` into segments of `seg_ms` by pts, as the capture client would, and writes them.
fn write_track(dir: &Path, meta: TrackMeta, frames: &[Frame], seg_ms: i64) -> TrackInput {
    let mut segments = Vec::new();
    let last = frames.iter().map(|f| f.pts_us).max().unwrap_or(0);
    for seq in 0..=(last / 1000 / seg_ms) {
        let range = seq * seg_ms * 1000..(seq + 1) * seg_ms * 1000;
        let part: Vec<Frame> = frames
            .iter()
            .filter(|f| range.contains(&f.pts_us))
            .cloned()
            .collect();
        let path = dir.join(format!("{}-{seq:06}.seg", meta.track));
        std::fs::write(&path, segment::encode(&meta, seq as u32, &part)).unwrap();
        segments.push(path);
    }
    TrackInput { meta, segments }
}

fn camera(dir: &Path, id: &str, who: &str, frames: &[Frame], codec: Codec) -> TrackInput {
    write_track(
        dir,
        meta(id, who, Kind::Video, "camera", codec),
        frames,
        10_000,
    )
}

fn mic(dir: &Path, id: &str, who: &str, frames: &[Frame]) -> TrackInput {
    write_track(
        dir,
        meta(id, who, Kind::Audio, "microphone", Codec::Opus),
        frames,
        10_000,
    )
}

fn near(values: &[i64], t: i64, within: i64) -> Option<i64> {
    values.iter().copied().find(|v| (v - t).abs() <= within)
}

/// Each expected event shows up as a flash and a beep no more than 40 ms apart.
fn assert_sync(a: &Analysis, events_ms: &[i64]) {
    for &t in events_ms {
        let flash = near(&a.flashes_ms, t, 100)
            .unwrap_or_else(|| panic!("no flash near {t} ms: {:?}", a.flashes_ms));
        let beep = near(&a.beeps_ms, t, 100)
            .unwrap_or_else(|| panic!("no beep near {t} ms: {:?}", a.beeps_ms));
        assert!(
            (flash - beep).abs() <= 40,
            "flash at {flash} ms, beep at {beep} ms"
        );
    }
}

fn assert_playable(a: &Analysis, duration_ms: i64) {
    assert_eq!((a.video_streams, a.audio_streams), (1, 1), "{a:?}");
    assert_eq!(
        (a.video_codec.as_str(), a.audio_codec.as_str()),
        ("h264", "aac")
    );
    assert!(
        (a.duration_ms - duration_ms).abs() <= 300,
        "duration {} ms, wanted {duration_ms}",
        a.duration_ms
    );
}

/// What a user's tools see: `ffprobe` on the file.
fn ffprobe_streams(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["streams"].as_array().cloned().unwrap_or_default()
}

fn replay_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("replay.mp4")
}

/// Set `RECORDER_KEEP_REPLAYS=DIR` to keep the replays for a look in a browser.
fn keep(out: &Path, name: &str) {
    if let Some(dir) = std::env::var_os("RECORDER_KEEP_REPLAYS") {
        let _ = std::fs::copy(out, Path::new(&dir).join(format!("{name}.mp4")));
    }
}

#[test]
fn vp8_camera_and_opus_mic_become_h264_and_aac_in_sync() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let events = [3000, 9000];
    let tracks = [
        camera(
            dir.path(),
            "cam",
            "alice",
            &testmedia::vp8_clip(12.0, FPS, W, H, &events),
            Codec::Vp8,
        ),
        mic(
            dir.path(),
            "mic",
            "alice",
            &testmedia::opus_clip(12.0, &events),
        ),
    ];
    let out = replay_path(&dir);
    let report = compose(&tracks, &out).unwrap();
    keep(&out, "vp8");
    assert_eq!(report.video_mode, "transcode");
    assert!((report.duration_ms - 12_000).abs() <= 300, "{report:?}");
    assert_eq!(report.switches, vec![(0, "cam".to_string())]);
    let a = testmedia::analyse(&out);
    assert_playable(&a, 12_000);
    assert_sync(&a, &events);
    assert_eq!(a.flashes_ms.len(), 2, "{:?}", a.flashes_ms);

    let streams = ffprobe_streams(&out);
    let codecs: Vec<&str> = streams
        .iter()
        .filter_map(|s| s["codec_name"].as_str())
        .collect();
    assert_eq!(codecs.len(), 2, "{streams:?}");
    assert!(
        codecs.contains(&"h264") && codecs.contains(&"aac"),
        "{codecs:?}"
    );
    let video = streams.iter().find(|s| s["codec_name"] == "h264").unwrap();
    assert_eq!(video["pix_fmt"], "yuv420p");
    assert_eq!(video["profile"], "High");
    let audio = streams.iter().find(|s| s["codec_name"] == "aac").unwrap();
    assert_eq!(
        (audio["profile"].as_str(), audio["sample_rate"].as_str()),
        (Some("LC"), Some("48000"))
    );
    eprintln!("vp8 test took {:?}", started.elapsed());
}

#[test]
fn a_single_h264_track_is_remuxed_in_sync() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let events = [3000, 9000];
    let tracks = [
        camera(
            dir.path(),
            "cam",
            "bob",
            &testmedia::h264_clip(12.0, FPS, W, H, &events),
            Codec::H264,
        ),
        mic(
            dir.path(),
            "mic",
            "bob",
            &testmedia::opus_clip(12.0, &events),
        ),
    ];
    let out = replay_path(&dir);
    let report = compose(&tracks, &out).unwrap();
    keep(&out, "h264");
    assert_eq!(report.video_mode, "copy");
    let a = testmedia::analyse(&out);
    assert_playable(&a, 12_000);
    assert_sync(&a, &events);
    let streams = ffprobe_streams(&out);
    let video = streams.iter().find(|s| s["codec_name"] == "h264").unwrap();
    assert_eq!(
        (video["width"].as_i64(), video["height"].as_i64()),
        (Some(320), Some(240))
    );
    eprintln!("h264 test took {:?}", started.elapsed());
}

#[test]
fn the_active_speakers_camera_is_shown_and_all_voices_are_mixed() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let a_beeps: Vec<i64> = (0..12).map(|i| i * 500).collect();
    let b_beeps: Vec<i64> = (12..24).map(|i| i * 500).collect();
    let (a_luma, b_luma) = (60u8, 170u8);
    let tracks = [
        camera(
            dir.path(),
            "cam-a",
            "a",
            &testmedia::video_clip(Codec::Vp8, 12.0, FPS, W, H, a_luma, &[]),
            Codec::Vp8,
        ),
        camera(
            dir.path(),
            "cam-b",
            "b",
            &testmedia::video_clip(Codec::Vp8, 12.0, FPS, W, H, b_luma, &[]),
            Codec::Vp8,
        ),
        mic(
            dir.path(),
            "mic-a",
            "a",
            &testmedia::opus_clip(12.0, &a_beeps),
        ),
        mic(
            dir.path(),
            "mic-b",
            "b",
            &testmedia::opus_clip(12.0, &b_beeps),
        ),
    ];
    let out = replay_path(&dir);
    let report = compose(&tracks, &out).unwrap();
    assert_eq!(report.video_mode, "transcode");
    keep(&out, "speaker");
    assert_eq!(report.switches.len(), 2, "{:?}", report.switches);
    assert_eq!(report.switches[0], (0, "cam-a".to_string()));
    assert_eq!(report.switches[1].1, "cam-b");
    assert!(
        (report.switches[1].0 - 6000).abs() <= 1000,
        "{:?}",
        report.switches
    );

    let a = testmedia::analyse(&out);
    assert_playable(&a, 12_000);
    let luma_in = |from: i64, to: i64| -> Vec<f64> {
        a.luma
            .iter()
            .filter(|l| l.0 >= from && l.0 < to)
            .map(|l| l.1)
            .collect()
    };
    let first = luma_in(500, 5500);
    let second = luma_in(7500, 11500);
    assert!(!first.is_empty() && !second.is_empty());
    assert!(
        first.iter().all(|l| (l - f64::from(a_luma)).abs() < 15.0),
        "{first:?}"
    );
    assert!(
        second.iter().all(|l| (l - f64::from(b_luma)).abs() < 15.0),
        "{second:?}"
    );
    for t in a_beeps.iter().chain(&b_beeps) {
        assert!(
            near(&a.beeps_ms, *t, 40).is_some(),
            "beep at {t} missing: {:?}",
            a.beeps_ms
        );
    }
    eprintln!("speaker test took {:?}", started.elapsed());
}

#[test]
fn a_lost_segment_leaves_a_gap_not_a_failure() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let events = [2000, 10_000];
    let video = testmedia::vp8_clip(12.0, FPS, W, H, &events);
    let audio = testmedia::opus_clip(12.0, &events);
    let cam = write_track(
        dir.path(),
        meta("cam", "c", Kind::Video, "camera", Codec::Vp8),
        &video,
        4000,
    );
    let mut mic = write_track(
        dir.path(),
        meta("mic", "c", Kind::Audio, "microphone", Codec::Opus),
        &audio,
        4000,
    );
    assert_eq!((cam.segments.len(), mic.segments.len()), (3, 3));
    // The video's middle segment file is gone; the audio's is not even listed.
    std::fs::remove_file(&cam.segments[1]).unwrap();
    let lost = mic.segments.remove(1);
    std::fs::remove_file(lost).unwrap();

    let out = replay_path(&dir);
    let report = compose(&[cam, mic], &out).unwrap();
    keep(&out, "lost");
    assert!((report.duration_ms - 12_000).abs() <= 300, "{report:?}");
    let a = testmedia::analyse(&out);
    assert_playable(&a, 12_000);
    assert_sync(&a, &events);
    eprintln!("lost segment test took {:?}", started.elapsed());
}

/// Moves every frame `by_us` later on the recording's timeline.
fn shifted(frames: Vec<Frame>, by_us: i64) -> Vec<Frame> {
    frames
        .into_iter()
        .map(|f| Frame {
            pts_us: f.pts_us + by_us,
            ..f
        })
        .collect()
}

#[test]
fn a_late_start_and_reordered_packets_keep_sync() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The mic starts 1.5 s into the recording, the camera 0.7 s after it; flash and beep at
    // 3 s and 7 s of the recording, which is 1.5 s and 5.5 s of the replay.
    let video = shifted(testmedia::vp8_clip(9.3, FPS, W, H, &[800, 4800]), 2_200_000);
    let mut audio = shifted(testmedia::opus_clip(10.0, &[1500, 5500]), 1_500_000);
    // Packets around each beep arrive out of order; each must still land at its own pts.
    for i in [74, 76, 274, 276] {
        audio.swap(i, i + 1);
    }
    audio.swap(270, 280);
    let tracks = [
        camera(dir.path(), "cam", "d", &video, Codec::Vp8),
        mic(dir.path(), "mic", "d", &audio),
    ];
    let out = replay_path(&dir);
    let report = compose(&tracks, &out).unwrap();
    keep(&out, "offset");
    // Time 0 is the mic's first packet at 1.5 s.
    assert!((report.duration_ms - 10_000).abs() <= 300, "{report:?}");
    let a = testmedia::analyse(&out);
    assert_playable(&a, 10_000);
    assert_sync(&a, &[1500, 5500]);
    assert_eq!(report.switches, vec![(0, "cam".to_string())]);
    eprintln!("offset test took {:?}", started.elapsed());
}

#[test]
fn garbage_and_nothing_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let out = replay_path(&dir);
    assert!(matches!(compose(&[], &out), Err(ComposeError::Empty)));

    let junk = dir.path().join("junk.seg");
    std::fs::write(&junk, b"this is not a segment at all").unwrap();
    let track = TrackInput {
        meta: meta("cam", "x", Kind::Video, "camera", Codec::Vp8),
        segments: vec![junk.clone()],
    };
    assert!(compose(&[track], &out).is_err());

    // A well-formed segment whose frames are noise: nothing decodes, nothing panics.
    let noise: Vec<Frame> = (0..50)
        .map(|i| Frame {
            pts_us: i * 20_000,
            keyframe: i % 10 == 0,
            data: bytes::Bytes::from(vec![(i * 37 % 251) as u8; 1 + (i as usize * 13) % 300]),
        })
        .collect();
    let tracks = [
        write_track(
            dir.path(),
            meta("v", "x", Kind::Video, "camera", Codec::H264),
            &noise,
            10_000,
        ),
        write_track(
            dir.path(),
            meta("a", "x", Kind::Audio, "microphone", Codec::Opus),
            &noise,
            10_000,
        ),
        TrackInput {
            meta: meta("w", "x", Kind::Video, "screen", Codec::Vp8),
            segments: vec![junk],
        },
    ];
    // Whether this is an error or a silent replay, it must not panic or hang.
    let _ = compose(&tracks, &out);
    assert!(
        !out.exists()
            || std::fs::metadata(&out)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
    );
}

/// A longer meeting, for timing by hand: `cargo test -p recorder --release -- --ignored`.
#[test]
#[ignore]
fn a_minute_of_two_cameras_composes() {
    let dir = tempfile::tempdir().unwrap();
    let a_beeps: Vec<i64> = (0..30).map(|i| i * 1000).collect();
    let b_beeps: Vec<i64> = (30..60).map(|i| i * 1000).collect();
    let tracks = [
        camera(
            dir.path(),
            "cam-a",
            "a",
            &testmedia::video_clip(Codec::Vp8, 60.0, FPS, 640, 480, 60, &[]),
            Codec::Vp8,
        ),
        camera(
            dir.path(),
            "cam-b",
            "b",
            &testmedia::video_clip(Codec::H264, 60.0, FPS, 640, 480, 170, &[]),
            Codec::H264,
        ),
        mic(
            dir.path(),
            "mic-a",
            "a",
            &testmedia::opus_clip(60.0, &a_beeps),
        ),
        mic(
            dir.path(),
            "mic-b",
            "b",
            &testmedia::opus_clip(60.0, &b_beeps),
        ),
    ];
    let out = replay_path(&dir);
    let started = Instant::now();
    let report = compose(&tracks, &out).unwrap();
    eprintln!("composed a minute in {:?}: {report:?}", started.elapsed());
    let a = testmedia::analyse(&out);
    assert_playable(&a, 60_000);
}
