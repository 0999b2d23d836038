//! Signaling helpers for the media tests: tokens, joining over `/rtc`, reading SDP.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use signaling::token::{Grants, TokenKey, TokenRequest};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::TestApp;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CONNECT: Duration = Duration::from_secs(10);

pub fn token(app: &TestApp, room: &str, identity: &str, grants: &str) -> String {
    let hex = std::fs::read_to_string(app.data_dir().join("token.key")).unwrap();
    TokenKey::from_hex(&hex)
        .unwrap()
        .mint(&TokenRequest {
            room: room.into(),
            identity: identity.into(),
            name: identity.into(),
            grants: grants.parse::<Grants>().unwrap(),
            ttl: Duration::from_secs(3600),
        })
        .unwrap()
}

/// Opens the WebSocket and waits for `joined`.
pub async fn join(app: &TestApp, room: &str, identity: &str, grants: &str) -> Ws {
    let url = format!(
        "ws://{}/rtc?access_token={}",
        app.addr,
        token(app, room, identity, grants)
    );
    let (mut ws, _) = tokio::time::timeout(CONNECT, connect_async(url))
        .await
        .expect("WebSocket handshake timed out")
        .unwrap_or_else(|e| panic!("{identity} cannot connect: {e}"));
    loop {
        let frame = tokio::time::timeout(CONNECT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{identity} got no `joined`"));
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "joined", "{identity}'s first message: {v}");
                return ws;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("{identity} expected `joined`, got {other:?}"),
        }
    }
}

pub async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string()))
        .await
        .expect("WebSocket send");
}

pub use loadtest::media::sdp_mids;

/// The `ip:port` of every candidate in an SDP.
pub fn sdp_candidates(sdp: &str) -> Vec<String> {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a=candidate:"))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            format!("{}:{}", f.get(4).unwrap_or(&""), f.get(5).unwrap_or(&""))
        })
        .collect()
}
