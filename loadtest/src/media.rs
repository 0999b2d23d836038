//! Synthetic media: VP8 frames and Opus packets that look real to a server (RFC 7741 payload
//! descriptors, keyframe headers, a browser's packet sizes) and carry a trailer the receiving
//! client reads back: when the packet was sent, which layer and frame it belongs to.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub const FRAME_INTERVAL: Duration = Duration::from_micros(33_333);
pub const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// RTP payload bytes per packet at most (a typical browser packetizer's budget).
pub const MAX_PAYLOAD: usize = 1100;
/// Every `KEYFRAME_EVERY`th frame is a keyframe (every 2 s at 30 fps, as encoders do for
/// simulcast).
pub const KEYFRAME_EVERY: u32 = 60;

const VIDEO_MAGIC: u8 = 0xD3;
const AUDIO_MAGIC: u8 = 0xA5;
/// magic, layer, frame (4), sent µs (8), magic.
const VIDEO_TRAILER: usize = 15;
/// magic, sent µs (8), magic.
const AUDIO_TRAILER: usize = 10;

/// One simulcast encoding of the synthetic camera.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Empty for a plain (non-simulcast) track.
    pub rid: &'static str,
    /// Payload bytes per frame: the layer's bitrate is about this × 8 × 30.
    pub frame_bytes: usize,
    /// Payload bytes per keyframe.
    pub key_bytes: usize,
}

/// A 720p camera as Chrome sends it: three layers, 180p ≈ 150 kb/s, 360p ≈ 500 kb/s, 720p ≈
/// 1.7 Mb/s, keyframes four times the size of a delta frame.
pub fn simulcast_720p() -> Vec<LayerSpec> {
    [("q", 625), ("h", 2_100), ("f", 7_000)]
        .into_iter()
        .map(|(rid, frame_bytes)| LayerSpec {
            rid,
            frame_bytes,
            key_bytes: frame_bytes * 4,
        })
        .collect()
}

/// A meeting tile's camera: one 360p encoding (≈ 500 kb/s), no simulcast, so that every server
/// forwards the same stream and a comparison is at equal load.
pub fn single_360p() -> Vec<LayerSpec> {
    vec![LayerSpec {
        rid: "",
        frame_bytes: 2_100,
        key_bytes: 8_400,
    }]
}

/// Microseconds since the process's media clock started: publishers and subscribers live in
/// one process, so a packet's one-way latency is the difference of two readings.
pub fn clock_us(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    now.saturating_duration_since(epoch).as_micros() as u64
}

/// The RTP payloads of one VP8 frame of `bytes` payload bytes in all: a payload descriptor on
/// each (S=1 on the first), the VP8 frame header on the first (with the keyframe start code and
/// a 1280x720 size on keyframes), filler, and the trailer.
pub fn vp8_frame(layer: u8, frame: u32, key: bool, bytes: usize, sent_us: u64) -> Vec<Bytes> {
    vp8_payloads(frame, key, bytes, (1280, 720), |_, _| {
        let mut t = Vec::with_capacity(VIDEO_TRAILER);
        t.push(VIDEO_MAGIC);
        t.push(layer);
        t.extend_from_slice(&frame.to_be_bytes());
        t.extend_from_slice(&sent_us.to_be_bytes());
        t.push(VIDEO_MAGIC);
        t
    })
}

/// The RTP payloads of one VP8 frame of `bytes` payload bytes in all, at most [`MAX_PAYLOAD`]
/// each: an RFC 7741 payload descriptor on each (S=1 on the first), the VP8 frame header on the
/// first (the keyframe start code and `size` on keyframes), filler, and `trailer(index, count)`
/// at the end of each.
pub fn vp8_payloads(
    frame: u32,
    key: bool,
    bytes: usize,
    (width, height): (u16, u16),
    trailer: impl Fn(usize, usize) -> Vec<u8>,
) -> Vec<Bytes> {
    let count = bytes.div_ceil(MAX_PAYLOAD).max(1);
    let per = bytes / count;
    (0..count)
        .map(|idx| {
            let size = if idx + 1 == count {
                bytes - per * (count - 1)
            } else {
                per
            };
            let mut p = Vec::with_capacity(size.max(32));
            if idx == 0 {
                p.push(0x10); // S=1, partition 0
                let first_partition: u32 = 64;
                p.push(u8::from(!key) | 0x10 /* show_frame */ | ((first_partition as u8 & 7) << 5));
                p.push((first_partition >> 3) as u8);
                p.push((first_partition >> 11) as u8);
                if key {
                    p.extend_from_slice(&[0x9d, 0x01, 0x2a]);
                    p.extend_from_slice(&width.to_le_bytes());
                    p.extend_from_slice(&height.to_le_bytes());
                }
            } else {
                p.push(0x00);
            }
            let tail = trailer(idx, count);
            let fill = (frame as u8) ^ (idx as u8);
            while p.len() + tail.len() < size {
                p.push(fill);
            }
            p.extend_from_slice(&tail);
            Bytes::from(p)
        })
        .collect()
}

/// A 20 ms Opus packet (one CELT frame's TOC byte, filler) with the trailer.
pub fn opus_packet(n: u32, sent_us: u64) -> Bytes {
    let mut p = vec![0x78];
    p.resize(70, n as u8);
    p.push(AUDIO_MAGIC);
    p.extend_from_slice(&sent_us.to_be_bytes());
    p.push(AUDIO_MAGIC);
    Bytes::from(p)
}

/// When a packet built here was sent (its trailer), for video and audio alike.
pub fn sent_us(p: &[u8]) -> Option<u64> {
    let stamp = |t: &[u8]| u64::from_be_bytes(t.try_into().ok()?).into();
    if let Some(t) = p.get(p.len().checked_sub(VIDEO_TRAILER)?..)
        && t[0] == VIDEO_MAGIC
        && t[VIDEO_TRAILER - 1] == VIDEO_MAGIC
    {
        return stamp(&t[6..14]);
    }
    let t = p.get(p.len().checked_sub(AUDIO_TRAILER)?..)?;
    (t[0] == AUDIO_MAGIC && t[AUDIO_TRAILER - 1] == AUDIO_MAGIC)
        .then(|| stamp(&t[1..9]))
        .flatten()
}

/// Payload type, sequence number, timestamp and SSRC of an SRTP datagram (those header fields
/// travel in the clear); `None` for STUN, DTLS and RTCP.
pub fn rtp_fields(d: &[u8]) -> Option<(u8, u16, u32, u32)> {
    if d.len() < 12 || d[0] >> 6 != 2 {
        return None;
    }
    let pt = d[1] & 0x7f;
    if (64..=95).contains(&pt) {
        return None;
    }
    Some((
        pt,
        u16::from_be_bytes([d[2], d[3]]),
        u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
        u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
    ))
}

/// (payload type, clock rate, codec name lower-cased) of every `a=rtpmap` line in an SDP.
pub fn rtpmaps(sdp: &str) -> Vec<(u8, u32, String)> {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a=rtpmap:"))
        .filter_map(|l| {
            let (pt, codec) = l.split_once(' ')?;
            let mut parts = codec.split('/');
            let name = parts.next()?.to_ascii_lowercase();
            let rate = parts.next()?.parse().ok()?;
            Some((pt.parse().ok()?, rate, name))
        })
        .collect()
}

/// (kind, mid) of each m-section.
pub fn sdp_mids(sdp: &str) -> Vec<(String, String)> {
    sdp.split("\nm=")
        .skip(1)
        .map(|s| {
            let kind = s.split(' ').next().unwrap_or_default().to_string();
            let mid = s
                .lines()
                .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
                .unwrap_or_default()
                .to_string();
            (kind, mid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_read_back() {
        let frames = vp8_frame(2, 77, true, 7_000, 123_456_789);
        assert_eq!(frames.len(), 7);
        assert!(sfu::forwarder::vp8_keyframe_start(&frames[0]));
        assert!(!sfu::forwarder::vp8_keyframe_start(&frames[1]));
        assert!(frames.iter().all(|f| sent_us(f) == Some(123_456_789)));
        let delta = vp8_frame(0, 78, false, 625, 5);
        assert!(!sfu::forwarder::vp8_keyframe_start(&delta[0]));
        assert_eq!(sent_us(&opus_packet(3, 42)), Some(42));
        assert_eq!(sent_us(b"short"), None);
    }

    #[test]
    fn clear_header_fields() {
        let d = [0x80, 96, 0x12, 0x34, 0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef, 1];
        assert_eq!(rtp_fields(&d), Some((96, 0x1234, 9, 0xdead_beef)));
        let rtcp = [0x80, 200, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(rtp_fields(&rtcp), None);
    }
}
