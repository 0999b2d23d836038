//! dangjian as a [`Target`]: tokens minted with the server's key, one `/rtc` WebSocket per
//! participant carrying both of its connections' SDP (docs/protocol.md).

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use signaling::token::{Grants, TokenKey, TokenRequest};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::target::{AbortOnDrop, AdapterEnd, Down, JoinSpec, Link, Participant, Target, Up};

const CONNECT: Duration = Duration::from_secs(15);

pub struct Dangjian {
    /// `ws://host:port`
    ws_base: String,
    key: TokenKey,
}

impl Dangjian {
    /// `http` is the server's HTTP address (`host:port` or `http://host:port`); `key_hex` its
    /// token key (`DATA/token.key`, or the `token_key` setting).
    pub fn new(http: &str, key_hex: &str) -> anyhow::Result<Dangjian> {
        let host = http
            .trim_end_matches('/')
            .trim_start_matches("http://")
            .trim_start_matches("ws://");
        let key =
            TokenKey::from_hex(key_hex.trim()).map_err(|e| anyhow::anyhow!("token key: {e}"))?;
        Ok(Dangjian {
            ws_base: format!("ws://{host}"),
            key,
        })
    }

    fn token(&self, spec: &JoinSpec) -> anyhow::Result<String> {
        let mut grants = Vec::new();
        if spec.publish {
            grants.push("publish");
        }
        if spec.subscribe {
            grants.push("subscribe");
        }
        let grants: Grants = grants
            .join(",")
            .parse()
            .map_err(|e| anyhow::anyhow!("grants: {e:?}"))?;
        self.key
            .mint(&TokenRequest {
                room: spec.room.clone(),
                identity: spec.identity.clone(),
                name: spec.identity.clone(),
                grants,
                ttl: Duration::from_secs(6 * 3600),
            })
            .map_err(|e| anyhow::anyhow!("token: {e}"))
    }
}

#[async_trait::async_trait]
impl Target for Dangjian {
    fn name(&self) -> &'static str {
        "dangjian"
    }

    async fn prepare(&self, _room: &str, _publishers: usize) -> anyhow::Result<()> {
        Ok(())
    }

    async fn join(&self, spec: &JoinSpec) -> anyhow::Result<Participant> {
        let url = format!("{}/rtc?access_token={}", self.ws_base, self.token(spec)?);
        let (mut ws, _) = tokio::time::timeout(CONNECT, connect_async(url))
            .await
            .context("WebSocket handshake timed out")?
            .context("WebSocket")?;
        loop {
            let frame = tokio::time::timeout(CONNECT, ws.next())
                .await
                .context("no `joined`")?;
            match frame {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if v["type"] != "joined" {
                        bail!("expected `joined`, got {v}");
                    }
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => bail!("expected `joined`, got {other:?}"),
            }
        }
        let (publish, pub_end) = Link::pair();
        let (subscribe, sub_end) = Link::pair();
        let task = tokio::spawn(pump(ws, pub_end, sub_end));
        Ok(Participant {
            publish: spec.publish.then_some(publish),
            subscribe: spec.subscribe.then_some(subscribe),
            keep: Box::new(AbortOnDrop(task)),
        })
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Carries SDP between the two connections' links and the one WebSocket.
async fn pump(mut ws: Ws, mut publisher: AdapterEnd, mut subscriber: AdapterEnd) {
    let fail = |why: String, a: &AdapterEnd, b: &AdapterEnd| {
        let _ = a.down.send(Down::Failed(why.clone()));
        let _ = b.down.send(Down::Failed(why));
    };
    let (mut pub_open, mut sub_open) = (true, true);
    loop {
        let out = tokio::select! {
            up = publisher.up.recv(), if pub_open => {
                pub_open = up.is_some();
                up
            }
            up = subscriber.up.recv(), if sub_open => {
                sub_open = up.is_some();
                up
            }
            m = ws.next() => {
                match m {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                        let sdp = v["sdp"].as_str().unwrap_or_default().to_string();
                        match v["type"].as_str().unwrap_or_default() {
                            "answer" => { let _ = publisher.down.send(Down::Answer { sdp }); }
                            "offer" => { let _ = subscriber.down.send(Down::Offer { sdp }); }
                            "error" => fail(format!("{}", v["message"]), &publisher, &subscriber),
                            "closed" => fail(format!("closed: {}", v["reason"]), &publisher, &subscriber),
                            _ => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    other => {
                        fail(format!("WebSocket ended: {other:?}"), &publisher, &subscriber);
                        return;
                    }
                }
                continue;
            }
        };
        let msg = match out {
            Some(Up::Offer { sdp, tracks }) => {
                let tracks: Vec<Value> = tracks
                    .into_iter()
                    .map(|(mid, source)| json!({"mid": mid, "source": source}))
                    .collect();
                json!({"type": "offer", "sdp": sdp, "tracks": tracks})
            }
            Some(Up::Answer { sdp }) => json!({"type": "answer", "sdp": sdp}),
            // That client stopped (or never was): the participant leaves when it is dropped.
            None => continue,
        };
        if ws.send(Message::text(msg.to_string())).await.is_err() {
            fail("WebSocket send failed".into(), &publisher, &subscriber);
            return;
        }
    }
}
