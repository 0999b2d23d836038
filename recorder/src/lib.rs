//! # recorder — sessions to object storage
//!
//! The recorder is a subscriber like any other participant (LiveKit's egress and Galène's disk
//! writer, not a headless browser): [`capture`] joins the room over the server's own `/rtc`
//! WebSocket with a hidden, subscribe-only token, receives every track through the same WebRTC
//! path a browser does, depacketises the frames and cuts them into [`segment`]s every
//! [`SEGMENT_SECONDS`]. [`spool`] writes each segment to local disk first and uploads it to the
//! object store with backoff, so a crash loses at most the segment being filled and an S3 outage
//! loses nothing. When the recording ends, [`compose`] (ffmpeg-next) turns the uploaded segments
//! into one replay: every speaker's audio mixed, the active speaker's or the screen share's video.
//!
//! It knows nothing of HTTP or SQL: the catalogue of recordings lives in `portal`, which drives
//! the [`Recorder`] handle and is told through [`RecorderEvent`]s when a capture ends on its own.

pub mod capture;
pub mod compose;
pub mod originals;
pub mod segment;
pub mod spool;
#[doc(hidden)]
pub mod testmedia;

pub use service::{Recorder, RecorderConfig, RecorderError, RecorderEvent, Replay};

mod service;

/// Longest stretch of media a crash may lose: one segment.
pub const SEGMENT_SECONDS: u64 = 10;

/// Every object of recording `id` lives under this prefix.
pub fn prefix(id: &str) -> String {
    format!("recordings/{id}/")
}

/// Where a track's segment `seq` is stored.
pub fn segment_key(id: &str, track: &str, seq: u32) -> String {
    format!("recordings/{id}/tracks/{track}/{seq:06}.seg")
}

/// Where the composed replay is stored.
pub fn replay_key(id: &str) -> String {
    format!("recordings/{id}/replay.mp4")
}
