//! Test databases: a temporary SQLite file, or a fresh schema on the PostgreSQL server
//! at `127.0.0.1:5432` (database `test`; `ACKWIRE_PG_URL` overrides).
//!
//! PostgreSQL tests call [`postgres`]: if the server is unreachable it prints
//! `skipped: PostgreSQL not reachable at …` and returns `None`, unless
//! `ACKWIRE_REQUIRE_POSTGRES=1` is set, when it panics (CI must run them).

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The server the PostgreSQL tests use.
pub fn pg_url() -> String {
    std::env::var("ACKWIRE_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Whether `ACKWIRE_REQUIRE_POSTGRES=1` (a missing server fails the test).
pub fn postgres_required() -> bool {
    std::env::var("ACKWIRE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// Called by a PostgreSQL test built without the `postgres` feature.
pub fn postgres_not_built(test: &str) {
    assert!(
        !postgres_required(),
        "{test}: ACKWIRE_REQUIRE_POSTGRES=1 but ackwire-inbox was built without the \
         `postgres` feature (use --features ackwire-inbox/postgres)"
    );
    say_through_capture(&format!(
        "{test}: skipped: built without the `postgres` feature \
         (cargo test -p ackwire-inbox --features postgres)"
    ));
}

/// Write a line to stderr past libtest's output capture (which only takes `print!`
/// and `eprint!`), so a plain `cargo test` shows which tests were skipped.
pub fn say_through_capture(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A SQLite database in a temporary file (WAL, 10 s busy timeout), deleted on drop.
#[derive(Debug)]
pub struct SqliteDb {
    pub pool: SqlitePool,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Connect options for the SQLite file at `path` (created if missing).
pub fn sqlite_options(path: &std::path::Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
}

/// A pool on the SQLite file at `path`.
pub async fn sqlite_pool(path: &std::path::Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(sqlite_options(path))
        .await
        .expect("open sqlite")
}

/// A fresh SQLite database, migrated.
pub async fn sqlite() -> SqliteDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db.sqlite");
    let pool = sqlite_pool(&path).await;
    ackwire_inbox::migrate(&pool).await.expect("migrate");
    SqliteDb {
        pool,
        path,
        _dir: dir,
    }
}

/// The application's own table: one row per applied effect (no unique constraint,
/// so an effect applied twice shows as two rows).
pub async fn create_effects<DB: sqlx::Database>(pool: &sqlx::Pool<DB>)
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    sqlx::Executor::execute(pool, "CREATE TABLE effects (n BIGINT NOT NULL)")
        .await
        .expect("create effects");
}

static SCHEMA_SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique schema name for this process and test.
fn schema_name(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let short: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(24)
        .collect();
    format!(
        "ackwire_t_{}_{}_{nanos:x}_{short}",
        std::process::id(),
        SCHEMA_SEQ.fetch_add(1, Ordering::Relaxed)
    )
    .to_lowercase()
}

#[cfg(feature = "postgres")]
pub use pg::*;

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::PgPool;
    use std::str::FromStr;

    /// A schema of its own on the test server, with a pool whose `search_path` is
    /// that schema. [`PgDb::drop_schema`] removes it.
    #[derive(Debug)]
    pub struct PgDb {
        pub pool: PgPool,
        pub schema: String,
        admin: PgPool,
    }

    impl PgDb {
        /// Drop the schema and close the pools (best effort).
        pub async fn drop_schema(self) {
            self.pool.close().await;
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
                .execute(&self.admin)
                .await;
            self.admin.close().await;
        }
    }

    /// Whether the server's port answers (checked once per process, 1 s timeout), so
    /// that a machine without a server skips every test at once.
    fn reachable() -> &'static Result<(), String> {
        static REACHABLE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        REACHABLE.get_or_init(|| {
            let opts = PgConnectOptions::from_str(&pg_url()).map_err(|e| e.to_string())?;
            let addr =
                std::net::ToSocketAddrs::to_socket_addrs(&(opts.get_host(), opts.get_port()))
                    .map_err(|e| e.to_string())?
                    .next()
                    .ok_or("no address")?;
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    /// Options of a connection to the test server with `search_path` = `schema`.
    pub fn pg_options(schema: &str) -> PgConnectOptions {
        PgConnectOptions::from_str(&pg_url())
            .expect("ACKWIRE_PG_URL")
            .options([("search_path", schema)])
    }

    /// A pool on `schema` of the test server.
    pub async fn pg_pool(schema: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(6)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(pg_options(schema))
            .await
            .expect("connect to the PostgreSQL test server")
    }

    /// A fresh schema on the test server, migrated; `None` (with a `skipped:` line)
    /// when the server is unreachable, unless `ACKWIRE_REQUIRE_POSTGRES=1`.
    pub async fn postgres(test: &str) -> Option<PgDb> {
        let url = pg_url();
        let admin = match reachable() {
            Ok(()) => PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(PgConnectOptions::from_str(&url).expect("ACKWIRE_PG_URL"))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        let admin = match admin {
            Ok(a) => a,
            Err(e) => {
                assert!(
                    !postgres_required(),
                    "{test}: ACKWIRE_REQUIRE_POSTGRES=1 but PostgreSQL is not reachable at {url}: {e}"
                );
                say_through_capture(&format!(
                    "{test}: skipped: PostgreSQL not reachable at {url} ({e})"
                ));
                return None;
            }
        };
        let schema = schema_name(test);
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&admin)
            .await
            .expect("create schema");
        let pool = pg_pool(&schema).await;
        ackwire_inbox::migrate(&pool).await.expect("migrate");
        Some(PgDb {
            pool,
            schema,
            admin,
        })
    }
}
