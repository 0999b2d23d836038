//! The forwarding fast path: the SFU protects forwarded media with the subscriber connection's
//! own SRTP key and puts it on the wire itself, instead of walking each packet through `rtc`'s
//! send pipeline (interceptor chain, handler queues, two copies; about 10 µs a packet).
//!
//! `rtc` keeps everything else on the connection: ICE, DTLS, SRTCP in both directions and the
//! RTCP it receives. What its send-side interceptors did for media is done here instead:
//! transport-wide sequence numbers and the send history that turns TWCC feedback into a
//! bandwidth estimate ([`Congestion`]), sender reports ([`SendStats`]), and a history of sent
//! datagrams to answer NACKs from ([`SentRing`]).
//!
//! `rtc` does not expose the keys it derives, so the connection gets a crypto provider that
//! notes the master keys handed to SRTP key derivation ([`KeyCapture`]). Which of them is the
//! local one (and which protection profile) is decided by decrypting an SRTCP datagram that
//! `rtc` itself protected on that connection ([`Sealer::find`]): a wrong guess cannot pass the
//! authentication tag. Without a match the connection keeps sending through `rtc`.
//!
//! One writer per SSRC: once a connection seals its own media, `rtc` never sends RTP on it (its
//! chain has no interceptor that could), so no SRTP nonce is used twice. Retransmissions go out
//! as RTX (RFC 4588) on their own SSRC and sequence numbers, never as a second, different packet
//! under an old sequence number.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::crypto::{
    ActiveKeyExchange, AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher,
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac,
    PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme, SigningKey, StreamCipher,
    StreamCipherAlgorithm,
};
use rtc::interceptor::{BandwidthEstimator, Gcc, PacketReport, convert_twcc};
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::shared::time::SystemInstant;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

use crate::engine::Published;

/// The master keys (and the first key-derivation block, which starts with the master salt) that
/// one connection's SRTP contexts were built from, in the order they were built.
#[derive(Clone, Default)]
pub struct KeyCapture(Arc<Mutex<Vec<Derivation>>>);

/// A master key and the first block derived with it.
type Derivation = (Vec<u8>, [u8; 16]);

/// A connection builds two SRTP contexts (local, remote), each deriving up to eight key blocks
/// (SRTP and SRTCP: encryption, two for authentication, salt); room to spare.
const MAX_CAPTURED: usize = 32;

impl KeyCapture {
    /// A crypto provider for one connection: `rtc`'s default, noting what SRTP derives keys from.
    pub fn provider(&self) -> Result<Arc<dyn RTCCryptoProvider>, String> {
        let inner = rtc::crypto::default_provider().map_err(|e| e.to_string())?;
        Ok(Arc::new(CapturingProvider {
            crypto: CapturingCrypto {
                inner: inner.clone(),
                seen: self.clone(),
            },
            inner,
        }))
    }

    /// Each distinct master key seen, with the salt candidate from its first derivation block.
    fn candidates(&self) -> Vec<Derivation> {
        let seen = self.0.lock().map(|s| s.clone()).unwrap_or_default();
        let mut out: Vec<Derivation> = Vec::new();
        for (key, block) in seen {
            if !out.iter().any(|(k, _)| *k == key) {
                out.push((key, block));
            }
        }
        out
    }

    /// The first of `accept`'s answers over every captured key and profile that fit each other;
    /// it gets an rtc SRTP context made from them to try a datagram with.
    fn find<T>(
        &self,
        mut accept: impl FnMut(Context, &[u8], &[u8], ProtectionProfile, &dyn RTCCrypto) -> Option<T>,
    ) -> Option<T> {
        let provider = rtc::crypto::default_provider().ok()?;
        let crypto = provider.crypto();
        self.candidates().into_iter().find_map(|(key, block)| {
            PROFILES.into_iter().find_map(|profile| {
                if profile.key_len() != key.len() || profile.salt_len() > 14 {
                    return None;
                }
                let salt = &block[..profile.salt_len()];
                let probe = Context::new(&key, salt, profile, None, None, crypto).ok()?;
                accept(probe, &key, salt, profile, crypto)
            })
        })
    }

    /// Notes `key` as if SRTP had derived from it with `salt` (the first block starts with it).
    #[cfg(test)]
    pub(crate) fn note_for_test(&self, key: &[u8], salt: &[u8]) {
        let mut block = [0u8; 16];
        block[..salt.len()].copy_from_slice(salt);
        self.0.lock().unwrap().push((key.to_vec(), block));
    }

    #[cfg(test)]
    pub(crate) fn has_any(&self) -> bool {
        !self.candidates().is_empty()
    }

    /// Forgets the keys once they are no longer needed.
    pub fn clear(&self) {
        if let Ok(mut s) = self.0.lock() {
            s.clear();
        }
    }
}

struct CapturingProvider {
    inner: Arc<dyn RTCCryptoProvider>,
    crypto: CapturingCrypto,
}

impl RTCCryptoProvider for CapturingProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn crypto(&self) -> &dyn RTCCrypto {
        &self.crypto
    }
    fn random(&self) -> &dyn RTCRandom {
        self.inner.random()
    }
}

struct CapturingCrypto {
    inner: Arc<dyn RTCCryptoProvider>,
    seen: KeyCapture,
}

impl RTCCrypto for CapturingCrypto {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        self.inner.crypto().supports(algorithm)
    }
    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.crypto().hash(algorithm, data)
    }
    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        // SRTP's key derivation is the only user of single-block encryption in rtc.
        if let (Ok(mut seen), Ok(b)) = (self.seen.0.lock(), <[u8; 16]>::try_from(&*block))
            && seen.len() < MAX_CAPTURED
        {
            seen.push((key.to_vec(), b));
        }
        self.inner.crypto().block_encrypt(algorithm, key, block)
    }
    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner.crypto().new_hmac(algorithm, key)
    }
    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        self.inner.crypto().new_stream_cipher(algorithm, key)
    }
    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        self.inner.crypto().new_aead(algorithm, key)
    }
    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner.crypto().new_cbc(algorithm, key)
    }
    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        self.inner.crypto().start_key_exchange(algorithm)
    }
    fn generate_signing_key(
        &self,
        scheme: SignatureScheme,
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().generate_signing_key(scheme)
    }
    fn import_signing_key(
        &self,
        scheme: SignatureScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().import_signing_key(scheme, pkcs8_der)
    }
    fn verify_signature(
        &self,
        scheme: SignatureScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner
            .crypto()
            .verify_signature(scheme, public_key, message, signature)
    }
}

/// The profiles a connection may have negotiated. The 32-bit-tag variant is left out: its
/// SRTCP looks exactly like the 80-bit one's, so the probe could not tell them apart (such a
/// connection keeps sending through rtc).
const PROFILES: [ProtectionProfile; 3] = [
    ProtectionProfile::AeadAes128Gcm,
    ProtectionProfile::AeadAes256Gcm,
    ProtectionProfile::Aes128CmHmacSha1_80,
];

/// The connection's outbound SRTP protection, owned by the SFU.
pub struct Sealer {
    pub profile: ProtectionProfile,
    how: How,
}

/// One direction's SRTP session keys, ready to use.
pub(crate) enum How {
    /// AES-128-GCM (what browsers and rtc negotiate), sealed in place in the SFU's own send
    /// buffer: no copy, no allocation, no lookup per packet.
    Gcm {
        aead: Box<dyn AeadCipher>,
        salt: [u8; 12],
    },
    /// AES-128 counter mode with an 80-bit HMAC-SHA1 tag (what Chromium negotiates), in place
    /// too.
    CmHmac {
        ctr: Box<dyn StreamCipher>,
        mac: Box<dyn Mac>,
        salt: [u8; 14],
    },
    /// Any other profile, through rtc's SRTP context (it copies and allocates).
    Context(Context),
}

/// RFC 3711 key derivation labels.
const LABEL_SRTP_ENCRYPTION: u8 = 0;
const LABEL_SRTP_AUTHENTICATION: u8 = 1;
const LABEL_SRTP_SALT: u8 = 2;

/// The longest tag a protected packet gets (AES-GCM's); room for it is kept in the send arena.
pub const MAX_TAG: usize = 16;
const GCM_TAG: usize = 16;
const HMAC_SHA1_80_TAG: usize = 10;

impl Sealer {
    /// The captured key and profile under which `srtcp` (a datagram rtc protected on this
    /// connection) authenticates, ready to protect RTP.
    pub fn find(keys: &KeyCapture, srtcp: &[u8]) -> Option<Sealer> {
        let found = keys.find(|mut probe, key, salt, profile, crypto| {
            probe.decrypt_rtcp(srtcp).ok()?;
            Sealer::new(key, salt, profile, crypto)
        });
        keys.clear();
        found
    }

    fn new(
        key: &[u8],
        salt: &[u8],
        profile: ProtectionProfile,
        crypto: &dyn RTCCrypto,
    ) -> Option<Sealer> {
        let how = How::new(key, salt, profile, crypto)?;
        Some(Sealer { profile, how })
    }

    /// Whether [`Sealer::seal_in_place`] works (else [`Sealer::seal`]).
    pub fn in_place(&self) -> bool {
        !matches!(self.how, How::Context(_))
    }

    /// Protects the RTP packet that `buf` holds (its first `header_len` bytes are the header,
    /// authenticated; the rest is encrypted), appending the tag. `roc`: the rollover counter of
    /// the packet's sequence number (RFC 7714 §8.1).
    pub fn seal_in_place(
        &mut self,
        buf: &mut BytesMut,
        header_len: usize,
        ssrc: u32,
        seq: u16,
        roc: u32,
    ) -> Result<(), CryptoError> {
        self.how.seal_in_place(buf, header_len, ssrc, seq, roc)
    }

    /// Protects one marshalled RTP packet (`packet` starts with `header`) through rtc's context.
    pub fn seal(
        &mut self,
        packet: &[u8],
        header: &rtc::rtp::header::Header,
    ) -> Result<Bytes, rtc::shared::error::Error> {
        match &mut self.how {
            How::Context(ctx) => ctx
                .encrypt_rtp_with_header(packet, header)
                .map(|b| b.freeze()),
            How::Gcm { .. } | How::CmHmac { .. } => Err(rtc::shared::error::Error::Other(
                "this profile seals in place".into(),
            )),
        }
    }
}

impl How {
    pub(crate) fn new(
        key: &[u8],
        salt: &[u8],
        profile: ProtectionProfile,
        crypto: &dyn RTCCrypto,
    ) -> Option<How> {
        Some(
            if matches!(profile, ProtectionProfile::AeadAes128Gcm) && key.len() == 16 {
                let session_key = derive(crypto, key, salt, LABEL_SRTP_ENCRYPTION, 0)?;
                let session_salt = derive(crypto, key, salt, LABEL_SRTP_SALT, 0)?;
                let aead = crypto
                    .new_aead(AeadAlgorithm::Aes128Gcm, &session_key)
                    .ok()?;
                let mut salt = [0u8; 12];
                salt.copy_from_slice(&session_salt[..12]);
                How::Gcm { aead, salt }
            } else if matches!(profile, ProtectionProfile::Aes128CmHmacSha1_80) && key.len() == 16 {
                let session_key = derive(crypto, key, salt, LABEL_SRTP_ENCRYPTION, 0)?;
                let session_salt = derive(crypto, key, salt, LABEL_SRTP_SALT, 0)?;
                // A 160-bit key: two blocks of the key stream.
                let mut auth = [0u8; 32];
                auth[..16].copy_from_slice(&derive(
                    crypto,
                    key,
                    salt,
                    LABEL_SRTP_AUTHENTICATION,
                    0,
                )?);
                auth[16..].copy_from_slice(&derive(
                    crypto,
                    key,
                    salt,
                    LABEL_SRTP_AUTHENTICATION,
                    1,
                )?);
                let ctr = crypto
                    .new_stream_cipher(StreamCipherAlgorithm::Aes128Ctr, &session_key)
                    .ok()?;
                let mac = crypto.new_hmac(HmacAlgorithm::Sha1, &auth[..20]).ok()?;
                let mut salt = [0u8; 14];
                salt.copy_from_slice(&session_salt[..14]);
                How::CmHmac { ctr, mac, salt }
            } else {
                How::Context(Context::new(key, salt, profile, None, None, crypto).ok()?)
            },
        )
    }

    fn seal_in_place(
        &mut self,
        buf: &mut BytesMut,
        header_len: usize,
        ssrc: u32,
        seq: u16,
        roc: u32,
    ) -> Result<(), CryptoError> {
        match self {
            How::Gcm { aead, salt } => {
                let nonce = gcm_nonce(salt, ssrc, seq, roc);
                buf.extend_from_slice(&[0u8; GCM_TAG]);
                let (aad, rest) = buf.split_at_mut(header_len);
                let (body, tag) = rest.split_at_mut(rest.len() - GCM_TAG);
                aead.seal_in_place(&nonce, aad, body, tag)
            }
            How::CmHmac { ctr, mac, salt } => {
                ctr.apply_keystream(&ctr_iv(salt, ssrc, seq, roc), &mut buf[header_len..])?;
                // §4.2: the tag covers the packet and the rollover counter.
                let mut tag = [0u8; 20];
                mac.sign(&[&buf[..], &roc.to_be_bytes()], &mut tag)?;
                buf.extend_from_slice(&tag[..HMAC_SHA1_80_TAG]);
                Ok(())
            }
            // The other profiles go through rtc's context (`seal`).
            How::Context(_) => Err(not_in_place()),
        }
    }

    /// Authenticates and decrypts the SRTP packet `buf` holds, in place, and drops its tag.
    pub(crate) fn open_in_place(
        &mut self,
        buf: &mut [u8],
        header_len: usize,
        ssrc: u32,
        seq: u16,
        roc: u32,
    ) -> Result<usize, CryptoError> {
        match self {
            How::Gcm { aead, salt } => {
                let Some(body_end) = buf.len().checked_sub(GCM_TAG).filter(|e| *e >= header_len)
                else {
                    return Err(CryptoError::AuthenticationFailed);
                };
                let nonce = gcm_nonce(salt, ssrc, seq, roc);
                let (aad, rest) = buf.split_at_mut(header_len);
                let (body, tag) = rest.split_at_mut(body_end - header_len);
                aead.open_in_place(&nonce, aad, body, tag)?;
                Ok(body_end)
            }
            How::CmHmac { ctr, mac, salt } => {
                let Some(body_end) = buf
                    .len()
                    .checked_sub(HMAC_SHA1_80_TAG)
                    .filter(|e| *e >= header_len)
                else {
                    return Err(CryptoError::AuthenticationFailed);
                };
                let mut tag = [0u8; 20];
                mac.sign(&[&buf[..body_end], &roc.to_be_bytes()], &mut tag)?;
                // In constant time: the difference of every byte, folded.
                let diff = tag[..HMAC_SHA1_80_TAG]
                    .iter()
                    .zip(&buf[body_end..])
                    .fold(0u8, |d, (a, b)| d | (a ^ b));
                if diff != 0 {
                    return Err(CryptoError::AuthenticationFailed);
                }
                ctr.apply_keystream(
                    &ctr_iv(salt, ssrc, seq, roc),
                    &mut buf[header_len..body_end],
                )?;
                Ok(body_end)
            }
            How::Context(_) => Err(not_in_place()),
        }
    }
}

fn not_in_place() -> CryptoError {
    CryptoError::UnsupportedAlgorithm(CryptoAlgorithm::Aead(AeadAlgorithm::Aes128Gcm))
}

/// RFC 7714 §8.1: the 12-byte IV is the session salt XOR (SSRC, ROC, SEQ).
fn gcm_nonce(salt: &[u8; 12], ssrc: u32, seq: u16, roc: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
    nonce[6..10].copy_from_slice(&roc.to_be_bytes());
    nonce[10..12].copy_from_slice(&seq.to_be_bytes());
    for (n, s) in nonce.iter_mut().zip(salt.iter()) {
        *n ^= s;
    }
    nonce
}

/// RFC 3711 §4.1.1: IV = (salt · 2^16) ⊕ (SSRC · 2^64) ⊕ (index · 2^16).
fn ctr_iv(salt: &[u8; 14], ssrc: u32, seq: u16, roc: u32) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&roc.to_be_bytes());
    iv[12..14].copy_from_slice(&seq.to_be_bytes());
    for (v, s) in iv.iter_mut().zip(salt.iter()) {
        *v ^= s;
    }
    iv
}

/// The connection's inbound SRTP, owned by the SFU: opens a publisher's media in place.
pub struct Opener {
    pub profile: ProtectionProfile,
    how: How,
}

impl Opener {
    /// The captured key and profile under which `srtp` (an RTP packet the remote end sent)
    /// authenticates. Only the profiles that open in place qualify.
    pub fn find(keys: &KeyCapture, srtp: &[u8]) -> Option<Opener> {
        let found = keys.find(|mut probe, key, salt, profile, crypto| {
            probe.decrypt_rtp(srtp).ok()?;
            let how = How::new(key, salt, profile, crypto)?;
            (!matches!(how, How::Context(_))).then_some(Opener { profile, how })
        });
        if found.is_some() {
            keys.clear();
        }
        found
    }

    /// Authenticates and decrypts the SRTP packet in `buf` (its first `header_len` bytes are
    /// the header); returns where the payload ends (the tag is not part of it).
    pub fn open_in_place(
        &mut self,
        buf: &mut [u8],
        header_len: usize,
        ssrc: u32,
        seq: u16,
        roc: u32,
    ) -> Result<usize, CryptoError> {
        self.how.open_in_place(buf, header_len, ssrc, seq, roc)
    }
}

/// Block `i` of an AES-128 session key, salt or authentication key from the master key (RFC 3711
/// §4.3.3, key derivation rate 0): AES of the master salt with the label in byte 7 and the
/// block number in the last two.
fn derive(crypto: &dyn RTCCrypto, key: &[u8], salt: &[u8], label: u8, i: u16) -> Option<[u8; 16]> {
    let mut block = [0u8; 16];
    block.get_mut(..salt.len())?.copy_from_slice(salt);
    block[7] ^= label;
    block[14..].copy_from_slice(&i.to_be_bytes());
    crypto
        .block_encrypt(BlockCipherAlgorithm::Aes128, key, &mut block)
        .ok()?;
    Some(block)
}

/// The sender's view of one SSRC's SRTP packet index: the rollover counter of each sequence
/// number, as the receiver will estimate it (the extension nearest the highest seen).
#[derive(Default)]
pub struct Rollover(Option<u64>);

impl Rollover {
    pub fn roc(&mut self, seq: u16) -> u32 {
        let ext = self.extend(seq);
        self.note(ext);
        (ext >> 16) as u32
    }

    /// The extended sequence number nearest the highest seen (RFC 3711 §3.3.1).
    pub fn extend(&self, seq: u16) -> u64 {
        match self.0 {
            None => u64::from(seq),
            Some(last) => {
                let back = i64::from(seq.wrapping_sub(last as u16) as i16);
                (last as i64 + back).max(0) as u64
            }
        }
    }

    pub fn note(&mut self, ext: u64) {
        if self.0.is_none_or(|last| ext > last) {
            self.0 = Some(ext);
        }
    }

    pub fn highest(&self) -> Option<u64> {
        self.0
    }
}

/// RFC 5761: an RTCP packet type in the second byte (RTP payload types stop below 72 with the
/// marker bit, or 128 + 71 with it).
pub fn is_rtcp(datagram: &[u8]) -> bool {
    datagram.len() >= 8 && (128..192).contains(&datagram[0]) && (192..224).contains(&datagram[1])
}

/// Whether `datagram` is RTP (not RTCP, not STUN or DTLS).
pub fn is_rtp(datagram: &[u8]) -> bool {
    datagram.len() >= 12 && (128..192).contains(&datagram[0]) && !is_rtcp(datagram)
}

/// The last packets sent on one video stream, by sequence number, to resend (as RTX) when the
/// subscriber reports them lost (NACK). The payloads are the publisher's, shared by every
/// subscriber: a slot costs a reference, not a copy.
pub struct SentRing {
    slots: Box<[Option<Kept>]>,
}

/// One sent packet as the subscriber saw it.
#[derive(Clone)]
pub struct Kept {
    pub seq: u16,
    pub ts: u32,
    pub marker: bool,
    pub payload: Bytes,
}

/// About 1.7 s of a full-size layer; a NACK comes within a round trip or two.
pub const SENT_RING: usize = 512;

impl Default for SentRing {
    fn default() -> Self {
        SentRing {
            slots: (0..SENT_RING).map(|_| None).collect(),
        }
    }
}

impl SentRing {
    pub fn push(&mut self, kept: Kept) {
        let i = kept.seq as usize % SENT_RING;
        self.slots[i] = Some(kept);
    }

    pub fn get(&self, seq: u16) -> Option<&Kept> {
        self.slots[seq as usize % SENT_RING]
            .as_ref()
            .filter(|k| k.seq == seq)
    }
}

/// What a sender report about one outgoing stream says.
#[derive(Default)]
pub struct SendStats {
    packets: u32,
    octets: u32,
    /// The RTP timestamp of the latest frame, and when its first packet went out.
    last: Option<(u32, Instant)>,
}

impl SendStats {
    pub fn on_packet(&mut self, now: Instant, ts: u32, payload: usize) {
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(payload as u32);
        // The first packet of a frame fixes the mapping: the rest of a frame goes out later
        // only because it is long.
        if self.last.is_none_or(|(t, _)| t != ts) {
            self.last = Some((ts, now));
        }
    }

    /// A sender report for `ssrc` as of `now`, once something was sent.
    pub fn report(
        &self,
        now: Instant,
        ssrc: u32,
        clock_rate: u32,
        wall: &SystemInstant,
    ) -> Option<SenderReport> {
        let (ts, at) = self.last?;
        let since = now.saturating_duration_since(at).as_secs_f64();
        Some(SenderReport {
            ssrc,
            ntp_time: wall.ntp(now),
            rtp_time: ts.wrapping_add((since * f64::from(clock_rate)) as u32),
            packet_count: self.packets,
            octet_count: self.octets,
            ..Default::default()
        })
    }
}

/// Sent packets remembered for TWCC feedback: several seconds at any sane rate, and feedback
/// comes every 100 ms or so.
const TWCC_HISTORY: usize = 2048;

/// One sent packet awaiting feedback. `id` is the extended transport-wide sequence number (its
/// low 16 bits are what went on the wire), so slots are found without hashing.
#[derive(Clone, Copy)]
struct Sent {
    id: u64,
    ssrc: u32,
    seq: u16,
    size: u32,
    departure: Instant,
    arrived: bool,
    arrival: Option<Duration>,
}

/// Transport-wide congestion control for one connection: numbers every packet, remembers when
/// it left, and feeds the subscriber's feedback to the estimator (GCC). Does what rtc's
/// `History` does, in a ring instead of three hash maps (a third of the forwarding time).
pub struct Congestion {
    /// The negotiated id of the transport-wide sequence number extension.
    pub ext_id: Option<u8>,
    next: u64,
    sent: Box<[Option<Sent>]>,
    /// Highest id reported as arrived, and the lowest not yet handed to the estimator.
    highest_arrived: Option<u64>,
    next_to_report: u64,
    estimator: Published<Gcc>,
}

impl Congestion {
    pub fn new(estimator: Published<Gcc>) -> Congestion {
        Congestion {
            ext_id: None,
            next: 0,
            sent: vec![None; TWCC_HISTORY].into_boxed_slice(),
            highest_arrived: None,
            next_to_report: 0,
            estimator,
        }
    }

    /// The extension id and the next transport-wide sequence number, if negotiated.
    pub fn number(&mut self) -> Option<(u8, u16)> {
        let id = self.ext_id?;
        Some((id, self.next as u16))
    }

    /// Records the packet numbered by the last [`Congestion::number`].
    pub fn sent(&mut self, ssrc: u32, seq: u16, size: usize, now: Instant) {
        let id = self.next;
        self.next += 1;
        self.sent[id as usize % TWCC_HISTORY] = Some(Sent {
            id,
            ssrc,
            seq,
            size: size as u32,
            departure: now,
            arrived: false,
            arrival: None,
        });
    }

    /// The extended id of a wire sequence number: the one nearest the last sent.
    fn extend(&self, wire: u16) -> Option<u64> {
        let last = self.next.checked_sub(1)?;
        let back = (last as u16).wrapping_sub(wire) as u64;
        last.checked_sub(back)
    }

    pub fn on_feedback(&mut self, now: Instant, feedback: &TransportLayerCc) {
        for ack in convert_twcc(feedback) {
            let Some(id) = self.extend(ack.sequence_number) else {
                continue;
            };
            let Some(p) = self.sent[id as usize % TWCC_HISTORY]
                .as_mut()
                .filter(|p| p.id == id)
            else {
                continue;
            };
            p.arrived = ack.arrived;
            p.arrival = ack.arrival;
            if ack.arrived {
                self.highest_arrived = Some(self.highest_arrived.map_or(id, |h| h.max(id)));
            }
        }
        let reports = self.take_reports();
        if !reports.is_empty() {
            self.estimator.on_reports(now, &reports);
        }
    }

    /// Everything up to the highest arrived packet, in send order; what did not arrive by then
    /// is reported lost.
    fn take_reports(&mut self) -> Vec<PacketReport> {
        let Some(highest) = self.highest_arrived else {
            return Vec::new();
        };
        let from = self
            .next_to_report
            .max((highest + 1).saturating_sub(TWCC_HISTORY as u64));
        let mut out = Vec::new();
        for id in from..=highest {
            let slot = &mut self.sent[id as usize % TWCC_HISTORY];
            if let Some(p) = slot.take_if(|p| p.id == id) {
                out.push(PacketReport {
                    ssrc: p.ssrc,
                    id,
                    rtp_sequence_number: p.seq,
                    is_twcc: true,
                    twcc_sequence_number: id as u16,
                    size: p.size as usize,
                    arrived: p.arrived,
                    departure: p.departure,
                    arrival: p.arrival,
                    ecn: Ecn::NotEct,
                });
            }
        }
        self.next_to_report = self.next_to_report.max(highest + 1);
        out
    }

    pub fn on_tick(&mut self, now: Instant) {
        self.estimator.handle_timeout(now);
    }
}

/// Writes the RTP header the SFU sends (no CSRCs; at most the transport-wide sequence number,
/// as a one-byte-header extension) into `buf`; returns its length.
pub fn write_header(
    buf: &mut impl BufMut,
    marker: bool,
    pt: u8,
    seq: u16,
    ts: u32,
    ssrc: u32,
    twcc: Option<(u8, u16)>,
) -> usize {
    buf.put_u8(0x80 | if twcc.is_some() { 0x10 } else { 0 });
    buf.put_u8(u8::from(marker) << 7 | (pt & 0x7f));
    buf.put_u16(seq);
    buf.put_u32(ts);
    buf.put_u32(ssrc);
    let Some((id, n)) = twcc else {
        return 12;
    };
    // Profile 0xBEDE, one 32-bit word: id and length-1, two bytes, one byte of padding.
    let [hi, lo] = n.to_be_bytes();
    buf.put_slice(&[0xBE, 0xDE, 0, 1, (id << 4) | 1, hi, lo, 0]);
    20
}

/// How a subscriber connection's media gets protected.
pub enum Seal {
    /// Connected, but not yet known which key is ours.
    Pending,
    /// By the SFU, with the connection's own key: the fast path.
    Own(Sealer),
    /// Through rtc's pipeline (the probe found no key, or the fast path is switched off).
    Rtc,
}

/// The send side of a subscriber connection.
pub struct Outbound {
    pub keys: KeyCapture,
    pub seal: Seal,
    /// Where the selected candidate pair sends (and whether over ICE-TCP), as rtc last sent.
    pub dest: Option<(SocketAddr, bool)>,
    pub cc: Congestion,
    /// Reused for every packet: its extension list keeps its capacity.
    pub header: rtc::rtp::header::Header,
    pub wall: SystemInstant,
}

impl Outbound {
    pub fn new(now: Instant, keys: KeyCapture, estimator: Published<Gcc>) -> Outbound {
        Outbound {
            keys,
            seal: Seal::Pending,
            dest: None,
            cc: Congestion::new(estimator),
            header: rtc::rtp::header::Header {
                version: 2,
                extensions: Vec::with_capacity(1),
                ..Default::default()
            },
            wall: SystemInstant::now(now),
        }
    }
}

/// An rtc SRTP context protecting with AES-128-GCM under `key` and `salt`: the far end.
#[cfg(test)]
pub(crate) fn gcm_context(key: &[u8], salt: &[u8]) -> Context {
    let provider = rtc::crypto::default_provider().unwrap();
    let gcm = ProtectionProfile::AeadAes128Gcm;
    Context::new(key, salt, gcm, None, None, provider.crypto()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_ring_returns_only_the_sequence_asked_for() {
        let kept = |seq: u16, what: &'static [u8]| Kept {
            seq,
            ts: 0,
            marker: false,
            payload: Bytes::from_static(what),
        };
        let mut r = SentRing::default();
        r.push(kept(10, b"ten"));
        r.push(kept(10 + SENT_RING as u16, b"later"));
        assert!(r.get(10).is_none(), "overwritten by a later packet");
        assert_eq!(
            r.get(10 + SENT_RING as u16).map(|k| &k.payload[..]),
            Some(&b"later"[..])
        );
        r.push(kept(65_535, b"wrap"));
        assert_eq!(r.get(65_535).map(|k| &k.payload[..]), Some(&b"wrap"[..]));
        assert!(r.get(11).is_none());
    }

    #[test]
    fn in_place_gcm_equals_rtcs_srtp() {
        sealed_in_place_equals_rtcs_srtp(ProtectionProfile::AeadAes128Gcm, &[0x22; 12]);
    }

    #[test]
    fn in_place_cm_hmac_equals_rtcs_srtp() {
        sealed_in_place_equals_rtcs_srtp(ProtectionProfile::Aes128CmHmacSha1_80, &[0x33; 14]);
    }

    fn sealed_in_place_equals_rtcs_srtp(profile: ProtectionProfile, salt: &[u8]) {
        use rtc::shared::marshal::Unmarshal;
        let provider = rtc::crypto::default_provider().unwrap();
        let crypto = provider.crypto();
        let key = [0x11u8; 16];
        let mut ours = Sealer::new(&key, salt, profile, crypto).unwrap();
        assert!(ours.in_place());
        let mut theirs = Context::new(&key, salt, profile, None, None, crypto).unwrap();
        let mut roc = Rollover::default();
        let mut opener: Option<Opener> = None;
        let payload = vec![0x5Au8; 700];
        for (i, seq) in (65_530u16..=65_535).chain(0..6).enumerate() {
            let twcc = (i % 2 == 0).then_some((5u8, i as u16));
            let mut buf = BytesMut::new();
            let n = write_header(&mut buf, i % 3 == 0, 96, seq, 9000 * i as u32, 0xCAFE, twcc);
            buf.extend_from_slice(&payload);
            let plain = buf.clone();
            let r = roc.roc(seq);
            ours.seal_in_place(&mut buf, n, 0xCAFE, seq, r).unwrap();
            let header = rtc::rtp::header::Header::unmarshal(&mut &plain[..]).unwrap();
            let expected = theirs.encrypt_rtp_with_header(&plain, &header).unwrap();
            assert_eq!(&buf[..], &expected[..], "packet {seq}");

            // The receiving side: found from rtc's packet among the captured keys, it opens
            // what rtc sealed, and refuses it altered.
            let opener = opener.get_or_insert_with(|| {
                let keys = KeyCapture::default();
                keys.note_for_test(&[0x22u8; 16], salt);
                keys.note_for_test(&key, salt);
                Opener::find(&keys, &expected).expect("the key that sealed it")
            });
            let mut altered = expected.to_vec();
            altered[n + 3] ^= 0x40;
            assert!(
                opener
                    .open_in_place(&mut altered, n, 0xCAFE, seq, r)
                    .is_err()
            );
            let mut opened = expected.to_vec();
            let end = opener
                .open_in_place(&mut opened, n, 0xCAFE, seq, r)
                .unwrap();
            assert_eq!(&opened[..end], &plain[..], "opened {seq}");
            let wrong_roc = r.wrapping_add(1);
            let mut opened = expected.to_vec();
            assert!(
                opener
                    .open_in_place(&mut opened, n, 0xCAFE, seq, wrong_roc)
                    .is_err()
            );
        }
    }

    #[test]
    fn rollover_counts_wraps_and_tolerates_reordering() {
        let mut r = Rollover::default();
        assert_eq!(r.roc(65_534), 0);
        assert_eq!(r.roc(65_535), 0);
        assert_eq!(r.roc(0), 1);
        assert_eq!(r.roc(65_535), 0, "a late packet from before the wrap");
        assert_eq!(r.roc(1), 1);
        let mut fresh = Rollover::default();
        assert_eq!(fresh.roc(3), 0);
        assert_eq!(
            fresh.roc(65_000),
            0,
            "behind the first packet: no negative index"
        );
    }

    #[test]
    fn written_headers_parse_back() {
        use rtc::shared::marshal::Unmarshal;
        for twcc in [None, Some((3u8, 0xABCDu16))] {
            let mut buf = vec![9u8];
            let n = write_header(&mut buf, true, 96, 65_000, 0xDEAD_BEEF, 42, twcc);
            let h = rtc::rtp::header::Header::unmarshal(&mut &buf[1..]).unwrap();
            assert_eq!(n, buf.len() - 1);
            use rtc::shared::marshal::MarshalSize;
            assert_eq!(h.marshal_size(), n);
            assert_eq!(
                (
                    h.marker,
                    h.payload_type,
                    h.sequence_number,
                    h.timestamp,
                    h.ssrc
                ),
                (true, 96, 65_000, 0xDEAD_BEEF, 42)
            );
            let ext = twcc.and_then(|(id, _)| h.get_extension(id));
            assert_eq!(ext.as_deref(), twcc.map(|_| &[0xAB, 0xCD][..]));
        }
    }

    #[test]
    fn demultiplexes_rtp_from_rtcp() {
        let rtp = [0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let rtcp = [0x80, 201, 0, 1, 0, 0, 0, 1];
        assert!(is_rtp(&rtp) && !is_rtcp(&rtp));
        assert!(is_rtcp(&rtcp) && !is_rtp(&rtcp));
        assert!(!is_rtp(&[
            0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0
        ]));
    }

    #[test]
    fn sender_report_extrapolates_the_timestamp() {
        let t0 = Instant::now();
        let wall = SystemInstant::now(t0);
        let mut s = SendStats::default();
        assert!(s.report(t0, 1, 90_000, &wall).is_none());
        s.on_packet(t0, 1000, 100);
        s.on_packet(t0 + Duration::from_millis(5), 1000, 100);
        let sr = s
            .report(t0 + Duration::from_millis(100), 7, 90_000, &wall)
            .unwrap();
        assert_eq!((sr.ssrc, sr.packet_count, sr.octet_count), (7, 2, 200));
        assert_eq!(sr.rtp_time, 1000 + 9000);
    }

    #[test]
    fn a_key_that_did_not_protect_the_probe_is_not_used() {
        let key = [7u8; 16];
        let salt = [9u8; 12];
        let mut theirs = gcm_context(&key, &salt);
        let rr = [0x80, 201, 0, 1, 0, 0, 0, 1];
        let srtcp = theirs.encrypt_rtcp(&rr).unwrap();
        let wrong = KeyCapture::default();
        wrong.note_for_test(&[8u8; 16], &salt);
        assert!(Sealer::find(&wrong, &srtcp).is_none());
        let right = KeyCapture::default();
        right.note_for_test(&[8u8; 16], &salt);
        right.note_for_test(&key, &salt);
        let found = Sealer::find(&right, &srtcp).expect("the second key protected it");
        assert!(matches!(found.profile, ProtectionProfile::AeadAes128Gcm));
        assert!(
            right.candidates().is_empty(),
            "keys are forgotten after the probe"
        );
    }
}
