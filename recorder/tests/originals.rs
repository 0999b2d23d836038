//! Per-track originals end to end: segments of real encoded media in, a playable file out,
//! checked with `ffprobe` as a user's tools would see it.

use std::path::Path;
use std::process::Command;

use recorder::compose::TrackInput;
use recorder::originals::{Original, export};
use recorder::segment::{self, Codec, Frame, Kind, TrackMeta};
use recorder::testmedia;

const FPS: u32 = 30;
const W: u32 = 320;
const H: u32 = 240;
/// Where the clips start on the recording's timeline.
const OFFSET_US: i64 = 2_500_000;

fn meta(track: &str, kind: Kind, source: &str, codec: Codec) -> TrackMeta {
    TrackMeta {
        track: track.into(),
        participant: "alice".into(),
        kind,
        source: source.into(),
        codec,
    }
}

/// Moves `frames` to start at [`OFFSET_US`], cuts them into 10 s segments by pts, as the capture
/// client would, and writes them.
fn write_track(dir: &Path, meta: TrackMeta, frames: &[Frame]) -> TrackInput {
    let frames: Vec<Frame> = frames
        .iter()
        .cloned()
        .map(|mut f| {
            f.pts_us += OFFSET_US;
            f
        })
        .collect();
    let seg_us = 10_000_000;
    let last = frames.iter().map(|f| f.pts_us).max().unwrap_or(0);
    let mut segments = Vec::new();
    for seq in 0..=(last / seg_us) {
        let range = seq * seg_us..(seq + 1) * seg_us;
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

/// `ffprobe -show_streams -show_format` as JSON.
fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Decodes the whole file with the ffmpeg CLI: errors mean a player would stumble.
fn decodes_cleanly(path: &Path) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success(), "{path:?} does not decode");
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(errors.trim().is_empty(), "{path:?}: {errors}");
}

/// One stream of `codec`, lasting `seconds` (±0.3 s) by ffprobe and by the export's own count.
fn assert_one_stream(o: &Original, codec: &str, kind: &str, seconds: f64) {
    let probe = ffprobe(&o.file);
    let streams = probe["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1, "{probe}");
    assert_eq!(streams[0]["codec_name"], codec, "{probe}");
    assert_eq!(streams[0]["codec_type"], kind, "{probe}");
    let duration: f64 = probe["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no duration: {probe}"));
    assert!(
        (duration - seconds).abs() <= 0.3,
        "{codec}: {duration} s by ffprobe, wanted {seconds}"
    );
    assert!(
        (o.duration_ms as f64 / 1000.0 - seconds).abs() <= 0.3,
        "{codec}: {} ms reported, wanted {seconds} s",
        o.duration_ms
    );
    assert_eq!(o.start_ms, OFFSET_US / 1000, "{o:?}");
    decodes_cleanly(&o.file);
}

#[test]
fn vp8_becomes_a_webm() {
    let dir = tempfile::tempdir().unwrap();
    let frames = testmedia::vp8_clip(12.0, FPS, W, H, &[]);
    let t = write_track(
        dir.path(),
        meta("TR_cam", Kind::Video, "camera", Codec::Vp8),
        &frames,
    );
    let out = tempfile::tempdir().unwrap();
    let o = export(&t, out.path()).unwrap();
    assert_eq!(o.file, out.path().join("TR_cam.webm"));
    assert_eq!(
        (o.participant.as_str(), o.kind, o.source.as_str()),
        ("alice", Kind::Video, "camera")
    );
    assert_one_stream(&o, "vp8", "video", 12.0);
    let probe = ffprobe(&o.file);
    assert_eq!(probe["streams"][0]["width"], W);
    assert_eq!(probe["streams"][0]["height"], H);
    assert!(
        probe["format"]["format_name"]
            .as_str()
            .unwrap()
            .contains("webm"),
        "{probe}"
    );
}

#[test]
fn h264_becomes_an_mp4() {
    let dir = tempfile::tempdir().unwrap();
    let frames = testmedia::h264_clip(12.0, FPS, W, H, &[]);
    let t = write_track(
        dir.path(),
        meta("TR_h264", Kind::Video, "screen", Codec::H264),
        &frames,
    );
    let out = tempfile::tempdir().unwrap();
    let o = export(&t, out.path()).unwrap();
    assert_eq!(o.file.extension().unwrap(), "mp4");
    assert_one_stream(&o, "h264", "video", 12.0);
    let probe = ffprobe(&o.file);
    assert_eq!(probe["streams"][0]["codec_tag_string"], "avc1", "{probe}");
    assert_eq!(probe["streams"][0]["width"], W);
}

#[test]
fn opus_becomes_an_audio_only_webm() {
    let dir = tempfile::tempdir().unwrap();
    let frames = testmedia::opus_clip(12.0, &[1000, 5000]);
    let t = write_track(
        dir.path(),
        meta("TR_mic", Kind::Audio, "microphone", Codec::Opus),
        &frames,
    );
    let out = tempfile::tempdir().unwrap();
    let o = export(&t, out.path()).unwrap();
    assert_eq!(o.file.extension().unwrap(), "webm");
    assert_one_stream(&o, "opus", "audio", 12.0);
    assert_eq!(ffprobe(&o.file)["streams"][0]["sample_rate"], "48000");
}

#[test]
fn a_missing_middle_segment_leaves_a_gap_in_a_playable_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let cases = [
        (
            meta("TR_vp8", Kind::Video, "camera", Codec::Vp8),
            testmedia::vp8_clip(25.0, FPS, W, H, &[]),
            "vp8",
            "video",
        ),
        (
            meta("TR_avc", Kind::Video, "camera", Codec::H264),
            testmedia::h264_clip(25.0, FPS, W, H, &[]),
            "h264",
            "video",
        ),
        (
            meta("TR_opus", Kind::Audio, "microphone", Codec::Opus),
            testmedia::opus_clip(25.0, &[]),
            "opus",
            "audio",
        ),
    ];
    for (meta, frames, codec, kind) in cases {
        let t = write_track(dir.path(), meta, &frames);
        assert_eq!(t.segments.len(), 3);
        // The middle segment (7.5 s to 17.5 s of the clip) never reached the store.
        std::fs::remove_file(&t.segments[1]).unwrap();
        let o = export(&t, out.path()).unwrap();
        // The timeline keeps its length: the gap stays a gap.
        assert_one_stream(&o, codec, kind, 25.0);
        let packets = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "packet=pts_time",
                "-of",
                "csv=p=0",
            ])
            .arg(&o.file)
            .output()
            .unwrap();
        let times: Vec<f64> = String::from_utf8_lossy(&packets.stdout)
            .lines()
            .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
            .collect();
        assert!(
            !times.iter().any(|t| (7.6..17.4).contains(t)),
            "{codec}: packets inside the gap"
        );
        assert!(
            times.iter().any(|&t| t >= 17.5),
            "{codec}: nothing after the gap"
        );
    }
}

#[test]
fn a_track_without_frames_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = write_track(
        dir.path(),
        meta("TR_empty", Kind::Video, "camera", Codec::Vp8),
        &[],
    );
    let out = tempfile::tempdir().unwrap();
    assert!(export(&t, out.path()).is_err());
    assert!(!out.path().join("TR_empty.webm").exists());
}

#[test]
fn h264_changing_its_size_mid_track_stays_one_playable_mp4() {
    let dir = tempfile::tempdir().unwrap();
    let mut frames = testmedia::h264_clip(4.0, FPS, W, H, &[]);
    let bigger = testmedia::h264_clip(4.0, FPS, 2 * W, 2 * H, &[]);
    frames.extend(bigger.into_iter().map(|mut f| {
        f.pts_us += 4_000_000;
        f
    }));
    let t = write_track(
        dir.path(),
        meta("TR_resize", Kind::Video, "screen", Codec::H264),
        &frames,
    );
    let out = tempfile::tempdir().unwrap();
    let o = export(&t, out.path()).unwrap();
    assert_one_stream(&o, "h264", "video", 8.0);
    // The parameter sets change in band, which `avc3` allows and `avc1` does not.
    let probe = ffprobe(&o.file);
    assert_eq!(probe["streams"][0]["codec_tag_string"], "avc3", "{probe}");
}

/// `Recorder::finalize` exports every track next to the replay, and leaves out (without
/// failing) a track that cannot be exported.
#[tokio::test]
async fn finalizing_uploads_an_original_per_track() {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let id = "rec-originals";
    let tracks = [
        (
            meta("TR_cam", Kind::Video, "camera", Codec::Vp8),
            testmedia::vp8_clip(4.0, FPS, W, H, &[]),
        ),
        (
            meta("TR_mic", Kind::Audio, "microphone", Codec::Opus),
            testmedia::opus_clip(4.0, &[]),
        ),
        // Never a keyframe: nothing in it can be shown, so it has no original.
        (
            meta("TR_broken", Kind::Video, "screen", Codec::Vp8),
            (0..30)
                .map(|i| Frame {
                    pts_us: OFFSET_US + i * 33_333,
                    keyframe: false,
                    data: vec![1, 2, 3].into(),
                })
                .collect(),
        ),
    ];
    for (meta, frames) in &tracks {
        let frames: Vec<Frame> = frames
            .iter()
            .cloned()
            .map(|mut f| {
                f.pts_us += OFFSET_US;
                f
            })
            .collect();
        let key = recorder::segment_key(id, &meta.track, 0);
        store
            .put(
                &StorePath::from(key),
                PutPayload::from(segment::encode(meta, 0, &frames)),
            )
            .await
            .unwrap();
    }
    let spool = tempfile::tempdir().unwrap();
    let (rec, _events) = recorder::Recorder::new(recorder::RecorderConfig {
        rtc_url: "ws://127.0.0.1:9/rtc".into(),
        tokens: signaling::token::TokenKey::generate(),
        store: store.clone(),
        spool_dir: spool.path().to_path_buf(),
    });
    let replay = rec.finalize(id).await.unwrap();
    let mut got: Vec<_> = replay
        .originals
        .iter()
        .map(|o| (o.track.as_str(), o.key.as_str(), o.kind))
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(
        got,
        vec![
            (
                "TR_cam",
                "recordings/rec-originals/originals/TR_cam.webm",
                Kind::Video
            ),
            (
                "TR_mic",
                "recordings/rec-originals/originals/TR_mic.webm",
                Kind::Audio
            ),
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    for o in &replay.originals {
        let bytes = store
            .get(&StorePath::from(o.key.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(bytes.len() as u64, o.size);
        assert_eq!(o.start_ms, OFFSET_US / 1000);
        assert!((o.duration_ms - 4000).abs() <= 300, "{o:?}");
        let file = dir.path().join(format!("{}.webm", o.track));
        std::fs::write(&file, &bytes).unwrap();
        let probe = ffprobe(&file);
        assert_eq!(probe["streams"].as_array().unwrap().len(), 1, "{probe}");
    }
}
