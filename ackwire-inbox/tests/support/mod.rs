//! Shared helpers for the integration tests: databases ([`db`]), nodes ([`net`]) and
//! child processes ([`child`]) and ports ([`ports`]), both shared with ackwire's own tests.
#![allow(unreachable_pub, dead_code, unused_macros)]

/// Expands each scenario into a SQLite test and a PostgreSQL test; inside, `DB` is
/// the database type and the named pool is migrated and has an `effects` table.
macro_rules! scenarios {
    ($( async fn $name:ident($pool:ident) $body:block )*) => {
        mod sqlite {
            use super::*;
            type DB = sqlx::Sqlite;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = crate::support::db::sqlite().await;
                    let $pool: sqlx::Pool<DB> = db.pool.clone();
                    crate::support::db::create_effects(&$pool).await;
                    $body
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            use super::*;
            type DB = sqlx::Postgres;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = crate::support::db::postgres(stringify!($name)).await else {
                        return;
                    };
                    let $pool: sqlx::Pool<DB> = db.pool.clone();
                    crate::support::db::create_effects(&$pool).await;
                    $body
                    db.drop_schema().await;
                }
            )*
        }
        #[cfg(not(feature = "postgres"))]
        mod postgres {
            $(
                #[test]
                fn $name() {
                    crate::support::db::postgres_not_built(stringify!($name));
                }
            )*
        }
    };
}

#[path = "../../../tests/support/child.rs"]
pub mod child;
pub mod db;
pub mod net;
#[path = "../../../tests/support/ports.rs"]
pub mod ports;
