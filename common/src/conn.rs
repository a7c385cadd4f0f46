//! Redis URLs and connections.
//!
//! [`RedisUrl`] keeps the URL as given (with its secrets, to connect) and shows only a redacted
//! form: `Display` and `Debug` never print the password. `redis://`, `rediss://` (TLS),
//! `redis://user:pass@host` (ACL users) and `?protocol=resp3` work as in the `redis` crate.

use crate::{Error, Result};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use std::time::Duration;

/// The URL used when neither `--redis` nor `$REDTX_REDIS_URL` is given.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
/// Environment variable holding the default Redis URL.
pub const URL_ENV: &str = "REDTX_REDIS_URL";

/// A Redis URL whose printed form hides its password.
#[derive(Clone)]
pub struct RedisUrl {
    raw: String,
    redacted: String,
    client: redis::Client,
}

impl RedisUrl {
    /// Parses and checks a URL (no connection yet).
    pub fn parse(raw: &str) -> Result<Self> {
        let redacted = redact(raw);
        let client =
            redis::Client::open(raw).map_err(|e| Error::BadUrl { url: redacted.clone(), reason: e.to_string() })?;
        Ok(RedisUrl { raw: raw.to_string(), redacted, client })
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The `redis` crate client for this URL.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Opens a multiplexed connection; replies may take up to `response_timeout` (give blocking
    /// reads enough).
    pub async fn connect_with(&self, response_timeout: Duration) -> Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(response_timeout));
        self.client.get_multiplexed_async_connection_with_config(&cfg).await.map_err(|e| Error::redis(self, e))
    }

    /// Opens a connection that reconnects by itself after the server went away (a command that
    /// fails on the broken connection still fails; the next one uses a fresh connection).
    pub async fn connect_managed(&self, response_timeout: Duration) -> Result<redis::aio::ConnectionManager> {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        self.client.get_connection_manager_with_config(cfg).await.map_err(|e| Error::redis(self, e))
    }

    /// Opens a multiplexed connection with a 10 s response timeout.
    pub async fn connect(&self) -> Result<MultiplexedConnection> {
        self.connect_with(Duration::from_secs(10)).await
    }

    /// The raw URL, secrets included. Only for handing to a child process.
    pub fn expose(&self) -> &str {
        &self.raw
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({})", self.redacted)
    }
}

/// The URL to use: the explicit one, else `$REDTX_REDIS_URL`, else [`DEFAULT_URL`].
pub fn default_url(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var(URL_ENV).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_URL.to_string())
}

/// `scheme://user:***@host/...` for any URL with a password, and `?pass=***` for a Unix socket
/// URL (whose credentials the `redis` crate reads from the query); unparsable input is hidden
/// whole past the scheme, since it may hold a secret we cannot locate.
pub fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            } else if !u.username().is_empty() && (u.scheme().starts_with("redis") || u.scheme().starts_with("valkey"))
            {
                // `redis://secret@host` puts the password in the user slot for Redis < 6 AUTH.
                let _ = u.set_username("***");
            }
            if u.query_pairs().any(|(k, _)| k == "pass") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "pass" { "***".to_string() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        assert_eq!(redact("redis://alice:s3cret@db:6380/2"), "redis://alice:***@db:6380/2");
        assert_eq!(redact("rediss://:s3cret@db"), "rediss://:***@db");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert!(!redact("redis://s3cret@db").contains("s3cret"));
        assert!(!redact("redis//s3cret@@@").contains("s3cret"));
        let u = RedisUrl::parse("redis://bob:hunter2@127.0.0.1:1").unwrap();
        assert!(!format!("{u} {u:?}").contains("hunter2"));
        let e = RedisUrl::parse("http://bob:hunter2@x").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn unix_socket_and_valkey_passwords_never_print() {
        // The redis crate reads a Unix socket URL's credentials from its query (`?user=&pass=`),
        // and takes `valkey://` like `redis://`.
        for raw in [
            "redis+unix:///run/redis.sock?pass=hunter2",
            "unix:///run/redis.sock?db=1&user=bob&pass=hunter2",
            "valkey+unix:///run/valkey.sock?pass=hunter2&protocol=resp3",
            "valkey://hunter2@db:6379",
            "valkeys://hunter2@db:6379",
        ] {
            let u = RedisUrl::parse(raw).unwrap();
            let shown = format!("{u} {u:?} {}", u.redacted());
            assert!(!shown.contains("hunter2"), "{raw} shows as {shown}");
        }
        assert_eq!(redact("unix:///run/redis.sock?db=1&pass=hunter2"), "unix:///run/redis.sock?db=1&pass=***");
    }
}
