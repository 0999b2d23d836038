//! The database: one pool over SQLite or PostgreSQL, chosen by URL, with one set of migrations.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::{AnyPoolOptions, install_default_drivers};

/// Which engine a URL names; the SQL we write runs on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("unsupported database URL scheme (use sqlite:// or postgres://)")]
    Scheme,
    #[error("cannot connect to the {0:?} database: {1}")]
    Connect(Backend, sqlx::Error),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

impl Db {
    /// Connects and applies pending migrations. The URL may hold a password: it is never logged.
    pub async fn connect(url: &str) -> Result<Db, ConnectError> {
        let db = Self::connect_only(url).await?;
        db.migrate().await?;
        Ok(db)
    }

    pub async fn connect_only(url: &str) -> Result<Db, ConnectError> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(ConnectError::Scheme);
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| ConnectError::Connect(backend, e))?;
        if backend == Backend::Sqlite {
            // WAL lets readers go on while one writer commits; the setting sticks to the file.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(|e| ConnectError::Connect(backend, e))?;
        }
        Ok(Db { pool, backend })
    }

    pub async fn migrate(&self) -> Result<(), ConnectError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

/// Milliseconds since the Unix epoch, the one time format in the schema.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Time-ordered ids, so that lists sort by creation without another column.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
