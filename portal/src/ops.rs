//! Operational endpoints: liveness, readiness, metrics and the API description.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::OpenApi;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ok")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Each dependency: `"ok"` or why not.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub database: String,
    pub object_store: String,
}

/// Ready to serve: the database and the object store answer.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (db, store) = tokio::join!(state.db.ping(), state.storage.ping());
    let database = match db {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "database not ready");
            "database unreachable".to_string()
        }
    };
    let object_store = match store {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "object store not ready");
            format!("object store unreachable ({})", state.storage.describe)
        }
    };
    let ready = database == "ok" && object_store == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            database,
            object_store,
        }),
    )
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = state.metrics.render();
    // The registry ends with "# EOF"; media figures go before it.
    if let Some(stripped) = text.strip_suffix("# EOF\n") {
        text = stripped.to_string();
    }
    text.push_str(&media_metrics(&state).await);
    text.push_str("# EOF\n");
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn media_metrics(state: &AppState) -> String {
    let (rooms, participants, tracks) = state.rooms.counts();
    let snap = state.rooms.sfu().snapshot().await;
    let s = snap.stats;
    let rows: [(&str, &str, &str, u64); 19] = [
        ("dangjian_rooms", "gauge", "Live rooms", rooms as u64),
        (
            "dangjian_participants",
            "gauge",
            "Participants in live rooms",
            participants as u64,
        ),
        (
            "dangjian_tracks",
            "gauge",
            "Published tracks",
            tracks as u64,
        ),
        (
            "dangjian_sfu_peers",
            "gauge",
            "Server-side peer connections",
            snap.peers as u64,
        ),
        (
            "dangjian_sfu_datagrams_in_total",
            "counter",
            "UDP datagrams received",
            s.datagrams_in,
        ),
        (
            "dangjian_sfu_bytes_in_total",
            "counter",
            "UDP bytes received",
            s.bytes_in,
        ),
        (
            "dangjian_sfu_datagrams_out_total",
            "counter",
            "UDP datagrams sent",
            s.datagrams_out,
        ),
        (
            "dangjian_sfu_bytes_out_total",
            "counter",
            "UDP bytes sent",
            s.bytes_out,
        ),
        (
            "dangjian_sfu_rtp_in_total",
            "counter",
            "RTP packets received from publishers",
            s.rtp_in,
        ),
        (
            "dangjian_sfu_rtp_forwarded_total",
            "counter",
            "RTP packets forwarded to subscribers",
            s.rtp_forwarded,
        ),
        (
            "dangjian_sfu_dropped_unknown_total",
            "counter",
            "Datagrams dropped: unknown sender or undecodable",
            s.dropped_unknown,
        ),
        (
            "dangjian_sfu_nacks_received_total",
            "counter",
            "Packets subscribers asked for again (NACK), answered from the send history",
            s.nacks_received,
        ),
        (
            "dangjian_sfu_retransmitted_total",
            "counter",
            "Lost packets resent to subscribers (RTX)",
            s.retransmitted,
        ),
        (
            "dangjian_sfu_fast_path_connections_total",
            "counter",
            "Subscriber connections whose media the SFU protects itself",
            s.fast_path_connections,
        ),
        (
            "dangjian_sfu_rtc_path_connections_total",
            "counter",
            "Subscriber connections that send media through the WebRTC engine's pipeline (no key matched)",
            s.rtc_path_connections,
        ),
        (
            "dangjian_sfu_receive_fast_path_connections_total",
            "counter",
            "Publisher connections whose media the SFU opens itself",
            s.receive_fast_path_connections,
        ),
        (
            "dangjian_sfu_rejected_srtp_total",
            "counter",
            "Publisher packets refused: failed authentication or replayed",
            s.rejected_srtp,
        ),
        (
            "dangjian_sfu_plis_total",
            "counter",
            "Keyframe requests sent to publishers",
            s.plis,
        ),
        (
            "dangjian_sfu_send_drops_total",
            "counter",
            "Datagrams dropped because the socket was full",
            snap.send_drops,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}.\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    out
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    let mut doc = crate::api::ApiDoc::openapi();
    doc.merge(crate::recordings::RecordingsApi::openapi());
    doc.merge(crate::orgs::OrgsApi::openapi());
    doc.merge(crate::members::MembersApi::openapi());
    doc.merge(crate::transfers::TransfersApi::openapi());
    doc.merge(crate::dues::DuesApi::openapi());
    doc.merge(crate::orglife::OrglifeApi::openapi());
    doc.merge(crate::guidance::GuidanceApi::openapi());
    doc.merge(crate::stats::StatsApi::openapi());
    doc.merge(crate::xlsx::XlsxApi::openapi());
    Json(doc)
}
