//! Private `redis-server` processes on free loopback ports, for `redtx demo` and the tests.
//!
//! Each server gets its own temporary directory (AOF on, so a restart keeps what was acked) and
//! is killed when the [`RedisServer`] is dropped. The binary is `redis-server` from `PATH`, or
//! `$REDTX_REDIS_SERVER`.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the `redis-server` binary to use.
pub const SERVER_ENV: &str = "REDTX_REDIS_SERVER";

/// Options of a private server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `appendonly yes` with `appendfsync always`: nothing acked is lost on `kill -9`.
    pub aof: bool,
    /// `requirepass` for the default user.
    pub password: Option<String>,
    /// Extra `--name value` arguments.
    pub extra: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { aof: true, password: None, extra: Vec::new() }
    }
}

/// A running private `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    opts: ServerOptions,
}

impl RedisServer {
    /// Starts a server with default options (AOF on).
    pub fn start() -> Result<Self> {
        Self::start_with(ServerOptions::default())
    }

    /// Starts a server with `opts` on a free port.
    pub fn start_with(opts: ServerOptions) -> Result<Self> {
        Self::start_picking(opts, free_port)
    }

    /// Starts a server with `opts` on a port chosen by `pick` (asked again, up to ten times in
    /// all, when the server cannot start on the one it gave: a race for the port, say).
    pub fn start_picking(opts: ServerOptions, mut pick: impl FnMut() -> Result<u16>) -> Result<Self> {
        let mut dir = tempfile::Builder::new().prefix("redtx-redis-").tempdir()?;
        let mut last_err = String::new();
        for _ in 0..10 {
            let port = pick()?;
            let mut s = RedisServer { child: None, port, dir, opts: opts.clone() };
            match s.spawn() {
                Ok(()) => return Ok(s),
                Err(e @ Error::RedisServerMissing { .. }) => return Err(e),
                Err(e) => {
                    last_err = e.to_string();
                    dir = std::mem::replace(&mut s.dir, tempfile::tempdir()?);
                }
            }
        }
        Err(Error::ServerStart(last_err))
    }

    fn binary() -> String {
        std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "redis-server".into())
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = Self::binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.opts.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(p) = &self.opts.password {
            cmd.arg("--requirepass").arg(p);
        }
        for (k, v) in &self.opts.extra {
            cmd.arg(format!("--{k}")).arg(v);
        }
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::RedisServerMissing { binary: bin.clone() }
            } else {
                Error::ServerStart(format!("{bin}: {e}"))
            }
        })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(Error::ServerStart(format!(
                    "exited with {status} on port {}: {}",
                    self.port,
                    tail.join(" | ")
                )));
            }
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(Error::ServerStart(format!("no answer on port {} within 10s", self.port)))
    }

    /// Sends `PING` over a raw socket (no async runtime needed); true on `+PONG` or `-NOAUTH`.
    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"),
            Err(_) => false,
        }
    }

    /// The server's process id while it runs (for the CPU it uses, read from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://[:password@]127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        match &self.opts.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Kills the server with SIGKILL (no chance to write anything more).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server (if running) and starts it again on the same port and directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let started = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The old socket may linger a moment.
                Err(e) if started.elapsed() < Duration::from_secs(10) => {
                    tracing::debug!(error = %e, "restart: retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fields of `/proc/<pid>/stat` after the process name, the state first (`R`, `S`, `T`
/// stopped, `Z` zombie, ...); `None` when the process is gone (or there is no `/proc`). The
/// name may hold spaces and parentheses, so the fields are counted from its last `)`.
pub fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_string).collect())
}

/// `utime + stime` of process `pid` (all its threads), in clock ticks: fields 14 and 15 of
/// `/proc/<pid>/stat`, the 12th and 13th after the name.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = proc_stat(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
