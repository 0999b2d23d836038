//! Operational endpoints and the API description, on both databases.

mod common;

use common::{Backend, TestApp};
use serde_json::Value;

async fn health_readiness_and_metrics(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().contains_key("x-request-id"),
        "every response carries a request id"
    );
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        ready,
        serde_json::json!({"ready": true, "database": "ok", "object_store": "ok"})
    );

    let r = app.get("/metrics").await;
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    assert!(
        text.contains(
            r#"dangjian_http_requests_total{method="GET",route="/readyz",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("# TYPE dangjian_http_request_duration_seconds histogram"));
    app.stop().await;
}

async fn openapi_documents_every_endpoint_that_exists(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let doc: Value = app.get("/api/v1/openapi.json").await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for expected in [
        "/api/v1/session",
        "/api/v1/me",
        "/api/v1/users",
        "/api/v1/rooms/{room}/tokens",
        "/api/v1/rooms/{room}/recordings",
        "/api/v1/recordings/{id}",
        "/readyz",
    ] {
        assert!(paths.contains_key(expected), "{expected} is documented");
    }
    // Every documented operation is routed: none falls through to 404 or 405.
    for (path, ops) in paths {
        let concrete = path.replace("{room}", "doc-room");
        for method in ops.as_object().unwrap().keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = app
                .client
                .request(m, app.url(&concrete))
                .send()
                .await
                .unwrap();
            assert!(
                ![404, 405].contains(&r.status().as_u16()),
                "{method} {path} gave {}",
                r.status()
            );
        }
    }
    app.stop().await;
}

async fn unknown_paths_are_404_as_json_or_page(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let r = app.get("/api/v1/nothing-here").await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    let r = app.get("/nothing-here").await;
    assert_eq!(r.status(), 404);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("页面不存在"));
    app.stop().await;
}

on_both_databases!(
    health_readiness_and_metrics,
    openapi_documents_every_endpoint_that_exists,
    unknown_paths_are_404_as_json_or_page,
);
