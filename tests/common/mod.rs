//! Test harness: each test spawns the app on port 0 with a fresh database (SQLite in a temporary
//! directory, or a PostgreSQL database created for it and dropped afterwards).
#![allow(dead_code)]

pub mod api;
pub mod publisher;
pub mod rtc;

use std::net::SocketAddr;
use std::path::PathBuf;

use dangjian::Server;
use dangjian::config::{Layer, Secret};
use serde_json::{Value, json};

pub const ADMIN_PASSWORD: &str = "admin-password-1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where the tests find PostgreSQL: an admin URL on the maintenance database.
pub fn pg_admin_url() -> String {
    std::env::var("DJTEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A PostgreSQL database that exists for one test.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sqlx::Connection;
        let admin = pg_admin_url();
        let name = format!("dj_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for these tests: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let (base, _) = admin.rsplit_once('/').expect("database URL has a path");
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: use a private runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The server's media (UDP) socket as clients reach it.
    pub media_addr: SocketAddr,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    server: Option<Server>,
    pg: Option<PgDatabase>,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, Layer::default()).await
    }

    /// `extra` overrides the defaults (e.g. a storage URL).
    pub async fn spawn_with(backend: Backend, extra: Layer) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PgDatabase::create().await),
        };
        let base = Layer {
            http: Some("127.0.0.1:0".into()),
            data: Some(dir.path().to_path_buf()),
            database_url: pg.as_ref().map(|p| Secret::new(p.url.clone())),
            admin_password: Some(Secret::new(ADMIN_PASSWORD)),
            rtc_udp: Some("127.0.0.1:0".into()),
            ..Layer::default()
        };
        let config = base.merge(extra).resolve().unwrap();
        let server = dangjian::start(config).await.unwrap();
        TestApp {
            addr: server.addr,
            media_addr: server.media_addr,
            client: client(),
            dir,
            server: Some(server),
            pg,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The URL of this app's database (for tests that look inside it).
    pub fn database_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.dir.path().join("dangjian.db").display()
            ),
        }
    }

    /// A connection to the app's database, for seeding and checking behind the API.
    pub async fn db(&self) -> portal::db::Db {
        portal::db::Db::connect_only(&self.database_url())
            .await
            .unwrap()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Signs the app's client in; panics unless it works.
    pub async fn sign_in(&self, username: &str, password: &str) -> Value {
        let r = self
            .post_json(
                "/api/v1/session",
                json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(r.status(), 200, "sign-in as {username}");
        r.json().await.unwrap()
    }

    pub async fn sign_in_admin(&self) -> Value {
        self.sign_in("admin", ADMIN_PASSWORD).await
    }

    /// Creates a user through the API (the client must be an admin) and returns a client signed
    /// in as that user.
    pub async fn user_client(&self, username: &str, role: &str) -> reqwest::Client {
        let r = self
            .post_json(
                "/api/v1/users",
                json!({"username": username, "display_name": username, "password": "initial-pass-1", "role": role}),
            )
            .await;
        assert_eq!(r.status(), 201, "create {username}");
        self.signed_in_new_user(username).await
    }

    /// A fresh client (its own cookies) signed in as `username`; panics unless it works.
    pub async fn signed_in(&self, username: &str, password: &str) -> reqwest::Client {
        let c = client();
        let r = c
            .post(self.url("/api/v1/session"))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "sign-in as {username}");
        c
    }

    /// A client signed in as a user just made with the initial password `initial-pass-1`, who
    /// has chosen their own (`own-pass-1234`): nothing else is allowed before that.
    pub async fn signed_in_new_user(&self, username: &str) -> reqwest::Client {
        let c = self.signed_in(username, "initial-pass-1").await;
        let r = c
            .put(self.url("/api/v1/me/password"))
            .json(&json!({"current_password": "initial-pass-1", "new_password": "own-pass-1234"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{username} chooses a password");
        c
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }
}

/// Runs each named `async fn(Backend)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name($crate::common::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name($crate::common::Backend::Postgres).await } )*
        }
    };
}
