//! Rooms and participants: who is where, what they publish, and who hears what. Signaling state
//! only (never on the media path), so one mutex is fine here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sfu::RouterId;
use sfu::core::{Direction, MediaKind, PeerId, ProducerId, SfuEvent};
use sfu::driver::SfuHandle;
use tokio::sync::mpsc;

use crate::protocol::{
    IceServer, MidTrack, ParticipantInfo, ServerMessage, TrackInfo, TrackKind, TrackSource,
    VideoCodec,
};
use crate::token::{Claims, TokenKey};

#[derive(Debug, Clone)]
pub struct RoomsConfig {
    /// How long an empty room lingers before it is closed.
    pub empty_timeout: Duration,
    /// How long a participant whose connection dropped keeps its place.
    pub reconnect_grace: Duration,
    pub ice_servers: Vec<IceServer>,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            empty_timeout: Duration::from_secs(300),
            reconnect_grace: Duration::from_secs(30),
            ice_servers: Vec::new(),
        }
    }
}

/// What the connection task sends to its socket.
#[derive(Debug)]
pub enum Outgoing {
    Message(ServerMessage),
    Close(u16, String),
}

pub type Outbox = mpsc::UnboundedSender<Outgoing>;

struct Participant {
    name: String,
    claims: Claims,
    tracks: Vec<TrackInfo>,
    /// mid → source, from the client's offers.
    intents: HashMap<String, TrackSource>,
    outbox: Outbox,
    conn: u64,
    /// Can send and receive H.264 (said by the client when it connects).
    h264: bool,
    publisher: Option<PeerId>,
    subscriber: Option<PeerId>,
    disconnected_at: Option<Instant>,
}

impl Participant {
    fn info(&self, identity: &str) -> ParticipantInfo {
        ParticipantInfo {
            identity: identity.to_string(),
            name: self.name.clone(),
            tracks: self.tracks.clone(),
            can_publish: self.claims.grants.publish,
            is_admin: self.claims.grants.admin,
            can_record: self.claims.grants.record,
        }
    }

    fn send(&self, msg: ServerMessage) {
        let _ = self.outbox.send(Outgoing::Message(msg));
    }
}

#[derive(Default)]
struct Room {
    participants: BTreeMap<String, Participant>,
    empty_since: Option<Instant>,
    video_codec: VideoCodec,
    /// The recording in progress, if any.
    recording: Option<String>,
}

impl Room {
    /// Nobody counts as present but hidden participants (the recorder).
    fn deserted(&self) -> bool {
        self.participants.values().all(|p| p.claims.grants.hidden)
    }

    fn visible(&self) -> impl Iterator<Item = ParticipantInfo> + '_ {
        self.participants
            .iter()
            .filter(|(_, p)| !p.claims.grants.hidden)
            .map(|(id, p)| p.info(id))
    }

    /// H.264 when everyone can decode it; tells everyone when that changes.
    /// H.264 when everyone, including a `newcomer` about to enter, can decode it; tells the
    /// people already in the room when that changes.
    fn update_codec(&mut self, newcomer: Option<bool>) {
        let anyone = newcomer.is_some() || !self.participants.is_empty();
        let all = newcomer.unwrap_or(true) && self.participants.values().all(|p| p.h264);
        let codec = if anyone && all {
            VideoCodec::H264
        } else {
            VideoCodec::Vp8
        };
        if codec != self.video_codec {
            self.video_codec = codec;
            self.broadcast(None, &ServerMessage::VideoCodec { codec });
        }
    }

    fn broadcast(&self, except: Option<&str>, msg: &ServerMessage) {
        for (id, p) in &self.participants {
            if Some(id.as_str()) != except && p.disconnected_at.is_none() {
                p.send(msg.clone());
            }
        }
    }
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    /// Which participant owns each SFU peer.
    peers: HashMap<PeerId, (String, String)>,
    /// Offers the SFU made for a subscriber peer before `join` registered it (it offers as soon
    /// as the peer exists); delivered once it is registered.
    early_offers: HashMap<PeerId, ServerMessage>,
}

/// A participant asked to start or stop recording its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRequest {
    pub room: String,
    /// The asking participant's identity (a user id for tokens the portal issued).
    pub identity: String,
    pub start: bool,
}

/// A summary for the room service API and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomSummary {
    pub name: String,
    pub participants: Vec<ParticipantInfo>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoomError {
    #[error("no such room")]
    NoRoom,
    #[error("no such participant")]
    NoParticipant,
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    #[error("{0}")]
    Media(String),
}

struct Inner {
    config: RoomsConfig,
    tokens: TokenKey,
    sfu: SfuHandle,
    state: Mutex<State>,
    next_conn: std::sync::atomic::AtomicU64,
    record_requests: (
        mpsc::UnboundedSender<RecordRequest>,
        Mutex<Option<mpsc::UnboundedReceiver<RecordRequest>>>,
    ),
}

/// The room service: cheap to clone, shared by every connection and the REST API.
#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Inner>,
}

/// What a connection learns when it joins.
pub struct Joined {
    pub conn: u64,
}

impl Rooms {
    pub fn new(config: RoomsConfig, tokens: TokenKey, sfu: SfuHandle) -> Rooms {
        Rooms {
            inner: Arc::new(Inner {
                config,
                tokens,
                sfu,
                state: Mutex::new(State::default()),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                record_requests: {
                    let (tx, rx) = mpsc::unbounded_channel();
                    (tx, Mutex::new(Some(rx)))
                },
            }),
        }
    }

    pub fn tokens(&self) -> &TokenKey {
        &self.inner.tokens
    }

    /// Marks `room` as being recorded (`Some(recording id)`) or no longer, and tells everyone in
    /// it, and everyone who joins later, so that no one is recorded unawares.
    pub fn set_recording(&self, room: &str, recording: Option<&str>) {
        let mut st = self.state();
        let fresh = !st.rooms.contains_key(room);
        let r = st.rooms.entry(room.to_string()).or_default();
        let was = r.recording.is_some();
        r.recording = recording.map(str::to_string);
        if was != recording.is_some() {
            r.broadcast(
                None,
                &ServerMessage::Recording {
                    active: recording.is_some(),
                },
            );
        }
        if fresh {
            // Nobody is here yet: the room closes as any empty room does unless someone comes.
            r.empty_since = Some(Instant::now());
            drop(st);
            self.expire_later(room.to_string());
        }
    }

    /// The recording in progress in `room`.
    pub fn recording(&self, room: &str) -> Option<String> {
        self.state().rooms.get(room)?.recording.clone()
    }

    /// A participant with the `record` grant asks to start or stop recording.
    pub fn request_recording(&self, room: &str, identity: &str, start: bool) {
        let _ = self.inner.record_requests.0.send(RecordRequest {
            room: room.into(),
            identity: identity.into(),
            start,
        });
    }

    /// The start and stop requests of participants with the `record` grant, for whoever keeps
    /// the recordings catalogue. Only the first call gets the receiver.
    pub fn record_requests(&self) -> Option<mpsc::UnboundedReceiver<RecordRequest>> {
        self.inner
            .record_requests
            .1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn sfu(&self) -> &SfuHandle {
        &self.inner.sfu
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters the room (or resumes a place kept for a dropped connection) and sets up the
    /// participant's peer connections.
    pub async fn join(
        &self,
        claims: Claims,
        name: String,
        h264: bool,
        outbox: Outbox,
    ) -> Result<Joined, RoomError> {
        let conn = self
            .inner
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let identity = claims.sub.clone();
        let room_name = claims.room.clone();
        let router = RouterId(room_name.clone());
        let publisher = if claims.grants.publish {
            Some(
                self.inner
                    .sfu
                    .create_peer(router.clone(), identity.clone(), Direction::Publish)
                    .await
                    .map_err(|e| RoomError::Media(e.to_string()))?,
            )
        } else {
            None
        };
        let subscriber = if claims.grants.subscribe {
            match self
                .inner
                .sfu
                .create_peer(router, identity.clone(), Direction::Subscribe)
                .await
            {
                Ok(p) => Some(p),
                Err(e) => {
                    if let Some(p) = publisher {
                        self.inner.sfu.close_peer(p);
                    }
                    return Err(RoomError::Media(e.to_string()));
                }
            }
        } else {
            None
        };
        let mut st = self.state();
        for p in publisher.iter().chain(subscriber.iter()) {
            st.peers.insert(*p, (room_name.clone(), identity.clone()));
        }
        let hidden = claims.grants.hidden;
        let room = st.rooms.entry(room_name.clone()).or_default();
        if !hidden {
            room.empty_since = None;
        }
        let previous = room.participants.remove(&identity);
        let resumed = previous.is_some();
        let mut old_peers = Vec::new();
        if let Some(old) = &previous {
            if old.disconnected_at.is_none() {
                let _ = old.outbox.send(Outgoing::Message(ServerMessage::Closed {
                    reason: "replaced by a new connection".into(),
                }));
                let _ = old.outbox.send(Outgoing::Close(4000, "replaced".into()));
            }
            old_peers.extend(old.publisher.iter().chain(old.subscriber.iter()).copied());
        }
        let display = if name.trim().is_empty() {
            claims.name.clone()
        } else {
            name.trim().chars().take(64).collect()
        };
        let participant = Participant {
            name: display,
            claims,
            // Old tracks go with the old connection; the SFU reports their removal.
            tracks: previous.map(|p| p.tracks).unwrap_or_default(),
            intents: HashMap::new(),
            outbox,
            conn,
            h264,
            publisher,
            subscriber,
            disconnected_at: None,
        };
        // The newcomer counts: if it cannot decode H.264, the others switch before it arrives.
        room.update_codec(Some(h264));
        let you = participant.info(&identity);
        let others: Vec<ParticipantInfo> = room.visible().collect();
        participant.send(ServerMessage::Joined {
            room: room_name.clone(),
            you: you.clone(),
            participants: others,
            ice_servers: self.inner.config.ice_servers.clone(),
            resumed,
            video_codec: room.video_codec,
            recording: room.recording.is_some(),
        });
        if !resumed && !hidden {
            room.broadcast(None, &ServerMessage::ParticipantJoined { participant: you });
        }
        let early = subscriber.and_then(|s| st.early_offers.remove(&s));
        if let Some(offer) = early {
            participant.send(offer);
        }
        let room = st.rooms.entry(room_name.clone()).or_default();
        room.participants.insert(identity, participant);
        for p in &old_peers {
            st.peers.remove(p);
            st.early_offers.remove(p);
        }
        drop(st);
        for p in old_peers {
            self.inner.sfu.close_peer(p);
        }
        Ok(Joined { conn })
    }

    /// The connection `conn` of `identity` ended. A `leave` removes at once; a drop keeps the
    /// place for the reconnect grace period.
    pub fn disconnected(&self, room: &str, identity: &str, conn: u64, left: bool) {
        if left {
            self.remove(room, identity, Some(conn), None);
            return;
        }
        {
            let mut st = self.state();
            let Some(p) = st
                .rooms
                .get_mut(room)
                .and_then(|r| r.participants.get_mut(identity))
            else {
                return;
            };
            if p.conn != conn {
                return;
            }
            p.disconnected_at = Some(Instant::now());
        }
        let this = self.clone();
        let (room, identity) = (room.to_string(), identity.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(this.inner.config.reconnect_grace).await;
            let still_gone = {
                let st = this.state();
                st.rooms
                    .get(&room)
                    .and_then(|r| r.participants.get(&identity))
                    .is_some_and(|p| p.conn == conn && p.disconnected_at.is_some())
            };
            if still_gone {
                this.remove(&room, &identity, Some(conn), None);
            }
        });
    }

    /// Takes a participant out: closes its peers, tells the others, and starts the empty-room
    /// clock. With `conn`, only if that is still its connection.
    fn remove(
        &self,
        room_name: &str,
        identity: &str,
        conn: Option<u64>,
        closing: Option<(u16, &str)>,
    ) -> bool {
        let peers;
        {
            let mut st = self.state();
            let Some(room) = st.rooms.get_mut(room_name) else {
                return false;
            };
            if conn.is_some_and(|c| room.participants.get(identity).is_some_and(|p| p.conn != c)) {
                return false;
            }
            let Some(p) = room.participants.remove(identity) else {
                return false;
            };
            if let Some((code, reason)) = closing {
                p.send(ServerMessage::Closed {
                    reason: reason.into(),
                });
                let _ = p.outbox.send(Outgoing::Close(code, reason.into()));
            }
            if !p.claims.grants.hidden {
                room.broadcast(
                    None,
                    &ServerMessage::ParticipantLeft {
                        identity: identity.into(),
                    },
                );
            }
            room.update_codec(None);
            let empty = room.deserted() && room.empty_since.is_none();
            if empty {
                room.empty_since = Some(Instant::now());
            }
            peers = p
                .publisher
                .into_iter()
                .chain(p.subscriber)
                .collect::<Vec<_>>();
            for peer in &peers {
                st.peers.remove(peer);
                st.early_offers.remove(peer);
            }
            if empty {
                self.expire_later(room_name.to_string());
            }
        }
        for peer in peers {
            self.inner.sfu.close_peer(peer);
        }
        true
    }

    fn expire_later(&self, room: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.inner.config.empty_timeout).await;
            let deserted = {
                let st = this.state();
                st.rooms
                    .get(&room)
                    .is_some_and(|r| r.deserted() && r.empty_since.is_some())
            };
            // Hidden participants (the recorder) are shown out as the room closes.
            if deserted && this.close_room(&room).is_ok() {
                tracing::info!(room, "room closed after being empty");
            }
        });
    }

    pub fn publisher_peer(&self, room: &str, identity: &str) -> Option<PeerId> {
        self.state()
            .rooms
            .get(room)?
            .participants
            .get(identity)?
            .publisher
    }

    pub fn subscriber_peer(&self, room: &str, identity: &str) -> Option<PeerId> {
        self.state()
            .rooms
            .get(room)?
            .participants
            .get(identity)?
            .subscriber
    }

    pub fn set_intents(
        &self,
        room: &str,
        identity: &str,
        intents: impl IntoIterator<Item = (String, TrackSource)>,
    ) {
        let mut st = self.state();
        if let Some(p) = st
            .rooms
            .get_mut(room)
            .and_then(|r| r.participants.get_mut(identity))
        {
            p.intents.extend(intents);
        }
    }

    /// Marks one of the participant's own tracks muted or not.
    pub fn set_muted(
        &self,
        room: &str,
        identity: &str,
        track: &str,
        muted: bool,
    ) -> Result<(), RoomError> {
        let mut st = self.state();
        let r = st.rooms.get_mut(room).ok_or(RoomError::NoRoom)?;
        let p = r
            .participants
            .get_mut(identity)
            .ok_or(RoomError::NoParticipant)?;
        let t = p
            .tracks
            .iter_mut()
            .find(|t| t.id == track)
            .ok_or(RoomError::NotAllowed("not your track"))?;
        t.muted = muted;
        let info = p.info(identity);
        r.broadcast(
            None,
            &ServerMessage::ParticipantUpdated { participant: info },
        );
        Ok(())
    }

    /// The participant's own track, for unpublishing.
    pub fn own_track(&self, room: &str, identity: &str, track: &str) -> Option<ProducerId> {
        let st = self.state();
        let p = st.rooms.get(room)?.participants.get(identity)?;
        p.tracks
            .iter()
            .any(|t| t.id == track)
            .then(|| ProducerId::parse(track))
            .flatten()
    }

    pub fn chat(&self, room: &str, from: &str, text: String) {
        let st = self.state();
        let Some(r) = st.rooms.get(room) else { return };
        let name = r
            .participants
            .get(from)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        r.broadcast(
            None,
            &ServerMessage::Chat {
                from: from.into(),
                name,
                text,
                at,
            },
        );
    }

    /// Admin action: mute everything `identity` sends and tell them.
    pub fn mute_participant(&self, room: &str, by: &str, identity: &str) -> Result<(), RoomError> {
        let mut st = self.state();
        let r = st.rooms.get_mut(room).ok_or(RoomError::NoRoom)?;
        let p = r
            .participants
            .get_mut(identity)
            .ok_or(RoomError::NoParticipant)?;
        for t in p.tracks.iter_mut().filter(|t| t.kind == TrackKind::Audio) {
            t.muted = true;
        }
        p.send(ServerMessage::MutedBy { by: by.into() });
        let info = p.info(identity);
        r.broadcast(
            None,
            &ServerMessage::ParticipantUpdated { participant: info },
        );
        Ok(())
    }

    /// Admin action: remove someone now.
    pub fn remove_participant(&self, room: &str, identity: &str) -> Result<(), RoomError> {
        if self.remove(room, identity, None, Some((4003, "removed by the host"))) {
            Ok(())
        } else {
            Err(RoomError::NoParticipant)
        }
    }

    /// Ends a room for everyone.
    pub fn close_room(&self, room: &str) -> Result<(), RoomError> {
        // Take the room out in one step, so nobody can join it halfway through closing.
        let closed = {
            let mut st = self.state();
            let r = st.rooms.remove(room).ok_or(RoomError::NoRoom)?;
            for peer in r
                .participants
                .values()
                .flat_map(|p| p.publisher.iter().chain(p.subscriber.iter()))
            {
                st.peers.remove(peer);
                st.early_offers.remove(peer);
            }
            r
        };
        for p in closed.participants.into_values() {
            p.send(ServerMessage::Closed {
                reason: "the room was closed".into(),
            });
            let _ = p
                .outbox
                .send(Outgoing::Close(4004, "the room was closed".into()));
            for peer in p.publisher.into_iter().chain(p.subscriber) {
                self.inner.sfu.close_peer(peer);
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<RoomSummary> {
        let st = self.state();
        let mut out: Vec<RoomSummary> = st
            .rooms
            .iter()
            .map(|(name, r)| RoomSummary {
                name: name.clone(),
                participants: r.visible().collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn room(&self, room: &str) -> Option<RoomSummary> {
        self.list().into_iter().find(|r| r.name == room)
    }

    /// Applies the media core's events to the rooms; runs for the life of the server.
    pub async fn run_events(self, mut events: mpsc::UnboundedReceiver<SfuEvent>) {
        while let Some(ev) = events.recv().await {
            self.on_sfu_event(ev);
        }
    }

    fn on_sfu_event(&self, ev: SfuEvent) {
        let mut st = self.state();
        match ev {
            SfuEvent::ProducerAdded {
                peer,
                owner,
                producer,
                kind,
                mid,
                ..
            } => {
                let Some((room, _)) = st.peers.get(&peer).cloned() else {
                    return;
                };
                let Some(r) = st.rooms.get_mut(&room) else {
                    return;
                };
                let Some(p) = r.participants.get_mut(&owner) else {
                    return;
                };
                let (kind, default_source) = match kind {
                    MediaKind::Audio => (TrackKind::Audio, TrackSource::Microphone),
                    MediaKind::Video => (TrackKind::Video, TrackSource::Camera),
                };
                let source = mid
                    .as_ref()
                    .and_then(|m| p.intents.get(m).copied())
                    .unwrap_or(default_source);
                let track = TrackInfo {
                    id: producer.to_string(),
                    participant: owner.clone(),
                    kind,
                    source,
                    muted: false,
                };
                p.tracks.retain(|t| t.source != source || t.kind != kind);
                p.tracks.push(track.clone());
                r.broadcast(None, &ServerMessage::TrackPublished { track });
            }
            SfuEvent::ProducerRemoved {
                router,
                owner,
                producer,
            } => {
                let Some(r) = st.rooms.get_mut(&router.0) else {
                    return;
                };
                let id = producer.to_string();
                if let Some(p) = r.participants.get_mut(&owner) {
                    p.tracks.retain(|t| t.id != id);
                }
                r.broadcast(None, &ServerMessage::TrackUnpublished { track: id });
            }
            SfuEvent::SubscriberOffer { peer, sdp, tracks } => {
                let tracks = tracks
                    .into_iter()
                    .map(|(mid, producer, participant)| MidTrack {
                        mid,
                        track: producer.to_string(),
                        participant,
                    })
                    .collect();
                let offer = ServerMessage::Offer { sdp, tracks };
                let outbox = st
                    .peers
                    .get(&peer)
                    .and_then(|(room, id)| st.rooms.get(room)?.participants.get(id))
                    .map(|p| p.outbox.clone());
                match outbox {
                    Some(outbox) => {
                        let _ = outbox.send(Outgoing::Message(offer));
                    }
                    None => {
                        st.early_offers.insert(peer, offer);
                    }
                }
            }
            SfuEvent::PublisherLayers {
                peer,
                producer,
                active,
            } => {
                let owner = st
                    .peers
                    .get(&peer)
                    .and_then(|(room, id)| st.rooms.get(room)?.participants.get(id));
                if let Some(p) = owner {
                    p.send(ServerMessage::PublisherLayers {
                        track: producer.to_string(),
                        active,
                    });
                }
            }
            SfuEvent::ActiveSpeakers { router, speakers } => {
                if let Some(r) = st.rooms.get(&router.0) {
                    r.broadcast(None, &ServerMessage::ActiveSpeakers { speakers });
                }
            }
            SfuEvent::Connected { peer } => tracing::debug!(?peer, "peer connected"),
            SfuEvent::Disconnected { peer } => tracing::debug!(?peer, "peer disconnected"),
        }
    }

    /// Gauges for `/metrics`.
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = self.state();
        let participants = st.rooms.values().map(|r| r.participants.len()).sum();
        let tracks = st
            .rooms
            .values()
            .flat_map(|r| r.participants.values())
            .map(|p| p.tracks.len())
            .sum();
        (st.rooms.len(), participants, tracks)
    }
}
