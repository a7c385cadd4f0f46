//! The setup shared by `redtx demo` and `redtx bench`: two banks on two private `redis-server`s
//! (or everything on one `--redis`), a coordinator and the participants `bank-a` and `bank-b` in
//! this process, the accounts, and the end-of-run checks (total money, locks left behind).
//!
//! With private servers the first one holds the streams and bank-a's data, the second bank-b's
//! data. Dropping the [`Cluster`] kills the servers it started.

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_common::shutdown::Shutdown;
use redtx_common::{conn::RedisUrl, Error};

/// Where a bank keeps its accounts.
pub struct Bank {
    /// The participant's name: `bank-a`, or `<label>-<run>-bank-a` on a shared `--redis`, so a
    /// run never joins (and feeds its data to) the consumer group of real participants.
    pub name: String,
    /// `a` or `b`.
    pub letter: char,
    pub url: RedisUrl,
    pub prefix: String,
}

impl Bank {
    /// The key of account `i` (`acct:a7`, or `<label>:<run>:acct:a7` on a shared `--redis`).
    pub fn key(&self, i: usize) -> String {
        format!("{}acct:{}{i}", self.prefix, self.letter)
    }
}

/// The accounts of both banks (`book[b][i]`) and the participants owning them (`book.names[b]`).
pub struct Book {
    pub names: [String; 2],
    pub keys: [Vec<String>; 2],
}

impl std::ops::Index<usize> for Book {
    type Output = Vec<String>;
    fn index(&self, bank: usize) -> &Vec<String> {
        &self.keys[bank]
    }
}

/// The servers, the two banks and the in-process workers.
pub struct Cluster {
    /// Redis holding the streams (and bank-a's data).
    pub stream_url: String,
    pub banks: [Bank; 2],
    /// Keeps the private servers alive until the cluster is dropped.
    servers: Vec<RedisServer>,
    shutdown: Shutdown,
    workers: tokio::task::JoinSet<redtx_common::Result<()>>,
}

impl Cluster {
    /// Starts two private servers (AOF off), or uses `redis` for the streams and both banks; on a
    /// shared Redis the account keys carry `<label>:<run id>:` so runs never mix. No workers yet.
    pub fn start(redis: Option<&str>, label: &str) -> Result<Cluster, Error> {
        let mut servers = Vec::new();
        let run = &redtx_common::spec::new_txn_id()[..8];
        let (stream_url, a_url, b_url, prefix) = match redis {
            Some(u) => (u.to_string(), u.to_string(), u.to_string(), format!("{label}:{run}:")),
            None => {
                let opts = ServerOptions { aof: false, ..Default::default() };
                let a = RedisServer::start_with(opts.clone())?;
                let b = RedisServer::start_with(opts)?;
                let urls = (a.url(), a.url(), b.url(), String::new());
                servers.push(a);
                servers.push(b);
                urls
            }
        };
        let name = |bank: &str| if servers.is_empty() { format!("{label}-{run}-{bank}") } else { bank.to_string() };
        let banks = [
            Bank { name: name("bank-a"), letter: 'a', url: RedisUrl::parse(&a_url)?, prefix: prefix.clone() },
            Bank { name: name("bank-b"), letter: 'b', url: RedisUrl::parse(&b_url)?, prefix },
        ];
        Ok(Cluster { stream_url, banks, servers, shutdown: Shutdown::new(), workers: tokio::task::JoinSet::new() })
    }

    /// True when the streams and both banks are on one Redis (`--redis`).
    pub fn shared(&self) -> bool {
        self.servers.is_empty()
    }

    /// Spawns a coordinator and the participants `bank-a` and `bank-b` in this process.
    pub fn start_workers(&mut self) {
        let coordinator = redtx_coordinator::CoordinatorConfig::new(self.stream_url.clone());
        self.workers.spawn(redtx_coordinator::run(coordinator, self.shutdown.clone()));
        for bank in &self.banks {
            let mut cfg = redtx_participant::ParticipantConfig::new(self.stream_url.clone(), bank.name.clone());
            cfg.data = Some(bank.url.expose().to_string());
            self.workers.spawn(redtx_participant::run(cfg, self.shutdown.clone()));
        }
    }

    /// Stops the workers; they finish what they hold. On a shared `--redis`, the run's own
    /// participant streams are deleted then (nobody else reads them).
    pub async fn stop_workers(&mut self) {
        self.shutdown.trigger();
        while self.workers.join_next().await.is_some() {}
        if self.shared() {
            let streams: Vec<String> =
                self.banks.iter().map(|b| redtx_common::keys::participant_stream(&b.name)).collect();
            if let Ok(mut c) = self.banks[0].url.connect().await {
                let _: redis::RedisResult<()> = c.del(&streams).await;
            }
        }
    }

    /// The keys of `accounts` accounts per bank, and the banks' participant names.
    pub fn book(&self, accounts: usize) -> Book {
        Book {
            names: [0, 1].map(|b| self.banks[b].name.clone()),
            keys: [0, 1].map(|b| (0..accounts).map(|i| self.banks[b].key(i)).collect()),
        }
    }

    /// Opens `accounts` accounts with `balance` in each bank; returns one connection per bank.
    pub async fn open_accounts(&self, accounts: usize, balance: i64) -> Result<Vec<MultiplexedConnection>, Error> {
        let mut conns = Vec::new();
        for bank in &self.banks {
            let mut c = bank.url.connect().await?;
            let keys: Vec<String> = (0..accounts).map(|i| bank.key(i)).collect();
            for chunk in keys.chunks(1000) {
                let pairs: Vec<(&String, i64)> = chunk.iter().map(|k| (k, balance)).collect();
                let _: () = c.mset(&pairs).await.map_err(|e| Error::redis(&bank.url, e))?;
            }
            conns.push(c);
        }
        Ok(conns)
    }

    /// The money in all accounts of both banks.
    pub async fn total(&self, conns: &mut [MultiplexedConnection], accounts: usize) -> Result<i64, Error> {
        let mut sum = 0;
        for (bank, c) in self.banks.iter().zip(conns.iter_mut()) {
            let keys: Vec<String> = (0..accounts).map(|i| bank.key(i)).collect();
            for chunk in keys.chunks(1000) {
                let vals: Vec<Option<i64>> = c.mget(chunk).await.map_err(|e| Error::redis(&bank.url, e))?;
                sum += vals.into_iter().map(|v| v.unwrap_or(0)).sum::<i64>();
            }
        }
        Ok(sum)
    }

    /// Locks on either bank's accounts still held (there must be none once everything finished).
    pub async fn locks_left(&self, conns: &mut [MultiplexedConnection]) -> Result<usize, Error> {
        let mut n = 0;
        for (bank, c) in self.banks.iter().zip(conns.iter_mut()) {
            n += count_locks(c, bank).await?;
        }
        Ok(n)
    }
}

async fn count_locks(c: &mut MultiplexedConnection, bank: &Bank) -> Result<usize, Error> {
    let pattern = format!("{}{}*", redtx_common::keys::lock(""), bank.prefix);
    let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await.map_err(|e| Error::redis(&bank.url, e))?;
    let mut n = 0;
    while let Some(k) = iter.next_item().await {
        let _ = k.map_err(|e| Error::redis(&bank.url, e))?;
        n += 1;
    }
    Ok(n)
}
