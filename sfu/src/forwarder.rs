//! Per-subscriber forwarding decisions for one video track: which simulcast layer to send, when to
//! switch (only at a keyframe of the new layer), and how to rewrite sequence numbers and timestamps
//! so that the subscriber sees one continuous stream across switches. Plain state, no I/O: the
//! tests drive it with tables of packets.

use std::time::{Duration, Instant};

/// A spatial layer index: 0 is the smallest picture.
pub type Layer = u8;

/// What one incoming packet becomes for this subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    /// Send with these header values.
    Send {
        seq: u16,
        ts: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Forwarder {
    clock_rate: u32,
    target: Option<Layer>,
    current: Option<Layer>,
    seq_offset: u16,
    ts_offset: u32,
    last: Option<Sent>,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u16,
    ts: u32,
    at: Instant,
}

/// `a` is newer than `b` in RTP's wrapping sequence space.
fn seq_newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

impl Forwarder {
    pub fn new(clock_rate: u32) -> Forwarder {
        Forwarder {
            clock_rate,
            target: None,
            current: None,
            seq_offset: 0,
            ts_offset: 0,
            last: None,
        }
    }

    pub fn target(&self) -> Option<Layer> {
        self.target
    }

    pub fn current(&self) -> Option<Layer> {
        self.current
    }

    /// Chooses the layer to move to. Returns true when a keyframe of that layer is needed (the
    /// switch waits for one).
    pub fn set_target(&mut self, layer: Option<Layer>) -> bool {
        self.target = layer;
        if layer.is_none() {
            self.current = None;
        }
        layer.is_some() && layer != self.current
    }

    /// Decides for one packet of `layer`. `keyframe_start` is true for the first packet of a
    /// keyframe.
    pub fn on_packet(
        &mut self,
        now: Instant,
        layer: Layer,
        seq: u16,
        ts: u32,
        keyframe_start: bool,
    ) -> Verdict {
        let Some(target) = self.target else {
            return Verdict::Drop;
        };
        if layer == target && self.current != Some(target) && keyframe_start {
            self.switch_to(now, layer, seq, ts);
        }
        if self.current != Some(layer) {
            return Verdict::Drop;
        }
        let out_seq = seq.wrapping_add(self.seq_offset);
        let out_ts = ts.wrapping_add(self.ts_offset);
        match self.last {
            Some(last) if !seq_newer(out_seq, last.seq) => {}
            _ => {
                self.last = Some(Sent {
                    seq: out_seq,
                    ts: out_ts,
                    at: now,
                })
            }
        }
        Verdict::Send {
            seq: out_seq,
            ts: out_ts,
        }
    }

    /// Makes `seq`/`ts` of the new layer follow on from the last packet sent.
    fn switch_to(&mut self, now: Instant, layer: Layer, seq: u16, ts: u32) {
        if let Some(last) = self.last {
            let next_seq = last.seq.wrapping_add(1);
            self.seq_offset = next_seq.wrapping_sub(seq);
            // Advance the clock by the real time since the last packet (at least one tick), so
            // the decoder's timing stays monotonic across the switch.
            let elapsed = now
                .saturating_duration_since(last.at)
                .max(Duration::from_millis(1));
            let ticks =
                (elapsed.as_micros() as u64 * self.clock_rate as u64 / 1_000_000).max(1) as u32;
            self.ts_offset = last.ts.wrapping_add(ticks).wrapping_sub(ts);
        }
        self.current = Some(layer);
    }
}

/// What the allocator knows about one layer of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerState {
    /// Packets arrived recently.
    pub active: bool,
    pub bitrate_bps: u64,
}

/// The layer a subscriber should get: the highest active one not above `cap` whose bitrate fits
/// the estimate (with 10 % headroom), else the lowest active one; none if no layer is active.
pub fn select_layer(layers: &[LayerState], cap: Layer, estimate_bps: Option<u64>) -> Option<Layer> {
    let active = || {
        layers
            .iter()
            .enumerate()
            .filter(|(i, l)| l.active && *i as Layer <= cap)
    };
    let fits =
        |l: &LayerState| estimate_bps.is_none_or(|e| l.bitrate_bps.saturating_mul(11) / 10 <= e);
    active()
        .filter(|(_, l)| fits(l))
        .map(|(i, _)| i as Layer)
        .next_back()
        .or_else(|| layers.iter().position(|l| l.active).map(|i| i as Layer))
}

/// Does this VP8 RTP payload start a keyframe? (RFC 7741 payload descriptor, then the VP8 header.)
pub fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let start = first & 0x10 != 0;
    let partition = first & 0x07;
    let mut i = 1;
    if first & 0x80 != 0 {
        let Some(&x) = payload.get(i) else {
            return false;
        };
        i += 1;
        if x & 0x80 != 0 {
            let Some(&pid) = payload.get(i) else {
                return false;
            };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    start && partition == 0 && payload.get(i).is_some_and(|b| b & 0x01 == 0)
}

/// Does this H.264 RTP payload carry the start of an IDR picture or its parameter sets?
/// (RFC 6184: single NAL units, STAP-A and the first fragment of FU-A.)
pub fn h264_keyframe_start(payload: &[u8]) -> bool {
    let is_key = |nal_type: u8| nal_type == 5 || nal_type == 7;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        24 => {
            let mut i = 1;
            while i + 2 < payload.len() {
                let size = u16::from_be_bytes([payload[i], payload[i + 1]]) as usize;
                if size == 0 {
                    return false;
                }
                if is_key(payload[i + 2] & 0x1f) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        28 => payload
            .get(1)
            .is_some_and(|h| h & 0x80 != 0 && is_key(h & 0x1f)),
        t => is_key(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_for_a_keyframe_before_sending_anything() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        assert!(f.set_target(Some(2)));
        // (layer, seq, ts, keyframe) → expected
        let table = [
            (2, 100, 9000, false, Verdict::Drop),
            (0, 500, 1000, true, Verdict::Drop),
            (2, 101, 9000, true, Verdict::Send { seq: 101, ts: 9000 }),
            (2, 102, 9000, false, Verdict::Send { seq: 102, ts: 9000 }),
            (1, 300, 4000, true, Verdict::Drop),
        ];
        for (i, (layer, seq, ts, key, want)) in table.into_iter().enumerate() {
            assert_eq!(
                f.on_packet(t0 + MS * i as u32, layer, seq, ts, key),
                want,
                "row {i}"
            );
        }
        assert_eq!(f.current(), Some(2));
    }

    #[test]
    fn switching_down_keeps_sequence_and_time_continuous() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_target(Some(2));
        assert_eq!(
            f.on_packet(t0, 2, 1000, 50_000, true),
            Verdict::Send {
                seq: 1000,
                ts: 50_000
            }
        );
        assert_eq!(
            f.on_packet(t0, 2, 1001, 50_000, false),
            Verdict::Send {
                seq: 1001,
                ts: 50_000
            }
        );
        assert!(f.set_target(Some(0)));
        // Still on layer 2 until layer 0 brings a keyframe.
        assert_eq!(f.on_packet(t0 + MS * 10, 0, 7, 123, false), Verdict::Drop);
        assert_eq!(
            f.on_packet(t0 + MS * 20, 2, 1002, 51_800, false),
            Verdict::Send {
                seq: 1002,
                ts: 51_800
            }
        );
        // Layer 0 keyframe 33 ms later: seq follows on, ts advances by 33 ms of 90 kHz.
        let v = f.on_packet(t0 + MS * 53, 0, 9, 777, true);
        assert_eq!(
            v,
            Verdict::Send {
                seq: 1003,
                ts: 51_800 + 2970
            }
        );
        assert_eq!(
            f.on_packet(t0 + MS * 54, 0, 10, 777, false),
            Verdict::Send {
                seq: 1004,
                ts: 51_800 + 2970
            }
        );
        assert_eq!(
            f.on_packet(t0 + MS * 55, 2, 1003, 54_000, false),
            Verdict::Drop,
            "old layer stops"
        );
        assert_eq!(f.current(), Some(0));
    }

    #[test]
    fn rewriting_survives_wraparound_and_reordering() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000);
        f.set_target(Some(0));
        f.on_packet(t0, 0, 65_534, u32::MAX - 10, true);
        f.set_target(Some(1));
        assert_eq!(
            f.on_packet(t0 + MS, 1, 40_000, 5, true),
            Verdict::Send {
                seq: 65_535,
                ts: (u32::MAX - 10).wrapping_add(90)
            }
        );
        assert_eq!(
            f.on_packet(t0 + MS * 2, 1, 40_002, 5, false),
            Verdict::Send { seq: 1, ts: 79 }
        );
        // A late packet keeps its place instead of moving "last" backwards.
        assert_eq!(
            f.on_packet(t0 + MS * 3, 1, 40_001, 5, false),
            Verdict::Send { seq: 0, ts: 79 }
        );
        assert_eq!(
            f.on_packet(t0 + MS * 4, 1, 40_003, 5, false),
            Verdict::Send { seq: 2, ts: 79 }
        );
    }

    #[test]
    fn no_target_means_nothing_is_sent() {
        let mut f = Forwarder::new(90_000);
        assert!(!f.set_target(None));
        assert_eq!(f.on_packet(Instant::now(), 0, 1, 1, true), Verdict::Drop);
    }

    #[test]
    fn layer_selection_follows_estimate_cap_and_activity() {
        let l = |active, kbps: u64| LayerState {
            active,
            bitrate_bps: kbps * 1000,
        };
        let all = [l(true, 150), l(true, 500), l(true, 1500)];
        // (layers, cap, estimate, expected)
        type Row<'a> = (&'a [LayerState], Layer, Option<u64>, Option<Layer>);
        let table: [Row; 8] = [
            (&all, 2, None, Some(2)),
            (&all, 2, Some(2_000_000), Some(2)),
            (&all, 2, Some(1_000_000), Some(1)),
            (&all, 2, Some(200_000), Some(0)),
            (&all, 2, Some(50_000), Some(0)),
            (&all, 1, Some(5_000_000), Some(1)),
            (&[l(true, 150), l(false, 0), l(false, 0)], 2, None, Some(0)),
            (&[l(false, 0), l(false, 0), l(false, 0)], 2, None, None),
        ];
        for (i, (layers, cap, est, want)) in table.into_iter().enumerate() {
            assert_eq!(select_layer(layers, cap, est), want, "row {i}");
        }
    }

    #[test]
    fn vp8_keyframes_are_recognised() {
        // S=1, PID=0, no extension; VP8 header P bit 0 → key frame.
        assert!(vp8_keyframe_start(&[0x10, 0x00, 0x9d, 0x01, 0x2a]));
        assert!(!vp8_keyframe_start(&[0x10, 0x01]), "inter frame");
        assert!(
            !vp8_keyframe_start(&[0x00, 0x00]),
            "not the start of a partition"
        );
        // X=1 with a two-byte picture id, TL0PICIDX and TID/KEYIDX.
        assert!(vp8_keyframe_start(&[
            0x90, 0xe0, 0x81, 0x23, 0x05, 0x40, 0x00
        ]));
        assert!(!vp8_keyframe_start(&[0x90, 0xe0, 0x81]), "truncated");
        assert!(!vp8_keyframe_start(&[]));
    }

    #[test]
    fn h264_keyframes_are_recognised() {
        assert!(h264_keyframe_start(&[0x65, 0x88]), "IDR slice");
        assert!(h264_keyframe_start(&[0x67, 0x42]), "SPS");
        assert!(!h264_keyframe_start(&[0x41, 0x9a]), "non-IDR slice");
        assert!(
            h264_keyframe_start(&[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce]),
            "STAP-A with SPS"
        );
        assert!(
            !h264_keyframe_start(&[0x78, 0x00, 0x02, 0x41, 0x9a]),
            "STAP-A without"
        );
        assert!(
            h264_keyframe_start(&[0x7c, 0x85, 0x00]),
            "FU-A start of IDR"
        );
        assert!(!h264_keyframe_start(&[0x7c, 0x45, 0x00]), "FU-A end of IDR");
        assert!(
            !h264_keyframe_start(&[0x78, 0x00, 0x00]),
            "zero-size STAP-A unit"
        );
    }
}
