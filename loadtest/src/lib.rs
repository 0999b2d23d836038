//! # loadtest — the load tool (`dangjian-load`)
//!
//! Light WebRTC clients (webrtc-rs `rtc` peer connections, each on its own UDP socket, hundreds
//! of them on a few threads) publish synthetic simulcast VP8 and Opus and subscribe to it, through
//! a [`target::Target`]: dangjian over its `/rtc` WebSocket, or Janus's VideoRoom over its HTTP
//! API. The scenario runner adds subscribers in steps, reads the server's CPU time from `/proc`,
//! and reports packets, loss, jitter, NACKs, frame rate and join time per step, as a table, JSON
//! and an SVG plot. `compare` runs the same scenario against both servers, each in turn inside a
//! network namespace of its own making (Janus will not use loopback for ICE).

pub mod client;
pub mod compare;
pub mod cpu;
pub mod dangjian;
pub mod endpoint;
pub mod janus;
pub mod media;
pub mod netns;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod target;
