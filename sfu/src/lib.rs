//! # sfu — the media core
//!
//! Owns everything that touches media packets: routers (rooms), transports (peers), producers and
//! consumers, forwarding, simulcast layer selection, NACK/PLI and bandwidth estimation. The core is
//! sans-IO: plain state machines that take packets and an `Instant` and return what to send. A thin
//! driver owns the shared UDP socket and the timers.
//!
//! It must not know about HTTP, SQL, users or organisations: `signaling` drives it through a handle.
//!
//! Main types: [`core::Sfu`] (the sans-IO state machine: peers, producers, consumers, routers),
//! [`driver::SfuHandle`] (what signaling holds: commands in, [`core::SfuEvent`]s out), and
//! [`engine`] (how a server-side `rtc` peer connection is built), and [`fastpath`] (the send side
//! the core runs itself: forwarded media is protected with the subscriber connection's own SRTP
//! key, numbered for TWCC, kept for RTX and reported in sender reports, instead of walking `rtc`'s
//! send pipeline), and [`inbound`] (the receive side it runs too: publishers' media opened with the
//! connection's remote key, replays refused, NACKs, transport-wide feedback and receiver reports).
//! Datagrams reach a peer by the ICE ufrag of their first STUN check, then by source address.

pub mod core;
pub mod driver;
pub mod engine;
pub mod fastpath;
pub mod forwarder;
pub mod inbound;

use std::fmt;

/// A room as the media core sees it: a set of peers that may forward to each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouterId(pub String);

impl fmt::Display for RouterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The UDP port every peer shares unless configured otherwise.
pub const DEFAULT_UDP_PORT: u16 = 7882;
