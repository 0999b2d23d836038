//! The receive side of a publisher's connection, run by the SFU: the duties `rtc`'s receive
//! interceptors had (NACKs for lost packets, transport-wide congestion feedback, receiver
//! reports), and the receive fast path.
//!
//! Once a stream's SSRC is known (rtc announced the track) and the connection's remote SRTP key
//! has been found ([`Opener::find`], the same key capture as the send side), its packets no
//! longer go through `rtc` at all: the SFU checks the tag, decrypts in its receive arena and
//! forwards. Packets of streams not yet known, RTX repairs and all RTCP still go through `rtc`,
//! and the packets it opens are noted here too ([`OpenedByRtc`]), so the feedback covers both
//! paths. Only packets that passed an SRTP check count: a forged datagram cannot skew it.
//!
//! Replays are refused here as SRTP requires (RFC 3711 §3.3.2): a packet is forwarded once,
//! so the SFU never seals two different packets under one sequence number downstream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::rtp::header::Header;

use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, RecvDelta, StatusChunkTypeTcc, StatusVectorChunk, SymbolSizeTypeTcc,
    SymbolTypeTcc, TransportLayerCc,
};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};

use crate::fastpath::{KeyCapture, Opener, Rollover};

/// How often transport-wide feedback and NACKs go out (libwebrtc sends feedback every 50 to 250
/// ms; NACKs want to be prompt).
pub const FEEDBACK_INTERVAL: Duration = Duration::from_millis(25);
const TWCC_INTERVAL: Duration = Duration::from_millis(50);
/// A lost packet is asked for again after this long, a few times, while it can still help.
const NACK_RETRY: Duration = Duration::from_millis(80);
const NACK_TRIES: u8 = 4;
const NACK_GIVE_UP: Duration = Duration::from_millis(1000);
/// A gap wider than this is not worth NACKing packet by packet (the decoder needs a keyframe).
const NACK_MAX_GAP: u64 = 100;
const NACK_QUEUE: usize = 256;
/// Received packets remembered below the highest: replays inside are refused, older packets
/// too (on the fast path).
const WINDOW: u64 = 128;
/// Transport-wide arrivals kept between two feedback packets.
const TWCC_LOG: usize = 4096;
/// Packets tried against the captured keys before the connection stays on rtc's path.
const FIND_TRIES: u8 = 8;

/// How a publisher's media gets opened.
pub enum Open {
    /// No packet of a known stream seen yet, or the keys did not fit so far.
    Pending(u8),
    Own(Opener),
    Rtc,
}

/// The receive side of one publisher connection.
pub struct Inbound {
    pub keys: KeyCapture,
    pub open: Open,
    streams: Vec<Stream>,
    /// The connection's extension ids: transport-wide sequence number, audio level.
    twcc_id: Option<u8>,
    level_id: Option<u8>,
    twcc: TwccLog,
    opened: OpenedByRtc,
    /// Our SSRC in the RTCP we send.
    sender_ssrc: u32,
    epoch: Instant,
    last_twcc: Option<Instant>,
}

/// One received stream (a simulcast layer, or the only stream of a track).
pub struct Stream {
    pub ssrc: u32,
    /// What the SFU forwards it as.
    pub producer: u64,
    pub layer: u8,
    clock_rate: u32,
    nack: bool,
    seq: Rollover,
    /// Bit `i`: `highest - i` arrived.
    seen: u128,
    first: Option<u64>,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    jitter: f64,
    last_transit: Option<i64>,
    /// The middle 32 bits of the last sender report's NTP time, and when it came.
    last_sr: Option<(u32, Instant)>,
    missing: Vec<Missing>,
}

struct Missing {
    seq: u64,
    since: Instant,
    last_asked: Option<Instant>,
    tries: u8,
}

/// What [`Inbound::arrived`] decided about a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// A replay, or too old to tell.
    Drop,
}

impl Inbound {
    pub fn new(now: Instant, keys: KeyCapture, sender_ssrc: u32) -> Inbound {
        Inbound {
            keys,
            open: Open::Pending(0),
            streams: Vec::new(),
            twcc_id: None,
            level_id: None,
            twcc: TwccLog::default(),
            opened: OpenedByRtc::default(),
            sender_ssrc,
            epoch: now,
            last_twcc: None,
        }
    }

    /// A stream rtc announced: from now on its packets may take the fast path.
    pub fn add_stream(&mut self, ssrc: u32, producer: u64, layer: u8, clock_rate: u32, nack: bool) {
        self.streams.retain(|s| s.ssrc != ssrc);
        self.streams.push(Stream {
            ssrc,
            producer,
            layer,
            clock_rate: clock_rate.max(1),
            nack,
            seq: Rollover::default(),
            seen: 0,
            first: None,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            jitter: 0.0,
            last_transit: None,
            last_sr: None,
            missing: Vec::new(),
        });
    }

    pub fn remove_producer(&mut self, producer: u64) {
        self.streams.retain(|s| s.producer != producer);
    }

    /// Where the connection's interceptor chain notes the packets rtc opens.
    pub fn opened_by_rtc(&self) -> OpenedByRtc {
        self.opened.clone()
    }

    /// The fields of an RTP packet of this connection, its extensions included.
    pub fn view(&self, data: &[u8]) -> Option<RtpView> {
        RtpView::parse(data, self.twcc_id, self.level_id)
    }

    /// The connection's extension ids, from a track rtc announced (the first one's stand).
    pub fn learn_extensions(&mut self, twcc: Option<u8>, level: Option<u8>) {
        self.twcc_id = self.twcc_id.or(twcc);
        self.level_id = self.level_id.or(level);
        self.opened.log().twcc_id = self.twcc_id;
    }

    pub fn stream(&mut self, ssrc: u32) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.ssrc == ssrc)
    }

    /// Finds the remote key with a packet of a known stream; after a few misses the connection
    /// stays on rtc's path. Returns whether the fast path is open.
    pub fn try_find(&mut self, srtp: &[u8]) -> bool {
        let Open::Pending(tries) = self.open else {
            return matches!(self.open, Open::Own(_));
        };
        self.open = match Opener::find(&self.keys, srtp) {
            Some(opener) => {
                tracing::debug!(profile = ?opener.profile, "receive fast path");
                Open::Own(opener)
            }
            None if tries + 1 >= FIND_TRIES => {
                tracing::warn!("no SRTP key opened the publisher's media: receiving through rtc");
                self.keys.clear();
                Open::Rtc
            }
            None => Open::Pending(tries + 1),
        };
        matches!(self.open, Open::Own(_))
    }

    /// Opens a packet of a known stream in place (fast path): its producer, and where its
    /// payload ends (before any padding). `None`: not ours to open, failed authentication,
    /// malformed padding, or a replay.
    pub fn open_packet(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        view: &RtpView,
    ) -> Option<(u64, usize)> {
        let Inbound {
            open,
            streams,
            epoch,
            ..
        } = self;
        let Open::Own(opener) = open else {
            return None;
        };
        let s = streams.iter_mut().find(|s| s.ssrc == view.ssrc)?;
        let roc = s.roc_of(view.seq);
        let end = opener
            .open_in_place(buf, view.header_len, view.ssrc, view.seq, roc)
            .ok()?;
        // RFC 3550 §5.1: the last byte counts the padding, itself included.
        let pad = match view.padding {
            true => Some(usize::from(buf[end - 1])).filter(|n| *n > 0)?,
            false => 0,
        };
        let end = end.checked_sub(pad).filter(|e| *e >= view.header_len)?;
        if s.arrived(now, *epoch, view.seq, view.ts, true) == Verdict::Drop {
            return None;
        }
        let producer = s.producer;
        if let Some(t) = view.transport_seq {
            self.on_transport_seq(now, t);
        }
        Some((producer, end))
    }

    /// A packet rtc opened (and checked against replays on its own SSRC, RTX repairs unwrapped
    /// included): `Drop` for one already forwarded. Repairs may be older than the window.
    pub fn arrived(&mut self, now: Instant, ssrc: u32, seq: u16, ts: u32) -> Verdict {
        let epoch = self.epoch;
        match self.stream(ssrc) {
            Some(s) => s.arrived(now, epoch, seq, ts, false),
            None => Verdict::Forward,
        }
    }

    /// A transport-wide sequence number arrived (any RTP packet of the connection, repairs and
    /// padding included: the sender's estimate counts them all).
    fn on_transport_seq(&mut self, now: Instant, seq: u16) {
        let at = now.saturating_duration_since(self.epoch).as_micros() as i64;
        self.twcc.record(seq, at);
    }

    /// Sender reports carry what receiver reports must echo (LSR, DLSR).
    pub fn on_sender_report(&mut self, now: Instant, ssrc: u32, ntp_time: u64) {
        if let Some(s) = self.stream(ssrc) {
            s.last_sr = Some(((ntp_time >> 16) as u32, now));
        }
    }

    /// What is due: transport-wide feedback, NACKs.
    pub fn feedback(&mut self, now: Instant) -> Vec<Box<dyn rtc::rtcp::Packet>> {
        let mut out: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::new();
        for (seq, at) in self.opened.take() {
            self.on_transport_seq(at, seq);
        }
        if self
            .last_twcc
            .is_none_or(|t| now.saturating_duration_since(t) >= TWCC_INTERVAL)
        {
            let media_ssrc = self.streams.first().map_or(0, |s| s.ssrc);
            if let Some(fb) = self.twcc.feedback(self.sender_ssrc, media_ssrc) {
                out.push(Box::new(fb));
                self.last_twcc = Some(now);
            }
        }
        for s in &mut self.streams {
            if let Some(nack) = s.nacks(now, self.sender_ssrc) {
                out.push(Box::new(nack));
            }
        }
        out
    }

    /// Receiver reports for every stream heard from.
    pub fn report(&mut self, now: Instant) -> Option<ReceiverReport> {
        let reports: Vec<ReceptionReport> = self
            .streams
            .iter_mut()
            .filter_map(|s| s.report(now))
            .take(31)
            .collect();
        (!reports.is_empty()).then(|| ReceiverReport {
            ssrc: self.sender_ssrc,
            reports,
            ..Default::default()
        })
    }
}

impl Stream {
    /// Notes a packet that passed authentication: `Drop` for a replay, or (on the fast path,
    /// `strict`) one too old to tell. Repairs rtc delivers may be older than the window.
    fn arrived(
        &mut self,
        now: Instant,
        epoch: Instant,
        seq: u16,
        ts: u32,
        strict: bool,
    ) -> Verdict {
        let ext = self.seq.extend(seq);
        let highest = self.seq.highest();
        match highest {
            Some(h) if ext <= h => {
                let back = h - ext;
                if back >= WINDOW {
                    if strict {
                        return Verdict::Drop;
                    }
                } else if self.seen & (1u128 << back) != 0 {
                    return Verdict::Drop;
                } else {
                    self.seen |= 1u128 << back;
                }
                self.missing.retain(|m| m.seq != ext);
            }
            _ => {
                let ahead = highest.map_or(1, |h| ext - h);
                self.seen = if ahead >= WINDOW {
                    0
                } else {
                    self.seen << ahead
                } | 1;
                if let Some(h) = highest {
                    self.note_gap(now, h, ext);
                }
                self.seq.note(ext);
                self.on_timing(now, epoch, ts);
            }
        }
        self.first.get_or_insert(ext);
        self.received += 1;
        Verdict::Forward
    }

    /// The extended sequence number and the rollover counter `seq` would have.
    pub fn roc_of(&self, seq: u16) -> u32 {
        (self.seq.extend(seq) >> 16) as u32
    }

    fn note_gap(&mut self, now: Instant, highest: u64, ext: u64) {
        if !self.nack || ext - highest <= 1 {
            return;
        }
        let from = (highest + 1).max(ext.saturating_sub(NACK_MAX_GAP));
        for seq in from..ext {
            if self.missing.len() >= NACK_QUEUE {
                self.missing.remove(0);
            }
            self.missing.push(Missing {
                seq,
                since: now,
                last_asked: None,
                tries: 0,
            });
        }
    }

    /// RFC 3550 A.8: interarrival jitter, in timestamp units.
    fn on_timing(&mut self, now: Instant, epoch: Instant, ts: u32) {
        let arrival = now.saturating_duration_since(epoch).as_secs_f64() * self.clock_rate as f64;
        let transit = (arrival as i64).wrapping_sub(i64::from(ts));
        if let Some(last) = self.last_transit {
            let d = (transit - last).abs() as f64;
            // A jump of more than a minute is a timestamp reset, not jitter.
            if d < 60.0 * self.clock_rate as f64 {
                self.jitter += (d - self.jitter) / 16.0;
            }
        }
        self.last_transit = Some(transit);
    }

    fn nacks(&mut self, now: Instant, sender_ssrc: u32) -> Option<TransportLayerNack> {
        self.missing.retain(|m| {
            m.tries < NACK_TRIES && now.saturating_duration_since(m.since) < NACK_GIVE_UP
        });
        let mut pairs: Vec<NackPair> = Vec::new();
        for m in &mut self.missing {
            if m.last_asked
                .is_some_and(|t| now.saturating_duration_since(t) < NACK_RETRY)
            {
                continue;
            }
            m.last_asked = Some(now);
            m.tries += 1;
            let seq = m.seq as u16;
            match pairs.last_mut() {
                Some(p) if seq.wrapping_sub(p.packet_id).wrapping_sub(1) < 16 => {
                    p.lost_packets |= 1 << seq.wrapping_sub(p.packet_id).wrapping_sub(1);
                }
                _ => pairs.push(NackPair {
                    packet_id: seq,
                    lost_packets: 0,
                }),
            }
        }
        (!pairs.is_empty()).then_some(TransportLayerNack {
            sender_ssrc,
            media_ssrc: self.ssrc,
            nacks: pairs,
        })
    }

    /// RFC 3550 §6.4.2 and A.3.
    fn report(&mut self, now: Instant) -> Option<ReceptionReport> {
        let first = self.first?;
        let highest = self.seq.highest()?;
        let expected = highest + 1 - first;
        let lost = expected as i64 - self.received as i64;
        let expected_interval = expected - self.expected_prior;
        let received_interval = self.received - self.received_prior;
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval as i64 - received_interval as i64;
        let fraction_lost = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval as i64).min(255) as u8
        };
        let (last_sender_report, delay) = match self.last_sr {
            Some((lsr, at)) => (
                lsr,
                (now.saturating_duration_since(at).as_secs_f64() * 65536.0) as u32,
            ),
            None => (0, 0),
        };
        Some(ReceptionReport {
            ssrc: self.ssrc,
            fraction_lost,
            // 24 bits, signed (duplicates can make it negative).
            total_lost: (lost.clamp(-0x80_0000, 0x7f_ffff) as u32) & 0xff_ffff,
            last_sequence_number: highest as u32,
            jitter: self.jitter as u32,
            last_sender_report,
            delay,
        })
    }
}

/// Arrivals of transport-wide sequence numbers since the last feedback packet.
#[derive(Default)]
struct TwccLog {
    seq: Rollover,
    arrivals: Vec<(u64, i64)>,
    /// The first sequence number the next feedback covers.
    next: Option<u64>,
    count: u8,
}

/// Transport-wide sequence numbers of the packets `rtc` opened on one connection (they passed
/// its SRTP check), with their arrival times: repairs, padding probes, everything of a
/// connection off the fast path, once the first track announced has told the extension's id
/// ([`Inbound::learn_extensions`]). The connection's interceptor chain notes them
/// ([`crate::engine::DeliverRtcpFeedback`]); its [`Inbound`] takes them into the feedback.
/// Shared by those two only.
#[derive(Clone, Default)]
pub struct OpenedByRtc(Arc<Mutex<OpenedLog>>);

#[derive(Default)]
struct OpenedLog {
    twcc_id: Option<u8>,
    arrivals: Vec<(u16, Instant)>,
}

impl OpenedByRtc {
    fn log(&self) -> std::sync::MutexGuard<'_, OpenedLog> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An RTP packet rtc opened.
    pub fn note(&self, header: &Header, now: Instant) {
        let mut log = self.log();
        let Some(id) = log.twcc_id else {
            return;
        };
        if log.arrivals.len() >= TWCC_LOG {
            return;
        }
        if let Some(v) = header.get_extension(id).filter(|v| v.len() >= 2) {
            log.arrivals.push((u16::from_be_bytes([v[0], v[1]]), now));
        }
    }

    fn take(&self) -> Vec<(u16, Instant)> {
        std::mem::take(&mut self.log().arrivals)
    }
}

/// Units of the reference time (64 ms) and of the deltas (250 µs), in µs.
const REFERENCE_UNIT: i64 = 64_000;
const DELTA_UNIT: i64 = 250;

impl TwccLog {
    fn record(&mut self, seq: u16, at: i64) {
        let ext = self.seq.extend(seq);
        self.seq.note(ext);
        if self.arrivals.len() < TWCC_LOG {
            self.arrivals.push((ext, at));
        }
    }

    /// One feedback packet (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1) for what
    /// arrived since the last; late arrivals of packets already reported missing are left out.
    fn feedback(&mut self, sender_ssrc: u32, media_ssrc: u32) -> Option<TransportLayerCc> {
        let mut arrivals = std::mem::take(&mut self.arrivals);
        arrivals.sort_unstable_by_key(|a| a.0);
        arrivals.dedup_by_key(|a| a.0);
        if let Some(next) = self.next {
            arrivals.retain(|a| a.0 >= next);
        }
        let &(last, _) = arrivals.last()?;
        // Report no further back than this window of missing packets.
        let base = self
            .next
            .unwrap_or(arrivals[0].0)
            .max(last.saturating_sub(0x7ffe));
        arrivals.retain(|a| a.0 >= base);
        self.next = Some(last + 1);
        let first_at = arrivals.first()?.1;
        let reference = first_at.div_euclid(REFERENCE_UNIT);
        let mut prev = reference * REFERENCE_UNIT;
        let mut symbols: Vec<SymbolTypeTcc> = Vec::with_capacity((last - base + 1) as usize);
        let mut recv_deltas = Vec::with_capacity(arrivals.len());
        let mut it = arrivals.iter().peekable();
        for seq in base..=last {
            match it.peek() {
                Some(&&(s, at)) if s == seq => {
                    it.next();
                    let units = ((at - prev) as f64 / DELTA_UNIT as f64).round() as i64;
                    let units = units.clamp(i64::from(i16::MIN), i64::from(i16::MAX));
                    prev += units * DELTA_UNIT;
                    let typ = if (0..=255).contains(&units) {
                        SymbolTypeTcc::PacketReceivedSmallDelta
                    } else {
                        SymbolTypeTcc::PacketReceivedLargeDelta
                    };
                    symbols.push(typ);
                    recv_deltas.push(RecvDelta {
                        type_tcc_packet: typ,
                        delta: units * DELTA_UNIT,
                    });
                }
                _ => symbols.push(SymbolTypeTcc::PacketNotReceived),
            }
        }
        let packet_chunks = symbols
            .chunks(7)
            .map(|c| {
                PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
                    type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
                    symbol_size: SymbolSizeTypeTcc::TwoBit,
                    symbol_list: c.to_vec(),
                })
            })
            .collect();
        let fb_pkt_count = self.count;
        self.count = self.count.wrapping_add(1);
        Some(TransportLayerCc {
            sender_ssrc,
            media_ssrc,
            base_sequence_number: base as u16,
            packet_status_count: symbols.len() as u16,
            reference_time: (reference as u32) & 0xff_ffff,
            fb_pkt_count,
            packet_chunks,
            recv_deltas,
        })
    }
}

/// The parts of an RTP header the SFU reads, from the clear header of an SRTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpView {
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub marker: bool,
    pub padding: bool,
    pub header_len: usize,
    pub transport_seq: Option<u16>,
    pub audio_level: Option<u8>,
}

impl RtpView {
    /// Parses the fixed header, the CSRCs and the extensions (one- and two-byte forms, RFC
    /// 8285), looking for the two the SFU reads. `None` for anything malformed.
    pub fn parse(data: &[u8], twcc_id: Option<u8>, level_id: Option<u8>) -> Option<RtpView> {
        if data.len() < 12 || data[0] >> 6 != 2 {
            return None;
        }
        let csrcs = usize::from(data[0] & 0x0f);
        let mut view = RtpView {
            ssrc: u32::from_be_bytes(data[8..12].try_into().ok()?),
            seq: u16::from_be_bytes([data[2], data[3]]),
            ts: u32::from_be_bytes(data[4..8].try_into().ok()?),
            marker: data[1] & 0x80 != 0,
            padding: data[0] & 0x20 != 0,
            header_len: 12 + 4 * csrcs,
            transport_seq: None,
            audio_level: None,
        };
        if data.len() < view.header_len {
            return None;
        }
        if data[0] & 0x10 == 0 {
            return Some(view);
        }
        let at = view.header_len;
        let ext = data.get(at..at + 4)?;
        let profile = u16::from_be_bytes([ext[0], ext[1]]);
        let words = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
        let body = data.get(at + 4..at + 4 + 4 * words)?;
        view.header_len = at + 4 + 4 * words;
        let two_byte = match profile {
            0xBEDE => false,
            p if p & 0xfff0 == 0x1000 => true,
            _ => return Some(view),
        };
        let mut i = 0;
        while i < body.len() {
            let (id, len, start) = if two_byte {
                if body[i] == 0 {
                    i += 1;
                    continue;
                }
                (body[i], usize::from(*body.get(i + 1)?), i + 2)
            } else {
                let b = body[i];
                if b == 0 {
                    i += 1;
                    continue;
                }
                if b >> 4 == 15 {
                    break;
                }
                (b >> 4, usize::from(b & 0x0f) + 1, i + 1)
            };
            let value = body.get(start..start + len)?;
            if Some(id) == twcc_id && value.len() >= 2 {
                view.transport_seq = Some(u16::from_be_bytes([value[0], value[1]]));
            } else if Some(id) == level_id && !value.is_empty() {
                view.audio_level = Some(value[0]);
            }
            i = start + len;
        }
        Some(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};

    fn stream(nack: bool) -> Stream {
        let mut inb = Inbound::new(Instant::now(), KeyCapture::default(), 7);
        inb.add_stream(1234, 1, 0, 90_000, nack);
        inb.streams.pop().unwrap()
    }

    #[test]
    fn replays_are_refused_and_gaps_are_nacked_until_repaired() {
        let t0 = Instant::now();
        let mut s = stream(true);
        for seq in [65_530u16, 65_531, 65_535, 2] {
            assert_eq!(s.arrived(t0, t0, seq, 0, true), Verdict::Forward);
        }
        assert_eq!(s.arrived(t0, t0, 65_531, 0, true), Verdict::Drop, "replay");
        assert_eq!(
            s.arrived(t0, t0, 2, 0, false),
            Verdict::Drop,
            "replay via rtc"
        );
        let nack = s.nacks(t0, 7).expect("gaps across the wrap");
        let asked: Vec<u16> = nack.nacks.iter().flat_map(|p| p.packet_list()).collect();
        assert_eq!(asked, vec![65_532, 65_533, 65_534, 0, 1]);
        // A repair arrives: it is forwarded once and no longer asked for.
        assert_eq!(s.arrived(t0, t0, 0, 0, false), Verdict::Forward);
        assert_eq!(s.arrived(t0, t0, 0, 0, false), Verdict::Drop);
        assert!(s.nacks(t0, 7).is_none(), "asked again too soon");
        let later = t0 + NACK_RETRY;
        let asked: Vec<u16> = s
            .nacks(later, 7)
            .unwrap()
            .nacks
            .iter()
            .flat_map(|p| p.packet_list())
            .collect();
        assert_eq!(asked, vec![65_532, 65_533, 65_534, 1]);
        assert!(s.nacks(t0 + NACK_GIVE_UP, 7).is_none(), "given up");
        // Far behind the window: refused on the fast path, let through from rtc (a repair).
        for seq in 3..200u16 {
            s.arrived(t0, t0, seq, 0, true);
        }
        assert_eq!(s.arrived(t0, t0, 1, 0, true), Verdict::Drop);
        assert_eq!(s.arrived(t0, t0, 1, 0, false), Verdict::Forward);
    }

    #[test]
    fn keys_that_open_nothing_leave_the_connection_to_rtc_and_are_forgotten() {
        let keys = KeyCapture::default();
        let mut inb = Inbound::new(Instant::now(), keys.clone(), 7);
        keys.note_for_test(&[1u8; 16], &[2u8; 16]);
        let packet = [
            0x80u8, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 5, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
        ];
        for _ in 1..FIND_TRIES {
            assert!(!inb.try_find(&packet));
            assert!(matches!(inb.open, Open::Pending(_)));
        }
        assert!(!inb.try_find(&packet));
        assert!(matches!(inb.open, Open::Rtc));
        assert!(!keys.has_any(), "the captured keys are dropped");
    }

    #[test]
    fn opened_packets_lose_their_padding_and_bad_padding_is_refused() {
        use rtc::srtp::context::Context;
        let (key, salt) = ([3u8; 16], [4u8; 12]);
        let mut theirs = crate::fastpath::gcm_context(&key, &salt);
        let keys = KeyCapture::default();
        keys.note_for_test(&key, &salt);
        let t0 = Instant::now();
        let mut inb = Inbound::new(t0, keys, 7);
        inb.add_stream(5, 1, 0, 48_000, false);
        // Header with P set, payload "abc", then padding whose last byte counts it.
        let sealed = |seq: u8, padding: &[u8], theirs: &mut Context| {
            let mut plain = vec![0xA0, 111, 0, seq, 0, 0, 0, 9, 0, 0, 0, 5];
            plain.extend_from_slice(b"abc");
            plain.extend_from_slice(padding);
            theirs.encrypt_rtp(&plain).unwrap().to_vec()
        };
        let mut good = sealed(1, &[0, 0, 3], &mut theirs);
        assert!(inb.try_find(&good));
        let view = RtpView::parse(&good, None, None).unwrap();
        assert_eq!(inb.open_packet(t0, &mut good, &view), Some((1, 15)));
        assert_eq!(&good[12..15], b"abc");
        for (seq, padding) in [(2, &[0u8][..]), (3, &[0, 9][..])] {
            let mut bad = sealed(seq, padding, &mut theirs);
            let view = RtpView::parse(&bad, None, None).unwrap();
            assert_eq!(inb.open_packet(t0, &mut bad, &view), None, "{padding:?}");
        }
    }

    #[test]
    fn audio_is_not_nacked() {
        let t0 = Instant::now();
        let mut s = stream(false);
        s.arrived(t0, t0, 1, 0, true);
        s.arrived(t0, t0, 5, 0, true);
        assert!(s.nacks(t0, 7).is_none());
    }

    #[test]
    fn receiver_report_counts_losses_per_interval_and_echoes_the_sender_report() {
        let t0 = Instant::now();
        let mut s = stream(true);
        for seq in (100..200u16).filter(|s| s % 10 != 0) {
            s.arrived(t0, t0, seq, u32::from(seq) * 3000, true);
        }
        s.last_sr = Some((0xABCD_1234, t0));
        let r = s.report(t0 + Duration::from_millis(500)).unwrap();
        // 100..=199 expected, the tens lost (100 itself never arrived: the first was 101).
        assert_eq!(r.last_sequence_number, 199);
        assert_eq!(r.total_lost, 9);
        assert_eq!(r.fraction_lost, (9 * 256 / 99) as u8);
        assert_eq!(r.last_sender_report, 0xABCD_1234);
        assert_eq!(r.delay, 32768, "half a second in 1/65536 s");
        for seq in 200..300u16 {
            s.arrived(t0, t0, seq, u32::from(seq) * 3000, true);
        }
        let r = s.report(t0).unwrap();
        assert_eq!(
            (r.fraction_lost, r.total_lost),
            (0, 9),
            "nothing lost since"
        );
    }

    #[test]
    fn transport_feedback_reports_arrivals_and_gaps() {
        let mut log = TwccLog::default();
        // 65 534 at 100 ms, 65 535 lost, 0 at 100.5 ms, 1 at 200 ms (a large delta), 2 reordered.
        log.record(65_534, 100_000);
        log.record(0, 100_500);
        log.record(2, 200_250);
        log.record(1, 200_000);
        let fb = log.feedback(7, 99).unwrap();
        let mut wire = vec![0u8; fb.marshal_size()];
        fb.marshal_to(&mut wire).unwrap();
        let back = TransportLayerCc::unmarshal(&mut &wire[..]).unwrap();
        assert_eq!(back.base_sequence_number, 65_534);
        assert_eq!(back.packet_status_count, 5);
        assert_eq!(back.reference_time, 1, "100 ms in 64 ms units");
        let deltas: Vec<i64> = back.recv_deltas.iter().map(|d| d.delta).collect();
        assert_eq!(deltas, vec![36_000, 500, 99_500, 250]);
        assert_eq!(back.fb_pkt_count, 0);
        // The next covers only what came since; a late packet already reported is left out.
        log.record(65_535, 201_000);
        log.record(3, 202_000);
        let fb = log.feedback(7, 99).unwrap();
        assert_eq!((fb.base_sequence_number, fb.packet_status_count), (3, 1));
        assert_eq!(fb.fb_pkt_count, 1);
        assert!(log.feedback(7, 99).is_none(), "nothing new");
    }

    #[test]
    fn packets_rtc_opened_count_once_their_extension_is_known() {
        let t0 = Instant::now();
        let mut inb = Inbound::new(t0, KeyCapture::default(), 7);
        let opened = inb.opened_by_rtc();
        let header = |seq: u16| {
            let mut h = Header::default();
            h.set_extension(3, bytes::Bytes::copy_from_slice(&seq.to_be_bytes()))
                .unwrap();
            h
        };
        opened.note(&header(4), t0);
        inb.learn_extensions(Some(3), None);
        opened.note(&header(5), t0 + Duration::from_millis(1));
        opened.note(&header(6), t0 + Duration::from_millis(2));
        let fb = inb.feedback(t0 + Duration::from_millis(3));
        let twcc = fb
            .iter()
            .find_map(|p| p.as_any().downcast_ref::<TransportLayerCc>())
            .expect("feedback for what rtc opened");
        assert_eq!(
            (twcc.base_sequence_number, twcc.packet_status_count),
            (5, 2),
            "noted before the id was known: not counted"
        );
    }

    #[test]
    fn headers_parse_with_both_extension_forms_and_malformed_ones_do_not() {
        let mut one = vec![0x90, 0x60, 0x12, 0x34, 0, 0, 0, 9, 0, 0, 0x04, 0xD2];
        one.extend_from_slice(&[0xBE, 0xDE, 0, 2, 0x11, 0xAB, 0xCD, 0x30, 0x85, 0, 0, 0]);
        one.extend_from_slice(b"payload");
        let v = RtpView::parse(&one, Some(1), Some(3)).unwrap();
        assert_eq!((v.ssrc, v.seq, v.ts, v.marker), (1234, 0x1234, 9, false));
        assert_eq!(
            (v.transport_seq, v.audio_level, v.header_len),
            (Some(0xABCD), Some(0x85), 24)
        );

        let mut two = vec![0x91, 0xE0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 5, 1, 2, 3, 4];
        two.extend_from_slice(&[0x10, 0x00, 0, 1, 5, 2, 0x00, 0x07]);
        let v = RtpView::parse(&two, Some(5), None).unwrap();
        assert_eq!(
            (v.transport_seq, v.header_len, v.marker),
            (Some(7), 24, true)
        );

        assert!(
            RtpView::parse(&one[..20], Some(1), None).is_none(),
            "cut short"
        );
        let mut lying = one.clone();
        lying[14..16].copy_from_slice(&[0, 200]);
        assert!(
            RtpView::parse(&lying, Some(1), None).is_none(),
            "extension past the end"
        );
        let mut long = one.clone();
        long[16] = 0x1F; // id 1 claims 16 bytes
        assert!(RtpView::parse(&long, Some(1), None).is_none());
        assert!(
            RtpView::parse(&[0x40; 12], None, None).is_none(),
            "not version 2"
        );
    }
}
