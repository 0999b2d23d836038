//! The messages on the `/rtc` WebSocket: JSON objects tagged by `type` (see `docs/protocol.md`).

use serde::{Deserialize, Serialize};

/// Which of a participant's two peer connections a message is about: the one it publishes on
/// (the client offers) or the one it receives on (the server offers). Two connections, as in
/// LiveKit, so that neither side's renegotiation can collide with the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Publisher,
    Subscriber,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKind {
    Audio,
    Video,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrackSource {
    #[default]
    Camera,
    Microphone,
    Screen,
    ScreenAudio,
}

/// An ICE candidate as the browser's `RTCIceCandidateInit` has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub candidate: String,
    #[serde(default, rename = "sdpMid")]
    pub sdp_mid: Option<String>,
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_mline_index: Option<u16>,
}

/// What the client says about a track it is about to publish, keyed by transceiver mid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackIntent {
    pub mid: String,
    #[serde(default)]
    pub source: TrackSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    pub id: String,
    pub participant: String,
    pub kind: TrackKind,
    pub source: TrackSource,
    pub muted: bool,
}

/// Which published track a transceiver of the subscriber connection carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MidTrack {
    pub mid: String,
    pub track: String,
    pub participant: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    pub identity: String,
    pub name: String,
    pub tracks: Vec<TrackInfo>,
    pub can_publish: bool,
    pub is_admin: bool,
    /// May start and stop recording the room.
    #[serde(default)]
    pub can_record: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The codec a room's video is published in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VideoCodec {
    /// Preferred: recordings can be remuxed without transcoding, and phones decode it in hardware.
    H264,
    #[default]
    Vp8,
}

/// Preferred quality of a subscribed video track (simulcast layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Low,
    Medium,
    #[default]
    High,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// SDP offer for the publisher connection, with what each new transceiver carries.
    Offer {
        sdp: String,
        #[serde(default)]
        tracks: Vec<TrackIntent>,
    },
    /// SDP answer to the server's offer on the subscriber connection.
    Answer {
        sdp: String,
    },
    Candidate {
        target: Target,
        candidate: Candidate,
    },
    Mute {
        track: String,
        muted: bool,
    },
    Unpublish {
        track: String,
    },
    Subscribe {
        track: String,
        subscribe: bool,
        #[serde(default)]
        quality: Quality,
    },
    Chat {
        text: String,
    },
    /// Admin grant: mute someone else's track(s).
    MuteParticipant {
        identity: String,
    },
    /// Admin grant: remove someone from the room.
    RemoveParticipant {
        identity: String,
    },
    /// Record grant: start or stop recording the room.
    Record {
        start: bool,
    },
    Ping {
        #[serde(default)]
        id: u64,
    },
    Leave,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// First message on every connection: who you are and who is here.
    Joined {
        room: String,
        you: ParticipantInfo,
        participants: Vec<ParticipantInfo>,
        ice_servers: Vec<IceServer>,
        /// Present when this connection resumed an earlier one (within the grace period).
        resumed: bool,
        /// The video codec to publish with: H.264 while everyone in the room can decode it.
        video_codec: VideoCodec,
        /// The room is being recorded.
        recording: bool,
    },
    /// Recording of the room started or stopped.
    Recording {
        active: bool,
    },
    /// The room's video codec changed (someone who cannot decode H.264 came, or left):
    /// publish video again with this one.
    VideoCodec {
        codec: VideoCodec,
    },
    Answer {
        sdp: String,
    },
    /// Offer for the subscriber connection; `tracks` says which track each mid carries.
    Offer {
        sdp: String,
        tracks: Vec<MidTrack>,
    },
    Candidate {
        target: Target,
        candidate: Candidate,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    ParticipantUpdated {
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        identity: String,
    },
    TrackPublished {
        track: TrackInfo,
    },
    TrackUnpublished {
        track: String,
    },
    ActiveSpeakers {
        speakers: Vec<String>,
    },
    Chat {
        from: String,
        name: String,
        text: String,
        at: u64,
    },
    /// Which simulcast layers of your track anyone watches: encode only those (index 0 = smallest).
    PublisherLayers {
        track: String,
        active: Vec<bool>,
    },
    /// Someone with the admin grant muted you.
    MutedBy {
        by: String,
    },
    Pong {
        id: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The server is closing this connection on purpose.
    Closed {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    UnknownType,
    NotAllowed,
    BadSdp,
    NotFound,
    Internal,
}

/// Parses one text frame. Unknown `type`s and malformed JSON are told apart, so the error sent
/// back can say which.
pub fn parse_client(text: &str) -> Result<ClientMessage, (ErrorCode, String)> {
    match serde_json::from_str::<ClientMessage>(text) {
        Ok(m) => Ok(m),
        Err(e) => {
            let kind = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
            match kind {
                Some(t) if !KNOWN_TYPES.contains(&t.as_str()) => Err((
                    ErrorCode::UnknownType,
                    format!("unknown message type `{t}`"),
                )),
                _ => Err((ErrorCode::Malformed, format!("malformed message: {e}"))),
            }
        }
    }
}

const KNOWN_TYPES: &[&str] = &[
    "offer",
    "answer",
    "candidate",
    "mute",
    "unpublish",
    "subscribe",
    "chat",
    "mute_participant",
    "remove_participant",
    "ping",
    "leave",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = parse_client(
            r#"{"type":"offer","sdp":"v=0","tracks":[{"mid":"0","source":"screen"}]}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Offer {
                sdp: "v=0".into(),
                tracks: vec![TrackIntent {
                    mid: "0".into(),
                    source: TrackSource::Screen
                }]
            }
        );
        let s = serde_json::to_string(&ServerMessage::ParticipantLeft {
            identity: "a".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"type":"participant_left","identity":"a"}"#);
        let c = parse_client(r#"{"type":"candidate","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}"#).unwrap();
        assert!(matches!(
            c,
            ClientMessage::Candidate {
                target: Target::Publisher,
                ..
            }
        ));
    }

    #[test]
    fn bad_frames_say_what_is_wrong() {
        assert_eq!(
            parse_client(r#"{"type":"fly"}"#).unwrap_err().0,
            ErrorCode::UnknownType
        );
        assert_eq!(
            parse_client("{not json").unwrap_err().0,
            ErrorCode::Malformed
        );
        assert_eq!(
            parse_client(r#"{"type":"offer"}"#).unwrap_err().0,
            ErrorCode::Malformed
        );
        assert_eq!(
            parse_client(r#"{"type":"mute","track":"t","muted":"yes"}"#)
                .unwrap_err()
                .0,
            ErrorCode::Malformed
        );
        assert_eq!(parse_client("[]").unwrap_err().0, ErrorCode::Malformed);
    }
}
