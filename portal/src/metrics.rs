//! Prometheus metrics: one registry per app (no globals, so tests can run many apps at once).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Histogram,
    pub login_failures: Counter,
    pub login_throttled: Counter,
    pub tokens_minted: Counter,
    pub started: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("dangjian");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served",
            http_requests.clone(),
        );
        let http_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "http_request_duration_seconds",
            "Time to produce an HTTP response",
            http_duration.clone(),
        );
        let login_failures = Counter::default();
        registry.register(
            "login_failures",
            "Failed sign-in attempts",
            login_failures.clone(),
        );
        let login_throttled = Counter::default();
        registry.register(
            "login_throttled",
            "Sign-in attempts refused by throttling",
            login_throttled.clone(),
        );
        let tokens_minted = Counter::default();
        registry.register(
            "tokens_minted",
            "Media access tokens issued",
            tokens_minted.clone(),
        );
        let started = Gauge::default();
        registry.register(
            "start_time_seconds",
            "Unix time the process started",
            started.clone(),
        );
        started.set(crate::db::now_ms() / 1000);
        Arc::new(Metrics {
            registry,
            http_requests,
            http_duration,
            login_failures,
            login_throttled,
            tokens_minted,
            started,
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts every request by route template (not raw path, which would explode the label set).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .http_duration
        .observe(start.elapsed().as_secs_f64());
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}
