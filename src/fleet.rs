//! Fleet mode's shared store (`operations.md`, "State and fleet mode"): one Redis that every
//! gateway instance of a fleet points at, for quota counters, usage counts and report
//! aggregates.
//!
//! The connection is made in the background: a gateway starts whether Redis is up or not
//! (requests meet the configured failure mode meanwhile), retries with exponential backoff,
//! and once connected, the redis crate's `ConnectionManager` reconnects by itself after a
//! dropped connection. Every call is bounded by `quota.timeout`. The URL is never logged:
//! it may carry a password.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Key prefix of everything the gateway keeps in Redis.
pub const PREFIX: &str = "scpgw";

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("not connected to Redis (yet)")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub struct Fleet {
    conn: ArcSwapOption<ConnectionManager>,
    timeout: Duration,
}

/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Fleet {
    /// Checks the URL (the error names `quota.redis_url` without echoing it) and starts
    /// connecting in the background. Needs a tokio runtime.
    pub fn start(url: &str, timeout: Duration) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("config key `quota.redis_url`: not a usable Redis URL: {e}"))?;
        let fleet = Arc::new(Self {
            conn: ArcSwapOption::empty(),
            timeout,
        });
        let weak = Arc::downgrade(&fleet);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(timeout.max(Duration::from_millis(250)))
                    .set_response_timeout(timeout)
                    .set_exponent_base(2)
                    .set_factor(100)
                    .set_max_delay(MAX_BACKOFF.as_millis() as u64);
                match ConnectionManager::new_with_config(client.clone(), config).await {
                    Ok(conn) => {
                        let Some(fleet) = weak.upgrade() else { return };
                        fleet.conn.store(Some(Arc::new(conn)));
                        tracing::info!("connected to the fleet's Redis");
                        return;
                    }
                    Err(e) => {
                        if weak.strong_count() == 0 {
                            return;
                        }
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to the fleet's Redis; quota failure mode applies");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
        Ok(fleet)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one call on the shared connection, bounded by the timeout.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn.load_full().ok_or(FleetError::NotConnected)?;
        match tokio::time::timeout(self.timeout, f((*conn).clone())).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(FleetError::Timeout(self.timeout)),
        }
    }
}

/// A Redis key part from an id: `%` and `:` percent-encoded, so that ids containing the
/// separator cannot make two different (plan, key) pairs share a key.
pub fn key_part(id: &str) -> std::borrow::Cow<'_, str> {
    if id.contains([':', '%']) {
        id.replace('%', "%25").replace(':', "%3A").into()
    } else {
        id.into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_parts_are_unambiguous() {
        assert_eq!(super::key_part("up-1"), "up-1");
        assert_eq!(super::key_part("a:b"), "a%3Ab");
        assert_eq!(super::key_part("a%3Ab"), "a%253Ab");
        assert_ne!(super::key_part("a:b"), super::key_part("a%3Ab"));
    }
}
