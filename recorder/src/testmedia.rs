//! Synthetic media for tests: encoded clips in the shape the capture client writes them (whole
//! VP8 frames, Annex-B H.264 access units, 20 ms Opus packets) and an analyser that decodes a
//! composed replay to find its flashes and beeps. Test-only helpers: they panic on failure.

use std::f64::consts::PI;
use std::path::Path;

use bytes::Bytes;
use ffmpeg::{ChannelLayout, Dictionary, Packet, Rational, codec, decoder, encoder, format, frame};
use ffmpeg_next as ffmpeg;

use crate::segment::{Codec, Frame};

/// Luma of the ordinary frames of [`vp8_clip`] and [`h264_clip`].
pub const DARK_LUMA: u8 = 40;
/// Luma of a flash frame.
pub const FLASH_LUMA: u8 = 235;
/// Mean luma above which [`analyse`] calls a frame a flash.
pub const FLASH_THRESHOLD: f64 = 180.0;
/// Audio RMS (full scale 1.0) above which [`analyse`] calls a 5 ms block loud.
pub const BEEP_THRESHOLD: f64 = 0.1;
/// Length of one beep.
pub const BEEP_MS: i64 = 100;

/// What a decoded replay holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Analysis {
    pub audio_streams: usize,
    pub video_streams: usize,
    pub duration_ms: i64,
    pub video_codec: String,
    pub audio_codec: String,
    /// Times where the mean luma jumps above [`FLASH_THRESHOLD`].
    pub flashes_ms: Vec<i64>,
    /// Onsets where the audio RMS jumps above [`BEEP_THRESHOLD`].
    pub beeps_ms: Vec<i64>,
    /// Every decoded video frame: (time ms, mean luma).
    pub luma: Vec<(i64, f64)>,
}

/// Dark grey VP8 frames, white at `flash_at_ms`, a keyframe every second.
pub fn vp8_clip(
    seconds: f64,
    fps: u32,
    width: u32,
    height: u32,
    flash_at_ms: &[i64],
) -> Vec<Frame> {
    video_clip(
        Codec::Vp8,
        seconds,
        fps,
        width,
        height,
        DARK_LUMA,
        flash_at_ms,
    )
}

/// Like [`vp8_clip`] in constrained-baseline H.264, Annex-B with in-band SPS/PPS.
pub fn h264_clip(
    seconds: f64,
    fps: u32,
    width: u32,
    height: u32,
    flash_at_ms: &[i64],
) -> Vec<Frame> {
    video_clip(
        Codec::H264,
        seconds,
        fps,
        width,
        height,
        DARK_LUMA,
        flash_at_ms,
    )
}

/// A clip of constant `luma` (white at `flash_at_ms`) in `codec` (VP8 or H.264).
pub fn video_clip(
    codec: Codec,
    seconds: f64,
    fps: u32,
    width: u32,
    height: u32,
    luma: u8,
    flash_at_ms: &[i64],
) -> Vec<Frame> {
    ffmpeg::init().expect("ffmpeg init");
    let fps = fps.max(1);
    let mut enc = open_video_encoder(codec, fps, width, height);
    let count = (seconds * f64::from(fps)).round() as i64;
    let mut out = Vec::new();
    for i in 0..count {
        let flash = flash_at_ms
            .iter()
            .any(|t| t * i64::from(fps) / 1000 == i && *t >= 0);
        let mut pic = flat_picture(width, height, if flash { FLASH_LUMA } else { luma });
        pic.set_pts(Some(i));
        if i % i64::from(fps) == 0 {
            // Force the one-per-second keyframe the brief promises.
            pic.set_kind(ffmpeg::picture::Type::I);
        }
        enc.send_frame(&pic).expect("encode video");
        drain_video(&mut enc, fps, &mut out);
    }
    enc.send_eof().expect("flush video");
    drain_video(&mut enc, fps, &mut out);
    out
}

fn open_video_encoder(codec: Codec, fps: u32, width: u32, height: u32) -> encoder::video::Encoder {
    let (name, opts): (&str, &[(&str, &str)]) = match codec {
        Codec::Vp8 => (
            "libvpx",
            &[
                ("deadline", "realtime"),
                ("cpu-used", "8"),
                ("lag-in-frames", "0"),
            ],
        ),
        Codec::H264 => (
            "libx264",
            &[
                ("preset", "veryfast"),
                ("tune", "zerolatency"),
                ("profile", "baseline"),
                ("forced-idr", "1"),
                ("x264-params", "scenecut=0"),
            ],
        ),
        Codec::Opus => panic!("not a video codec"),
    };
    let found = encoder::find_by_name(name).expect("video encoder present");
    let mut enc = codec::context::Context::new_with_codec(found)
        .encoder()
        .video()
        .expect("video encoder context");
    enc.set_width(width);
    enc.set_height(height);
    enc.set_format(format::Pixel::YUV420P);
    enc.set_time_base(Rational(1, fps as i32));
    enc.set_frame_rate(Some(Rational(fps as i32, 1)));
    enc.set_gop(fps);
    enc.set_max_b_frames(0);
    enc.set_bit_rate(600_000);
    let mut dict = Dictionary::new();
    for (k, v) in opts {
        dict.set(k, v);
    }
    enc.open_with(dict).expect("open video encoder")
}

fn flat_picture(width: u32, height: u32, luma: u8) -> frame::Video {
    let mut pic = frame::Video::new(format::Pixel::YUV420P, width, height);
    pic.data_mut(0).fill(luma);
    pic.data_mut(1).fill(128);
    pic.data_mut(2).fill(128);
    pic
}

fn drain_video(enc: &mut encoder::video::Encoder, fps: u32, out: &mut Vec<Frame>) {
    let mut pkt = Packet::empty();
    while enc.receive_packet(&mut pkt).is_ok() {
        let pts = pkt.pts().unwrap_or(0);
        out.push(Frame {
            pts_us: pts * 1_000_000 / i64::from(fps),
            keyframe: pkt.is_key(),
            data: Bytes::copy_from_slice(pkt.data().unwrap_or(&[])),
        });
    }
}

/// 48 kHz mono Opus in 20 ms packets: silence, with a 100 ms 1 kHz tone from each `beep_at_ms`.
pub fn opus_clip(seconds: f64, beep_at_ms: &[i64]) -> Vec<Frame> {
    ffmpeg::init().expect("ffmpeg init");
    let mut enc = open_opus_encoder();
    let packets = (seconds * 50.0).round() as usize;
    let mut out = Vec::new();
    for p in 0..packets {
        let mut f = frame::Audio::new(
            format::Sample::F32(format::sample::Type::Packed),
            960,
            ChannelLayout::MONO,
        );
        f.set_channels(1);
        f.set_rate(48_000);
        f.set_pts(Some(p as i64 * 960));
        let start = p as i64 * 960;
        for (i, s) in f.plane_mut::<f32>(0).iter_mut().enumerate() {
            *s = tone_sample(start + i as i64, beep_at_ms);
        }
        enc.send_frame(&f).expect("encode opus");
        drain_opus(&mut enc, &mut out);
    }
    enc.send_eof().expect("flush opus");
    drain_opus(&mut enc, &mut out);
    // Number the packets ourselves: 20 ms each from 0, as RTP timestamps would.
    out.truncate(packets);
    for (i, f) in out.iter_mut().enumerate() {
        f.pts_us = i as i64 * 20_000;
    }
    out
}

fn tone_sample(n: i64, beep_at_ms: &[i64]) -> f32 {
    let loud = beep_at_ms
        .iter()
        .any(|t| n >= t * 48 && n < (t + BEEP_MS) * 48);
    if loud {
        (0.5 * (2.0 * PI * 1000.0 * n as f64 / 48_000.0).sin()) as f32
    } else {
        0.0
    }
}

fn open_opus_encoder() -> encoder::audio::Encoder {
    let found = encoder::find_by_name("libopus").expect("libopus present");
    let mut enc = codec::context::Context::new_with_codec(found)
        .encoder()
        .audio()
        .expect("opus encoder context");
    enc.set_rate(48_000);
    enc.set_channel_layout(ChannelLayout::MONO);
    enc.set_channels(1);
    enc.set_format(format::Sample::F32(format::sample::Type::Packed));
    enc.set_time_base(Rational(1, 48_000));
    enc.set_bit_rate(64_000);
    let mut dict = Dictionary::new();
    dict.set("frame_duration", "20");
    dict.set("application", "audio");
    enc.open_with(dict).expect("open libopus")
}

fn drain_opus(enc: &mut encoder::audio::Encoder, out: &mut Vec<Frame>) {
    let mut pkt = Packet::empty();
    while enc.receive_packet(&mut pkt).is_ok() {
        out.push(Frame {
            pts_us: 0,
            keyframe: true,
            data: Bytes::copy_from_slice(pkt.data().unwrap_or(&[])),
        });
    }
}

/// Decodes `path` (with ffmpeg-next) and reports its streams, flashes and beeps.
pub fn analyse(path: &Path) -> Analysis {
    ffmpeg::init().expect("ffmpeg init");
    let mut ictx = format::input(&path).expect("open replay");
    let mut a = Analysis {
        duration_ms: ictx.duration() / 1000,
        ..Analysis::default()
    };
    let mut video: Option<(usize, decoder::Video, Rational)> = None;
    let mut audio: Option<(usize, decoder::Audio, Rational)> = None;
    for st in ictx.streams() {
        let par = st.parameters();
        let name = par.id().name().to_string();
        let ctx = codec::context::Context::from_parameters(par).expect("stream parameters");
        match ctx.medium() {
            ffmpeg::media::Type::Video => {
                a.video_streams += 1;
                a.video_codec = name;
                let dec = ctx.decoder().video().expect("video decoder");
                video.get_or_insert((st.index(), dec, st.time_base()));
            }
            ffmpeg::media::Type::Audio => {
                a.audio_streams += 1;
                a.audio_codec = name;
                let dec = ctx.decoder().audio().expect("audio decoder");
                audio.get_or_insert((st.index(), dec, st.time_base()));
            }
            _ => {}
        }
    }
    let mut beeps = BeepDetector::default();
    for (st, pkt) in ictx.packets() {
        if let Some((idx, dec, tb)) = video.as_mut().filter(|v| v.0 == st.index()) {
            let _ = idx;
            let _ = dec.send_packet(&pkt);
            take_pictures(dec, *tb, &mut a);
        } else if let Some((_, dec, tb)) = audio.as_mut().filter(|v| v.0 == st.index()) {
            let _ = dec.send_packet(&pkt);
            take_sound(dec, *tb, &mut beeps);
        }
    }
    if let Some((_, dec, tb)) = video.as_mut() {
        let _ = dec.send_eof();
        take_pictures(dec, *tb, &mut a);
    }
    if let Some((_, dec, tb)) = audio.as_mut() {
        let _ = dec.send_eof();
        take_sound(dec, *tb, &mut beeps);
    }
    a.luma.sort_by_key(|l| l.0);
    a.flashes_ms = rising_edges(&a.luma, FLASH_THRESHOLD);
    a.beeps_ms = beeps.onsets;
    a
}

fn to_ms(ts: i64, tb: Rational) -> i64 {
    ts * 1000 * i64::from(tb.numerator()) / i64::from(tb.denominator()).max(1)
}

fn take_pictures(dec: &mut decoder::Video, tb: Rational, a: &mut Analysis) {
    let mut pic = frame::Video::empty();
    while dec.receive_frame(&mut pic).is_ok() {
        let t = to_ms(pic.timestamp().unwrap_or(0), tb);
        let (w, h) = (pic.width() as usize, pic.height() as usize);
        let stride = pic.stride(0);
        let data = pic.data(0);
        let mut sum = 0u64;
        for row in 0..h {
            sum += data[row * stride..row * stride + w]
                .iter()
                .map(|&v| u64::from(v))
                .sum::<u64>();
        }
        a.luma.push((t, sum as f64 / (w * h).max(1) as f64));
    }
}

fn rising_edges(series: &[(i64, f64)], threshold: f64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut above = false;
    for &(t, v) in series {
        if v > threshold && !above {
            out.push(t);
        }
        above = v > threshold;
    }
    out
}

/// Finds beep onsets from 5 ms RMS blocks, with hysteresis so one beep is one onset.
#[derive(Default)]
struct BeepDetector {
    onsets: Vec<i64>,
    loud: bool,
    quiet_blocks: u32,
}

impl BeepDetector {
    fn block(&mut self, t_ms: i64, rms: f64) {
        if rms > BEEP_THRESHOLD {
            if !self.loud {
                self.onsets.push(t_ms);
            }
            self.loud = true;
            self.quiet_blocks = 0;
        } else if rms < BEEP_THRESHOLD / 2.0 {
            // A beep ends after 30 ms of quiet, so dips inside one tone do not split it.
            self.quiet_blocks += 1;
            if self.quiet_blocks >= 6 {
                self.loud = false;
            }
        }
    }
}

fn take_sound(dec: &mut decoder::Audio, tb: Rational, beeps: &mut BeepDetector) {
    let mut f = frame::Audio::empty();
    while dec.receive_frame(&mut f).is_ok() {
        let rate = i64::from(f.rate().max(1));
        let start = f.timestamp().unwrap_or(0) * i64::from(tb.numerator()) * rate
            / i64::from(tb.denominator()).max(1);
        let samples = first_channel(&f);
        for (b, block) in samples.chunks(240).enumerate() {
            let ms = block.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / block.len() as f64;
            let n = start + (b * 240) as i64;
            beeps.block(n * 1000 / rate, ms.sqrt());
        }
    }
}

/// The first channel as f32, whatever the decoder's sample format.
fn first_channel(f: &frame::Audio) -> Vec<f32> {
    let n = f.samples();
    let ch = usize::from(f.channels().max(1));
    let raw = f.data(0);
    match f.format() {
        format::Sample::F32(t) => {
            let step = if t == format::sample::Type::Packed {
                ch
            } else {
                1
            };
            (0..n)
                .filter_map(|i| raw.get(i * step * 4..i * step * 4 + 4))
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        format::Sample::I16(t) => {
            let step = if t == format::sample::Type::Packed {
                ch
            } else {
                1
            };
            (0..n)
                .filter_map(|i| raw.get(i * step * 2..i * step * 2 + 2))
                .map(|b| f32::from(i16::from_ne_bytes([b[0], b[1]])) / 32768.0)
                .collect()
        }
        _ => Vec::new(),
    }
}
