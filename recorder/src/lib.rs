//! # recorder — sessions to object storage
//!
//! The recorder is a subscriber like any other participant (Galène's disk writer, not a headless
//! browser): it receives every track of a room through the same interface a browser peer does,
//! writes the tracks in segments with ffmpeg-next and uploads them to the object store the binary
//! hands it. It knows nothing of HTTP or SQL; the catalogue of recordings lives in `portal`.
//!
//! Status: a placeholder until the recording work; the object-store plumbing it will write to is
//! already wired by the binary (`portal::storage`).

/// Longest stretch of media a crash may lose: one segment.
pub const SEGMENT_SECONDS: u64 = 10;
