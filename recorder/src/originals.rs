//! Per-track originals: each recorded track remuxed, without transcoding, into a file a browser
//! plays on its own.
//!
//! | track | file | in it |
//! |---|---|---|
//! | VP8 video | `.webm` | the VP8 frames as captured |
//! | Opus audio | `.webm` (audio only) | the Opus packets as captured |
//! | H.264 video | `.mp4` | the access units, length-prefixed, with an avcC |
//!
//! Timestamps are the segments' own pts minus the first written frame's, so the file starts at
//! 0; [`Original::start_ms`] keeps where that is on the recording's timeline (the same clock as
//! every segment's pts, which starts when the capture starts; the replay's time 0 is the
//! earliest frame of any track). Frames lost with a missing, garbled or cut segment leave a gap
//! in the timestamps: audio simply resumes, video resumes at the next keyframe (frames before it
//! reference pictures that never arrived). A video track starts at its first keyframe.
//!
//! H.264: the avcC carries the first SPS and PPS. The in-band parameter sets of every keyframe
//! are kept in the samples, so when the stream changes them mid-track (a resolution change) the
//! file is written as `avc3` — the MP4 sample entry whose parameter sets may change in band —
//! instead of `avc1`, and nothing is split or dropped.

use std::path::{Path, PathBuf};

use ffmpeg::{Packet, Rational, codec, format};
use ffmpeg_next as ffmpeg;
use serde::{Deserialize, Serialize};

use crate::compose::{
    self, ComposeError, FALLBACK_SIZE, FrameReader, ReadFrame, Result, TrackInput, ff,
};
use crate::segment::{Codec, Kind};

/// One exported track, as a local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    pub track: String,
    pub participant: String,
    pub kind: Kind,
    /// `camera`, `microphone`, `screen` or `screen_audio`.
    pub source: String,
    pub codec: Codec,
    pub file: PathBuf,
    /// Where the file's time 0 lies on the recording's timeline.
    pub start_ms: i64,
    pub duration_ms: i64,
}

/// One exported track in the object store, as [`crate::Replay`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalObject {
    pub track: String,
    pub participant: String,
    pub kind: Kind,
    pub source: String,
    pub key: String,
    pub size: u64,
    pub start_ms: i64,
    pub duration_ms: i64,
}

/// The file extension an original of `codec` gets.
pub fn extension(codec: Codec) -> &'static str {
    match codec {
        Codec::Vp8 | Codec::Opus => "webm",
        Codec::H264 => "mp4",
    }
}

/// The MIME type browsers expect for an original stored under `key` (by its extension).
pub fn content_type(key: &str, kind: Kind) -> &'static str {
    match (key.rsplit_once('.').map(|(_, e)| e), kind) {
        (Some("mp4"), _) => "video/mp4",
        (Some("webm"), Kind::Audio) => "audio/webm",
        (Some("webm"), Kind::Video) => "video/webm",
        (Some("ogg"), _) => "audio/ogg",
        _ => "application/octet-stream",
    }
}

/// Where the original of `track` of recording `id` is stored.
pub fn original_key(id: &str, track: &str, codec: Codec) -> String {
    format!(
        "recordings/{id}/originals/{}.{}",
        file_stem(track),
        extension(codec)
    )
}

/// A track id made safe as one path segment (ids are ASCII in practice; anything else is `_`).
fn file_stem(track: &str) -> String {
    let s: String = track
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "track".into() } else { s }
}

/// Timestamps go in as microseconds.
const US: Rational = Rational(1, 1_000_000);
/// A video frame whose successor is unknown (the last, or the one before a gap) lasts this long.
const LAST_VIDEO_US: i64 = 33_333;
/// Longest plausible video frame interval; beyond it the next frame follows a gap.
const MAX_VIDEO_FRAME_US: i64 = 100_000;

/// Blocking: remuxes one track into `out_dir`. Fails with [`ComposeError::Empty`] when the
/// track has nothing playable (no packet, or no keyframe).
pub fn export(track: &TrackInput, out_dir: &Path) -> std::result::Result<Original, ComposeError> {
    ffmpeg::init().map_err(|e| ff("init", e))?;
    ffmpeg::log::set_level(ffmpeg::log::Level::Error);
    let meta = &track.meta;
    match (meta.kind, meta.codec) {
        (Kind::Video, Codec::Vp8 | Codec::H264) | (Kind::Audio, Codec::Opus) => {}
        (kind, codec) => {
            return Err(ComposeError::Ffmpeg(format!(
                "a {kind:?} track in {codec:?} cannot be exported"
            )));
        }
    }
    let file = out_dir.join(format!(
        "{}.{}",
        file_stem(&meta.track),
        extension(meta.codec)
    ));
    let written = match meta.codec {
        Codec::Opus => write_audio(track, &file),
        Codec::Vp8 | Codec::H264 => write_video(track, &file),
    };
    match written {
        Ok((start_us, end_us)) => Ok(Original {
            track: meta.track.clone(),
            participant: meta.participant.clone(),
            kind: meta.kind,
            source: meta.source.clone(),
            codec: meta.codec,
            file,
            start_ms: start_us / 1000,
            duration_ms: (end_us - start_us) / 1000,
        }),
        Err(e) => {
            // A half-written file must not be mistaken for one.
            let _ = std::fs::remove_file(&file);
            Err(e)
        }
    }
}

/// Writes packets on one stream, strictly increasing in the stream's time base, each held
/// back until the next tells its duration.
struct Writer {
    octx: format::context::Output,
    index: usize,
    time_base: Rational,
    /// First written packet's pts (µs): the file's time 0.
    t0: Option<i64>,
    last_ts: Option<i64>,
    held: Option<Held>,
    end_us: i64,
}

struct Held {
    data: Vec<u8>,
    pts_us: i64,
    key: bool,
    /// What it lasts when no successor tells.
    default_dur_us: i64,
    max_dur_us: i64,
}

impl Writer {
    fn start(mut octx: format::context::Output, index: usize, mp4: bool) -> Result<Self> {
        let mut opts = ffmpeg::Dictionary::new();
        if mp4 {
            // The index up front: a browser plays the download while it arrives.
            opts.set("movflags", "+faststart");
        }
        octx.write_header_with(opts)
            .map_err(|e| ff("writing the header", e))?;
        let time_base = compose::stream_time_base(&octx, index)?;
        Ok(Self {
            octx,
            index,
            time_base,
            t0: None,
            last_ts: None,
            held: None,
            end_us: 0,
        })
    }

    fn ts(&self, pts_us: i64) -> i64 {
        (pts_us - self.t0.unwrap_or(pts_us)).rescale(US, self.time_base)
    }

    /// Queues a packet; one that does not move time forward is dropped (a duplicate).
    fn push(&mut self, held: Held) -> Result<()> {
        let t0 = *self.t0.get_or_insert(held.pts_us);
        if held.pts_us < t0 {
            return Ok(());
        }
        let ts = self.ts(held.pts_us);
        if self.last_ts.is_some_and(|l| ts <= l) {
            return Ok(());
        }
        self.last_ts = Some(ts);
        self.flush_held(Some(held.pts_us))?;
        self.held = Some(held);
        Ok(())
    }

    fn flush_held(&mut self, next_us: Option<i64>) -> Result<()> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let dur_us = next_us.map_or(h.default_dur_us, |n| n - h.pts_us);
        let dur_us = if dur_us > h.max_dur_us {
            h.default_dur_us
        } else {
            dur_us
        };
        let ts = self.ts(h.pts_us);
        let mut pkt = Packet::copy(&h.data);
        pkt.set_pts(Some(ts));
        pkt.set_dts(Some(ts));
        pkt.set_duration(dur_us.rescale(US, self.time_base).max(1));
        if h.key {
            pkt.set_flags(codec::packet::Flags::KEY);
        }
        pkt.set_stream(self.index);
        pkt.write_interleaved(&mut self.octx)
            .map_err(|e| ff("writing a packet", e))?;
        self.end_us = self.end_us.max(h.pts_us + dur_us);
        Ok(())
    }

    /// Finishes the file; the span written, in µs on the recording's timeline.
    fn finish(mut self) -> Result<(i64, i64)> {
        self.flush_held(None)?;
        let t0 = self.t0.ok_or(ComposeError::Empty)?;
        self.octx
            .write_trailer()
            .map_err(|e| ff("finishing the file", e))?;
        Ok((t0, self.end_us))
    }
}

trait Rescale {
    fn rescale(self, from: Rational, to: Rational) -> i64;
}

impl Rescale for i64 {
    fn rescale(self, from: Rational, to: Rational) -> i64 {
        // SAFETY: a pure arithmetic function.
        unsafe { ffmpeg::ffi::av_rescale_q(self, from.into(), to.into()) }
    }
}

// --- video ------------------------------------------------------------------------------------

fn write_video(track: &TrackInput, file: &Path) -> Result<(i64, i64)> {
    let codec = track.meta.codec;
    let scan = compose::scan_track(track)?;
    let first_key = *scan.keyframes.first().ok_or(ComposeError::Empty)?;
    let (w, h) = compose::probe_size(track, first_key)?.unwrap_or(FALLBACK_SIZE);
    let container = if codec == Codec::H264 { "mp4" } else { "webm" };
    let mut octx =
        format::output_as(&file, container).map_err(|e| ff("creating the original", e))?;
    let index = {
        let mut st = octx
            .add_stream(ffmpeg::encoder::find(codec::Id::None))
            .map_err(|e| ff("adding the video stream", e))?;
        match codec {
            Codec::H264 => {
                let (sps, pps) = match (scan.sps.first(), scan.pps.first()) {
                    (Some(s), Some(p)) => (s, p),
                    _ => return Err(ComposeError::Ffmpeg("H.264 track without SPS/PPS".into())),
                };
                let avcc = compose::avcc_extradata(sps, pps)
                    .ok_or_else(|| ComposeError::Ffmpeg("H.264 parameter sets too short".into()))?;
                compose::set_h264_parameters(&mut st.parameters(), w, h, &avcc)?;
                if scan.sps.len() > 1 || scan.pps.len() > 1 {
                    tracing::info!(track = %track.meta.track, "H.264 parameter sets change mid-track: writing avc3");
                    set_codec_tag(&mut st.parameters(), *b"avc3");
                }
                st.set_time_base(Rational(1, 90_000));
            }
            _ => {
                set_vp8_parameters(&mut st.parameters(), w, h);
                st.set_time_base(Rational(1, 1000));
            }
        }
        st.index()
    };
    let mut out = Writer::start(octx, index, codec == Codec::H264)?;
    let mut reader = FrameReader::new(&track.segments);
    let mut need_key = true;
    while let Some(ReadFrame { frame, after_loss }) = reader.next()? {
        let key = compose::is_keyframe(codec, &frame.data);
        // After a loss the following frames reference pictures that never arrived.
        need_key = (need_key || after_loss) && !key;
        if need_key {
            continue;
        }
        let data = match codec {
            Codec::H264 => compose::annexb_to_avcc(&frame.data),
            _ => frame.data.to_vec(),
        };
        if data.is_empty() {
            continue;
        }
        if after_loss {
            // The frame before the gap lasts a frame, not the whole gap.
            out.flush_held(None)?;
        }
        out.push(Held {
            data,
            pts_us: frame.pts_us,
            key,
            default_dur_us: LAST_VIDEO_US,
            max_dur_us: MAX_VIDEO_FRAME_US,
        })?;
    }
    out.finish()
}

fn set_codec_tag(par: &mut codec::Parameters, tag: [u8; 4]) {
    // SAFETY: a plain field of the stream's codecpar, valid while the output context lives.
    unsafe {
        (*par.as_mut_ptr()).codec_tag = u32::from_le_bytes(tag);
    }
}

fn set_vp8_parameters(par: &mut codec::Parameters, width: u32, height: u32) {
    // SAFETY: plain field writes on the stream's codecpar, valid while the output context lives.
    unsafe {
        let p = par.as_mut_ptr();
        (*p).codec_type = ffmpeg::ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
        (*p).codec_id = ffmpeg::ffi::AVCodecID::AV_CODEC_ID_VP8;
        (*p).codec_tag = 0;
        (*p).width = width as i32;
        (*p).height = height as i32;
        (*p).format = ffmpeg::ffi::AVPixelFormat::AV_PIX_FMT_YUV420P as i32;
    }
}

// --- audio ------------------------------------------------------------------------------------

/// WebRTC negotiates `opus/48000/2`; a decoder set up for two channels plays mono packets too.
const OPUS_CHANNELS: u8 = 2;
/// A packet longer than this is not Opus (120 ms is the most one holds).
const MAX_OPUS_US: i64 = 120_000;

fn write_audio(track: &TrackInput, file: &Path) -> Result<(i64, i64)> {
    let mut octx = format::output_as(&file, "webm").map_err(|e| ff("creating the original", e))?;
    let index = {
        let mut st = octx
            .add_stream(ffmpeg::encoder::find(codec::Id::None))
            .map_err(|e| ff("adding the audio stream", e))?;
        set_opus_parameters(&mut st.parameters())?;
        st.set_time_base(Rational(1, 1000));
        st.index()
    };
    let mut out = Writer::start(octx, index, false)?;
    let mut reader = FrameReader::new(&track.segments);
    while let Some(ReadFrame { frame, .. }) = reader.next()? {
        let Some(dur) = opus_packet_us(&frame.data) else {
            continue; // Not an Opus packet: damage.
        };
        out.push(Held {
            data: frame.data.to_vec(),
            pts_us: frame.pts_us,
            key: true,
            default_dur_us: dur,
            max_dur_us: dur,
        })?;
    }
    out.finish()
}

/// The duration of an Opus packet from its TOC byte (RFC 6716, section 3.1).
fn opus_packet_us(data: &[u8]) -> Option<i64> {
    let toc = *data.first()?;
    let config = toc >> 3;
    let frame_us: i64 = match config {
        0..=11 => [10_000, 20_000, 40_000, 60_000][usize::from(config % 4)],
        12..=15 => [10_000, 20_000][usize::from(config % 2)],
        _ => [2_500, 5_000, 10_000, 20_000][usize::from(config % 4)],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => i64::from(*data.get(1)? & 0x3f),
    };
    let us = frame_us * frames;
    (us > 0 && us <= MAX_OPUS_US).then_some(us)
}

/// The `OpusHead` that WebM's CodecPrivate carries (RFC 7845, section 5.1): no pre-skip, so
/// nothing captured is trimmed; mapping family 0.
fn opus_head(channels: u8) -> Vec<u8> {
    let mut h = b"OpusHead".to_vec();
    h.push(1);
    h.push(channels);
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&48_000u32.to_le_bytes());
    h.extend_from_slice(&0i16.to_le_bytes());
    h.push(0);
    h
}

fn set_opus_parameters(par: &mut codec::Parameters) -> Result<()> {
    let head = opus_head(OPUS_CHANNELS);
    // SAFETY: the stream's codecpar is valid while the output context lives; extradata is
    // allocated with FFmpeg's allocator (and its padding) because FFmpeg frees it.
    unsafe {
        let p = par.as_mut_ptr();
        let ext = ffmpeg::ffi::av_mallocz(
            head.len() + ffmpeg::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize,
        ) as *mut u8;
        if ext.is_null() {
            return Err(ComposeError::Ffmpeg("out of memory for OpusHead".into()));
        }
        std::ptr::copy_nonoverlapping(head.as_ptr(), ext, head.len());
        (*p).codec_type = ffmpeg::ffi::AVMediaType::AVMEDIA_TYPE_AUDIO;
        (*p).codec_id = ffmpeg::ffi::AVCodecID::AV_CODEC_ID_OPUS;
        (*p).codec_tag = 0;
        (*p).sample_rate = 48_000;
        ffmpeg::ffi::av_channel_layout_default(&mut (*p).ch_layout, i32::from(OPUS_CHANNELS));
        (*p).extradata = ext;
        (*p).extradata_size = head.len() as i32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_durations_come_from_the_toc() {
        // CELT 20 ms, one frame; SILK 60 ms, two frames; CELT 2.5 ms, code 3 with 4 frames.
        assert_eq!(opus_packet_us(&[31 << 3, 0]), Some(20_000));
        assert_eq!(opus_packet_us(&[(3 << 3) | 1, 0]), Some(120_000));
        assert_eq!(opus_packet_us(&[(16 << 3) | 3, 4]), Some(10_000));
        assert_eq!(opus_packet_us(&[(3 << 3) | 3, 3]), None);
        assert_eq!(opus_packet_us(&[]), None);
    }

    #[test]
    fn keys_and_types_follow_the_codec() {
        assert_eq!(
            original_key("r1", "TR_a/b", Codec::H264),
            "recordings/r1/originals/TR_a_b.mp4"
        );
        assert_eq!(content_type("x/TR.webm", Kind::Audio), "audio/webm");
        assert_eq!(content_type("x/TR.webm", Kind::Video), "video/webm");
        assert_eq!(content_type("x/TR.mp4", Kind::Video), "video/mp4");
        assert_eq!(opus_head(2).len(), 19);
    }
}
