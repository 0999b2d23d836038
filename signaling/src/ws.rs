//! The `/rtc` WebSocket: the token is checked before the upgrade, then JSON messages flow both
//! ways until the client leaves or the connection drops.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::protocol::{ClientMessage, ErrorCode, Quality, ServerMessage, parse_client};
use crate::room::{Outgoing, RoomError, Rooms};
use crate::token::{Claims, TokenError};
use sfu::core::ProducerId;

/// Largest text frame a client may send (an SDP offer with many tracks fits easily).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Close code for a frame over [`MAX_MESSAGE`] (RFC 6455 "message too big").
pub const CLOSE_TOO_BIG: u16 = 1009;

pub fn router<S>(rooms: Rooms) -> Router<S> {
    Router::new().route("/rtc", get(upgrade)).with_state(rooms)
}

fn refuse(status: StatusCode, message: String) -> Response {
    let code = if status == StatusCode::FORBIDDEN {
        "forbidden"
    } else {
        "unauthorized"
    };
    (
        status,
        Json(serde_json::json!({"error": code, "message": message})),
    )
        .into_response()
}

async fn upgrade(
    State(rooms): State<Rooms>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = q.get("access_token") else {
        return refuse(StatusCode::UNAUTHORIZED, "missing access_token".into());
    };
    let checked = match q.get("room") {
        Some(room) => rooms.tokens().verify_for_room(token, room),
        None => rooms.tokens().verify(token),
    };
    let claims = match checked {
        Ok(c) => c,
        Err(e @ TokenError::WrongRoom { .. }) => {
            return refuse(StatusCode::FORBIDDEN, e.to_string());
        }
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    let name = q.get("name").cloned().unwrap_or_default();
    // What the client can send and receive; without a word, assume VP8 only (every WebRTC
    // browser has it).
    let h264 = q
        .get("codecs")
        .is_some_and(|c| c.split(',').any(|c| c.trim().eq_ignore_ascii_case("h264")));
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| serve(rooms, claims, name, h264, socket))
}

async fn serve(rooms: Rooms, claims: Claims, name: String, h264: bool, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let msg = match out {
                Outgoing::Message(m) => match serde_json::to_string(&m) {
                    Ok(text) => Message::Text(text.into()),
                    Err(_) => continue,
                },
                Outgoing::Close(code, reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
            };
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });
    let room = claims.room.clone();
    let identity = claims.sub.clone();
    let joined = match rooms.join(claims.clone(), name, h264, tx.clone()).await {
        Ok(j) => j,
        Err(e) => {
            let _ = tx.send(Outgoing::Message(ServerMessage::Error {
                code: ErrorCode::Internal,
                message: e.to_string(),
            }));
            let _ = tx.send(Outgoing::Close(1011, "cannot join".into()));
            let _ = writer.await;
            return;
        }
    };
    let session = Session {
        rooms: rooms.clone(),
        claims,
        tx: tx.clone(),
    };
    let mut left = false;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Text(text)) => match parse_client(&text) {
                Ok(ClientMessage::Leave) => {
                    left = true;
                    break;
                }
                Ok(msg) => session.handle(msg).await,
                Err((code, message)) => session.error(code, message),
            },
            Ok(Message::Binary(_)) => session.error(
                ErrorCode::Malformed,
                "binary frames are not part of the protocol".into(),
            ),
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) => {
                let too_big = e.to_string().to_lowercase().contains("too long")
                    || e.to_string().to_lowercase().contains("capacity");
                if too_big {
                    let _ = tx.send(Outgoing::Close(CLOSE_TOO_BIG, "message too big".into()));
                }
                break;
            }
        }
    }
    rooms.disconnected(&room, &identity, joined.conn, left);
    if left {
        let _ = tx.send(Outgoing::Close(1000, "left".into()));
    }
    drop(session);
    drop(tx);
    let _ = writer.await;
}

struct Session {
    rooms: Rooms,
    claims: Claims,
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl Session {
    fn send(&self, msg: ServerMessage) {
        let _ = self.tx.send(Outgoing::Message(msg));
    }

    fn error(&self, code: ErrorCode, message: String) {
        self.send(ServerMessage::Error { code, message });
    }

    fn room_error(&self, e: RoomError) {
        let code = match e {
            RoomError::NotAllowed(_) => ErrorCode::NotAllowed,
            RoomError::NoRoom | RoomError::NoParticipant => ErrorCode::NotFound,
            RoomError::Media(_) => ErrorCode::Internal,
        };
        self.error(code, e.to_string());
    }

    async fn handle(&self, msg: ClientMessage) {
        let (room, me) = (self.claims.room.as_str(), self.claims.sub.as_str());
        let g = self.claims.grants;
        match msg {
            ClientMessage::Offer { sdp, tracks } => {
                let Some(peer) = g
                    .publish
                    .then(|| self.rooms.publisher_peer(room, me))
                    .flatten()
                else {
                    return self.error(
                        ErrorCode::NotAllowed,
                        "your token does not allow publishing".into(),
                    );
                };
                self.rooms
                    .set_intents(room, me, tracks.into_iter().map(|t| (t.mid, t.source)));
                match self.rooms.sfu().publisher_offer(peer, sdp).await {
                    Ok(answer) => self.send(ServerMessage::Answer { sdp: answer }),
                    Err(e) => self.error(ErrorCode::BadSdp, e.to_string()),
                }
            }
            ClientMessage::Answer { sdp } => {
                let Some(peer) = self.rooms.subscriber_peer(room, me) else {
                    return self.error(
                        ErrorCode::NotAllowed,
                        "your token does not allow subscribing".into(),
                    );
                };
                if let Err(e) = self.rooms.sfu().subscriber_answer(peer, sdp).await {
                    self.error(ErrorCode::BadSdp, e.to_string());
                }
            }
            // The server is ICE-lite: it learns client addresses from their connectivity checks.
            ClientMessage::Candidate { .. } => {}
            ClientMessage::Mute { track, muted } => {
                if let Err(e) = self.rooms.set_muted(room, me, &track, muted) {
                    self.room_error(e);
                }
            }
            ClientMessage::Unpublish { track } => match self.rooms.own_track(room, me, &track) {
                Some(producer) => self.rooms.sfu().remove_producer(producer),
                None => self.error(
                    ErrorCode::NotFound,
                    format!("you publish no track `{track}`"),
                ),
            },
            // Every participant receives every track; the preference caps the simulcast layer.
            ClientMessage::Subscribe { track, quality, .. } => {
                let (Some(peer), Some(producer)) = (
                    self.rooms.subscriber_peer(room, me),
                    ProducerId::parse(&track),
                ) else {
                    return self.error(
                        ErrorCode::NotFound,
                        format!("no track `{track}` to subscribe to"),
                    );
                };
                let layer = match quality {
                    Quality::Low => 0,
                    Quality::Medium => 1,
                    Quality::High => 2,
                };
                self.rooms.sfu().set_preference(peer, producer, layer);
            }
            ClientMessage::Chat { text } => {
                if !g.data {
                    return self.error(
                        ErrorCode::NotAllowed,
                        "your token does not allow chat".into(),
                    );
                }
                if text.trim().is_empty() || text.chars().count() > 2000 {
                    return self.error(
                        ErrorCode::Malformed,
                        "chat text must be 1 to 2000 characters".into(),
                    );
                }
                self.rooms.chat(room, me, text);
            }
            ClientMessage::MuteParticipant { identity } => {
                if !g.admin {
                    return self.error(ErrorCode::NotAllowed, "only a host may mute others".into());
                }
                if let Err(e) = self.rooms.mute_participant(room, me, &identity) {
                    self.room_error(e);
                }
            }
            ClientMessage::RemoveParticipant { identity } => {
                if !g.admin {
                    return self.error(
                        ErrorCode::NotAllowed,
                        "only a host may remove others".into(),
                    );
                }
                if let Err(e) = self.rooms.remove_participant(room, &identity) {
                    self.room_error(e);
                }
            }
            ClientMessage::Record { start } => {
                if !g.record {
                    return self.error(
                        ErrorCode::NotAllowed,
                        "your token does not allow recording".into(),
                    );
                }
                self.rooms.request_recording(room, me, start);
            }
            ClientMessage::Ping { id } => self.send(ServerMessage::Pong { id }),
            ClientMessage::Leave => {}
        }
    }
}
