//! Composition: the per-track segments of a recording into one replay file.
//!
//! The replay is an MP4 (`+faststart`) with exactly one H.264 video stream and one AAC-LC
//! stream at 48 kHz, so that a plain `<video>` element plays it in every browser.
//!
//! It works in two passes over the segments, each reading one segment at a time so that an
//! hour-long recording never sits in memory:
//!
//! 1. **Scan** every track: its time span, the keyframes where decoding can start, the points
//!    where frames were lost (a missing, garbled or cut segment, or a jump in `seq`), when a
//!    video track was live, the H.264 parameter sets, and the loudness of each audio track per
//!    one-second window (this decodes the Opus once).
//! 2. **Plan** the video from the scan: a screen share while one is live, else the camera of the
//!    loudest speaker, held for at least [`HOLD_US`] to avoid flapping, else any live camera. A
//!    switch takes effect where the new track can be decoded: at once if a keyframe since its
//!    last loss precedes the switch (we start feeding its decoder from that keyframe), else at
//!    its next keyframe.
//! 3. **Write** the file in one-second steps, so that the muxer only ever interleaves a second's
//!    worth of packets: audio by decoding every audio track again and adding each packet's
//!    samples at the position its own pts gives (so a late or early packet never shifts the rest
//!    of its track, and gaps are silence) into a short mixing buffer, clipped and encoded to AAC;
//!    video either remuxed (`copy`: a single H.264 track with one set of parameter sets; Annex-B
//!    becomes length-prefixed AVC samples with an avcC built from its SPS/PPS) or decoded,
//!    letterboxed to one size with swscale and re-encoded with libx264 (`transcode`).
//!
//! Time 0 of the replay is the earliest frame of any track; every output timestamp is the
//! frame's own pts minus that, which is what keeps audio and video in sync. The first video
//! frame is shown from time 0 so that the player never starts on a black screen.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use ffmpeg::{
    ChannelLayout, Dictionary, Packet, Rational, codec, decoder, encoder, format, frame,
    software::scaling,
};
use ffmpeg_next as ffmpeg;

use crate::segment::{self, Codec, Frame, Kind, TrackMeta};

/// One track's uploaded segments, downloaded to local files, in sequence order.
#[derive(Debug, Clone)]
pub struct TrackInput {
    pub meta: TrackMeta,
    pub segments: Vec<PathBuf>,
}

/// What was made.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ComposeReport {
    pub duration_ms: i64,
    /// `copy` when the video was remuxed, `transcode` when re-encoded, `none` without video.
    pub video_mode: String,
    /// When the shown video switched, and to which track.
    pub switches: Vec<(i64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("nothing to compose: no audio or video frames")]
    Empty,
    #[error("ffmpeg: {0}")]
    Ffmpeg(String),
    #[error("reading a segment: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) type Result<T> = std::result::Result<T, ComposeError>;

/// Output audio: what browsers and AAC-LC expect.
const RATE: i64 = 48_000;
/// Output video timestamps count 90 kHz ticks, the usual video clock.
const VIDEO_HZ: i64 = 90_000;
/// Speaker detection and muxing step.
const WINDOW_US: i64 = 1_000_000;
/// A camera stays shown at least this long before another speaker takes over.
const HOLD_US: i64 = 2_000_000;
/// Frames further apart than this are two separate live stretches of a video track.
const LIVE_GAP_US: i64 = 3_000_000;
/// How late (in arrival order) an audio packet may come and still be mixed at its place.
const REORDER_US: i64 = 500_000;
/// A pts beyond two days is damage, not media; it would ask for days of silence.
const MAX_PTS_US: i64 = 48 * 3_600 * 1_000_000;
/// Mean square (full scale 1.0) below which a window is not speech: about -50 dBFS.
const SPEECH_ENERGY: f64 = 1e-5;
/// Largest output picture.
const MAX_SIZE: (u32, u32) = (1280, 720);
/// Used for the output size when no frame of the first shown track decodes.
pub(crate) const FALLBACK_SIZE: (u32, u32) = (640, 360);

pub(crate) fn ff(what: &str, e: ffmpeg::Error) -> ComposeError {
    ComposeError::Ffmpeg(format!("{what}: {e}"))
}

/// Blocking: run it on a blocking thread.
pub fn compose(tracks: &[TrackInput], out: &Path) -> Result<ComposeReport> {
    ffmpeg::init().map_err(|e| ff("init", e))?;
    // Damaged input would otherwise print a line per packet, and x264 its statistics, on
    // stderr; what matters comes back as our error or a `tracing` warning.
    ffmpeg::log::set_level(ffmpeg::log::Level::Error);
    let scans = tracks.iter().map(scan_track).collect::<Result<Vec<_>>>()?;
    let span = Span::of(&scans).ok_or(ComposeError::Empty)?;
    let plan = effective_plan(&desired_schedule(tracks, &scans, span), &scans);
    let mode = choose_mode(tracks, &scans, &plan);
    let report = ComposeReport {
        duration_ms: (span.end - span.t0) / 1000,
        video_mode: mode.name().to_string(),
        switches: plan
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // The first picture is shown from time 0 (see `write_replay`).
                let ms = if i == 0 {
                    0
                } else {
                    (s.from_us - span.t0) / 1000
                };
                (ms, tracks[s.track].meta.track.clone())
            })
            .collect(),
    };
    let written = write_replay(tracks, &scans, span, &plan, mode, out);
    if written.is_err() {
        // A half-written replay must not be mistaken for one.
        let _ = std::fs::remove_file(out);
    }
    written.map(|()| report)
}

// ---------------------------------------------------------------------------------------------
// Reading segments

/// A frame as read, and whether frames were lost just before it (its decoder needs a keyframe).
pub(crate) struct ReadFrame {
    pub(crate) frame: Frame,
    pub(crate) after_loss: bool,
}

/// Streams a track's frames one segment at a time. A missing or garbled segment, a jump in
/// `seq` or a cut segment marks the next frame as following a loss; none of them is an error.
pub(crate) struct FrameReader<'a> {
    paths: std::slice::Iter<'a, PathBuf>,
    current: std::vec::IntoIter<Frame>,
    expect_seq: Option<u32>,
    lost: bool,
    cut: bool,
    peeked: Option<ReadFrame>,
}

impl<'a> FrameReader<'a> {
    pub(crate) fn new(paths: &'a [PathBuf]) -> Self {
        Self {
            paths: paths.iter(),
            current: Vec::new().into_iter(),
            expect_seq: None,
            lost: false,
            cut: false,
            peeked: None,
        }
    }

    pub(crate) fn next(&mut self) -> Result<Option<ReadFrame>> {
        if let Some(f) = self.peeked.take() {
            return Ok(Some(f));
        }
        loop {
            if let Some(frame) = self.current.next() {
                if frame.data.is_empty() || frame.pts_us.abs() > MAX_PTS_US {
                    self.lost = true;
                    continue;
                }
                let after_loss = std::mem::take(&mut self.lost);
                return Ok(Some(ReadFrame { frame, after_loss }));
            }
            let Some(path) = self.paths.next() else {
                return Ok(None);
            };
            self.load(path)?;
        }
    }

    fn peek(&mut self) -> Result<Option<&ReadFrame>> {
        if self.peeked.is_none() {
            self.peeked = self.next()?;
        }
        Ok(self.peeked.as_ref())
    }

    fn load(&mut self, path: &Path) -> Result<()> {
        // Frames after a cut segment's damage are gone.
        self.lost |= std::mem::take(&mut self.cut);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "segment missing, composing without it");
                self.skip();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match segment::decode(&bytes) {
            Ok(seg) => {
                self.lost |= self.expect_seq.is_some_and(|s| s != seg.seq);
                self.expect_seq = Some(seg.seq.wrapping_add(1));
                self.cut = seg.truncated;
                self.current = seg.frames.into_iter();
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable segment skipped");
                self.skip();
            }
        }
        Ok(())
    }

    fn skip(&mut self) {
        self.lost = true;
        self.expect_seq = self.expect_seq.map(|s| s.wrapping_add(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Bitstream facts

/// The NAL units of an Annex-B access unit, without start codes or trailing zero bytes.
fn nal_units(au: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(au.len(), |&n| n - 3);
        let mut nal = &au[s..end.max(s)];
        while let [rest @ .., 0] = nal {
            nal = rest;
        }
        if !nal.is_empty() {
            out.push(nal);
        }
    }
    out
}

fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// Keyframes are read from the bitstream, not trusted from the segment's flag: a wrong flag
/// would start a decoder (or an MP4 sync sample) on a frame it cannot decode.
pub(crate) fn is_keyframe(codec: Codec, data: &[u8]) -> bool {
    match codec {
        // VP8 frame tag: bit 0 is 0 for a key frame.
        Codec::Vp8 => data.first().is_some_and(|b| b & 1 == 0),
        Codec::H264 => nal_units(data).iter().any(|n| nal_type(n) == 5),
        Codec::Opus => true,
    }
}

/// Annex-B to the length-prefixed form MP4 samples use.
pub(crate) fn annexb_to_avcc(au: &[u8]) -> Vec<u8> {
    let nals = nal_units(au);
    let mut out = Vec::with_capacity(au.len() + 4 * nals.len());
    for nal in nals {
        out.extend_from_slice(&(nal.len() as u32).to_be_bytes());
        out.extend_from_slice(nal);
    }
    out
}

/// An AVCDecoderConfigurationRecord (avcC) for one SPS and one PPS.
pub(crate) fn avcc_extradata(sps: &[u8], pps: &[u8]) -> Option<Vec<u8>> {
    if sps.len() < 4 || pps.is_empty() || sps.len() > 0xffff || pps.len() > 0xffff {
        return None;
    }
    let mut out = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
    out.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    out.extend_from_slice(sps);
    out.push(1);
    out.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    out.extend_from_slice(pps);
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Pass 1: scan

#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) first_us: Option<i64>,
    pub(crate) end_us: i64,
    /// Keyframe times, and the times of the first frame after each loss: decoding can start at
    /// a keyframe not followed by a loss before the wanted time.
    pub(crate) keyframes: Vec<i64>,
    breaks: Vec<i64>,
    live: Vec<(i64, i64)>,
    /// Audio: sum of squared samples per one-second window (by absolute pts).
    energy: BTreeMap<i64, f64>,
    pub(crate) sps: BTreeSet<Vec<u8>>,
    pub(crate) pps: BTreeSet<Vec<u8>>,
}

impl Scan {
    fn note_time(&mut self, start: i64, end: i64) {
        self.first_us = Some(self.first_us.map_or(start, |f| f.min(start)));
        self.end_us = self.end_us.max(end);
    }

    fn note_live(&mut self, pts: i64) {
        match self.live.last_mut() {
            Some((_, e)) if pts >= *e && pts - *e <= LIVE_GAP_US => *e = pts,
            Some((s, e)) if pts >= *s && pts < *e => {}
            _ => self.live.push((pts, pts)),
        }
    }

    fn is_live(&self, from: i64, to: i64) -> bool {
        self.live.iter().any(|&(s, e)| s < to && e >= from)
    }

    fn is_video(&self) -> bool {
        !self.keyframes.is_empty()
    }

    /// Where to start feeding the decoder to show the track from `t`, if it can be shown then.
    fn entry_at_or_before(&self, t: i64) -> Option<i64> {
        let k = *self.keyframes.iter().take_while(|&&k| k <= t).last()?;
        let lost_since = self.breaks.iter().any(|&b| b > k && b <= t);
        (!lost_since).then_some(k)
    }

    fn keyframe_at_or_after(&self, t: i64) -> Option<i64> {
        self.keyframes.iter().copied().find(|&k| k >= t)
    }
}

pub(crate) fn scan_track(input: &TrackInput) -> Result<Scan> {
    let mut scan = Scan::default();
    match (input.meta.kind, input.meta.codec) {
        (Kind::Video, Codec::Vp8 | Codec::H264) => scan_video(input, &mut scan)?,
        (Kind::Audio, Codec::Opus) => scan_audio(input, &mut scan)?,
        (kind, codec) => {
            tracing::warn!(track = %input.meta.track, ?kind, ?codec, "track kind and codec do not fit; ignored");
        }
    }
    scan.keyframes.sort_unstable();
    scan.breaks.sort_unstable();
    Ok(scan)
}

fn scan_video(input: &TrackInput, scan: &mut Scan) -> Result<()> {
    let codec = input.meta.codec;
    let mut reader = FrameReader::new(&input.segments);
    let mut prev: Option<i64> = None;
    while let Some(ReadFrame { frame, after_loss }) = reader.next()? {
        let pts = frame.pts_us;
        // The last frame lasts as long as the one before it, within reason.
        let dur = prev.map_or(33_333, |p| (pts - p).clamp(1_000, 100_000));
        prev = Some(pts);
        scan.note_time(pts, pts + dur);
        scan.note_live(pts);
        if after_loss {
            scan.breaks.push(pts);
        }
        if is_keyframe(codec, &frame.data) {
            scan.keyframes.push(pts);
            if codec == Codec::H264 {
                note_parameter_sets(&frame.data, scan);
            }
        }
    }
    Ok(())
}

fn note_parameter_sets(au: &[u8], scan: &mut Scan) {
    // A handful is enough to know the stream changed them; keep memory bounded.
    for nal in nal_units(au) {
        match nal_type(nal) {
            7 if scan.sps.len() < 8 => {
                scan.sps.insert(nal.to_vec());
            }
            8 if scan.pps.len() < 8 => {
                scan.pps.insert(nal.to_vec());
            }
            _ => {}
        }
    }
}

fn scan_audio(input: &TrackInput, scan: &mut Scan) -> Result<()> {
    let mut reader = FrameReader::new(&input.segments);
    let mut dec = OpusDecoder::new()?;
    while let Some(ReadFrame { frame, .. }) = reader.next()? {
        let pcm = dec.decode(&frame.data);
        let samples = (pcm.len() / 2) as i64;
        if samples == 0 {
            continue;
        }
        let pts = frame.pts_us;
        scan.note_time(pts, pts + samples * 1_000_000 / RATE);
        let energy: f64 = pcm.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / 2.0;
        *scan.energy.entry(pts.div_euclid(WINDOW_US)).or_default() += energy;
    }
    Ok(())
}

/// The replay's time span on the recording's timeline.
#[derive(Debug, Clone, Copy)]
struct Span {
    t0: i64,
    end: i64,
}

impl Span {
    fn of(scans: &[Scan]) -> Option<Span> {
        let t0 = scans.iter().filter_map(|s| s.first_us).min()?;
        let end = scans.iter().map(|s| s.end_us).max()?;
        (end > t0).then_some(Span { t0, end })
    }

    fn samples(&self, pts_us: i64) -> i64 {
        (pts_us - self.t0) * RATE / 1_000_000
    }

    fn ticks(&self, pts_us: i64) -> i64 {
        (pts_us - self.t0) * VIDEO_HZ / 1_000_000
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: plan the video

/// Show `track` from `from_us` (until the next entry), having fed its decoder from the
/// keyframe at `feed_from_us`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shown {
    track: usize,
    from_us: i64,
    feed_from_us: i64,
}

fn is_screen(meta: &TrackMeta) -> bool {
    meta.source == "screen"
}

/// The track we would like to show, window by window: (from, track) at each change.
fn desired_schedule(tracks: &[TrackInput], scans: &[Scan], span: Span) -> Vec<(i64, usize)> {
    let mut out: Vec<(i64, usize)> = Vec::new();
    let mut since = i64::MIN;
    for w in span.t0.div_euclid(WINDOW_US)..=(span.end - 1).div_euclid(WINDOW_US) {
        let from = (w * WINDOW_US).max(span.t0);
        let current = out.last().map(|c| c.1);
        let held = from.saturating_sub(since) < HOLD_US;
        let pick = pick_video(tracks, scans, w, current, held);
        if let Some(p) = pick.filter(|p| Some(*p) != current) {
            out.push((from, p));
            since = from;
        }
    }
    out
}

fn pick_video(
    tracks: &[TrackInput],
    scans: &[Scan],
    w: i64,
    current: Option<usize>,
    held: bool,
) -> Option<usize> {
    let (a, b) = (w * WINDOW_US, (w + 1) * WINDOW_US);
    let live: Vec<usize> = (0..tracks.len())
        .filter(|&i| tracks[i].meta.kind == Kind::Video && scans[i].is_video())
        .filter(|&i| scans[i].is_live(a, b))
        .collect();
    let screens: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&i| is_screen(&tracks[i].meta))
        .collect();
    if !screens.is_empty() {
        // Keep the screen already shown when two are live.
        return current
            .filter(|c| screens.contains(c))
            .or(screens.first().copied());
    }
    let cameras: Vec<usize> = live
        .into_iter()
        .filter(|&i| !is_screen(&tracks[i].meta))
        .collect();
    let shown = current.filter(|c| cameras.contains(c));
    let speaker = loudest_speaker(tracks, scans, w).and_then(|p| {
        cameras
            .iter()
            .copied()
            .find(|&c| tracks[c].meta.participant == p)
    });
    match (speaker, shown) {
        (Some(s), Some(c)) if s != c && held => Some(c),
        (Some(s), _) => Some(s),
        (None, Some(c)) => Some(c),
        // Nobody speaks into a live camera: whichever camera has frames, else freeze.
        (None, None) => cameras.first().copied().or(current),
    }
}

/// The participant whose microphone was loudest in window `w`, if anyone spoke.
fn loudest_speaker<'a>(tracks: &'a [TrackInput], scans: &[Scan], w: i64) -> Option<&'a str> {
    let window_samples = (RATE * WINDOW_US / 1_000_000) as f64;
    tracks
        .iter()
        .zip(scans)
        .filter(|(t, _)| t.meta.kind == Kind::Audio && t.meta.source != "screen_audio")
        .filter_map(|(t, s)| Some((t, s.energy.get(&w)? / window_samples)))
        .filter(|(_, e)| *e > SPEECH_ENERGY)
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(t, _)| t.meta.participant.as_str())
}

/// Moves each wanted switch to where the new track can actually be decoded.
fn effective_plan(desired: &[(i64, usize)], scans: &[Scan]) -> Vec<Shown> {
    let mut plan: Vec<Shown> = Vec::new();
    for (i, &(t, track)) in desired.iter().enumerate() {
        let until = desired.get(i + 1).map_or(i64::MAX, |d| d.0);
        let s = &scans[track];
        let shown = match s.entry_at_or_before(t) {
            Some(k) => Some(Shown {
                track,
                from_us: t,
                feed_from_us: k,
            }),
            None => s
                .keyframe_at_or_after(t)
                .filter(|&k| k < until)
                .map(|k| Shown {
                    track,
                    from_us: k,
                    feed_from_us: k,
                }),
        };
        match shown {
            Some(sh) if plan.last().is_none_or(|l| l.track != sh.track) => plan.push(sh),
            _ => {}
        }
    }
    plan
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    None,
    Copy(usize),
    Transcode,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Copy(_) => "copy",
            Mode::Transcode => "transcode",
        }
    }
}

/// Remux only when one H.264 track with one set of parameter sets is all that is shown: an
/// `avc1` track carries one avcC, and a resolution change mid-stream would break it.
fn choose_mode(tracks: &[TrackInput], scans: &[Scan], plan: &[Shown]) -> Mode {
    let used: BTreeSet<usize> = plan.iter().map(|s| s.track).collect();
    match used.iter().copied().collect::<Vec<_>>()[..] {
        [] => Mode::None,
        [t] if tracks[t].meta.codec == Codec::H264
            && scans[t].sps.len() == 1
            && scans[t].pps.len() == 1 =>
        {
            Mode::Copy(t)
        }
        _ => Mode::Transcode,
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 3: write

fn write_replay(
    tracks: &[TrackInput],
    scans: &[Scan],
    span: Span,
    plan: &[Shown],
    mode: Mode,
    out: &Path,
) -> Result<()> {
    let mut octx = format::output_as(&out, "mp4").map_err(|e| ff("creating the replay", e))?;
    let mut video = VideoOut::new(tracks, scans, span, plan, mode, &mut octx)?;
    let mut audio = Mixer::new(tracks, span, &mut octx)?;
    let mut opts = Dictionary::new();
    opts.set("movflags", "+faststart");
    octx.write_header_with(opts)
        .map_err(|e| ff("writing the header", e))?;
    video.learn_time_base(&octx)?;
    audio.learn_time_base(&octx)?;
    let mut t = span.t0;
    while t < span.end {
        t = (t + WINDOW_US).min(span.end);
        audio.mix_until(t, &mut octx)?;
        // Video frames at the very end still belong in: `end` is after the last one.
        let limit = if t >= span.end { i64::MAX } else { t };
        video.run_until(limit, &mut octx)?;
    }
    audio.finish(&mut octx)?;
    video.finish(&mut octx)?;
    octx.write_trailer()
        .map_err(|e| ff("finishing the replay", e))
}

pub(crate) fn stream_time_base(octx: &format::context::Output, index: usize) -> Result<Rational> {
    octx.stream(index)
        .map(|s| s.time_base())
        .ok_or_else(|| ComposeError::Ffmpeg(format!("output stream {index} vanished")))
}

/// Writes one packet, timestamped in `from` units, to stream `index`.
pub(crate) fn write_packet(
    octx: &mut format::context::Output,
    pkt: &mut Packet,
    index: usize,
    from: Rational,
    to: Rational,
) -> Result<()> {
    pkt.set_stream(index);
    pkt.rescale_ts(from, to);
    pkt.write_interleaved(octx)
        .map_err(|e| ff("writing a packet", e))
}

// --- audio ------------------------------------------------------------------------------------

/// Decodes Opus to interleaved stereo f32 at 48 kHz, whatever the packet's channel count.
struct OpusDecoder {
    dec: decoder::Audio,
    pic: frame::Audio,
}

impl OpusDecoder {
    fn new() -> Result<Self> {
        let found = decoder::find_by_name("opus")
            .or_else(|| decoder::find_by_name("libopus"))
            .ok_or_else(|| ComposeError::Ffmpeg("no Opus decoder in this FFmpeg".into()))?;
        let mut ctx = codec::context::Context::new_with_codec(found);
        // SAFETY: plain field writes on a context we own and have not opened yet.
        unsafe {
            let p = ctx.as_mut_ptr();
            (*p).sample_rate = RATE as i32;
        }
        let dec = ctx
            .decoder()
            .audio()
            .map_err(|e| ff("opening the Opus decoder", e))?;
        Ok(Self {
            dec,
            pic: frame::Audio::empty(),
        })
    }

    /// A damaged packet yields nothing rather than an error: it is a moment of silence.
    fn decode(&mut self, data: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        if self.dec.send_packet(&Packet::copy(data)).is_err() {
            return out;
        }
        while self.dec.receive_frame(&mut self.pic).is_ok() {
            let stereo = to_stereo(&self.pic);
            let rate = i64::from(self.pic.rate());
            if rate > 0 && rate != RATE {
                out.extend(resample_linear(&stereo, rate));
            } else {
                out.extend(stereo);
            }
        }
        out
    }
}

/// Interleaved stereo f32 from a decoded frame (mono is copied to both sides).
fn to_stereo(f: &frame::Audio) -> Vec<f32> {
    let n = f.samples();
    let channels = usize::from(f.channels().max(1));
    let sample = |ch: usize, i: usize| -> f32 {
        let ch = ch.min(channels - 1);
        match f.format() {
            format::Sample::F32(format::sample::Type::Planar) => read_f32(f.data(ch), i),
            format::Sample::F32(format::sample::Type::Packed) => {
                read_f32(f.data(0), i * channels + ch)
            }
            format::Sample::I16(format::sample::Type::Planar) => read_i16(f.data(ch), i),
            format::Sample::I16(format::sample::Type::Packed) => {
                read_i16(f.data(0), i * channels + ch)
            }
            _ => 0.0,
        }
    };
    if f.planes() == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n * 2);
    for i in 0..n {
        out.push(sample(0, i));
        out.push(sample(1, i));
    }
    out
}

fn read_f32(bytes: &[u8], i: usize) -> f32 {
    bytes
        .get(i * 4..i * 4 + 4)
        .map_or(0.0, |b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_i16(bytes: &[u8], i: usize) -> f32 {
    bytes.get(i * 2..i * 2 + 2).map_or(0.0, |b| {
        f32::from(i16::from_ne_bytes([b[0], b[1]])) / 32_768.0
    })
}

/// Opus always decodes at 48 kHz; this only guards against a decoder that does not.
fn resample_linear(stereo: &[f32], rate: i64) -> Vec<f32> {
    let n_in = stereo.len() / 2;
    let n_out = (n_in as i64 * RATE / rate) as usize;
    let mut out = Vec::with_capacity(n_out * 2);
    for j in 0..n_out {
        let x = j as f64 * rate as f64 / RATE as f64;
        let (i, frac) = (x as usize, (x - x.floor()) as f32);
        for ch in 0..2 {
            let a = stereo.get(i * 2 + ch).copied().unwrap_or(0.0);
            let b = stereo.get(i * 2 + 2 + ch).copied().unwrap_or(a);
            out.push(a + (b - a) * frac);
        }
    }
    out
}

/// One audio track being mixed: decoded packets wait in `pending` until the mix reaches them.
struct AudioSource<'a> {
    reader: FrameReader<'a>,
    dec: OpusDecoder,
    pending: Vec<(i64, Vec<f32>)>,
    /// Positions of the last packets read, in arrival order: reading stops once several in a
    /// row lie beyond what is being mixed, so one early packet does not stop the track.
    last_read: VecDeque<i64>,
    /// Recently placed positions, to drop a packet the capture wrote twice.
    placed: VecDeque<i64>,
}

const LOOKAHEAD_PACKETS: usize = 3;
const MAX_PENDING: usize = 512;

impl<'a> AudioSource<'a> {
    fn new(input: &'a TrackInput) -> Result<Self> {
        Ok(Self {
            reader: FrameReader::new(&input.segments),
            dec: OpusDecoder::new()?,
            pending: Vec::new(),
            last_read: VecDeque::new(),
            placed: VecDeque::new(),
        })
    }

    /// Reads and decodes packets until several in a row start at or after `horizon`.
    fn pull(&mut self, span: Span, horizon: i64) -> Result<()> {
        while !(self.last_read.len() == LOOKAHEAD_PACKETS
            && self.last_read.iter().all(|&p| p >= horizon))
        {
            let Some(ReadFrame { frame, .. }) = self.reader.next()? else {
                break;
            };
            let pos = span.samples(frame.pts_us);
            if self.last_read.len() == LOOKAHEAD_PACKETS {
                self.last_read.pop_front();
            }
            self.last_read.push_back(pos);
            let pcm = self.dec.decode(&frame.data);
            if !pcm.is_empty() && !self.placed.contains(&pos) {
                self.placed.push_back(pos);
                if self.placed.len() > 64 {
                    self.placed.pop_front();
                }
                self.pending.push((pos, pcm));
            }
        }
        if self.pending.len() > MAX_PENDING {
            // Only wild timestamps pile up here; the furthest are the least plausible.
            self.pending.sort_by_key(|p| p.0);
            self.pending.truncate(MAX_PENDING);
        }
        Ok(())
    }

    /// Adds every pending packet that starts before `horizon` into `mix`.
    fn place(&mut self, horizon: i64, mix: &mut MixBuffer) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].0 < horizon {
                let (pos, pcm) = self.pending.swap_remove(i);
                mix.add(pos, &pcm);
            } else {
                i += 1;
            }
        }
    }
}

/// Interleaved stereo samples from sample index `base` on; earlier ones are already encoded.
#[derive(Default)]
struct MixBuffer {
    base: i64,
    buf: VecDeque<f32>,
}

impl MixBuffer {
    /// Sums `pcm` in at `pos`; what falls before `base` came too late and is dropped.
    fn add(&mut self, pos: i64, pcm: &[f32]) {
        let skip = (self.base - pos).max(0) as usize;
        if skip * 2 >= pcm.len() {
            return;
        }
        let offset = ((pos - self.base).max(0) * 2) as usize;
        let tail = &pcm[skip * 2..];
        if self.buf.len() < offset + tail.len() {
            self.buf.resize(offset + tail.len(), 0.0);
        }
        for (k, s) in tail.iter().enumerate() {
            self.buf[offset + k] += s;
        }
    }

    /// Takes `n` samples per channel, planar and clipped; missing samples are silence.
    fn take(&mut self, n: usize) -> [Vec<f32>; 2] {
        let mut planes = [Vec::with_capacity(n), Vec::with_capacity(n)];
        for _ in 0..n {
            for plane in &mut planes {
                plane.push(self.buf.pop_front().unwrap_or(0.0).clamp(-1.0, 1.0));
            }
        }
        self.base += n as i64;
        planes
    }
}

/// Mixes every audio track onto the timeline and encodes AAC; silence where nobody is.
struct Mixer<'a> {
    sources: Vec<AudioSource<'a>>,
    mix: MixBuffer,
    enc: encoder::audio::Encoder,
    span: Span,
    index: usize,
    time_base: Rational,
    frame_size: usize,
}

impl<'a> Mixer<'a> {
    fn new(
        tracks: &'a [TrackInput],
        span: Span,
        octx: &mut format::context::Output,
    ) -> Result<Self> {
        let sources = tracks
            .iter()
            .filter(|t| t.meta.kind == Kind::Audio && t.meta.codec == Codec::Opus)
            .map(AudioSource::new)
            .collect::<Result<Vec<_>>>()?;
        let enc = open_aac()?;
        let mut st = octx
            .add_stream(encoder::find(codec::Id::AAC))
            .map_err(|e| ff("adding the audio stream", e))?;
        st.set_parameters(&enc);
        st.set_time_base(Rational(1, RATE as i32));
        let index = st.index();
        let frame_size = (enc.frame_size() as usize).max(1);
        Ok(Self {
            sources,
            mix: MixBuffer::default(),
            enc,
            span,
            index,
            time_base: Rational(1, RATE as i32),
            frame_size,
        })
    }

    fn learn_time_base(&mut self, octx: &format::context::Output) -> Result<()> {
        self.time_base = stream_time_base(octx, self.index)?;
        Ok(())
    }

    /// Encodes the mix up to `t_us`, having read each track [`REORDER_US`] beyond it so that
    /// packets arriving a little late still land in their place.
    fn mix_until(&mut self, t_us: i64, octx: &mut format::context::Output) -> Result<()> {
        let flush_to = self.span.samples(t_us);
        let horizon = flush_to + REORDER_US * RATE / 1_000_000;
        for s in &mut self.sources {
            s.pull(self.span, horizon)?;
            s.place(horizon, &mut self.mix);
        }
        while self.mix.base + self.frame_size as i64 <= flush_to {
            self.encode(self.frame_size, octx)?;
        }
        Ok(())
    }

    fn finish(&mut self, octx: &mut format::context::Output) -> Result<()> {
        for s in &mut self.sources {
            s.pull(self.span, i64::MAX)?;
            s.place(i64::MAX, &mut self.mix);
        }
        let total = self.span.samples(self.span.end);
        while self.mix.base < total {
            let n = ((total - self.mix.base) as usize).min(self.frame_size);
            self.encode(n, octx)?;
        }
        self.enc.send_eof().map_err(|e| ff("flushing AAC", e))?;
        self.drain(octx)
    }

    fn encode(&mut self, n: usize, octx: &mut format::context::Output) -> Result<()> {
        let pts = self.mix.base;
        let planes = self.mix.take(n);
        let mut f = frame::Audio::new(
            format::Sample::F32(format::sample::Type::Planar),
            n,
            ChannelLayout::STEREO,
        );
        f.set_channels(2);
        f.set_rate(RATE as u32);
        f.set_pts(Some(pts));
        for (ch, plane) in planes.iter().enumerate() {
            f.plane_mut::<f32>(ch).copy_from_slice(plane);
        }
        self.enc.send_frame(&f).map_err(|e| ff("encoding AAC", e))?;
        self.drain(octx)
    }

    fn drain(&mut self, octx: &mut format::context::Output) -> Result<()> {
        let mut pkt = Packet::empty();
        while self.enc.receive_packet(&mut pkt).is_ok() {
            write_packet(
                octx,
                &mut pkt,
                self.index,
                Rational(1, RATE as i32),
                self.time_base,
            )?;
        }
        Ok(())
    }
}

fn open_aac() -> Result<encoder::audio::Encoder> {
    let found = encoder::find_by_name("aac")
        .ok_or_else(|| ComposeError::Ffmpeg("no AAC encoder in this FFmpeg".into()))?;
    let mut enc = codec::context::Context::new_with_codec(found)
        .encoder()
        .audio()
        .map_err(|e| ff("the AAC encoder", e))?;
    enc.set_rate(RATE as i32);
    enc.set_channel_layout(ChannelLayout::STEREO);
    enc.set_channels(2);
    enc.set_format(format::Sample::F32(format::sample::Type::Planar));
    enc.set_time_base(Rational(1, RATE as i32));
    enc.set_bit_rate(128_000);
    // MP4 keeps the AAC configuration in the sample description, not in band.
    enc.set_flags(codec::Flags::GLOBAL_HEADER);
    enc.open().map_err(|e| ff("opening AAC", e))
}

// --- video ------------------------------------------------------------------------------------

enum VideoOut<'a> {
    None,
    Copy(Box<CopyVideo<'a>>),
    Transcode(Box<TranscodeVideo<'a>>),
}

impl<'a> VideoOut<'a> {
    fn new(
        tracks: &'a [TrackInput],
        scans: &[Scan],
        span: Span,
        plan: &[Shown],
        mode: Mode,
        octx: &mut format::context::Output,
    ) -> Result<Self> {
        Ok(match mode {
            Mode::None => VideoOut::None,
            Mode::Copy(t) => {
                VideoOut::Copy(Box::new(CopyVideo::new(&tracks[t], &scans[t], span, octx)?))
            }
            Mode::Transcode => {
                VideoOut::Transcode(Box::new(TranscodeVideo::new(tracks, span, plan, octx)?))
            }
        })
    }

    fn learn_time_base(&mut self, octx: &format::context::Output) -> Result<()> {
        match self {
            VideoOut::None => Ok(()),
            VideoOut::Copy(c) => {
                c.time_base = stream_time_base(octx, c.index)?;
                Ok(())
            }
            VideoOut::Transcode(t) => {
                t.time_base = stream_time_base(octx, t.index)?;
                Ok(())
            }
        }
    }

    fn run_until(&mut self, limit_us: i64, octx: &mut format::context::Output) -> Result<()> {
        match self {
            VideoOut::None => Ok(()),
            VideoOut::Copy(c) => c.run_until(limit_us, octx),
            VideoOut::Transcode(t) => t.run_until(limit_us, octx),
        }
    }

    fn finish(&mut self, octx: &mut format::context::Output) -> Result<()> {
        match self {
            VideoOut::None => Ok(()),
            VideoOut::Copy(c) => c.finish(octx),
            VideoOut::Transcode(t) => t.finish(octx),
        }
    }
}

/// Output timestamps in 90 kHz ticks: the first picture at 0, then strictly increasing.
#[derive(Default)]
struct OutClock {
    last: Option<i64>,
}

impl OutClock {
    /// `None` for a picture that would go back in time (a duplicate or reordered frame).
    fn stamp(&mut self, ticks: i64) -> Option<i64> {
        let t = match self.last {
            None => 0,
            Some(l) if ticks <= l => return None,
            Some(_) => ticks,
        };
        self.last = Some(t);
        Some(t)
    }
}

fn video_time_base() -> Rational {
    Rational(1, VIDEO_HZ as i32)
}

/// The single shown H.264 track, remuxed.
struct CopyVideo<'a> {
    reader: FrameReader<'a>,
    span: Span,
    index: usize,
    time_base: Rational,
    clock: OutClock,
    need_key: bool,
    /// Held back one frame so that its duration is known when it is written.
    held: Option<(Vec<u8>, i64, bool)>,
}

impl<'a> CopyVideo<'a> {
    fn new(
        input: &'a TrackInput,
        scan: &Scan,
        span: Span,
        octx: &mut format::context::Output,
    ) -> Result<Self> {
        let (sps, pps) = match (scan.sps.first(), scan.pps.first()) {
            (Some(s), Some(p)) => (s, p),
            _ => return Err(ComposeError::Ffmpeg("H.264 track without SPS/PPS".into())),
        };
        let extradata = avcc_extradata(sps, pps)
            .ok_or_else(|| ComposeError::Ffmpeg("H.264 parameter sets too short".into()))?;
        let first = scan.keyframes.first().copied().unwrap_or(0);
        let (w, h) = probe_size(input, first)?.unwrap_or(FALLBACK_SIZE);
        let mut st = octx
            .add_stream(encoder::find(codec::Id::H264))
            .map_err(|e| ff("adding the video stream", e))?;
        set_h264_parameters(&mut st.parameters(), w, h, &extradata)?;
        st.set_time_base(video_time_base());
        let index = st.index();
        Ok(Self {
            reader: FrameReader::new(&input.segments),
            span,
            index,
            time_base: video_time_base(),
            clock: OutClock::default(),
            need_key: true,
            held: None,
        })
    }

    fn run_until(&mut self, limit_us: i64, octx: &mut format::context::Output) -> Result<()> {
        while self
            .reader
            .peek()?
            .is_some_and(|f| f.frame.pts_us < limit_us)
        {
            let Some(ReadFrame { frame, after_loss }) = self.reader.next()? else {
                break;
            };
            let key = is_keyframe(Codec::H264, &frame.data);
            // After a loss the following frames reference pictures that never arrived.
            self.need_key = (self.need_key || after_loss) && !key;
            if self.need_key {
                continue;
            }
            let sample = annexb_to_avcc(&frame.data);
            let Some(ts) = self.clock.stamp(self.span.ticks(frame.pts_us)) else {
                continue;
            };
            if !sample.is_empty() {
                self.write_held(Some(ts), octx)?;
                self.held = Some((sample, ts, key));
            }
        }
        Ok(())
    }

    fn write_held(&mut self, next: Option<i64>, octx: &mut format::context::Output) -> Result<()> {
        let Some((data, ts, key)) = self.held.take() else {
            return Ok(());
        };
        let mut pkt = Packet::copy(&data);
        pkt.set_pts(Some(ts));
        pkt.set_dts(Some(ts));
        // The last frame gets a typical 30 fps duration.
        pkt.set_duration(next.map_or(VIDEO_HZ / 30, |n| n - ts));
        if key {
            pkt.set_flags(codec::packet::Flags::KEY);
        }
        write_packet(
            octx,
            &mut pkt,
            self.index,
            video_time_base(),
            self.time_base,
        )
    }

    fn finish(&mut self, octx: &mut format::context::Output) -> Result<()> {
        self.write_held(None, octx)
    }
}

pub(crate) fn set_h264_parameters(
    par: &mut codec::Parameters,
    width: u32,
    height: u32,
    extradata: &[u8],
) -> Result<()> {
    let size = extradata.len();
    // SAFETY: the stream's codecpar is valid while the output context lives; extradata is
    // allocated with FFmpeg's allocator (and its padding) because FFmpeg frees it.
    unsafe {
        let p = par.as_mut_ptr();
        let ext = ffmpeg::ffi::av_mallocz(size + ffmpeg::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize)
            as *mut u8;
        if ext.is_null() {
            return Err(ComposeError::Ffmpeg("out of memory for avcC".into()));
        }
        std::ptr::copy_nonoverlapping(extradata.as_ptr(), ext, size);
        (*p).codec_type = ffmpeg::ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
        (*p).codec_id = ffmpeg::ffi::AVCodecID::AV_CODEC_ID_H264;
        (*p).codec_tag = 0;
        (*p).width = width as i32;
        (*p).height = height as i32;
        (*p).format = ffmpeg::ffi::AVPixelFormat::AV_PIX_FMT_YUV420P as i32;
        (*p).extradata = ext;
        (*p).extradata_size = size as i32;
    }
    Ok(())
}

fn open_video_decoder(codec: Codec) -> Result<decoder::Video> {
    let id = match codec {
        Codec::Vp8 => codec::Id::VP8,
        Codec::H264 => codec::Id::H264,
        Codec::Opus => return Err(ComposeError::Ffmpeg("Opus is not video".into())),
    };
    let found =
        decoder::find(id).ok_or_else(|| ComposeError::Ffmpeg(format!("no {id:?} decoder")))?;
    let mut ctx = codec::context::Context::new_with_codec(found);
    // Pictures out as soon as their packet is in: there are no B-frames in WebRTC video.
    ctx.set_flags(codec::Flags::LOW_DELAY);
    ctx.decoder()
        .video()
        .map_err(|e| ff("opening a video decoder", e))
}

/// The size of the first picture decoded from `from_us` on, if any decodes.
pub(crate) fn probe_size(input: &TrackInput, from_us: i64) -> Result<Option<(u32, u32)>> {
    let mut reader = FrameReader::new(&input.segments);
    let mut dec = open_video_decoder(input.meta.codec)?;
    let mut pic = frame::Video::empty();
    let mut tried = 0;
    while let Some(ReadFrame { frame, .. }) = reader.next()? {
        if frame.pts_us < from_us {
            continue;
        }
        let _ = dec.send_packet(&Packet::copy(&frame.data));
        if dec.receive_frame(&mut pic).is_ok() && pic.width() > 0 && pic.height() > 0 {
            return Ok(Some((pic.width(), pic.height())));
        }
        tried += 1;
        if tried > 300 {
            break;
        }
    }
    Ok(None)
}

/// Fits `(w, h)` into [`MAX_SIZE`] keeping its shape, both even (yuv420p needs it).
fn fit_size((w, h): (u32, u32), (max_w, max_h): (u32, u32)) -> (u32, u32) {
    let scale = (f64::from(max_w) / f64::from(w.max(1)))
        .min(f64::from(max_h) / f64::from(h.max(1)))
        .min(1.0);
    let even = |v: f64| ((v.round() as u32) & !1).max(2);
    (even(f64::from(w) * scale), even(f64::from(h) * scale))
}

/// One video track being decoded for the transcode.
struct VideoSource<'a> {
    reader: FrameReader<'a>,
    dec: decoder::Video,
    codec: Codec,
    need_key: bool,
}

impl VideoSource<'_> {
    /// The pictures (with their pts) that `frame` completes; a damaged frame yields none and
    /// the decoder conceals what follows.
    fn decode(&mut self, frame: &Frame) -> Vec<(i64, frame::Video)> {
        let mut pkt = Packet::copy(&frame.data);
        pkt.set_pts(Some(frame.pts_us));
        pkt.set_dts(Some(frame.pts_us));
        let mut out = Vec::new();
        if self.dec.send_packet(&pkt).is_err() {
            return out;
        }
        loop {
            let mut pic = frame::Video::empty();
            if self.dec.receive_frame(&mut pic).is_err() {
                return out;
            }
            out.push((pic.pts().unwrap_or(frame.pts_us), pic));
        }
    }
}

/// Decodes the shown tracks, letterboxes them to one size and encodes H.264.
struct TranscodeVideo<'a> {
    tracks: &'a [TrackInput],
    plan: Vec<Shown>,
    cur: usize,
    sources: HashMap<usize, VideoSource<'a>>,
    enc: encoder::video::Encoder,
    size: (u32, u32),
    scaler: Option<(scaling::Context, (format::Pixel, u32, u32))>,
    span: Span,
    clock: OutClock,
    index: usize,
    time_base: Rational,
}

impl<'a> TranscodeVideo<'a> {
    fn new(
        tracks: &'a [TrackInput],
        span: Span,
        plan: &[Shown],
        octx: &mut format::context::Output,
    ) -> Result<Self> {
        let first = plan.first().ok_or(ComposeError::Empty)?;
        let src = probe_size(&tracks[first.track], first.feed_from_us)?.unwrap_or(FALLBACK_SIZE);
        let size = fit_size(src, MAX_SIZE);
        let enc = open_x264(size)?;
        let mut st = octx
            .add_stream(encoder::find(codec::Id::H264))
            .map_err(|e| ff("adding the video stream", e))?;
        st.set_parameters(&enc);
        st.set_time_base(video_time_base());
        let index = st.index();
        Ok(Self {
            tracks,
            plan: plan.to_vec(),
            cur: 0,
            sources: HashMap::new(),
            enc,
            size,
            scaler: None,
            span,
            clock: OutClock::default(),
            index,
            time_base: video_time_base(),
        })
    }

    fn run_until(&mut self, limit_us: i64, octx: &mut format::context::Output) -> Result<()> {
        while let Some(&shown) = self.plan.get(self.cur) {
            let until = self.plan.get(self.cur + 1).map_or(i64::MAX, |n| n.from_us);
            self.feed(shown, until, until.min(limit_us), octx)?;
            if until > limit_us {
                break;
            }
            self.cur += 1;
        }
        Ok(())
    }

    /// Feeds `shown.track`'s frames before `stop` to its decoder; shows those in its interval.
    fn feed(
        &mut self,
        shown: Shown,
        until: i64,
        stop: i64,
        octx: &mut format::context::Output,
    ) -> Result<()> {
        if !self.sources.contains_key(&shown.track) {
            let input = &self.tracks[shown.track];
            let source = VideoSource {
                reader: FrameReader::new(&input.segments),
                dec: open_video_decoder(input.meta.codec)?,
                codec: input.meta.codec,
                need_key: true,
            };
            self.sources.insert(shown.track, source);
        }
        loop {
            let Some(src) = self.sources.get_mut(&shown.track) else {
                return Ok(());
            };
            if src.reader.peek()?.is_none_or(|f| f.frame.pts_us >= stop) {
                return Ok(());
            }
            let Some(ReadFrame { frame, after_loss }) = src.reader.next()? else {
                return Ok(());
            };
            // Frames before the entry keyframe cannot help: the keyframe resets the decoder.
            if frame.pts_us < shown.feed_from_us {
                continue;
            }
            let key = is_keyframe(src.codec, &frame.data);
            src.need_key = (src.need_key || after_loss) && !key;
            if src.need_key {
                continue;
            }
            for (pts, pic) in src.decode(&frame) {
                if pts >= shown.from_us && pts < until {
                    self.show(&pic, pts, octx)?;
                }
            }
        }
    }

    fn show(
        &mut self,
        pic: &frame::Video,
        pts_us: i64,
        octx: &mut format::context::Output,
    ) -> Result<()> {
        let Some(ts) = self.clock.stamp(self.span.ticks(pts_us)) else {
            return Ok(());
        };
        let mut canvas = self.letterbox(pic)?;
        canvas.set_pts(Some(ts));
        self.enc
            .send_frame(&canvas)
            .map_err(|e| ff("encoding H.264", e))?;
        self.drain_encoder(octx)
    }

    /// The picture scaled to fit the output size, centred on black.
    fn letterbox(&mut self, pic: &frame::Video) -> Result<frame::Video> {
        let (ow, oh) = self.size;
        let (sw, sh) = fit_size((pic.width(), pic.height()), (ow, oh));
        let key = (pic.format(), pic.width(), pic.height());
        if self.scaler.as_ref().is_none_or(|s| s.1 != key) {
            let ctx = scaling::Context::get(
                key.0,
                key.1,
                key.2,
                format::Pixel::YUV420P,
                sw,
                sh,
                scaling::Flags::BILINEAR,
            )
            .map_err(|e| ff("creating a scaler", e))?;
            self.scaler = Some((ctx, key));
        }
        let mut scaled = frame::Video::empty();
        if let Some((ctx, _)) = self.scaler.as_mut() {
            ctx.run(pic, &mut scaled).map_err(|e| ff("scaling", e))?;
        }
        if (sw, sh) == (ow, oh) {
            return Ok(scaled);
        }
        let mut canvas = frame::Video::new(format::Pixel::YUV420P, ow, oh);
        canvas.data_mut(0).fill(16);
        canvas.data_mut(1).fill(128);
        canvas.data_mut(2).fill(128);
        let (x, y) = (((ow - sw) / 2) & !1, ((oh - sh) / 2) & !1);
        for plane in 0..3 {
            let shift = u32::from(plane > 0);
            blit(&scaled, &mut canvas, plane, x >> shift, y >> shift);
        }
        Ok(canvas)
    }

    fn drain_encoder(&mut self, octx: &mut format::context::Output) -> Result<()> {
        let mut pkt = Packet::empty();
        while self.enc.receive_packet(&mut pkt).is_ok() {
            write_packet(
                octx,
                &mut pkt,
                self.index,
                video_time_base(),
                self.time_base,
            )?;
        }
        Ok(())
    }

    fn finish(&mut self, octx: &mut format::context::Output) -> Result<()> {
        self.enc.send_eof().map_err(|e| ff("flushing H.264", e))?;
        self.drain_encoder(octx)
    }
}

/// Copies plane `plane` of `src` into `dst` at (`x`, `y`), clipped to `dst`.
fn blit(src: &frame::Video, dst: &mut frame::Video, plane: usize, x: u32, y: u32) {
    let (sw, sh) = (
        src.plane_width(plane) as usize,
        src.plane_height(plane) as usize,
    );
    let (dw, dh) = (
        dst.plane_width(plane) as usize,
        dst.plane_height(plane) as usize,
    );
    let (x, y) = (x as usize, y as usize);
    let (ss, ds) = (src.stride(plane), dst.stride(plane));
    let w = sw.min(dw.saturating_sub(x));
    let sdata = src.data(plane);
    let ddata = dst.data_mut(plane);
    for row in 0..sh.min(dh.saturating_sub(y)) {
        let s = &sdata[row * ss..row * ss + w];
        let d0 = (y + row) * ds + x;
        ddata[d0..d0 + w].copy_from_slice(s);
    }
}

fn open_x264((w, h): (u32, u32)) -> Result<encoder::video::Encoder> {
    let found = encoder::find_by_name("libx264")
        .ok_or_else(|| ComposeError::Ffmpeg("no libx264 in this FFmpeg".into()))?;
    let mut enc = codec::context::Context::new_with_codec(found)
        .encoder()
        .video()
        .map_err(|e| ff("the H.264 encoder", e))?;
    enc.set_width(w);
    enc.set_height(h);
    enc.set_format(format::Pixel::YUV420P);
    enc.set_time_base(video_time_base());
    // Only a rate-control hint: the timestamps are the sources' own (variable rate).
    enc.set_frame_rate(Some(Rational(30, 1)));
    // A keyframe every few seconds keeps seeking in the browser quick.
    enc.set_gop(120);
    enc.set_flags(codec::Flags::GLOBAL_HEADER);
    let mut opts = Dictionary::new();
    opts.set("preset", "veryfast");
    opts.set("profile", "high");
    opts.set("crf", "23");
    enc.open_with(opts).map_err(|e| ff("opening libx264", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annexb_becomes_length_prefixed() {
        let au = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5, 0,
        ];
        let nals = nal_units(&au);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]
        );
        assert!(is_keyframe(Codec::H264, &au));
        assert_eq!(
            annexb_to_avcc(&au),
            vec![
                0, 0, 0, 3, 0x67, 1, 2, 0, 0, 0, 2, 0x68, 3, 0, 0, 0, 3, 0x65, 4, 5
            ]
        );
        assert!(nal_units(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn avcc_carries_profile_and_sets() {
        let e = avcc_extradata(&[0x67, 0x42, 0xc0, 0x1f, 9], &[0x68, 7]).unwrap();
        assert_eq!(
            e,
            vec![
                1, 0x42, 0xc0, 0x1f, 0xff, 0xe1, 0, 5, 0x67, 0x42, 0xc0, 0x1f, 9, 1, 0, 2, 0x68, 7
            ]
        );
        assert!(avcc_extradata(&[0x67], &[0x68]).is_none());
    }

    #[test]
    fn packets_mix_at_their_own_position_and_clip() {
        let mut m = MixBuffer::default();
        m.add(2, &[0.5, 0.5, 0.5, 0.5]);
        m.add(0, &[0.25; 8]);
        m.add(3, &[0.75, 0.75]);
        let [l, _] = m.take(5);
        assert_eq!(l, vec![0.25, 0.25, 0.75, 1.0, 0.0]);
        // Too late for what was already taken: only the part after `base` counts.
        m.add(4, &[0.5; 4]);
        let [l, _] = m.take(2);
        assert_eq!(l, vec![0.5, 0.0]);
    }

    #[test]
    fn sizes_fit_and_stay_even() {
        assert_eq!(fit_size((1920, 1080), MAX_SIZE), (1280, 720));
        assert_eq!(fit_size((641, 481), MAX_SIZE), (640, 480));
        assert_eq!(fit_size((720, 1280), MAX_SIZE), (404, 720));
    }

    fn video_scan(keyframes: &[i64], breaks: &[i64], live: (i64, i64)) -> Scan {
        Scan {
            first_us: Some(live.0),
            end_us: live.1,
            keyframes: keyframes.to_vec(),
            breaks: breaks.to_vec(),
            live: vec![live],
            ..Scan::default()
        }
    }

    #[test]
    fn a_switch_waits_for_a_decodable_keyframe() {
        let s = video_scan(&[0, 5_000_000, 9_000_000], &[7_000_000], (0, 10_000_000));
        assert_eq!(s.entry_at_or_before(6_000_000), Some(5_000_000));
        assert_eq!(s.entry_at_or_before(8_000_000), None);
        let scans = [video_scan(&[0], &[], (0, 10_000_000)), s];
        let plan = effective_plan(&[(0, 0), (8_000_000, 1)], &scans);
        assert_eq!(
            plan,
            vec![
                Shown {
                    track: 0,
                    from_us: 0,
                    feed_from_us: 0
                },
                Shown {
                    track: 1,
                    from_us: 9_000_000,
                    feed_from_us: 9_000_000
                },
            ]
        );
    }

    fn input(track: &str, who: &str, kind: Kind, source: &str) -> TrackInput {
        TrackInput {
            meta: TrackMeta {
                track: track.into(),
                participant: who.into(),
                kind,
                source: source.into(),
                codec: if kind == Kind::Audio {
                    Codec::Opus
                } else {
                    Codec::Vp8
                },
            },
            segments: Vec::new(),
        }
    }

    fn loud_in(windows: &[i64]) -> Scan {
        Scan {
            first_us: Some(0),
            end_us: 10_000_000,
            energy: windows.iter().map(|&w| (w, 0.1 * 48_000.0)).collect(),
            ..Scan::default()
        }
    }

    #[test]
    fn screens_win_speakers_follow_and_cameras_do_not_flap() {
        let keys: Vec<i64> = (0..10).map(|s| s * 1_000_000).collect();
        let tracks = [
            input("cam-a", "a", Kind::Video, "camera"),
            input("cam-b", "b", Kind::Video, "camera"),
            input("screen", "a", Kind::Video, "screen"),
            input("mic-a", "a", Kind::Audio, "microphone"),
            input("mic-b", "b", Kind::Audio, "microphone"),
        ];
        let scans = [
            video_scan(&keys, &[], (0, 9_990_000)),
            video_scan(&keys, &[], (0, 9_990_000)),
            video_scan(&[4_000_000], &[], (4_000_000, 5_900_000)),
            // `a` speaks up again for one second at 7 s: too soon after the switch at 6 s.
            loud_in(&[0, 1, 2, 7]),
            loud_in(&[3, 4, 5, 6, 8, 9]),
        ];
        let span = Span {
            t0: 0,
            end: 10_000_000,
        };
        assert_eq!(
            desired_schedule(&tracks, &scans, span),
            vec![(0, 0), (3_000_000, 1), (4_000_000, 2), (6_000_000, 1)]
        );
    }
}
