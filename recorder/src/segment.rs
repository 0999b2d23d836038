//! The segment format: what the recorder uploads every [`crate::SEGMENT_SECONDS`] for each track.
//!
//! A segment holds whole depacketised frames (a VP8 frame, an H.264 access unit in Annex-B form,
//! an Opus packet) with their presentation time on the recording's common timeline, so that the
//! replay can be composed from any set of uploaded segments, in any order, after a crash. It is
//! deliberately dumb and self-describing: a magic line, a JSON header, then length-prefixed
//! frames. Parsing never panics on damaged input; a truncated segment yields the frames before
//! the damage.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"DJSEG01\n";
/// A frame larger than this is damage, not media (a 4K keyframe is a few hundred kB).
const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Audio,
    Video,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Opus,
    Vp8,
    H264,
}

/// What a track is, repeated in every segment so that each stands alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackMeta {
    /// The published track's id in the room (unique within a recording).
    pub track: String,
    pub participant: String,
    pub kind: Kind,
    /// `camera`, `microphone`, `screen` or `screen_audio`, as the signaling protocol names them.
    pub source: String,
    pub codec: Codec,
}

/// One frame. `pts_us` counts microseconds from the start of the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub pts_us: i64,
    pub keyframe: bool,
    pub data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    meta: TrackMeta,
    seq: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("not a dangjian segment")]
    NotASegment,
    #[error("damaged segment header: {0}")]
    Header(String),
}

/// A decoded segment: the track, its place in the track's sequence, its frames, and whether
/// the bytes ended early (the frames are those before the damage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub meta: TrackMeta,
    pub seq: u32,
    pub frames: Vec<Frame>,
    pub truncated: bool,
}

pub fn encode(meta: &TrackMeta, seq: u32, frames: &[Frame]) -> Bytes {
    let header = serde_json::to_vec(&Header {
        meta: meta.clone(),
        seq,
    })
    .expect("a header always serialises");
    let body: usize = frames.iter().map(|f| 13 + f.data.len()).sum();
    let mut out = BytesMut::with_capacity(MAGIC.len() + 4 + header.len() + body);
    out.put_slice(MAGIC);
    out.put_u32(header.len() as u32);
    out.put_slice(&header);
    for f in frames {
        out.put_u8(u8::from(f.keyframe));
        out.put_i64(f.pts_us);
        out.put_u32(f.data.len() as u32);
        out.put_slice(&f.data);
    }
    out.freeze()
}

pub fn decode(bytes: &[u8]) -> Result<Segment, SegmentError> {
    let mut b = bytes;
    if b.len() < MAGIC.len() + 4 || &b[..MAGIC.len()] != MAGIC {
        return Err(SegmentError::NotASegment);
    }
    b.advance(MAGIC.len());
    let len = b.get_u32() as usize;
    if b.len() < len {
        return Err(SegmentError::Header("header runs past the end".into()));
    }
    let header: Header =
        serde_json::from_slice(&b[..len]).map_err(|e| SegmentError::Header(e.to_string()))?;
    b.advance(len);
    let mut frames = Vec::new();
    let mut truncated = false;
    while b.has_remaining() {
        if b.len() < 13 {
            truncated = true;
            break;
        }
        let flags = b.get_u8();
        let pts_us = b.get_i64();
        let n = b.get_u32() as usize;
        if n > MAX_FRAME || b.len() < n {
            truncated = true;
            break;
        }
        frames.push(Frame {
            pts_us,
            keyframe: flags & 1 == 1,
            data: Bytes::copy_from_slice(&b[..n]),
        });
        b.advance(n);
    }
    Ok(Segment {
        meta: header.meta,
        seq: header.seq,
        frames,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> TrackMeta {
        TrackMeta {
            track: "TR_1".into(),
            participant: "alice".into(),
            kind: Kind::Video,
            source: "camera".into(),
            codec: Codec::Vp8,
        }
    }

    fn frames() -> Vec<Frame> {
        (0..5)
            .map(|i| Frame {
                pts_us: i * 33_333,
                keyframe: i == 0,
                data: Bytes::from(vec![i as u8; 100 + i as usize]),
            })
            .collect()
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&meta(), 7, &frames());
        let s = decode(&bytes).unwrap();
        assert_eq!(
            (s.meta, s.seq, s.frames, s.truncated),
            (meta(), 7, frames(), false)
        );
    }

    #[test]
    fn a_cut_segment_keeps_the_whole_frames_before_the_cut() {
        let bytes = encode(&meta(), 0, &frames());
        let s = decode(&bytes[..bytes.len() - 50]).unwrap();
        assert!(s.truncated);
        assert_eq!(s.frames, frames()[..4]);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        assert_eq!(decode(b"hello"), Err(SegmentError::NotASegment));
        let mut bytes = encode(&meta(), 0, &frames()).to_vec();
        bytes[14] = b'}';
        assert!(matches!(decode(&bytes), Err(SegmentError::Header(_))));
        for cut in 0..40 {
            let _ = decode(&bytes[..cut]);
        }
    }
}
