//! Private PostgreSQL servers on free loopback ports, for the tests.
//!
//! Each server gets its own temporary data directory (`initdb`, superuser `postgres`, trust
//! authentication, UTF-8, locale C) and is stopped, and its directory removed, when the
//! [`PgServer`] is dropped. It is set up for two-phase commit (`max_prepared_transactions=64`)
//! and for speed: `fsync`, `synchronous_commit` and `full_page_writes` are off. None of these
//! loses anything on a process crash ([`PgServer::kill`]): the OS keeps what was written. Only
//! a plain `COMMIT` acked in the last fraction of a second may be lost (asynchronous commit);
//! `PREPARE TRANSACTION` and `COMMIT PREPARED` always flush the WAL, so prepared transactions
//! survive a crash and the recovery that follows.
//!
//! The binaries are `$REDTX_PG_BIN/initdb` and `$REDTX_PG_BIN/postgres` when `REDTX_PG_BIN` is
//! set, else `initdb` from `PATH`, else from the newest `/usr/lib/postgresql/<version>/bin`
//! (Debian and Ubuntu keep them there, off `PATH`); `postgres` is taken from the directory of the
//! `initdb` found. Both refuse to run as root, so as root they run as `nobody`.

use crate::server::free_port;
use crate::{Error, Result};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the directory of the PostgreSQL binaries (`initdb`, `postgres`).
pub const PG_BIN_ENV: &str = "REDTX_PG_BIN";

/// Where Debian and Ubuntu install the binaries of each PostgreSQL version (`<version>/bin`).
const DEBIAN_LIB: &str = "/usr/lib/postgresql";

/// How long a start (or a restart, with its crash recovery) may take.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Drop`] lets an immediate shutdown take before it falls back to SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(2);

/// The log line of a server that accepts connections. A TCP port that answers is not enough:
/// during crash recovery the server accepts connections only to refuse them.
const READY_LINE: &str = "ready to accept connections";

/// A running private PostgreSQL server.
pub struct PgServer {
    child: Option<Child>,
    port: u16,
    postgres: PathBuf,
    /// `(uid, gid)` to run the server as, when we are root.
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

/// Why a `postgres` process did not become ready.
enum SpawnError {
    /// It exited: most likely another process took its port (or, on a restart, the previous
    /// one's port or shared memory is not released yet). Worth another try.
    Exited(String),
    /// Anything else (not installed, timed out, local I/O): trying again would not help.
    Failed(Error),
}

impl From<std::io::Error> for SpawnError {
    fn from(e: std::io::Error) -> Self {
        SpawnError::Failed(e.into())
    }
}

impl PgServer {
    /// Creates a fresh data directory with `initdb` and starts a server on a free port; returns
    /// once it accepts connections.
    pub fn start() -> Result<Self> {
        let bins = Binaries::find()?;
        let (dir, run_as) = data_dir()?;
        initdb(&bins.initdb, dir.path(), run_as)?;
        let mut server = PgServer { child: None, port: 0, postgres: bins.postgres, run_as, dir };
        let mut last_err = String::new();
        // A free port may be taken by a parallel test before the server binds it: try another.
        for _ in 0..10 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(SpawnError::Exited(msg)) => {
                    tracing::debug!(error = %msg, "postgres start: retrying on another port");
                    last_err = msg;
                }
                Err(SpawnError::Failed(e)) => return Err(e),
            }
        }
        Err(Error::PgServerStart(last_err))
    }

    fn spawn(&mut self) -> Result<(), SpawnError> {
        let dir = self.dir.path();
        // Appended to, so that a restart keeps the earlier log; only what follows `from` counts.
        let log = OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let from = log.metadata()?.len();
        let mut cmd = Command::new(&self.postgres);
        cmd.arg("-D")
            .arg(dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // The Unix socket in the private directory, not in a shared /var/run/postgresql.
            .arg("-k")
            .arg(dir)
            .args(["-c", "max_prepared_transactions=64"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=100"])
            // English messages: READY_LINE is looked for in the log.
            .args(["-c", "lc_messages=C"])
            .env("LC_ALL", "C")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_user(&mut cmd, self.run_as);
        let child = cmd.spawn().map_err(|e| SpawnError::Failed(spawn_error(&self.postgres, e)))?;
        self.child = Some(child);
        self.wait_ready(from)
    }

    fn wait_ready(&mut self, log_from: u64) -> Result<(), SpawnError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(SpawnError::Exited(format!(
                    "postgres exited with {status} on port {}: {}",
                    self.port,
                    self.log_tail(log_from)
                )));
            }
            if self.log_since(log_from).contains(READY_LINE) && self.accepts_tcp() {
                return Ok(());
            }
            if started.elapsed() >= READY_TIMEOUT {
                self.kill();
                return Err(SpawnError::Failed(Error::PgServerStart(format!(
                    "not ready on port {} within {}s: {}",
                    self.port,
                    READY_TIMEOUT.as_secs(),
                    self.log_tail(log_from)
                ))));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn accepts_tcp(&self) -> bool {
        TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200)).is_ok()
    }

    /// The log written since byte `from` (empty if unreadable).
    fn log_since(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            if f.seek(SeekFrom::Start(from)).is_ok() {
                let mut bytes = Vec::new();
                let _ = f.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        text
    }

    /// The last lines of the log since byte `from`, on one line, for error messages.
    fn log_tail(&self, from: u64) -> String {
        let log = self.log_since(from);
        let mut tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).rev().take(5).collect();
        tail.reverse();
        if tail.is_empty() {
            "(empty log)".into()
        } else {
            tail.join(" | ")
        }
    }

    /// The server's port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (superuser, no password: trust auth).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's data directory; it also holds the Unix socket and `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log (stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Crashes the server: SIGKILL to the postmaster and to every backend and helper process it
    /// forked, as a power cut would, so that nothing keeps running or holds its shared memory.
    /// The next [`PgServer::restart`] goes through crash recovery.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            // Stopped, the postmaster cannot fork a new child while its children are listed.
            signal("STOP", &[pid]);
            let children = children_of(pid);
            let _ = child.kill();
            signal("KILL", &children);
            let _ = child.wait();
        }
    }

    /// Kills the server (if running, as [`PgServer::kill`] does) and starts it again on the same
    /// port and data directory; returns once crash recovery is over and it accepts connections.
    /// Prepared transactions are still there.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let started = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The port or the shared memory of the previous run may be held a moment longer.
                Err(SpawnError::Exited(msg)) if started.elapsed() < READY_TIMEOUT => {
                    tracing::debug!(error = %msg, "postgres restart: retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(SpawnError::Exited(msg)) => return Err(Error::PgServerStart(msg)),
                Err(SpawnError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Whether the postmaster is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Immediate shutdown (SIGQUIT: the postmaster stops its children and waits for them), then
    /// [`PgServer::kill`] if it takes longer than [`QUIT_GRACE`].
    fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            signal("QUIT", &[child.id()]);
            let started = Instant::now();
            while started.elapsed() < QUIT_GRACE {
                if !matches!(child.try_wait(), Ok(None)) {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        // The TempDir field then removes the directory.
    }
}

/// The `initdb` and `postgres` binaries to use.
#[derive(Debug, PartialEq)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
}

impl Binaries {
    fn find() -> Result<Self> {
        Self::find_in(std::env::var_os(PG_BIN_ENV), std::env::var_os("PATH"), Path::new(DEBIAN_LIB))
    }

    /// The lookup of [`Binaries::find`], on the given `$REDTX_PG_BIN`, `$PATH` and Debian lib
    /// directory (parameters, so that tests need not change the process environment).
    fn find_in(pg_bin: Option<OsString>, path: Option<OsString>, debian_lib: &Path) -> Result<Self> {
        let initdb = match pg_bin.filter(|d| !d.is_empty()) {
            Some(d) => {
                let initdb = PathBuf::from(d).join("initdb");
                if !is_executable(&initdb) {
                    return Err(Error::PostgresMissing { binary: format!("{} (${PG_BIN_ENV})", initdb.display()) });
                }
                initdb
            }
            None => path
                .iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join("initdb"))
                .find(|p| is_executable(p))
                .or_else(|| newest_versioned(debian_lib))
                .ok_or_else(|| Error::PostgresMissing {
                    binary: format!("initdb (looked on PATH and in {}/*/bin)", debian_lib.display()),
                })?,
        };
        // Through symlinks first (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb,
        // Homebrew's bin -> Cellar): the server sits next to the real initdb.
        let real = std::fs::canonicalize(&initdb).unwrap_or_else(|_| initdb.clone());
        let postgres = [real.parent(), initdb.parent()]
            .into_iter()
            .flatten()
            .map(|d| d.join("postgres"))
            .find(|p| is_executable(p))
            .ok_or_else(|| Error::PostgresMissing { binary: real.with_file_name("postgres").display().to_string() })?;
        Ok(Binaries { initdb, postgres })
    }
}

/// `<lib>/<version>/bin/initdb` of the highest version (compared as numbers: 9.6 < 15 < 16).
fn newest_versioned(lib: &Path) -> Option<PathBuf> {
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version: Vec<u32> =
                e.file_name().to_str()?.split('.').map(|n| n.parse().ok()).collect::<Option<_>>()?;
            let initdb = e.path().join("bin").join("initdb");
            is_executable(&initdb).then_some((version, initdb))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, initdb)| initdb)
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh, empty data directory (mode 0700, as the server demands), and the user to run the
/// server as when we are root: `nobody`, who then owns the directory.
fn data_dir() -> Result<(tempfile::TempDir, Option<(u32, u32)>)> {
    let dir = tempfile::Builder::new().prefix("redtx-pg-").tempdir()?;
    // A directory we just made is owned by our effective uid: that tells root without libc.
    if dir.path().metadata()?.uid() != 0 {
        return Ok((dir, None));
    }
    let (uid, gid) = nobody();
    // `nobody` must be able to reach the directory, which $TMPDIR (say under /root) may not
    // allow; /tmp does.
    let dir = tempfile::Builder::new().prefix("redtx-pg-").tempdir_in("/tmp")?;
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    Ok((dir, Some((uid, gid))))
}

/// The uid and gid of `nobody` from /etc/passwd; 65534 (its usual ids) if it is not there.
fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            match f[..] {
                ["nobody", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
                _ => None,
            }
        })
        .unwrap_or((65534, 65534))
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        // std also drops root's supplementary groups when it sets the uid.
        cmd.uid(uid).gid(gid);
    }
}

fn initdb(bin: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.arg("-D")
        .arg(dir)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        .env("LC_ALL", "C")
        // Our own working directory may be closed to `nobody`, and initdb looks it up.
        .current_dir(dir)
        .stdin(Stdio::null());
    as_user(&mut cmd, run_as);
    let out = cmd.output().map_err(|e| spawn_error(bin, e))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(5).collect();
    tail.reverse();
    Err(Error::PgServerStart(format!("initdb exited with {}: {}", out.status, tail.join(" | "))))
}

fn spawn_error(bin: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::PostgresMissing { binary: bin.display().to_string() }
    } else {
        Error::PgServerStart(format!("{}: {e}", bin.display()))
    }
}

/// Sends signal `name` (`QUIT`, `KILL`, ...) to `pids`, best effort. Through the shell's `kill`
/// (present wherever `sh` is), which spares a libc dependency for a test harness.
fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("sh")
        .args(["-c", r#"sig=$1; shift; kill -s "$sig" "$@""#, "sh", name])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The processes whose parent is `pid`, from /proc (empty where there is no /proc). The backends
/// put themselves in their own sessions, so a process group would not reach them.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let ppid: u32 = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Gone, or a zombie waiting for whoever adopted it, within 2 s (a signal takes effect when
    /// its target is next scheduled).
    fn is_gone(pid: u32) -> bool {
        let started = Instant::now();
        loop {
            let gone = match crate::server::proc_stat(pid) {
                Some(f) => f.first().is_some_and(|state| state.starts_with(['Z', 'X'])),
                None => true,
            };
            if gone || started.elapsed() > Duration::from_secs(2) {
                return gone;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_prepared_transaction_survives_a_crash() {
        let rt = runtime();
        let mut pg = PgServer::start().unwrap();
        assert!(pg.is_running());
        let port = pg.port();
        rt.block_on(async {
            let c = connect(&pg.url()).await;
            let max: String = c.query_one("SHOW max_prepared_transactions", &[]).await.unwrap().get(0);
            assert_eq!(max, "64");
            c.batch_execute("BEGIN; CREATE TABLE t(x int); INSERT INTO t VALUES (42); PREPARE TRANSACTION 'g1'")
                .await
                .unwrap();
        });
        let pid = pg.child.as_ref().unwrap().id();
        let children = children_of(pid);
        assert!(!children.is_empty(), "a running postmaster has helper processes");
        pg.kill();
        assert!(!pg.is_running());
        assert!(children.iter().all(|&c| is_gone(c)), "kill() leaves no backend behind");

        pg.restart().unwrap();
        assert!(pg.is_running());
        assert_eq!(pg.port(), port);
        rt.block_on(async {
            let c = connect(&pg.url()).await;
            let gids: Vec<String> =
                c.query("SELECT gid FROM pg_prepared_xacts", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
            assert_eq!(gids, ["g1"]);
            c.batch_execute("COMMIT PREPARED 'g1'").await.unwrap();
            let x: i32 = c.query_one("SELECT x FROM t", &[]).await.unwrap().get(0);
            assert_eq!(x, 42);
        });
        let log = std::fs::read_to_string(pg.log_path()).unwrap();
        assert!(log.contains("not properly shut down"), "the restart went through crash recovery");
    }

    #[test]
    fn two_servers_start_in_parallel_and_drop_cleans_up() {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(PgServer::start);
            let b = s.spawn(PgServer::start);
            (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
        });
        assert_ne!(a.port(), b.port());
        assert_ne!(a.dir(), b.dir());
        runtime().block_on(async {
            for pg in [&a, &b] {
                let c = connect(&pg.url()).await;
                let port: String = c.query_one("SHOW port", &[]).await.unwrap().get(0);
                assert_eq!(port, pg.port().to_string());
            }
        });
        for pg in [a, b] {
            let dir = pg.dir().to_path_buf();
            let pid = pg.child.as_ref().unwrap().id();
            let children = children_of(pid);
            drop(pg);
            assert!(!dir.exists(), "the data directory is removed");
            assert!(is_gone(pid) && children.iter().all(|&c| is_gone(c)), "no process is left");
        }
    }

    #[test]
    fn missing_binaries_say_how_to_install_postgresql() {
        let empty = tempfile::tempdir().unwrap();
        for err in [
            Binaries::find_in(Some(empty.path().into()), None, empty.path()).unwrap_err(),
            Binaries::find_in(None, Some(empty.path().into()), empty.path()).unwrap_err(),
        ] {
            assert!(matches!(err, Error::PostgresMissing { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("PostgreSQL is not installed"), "{msg}");
            for cmd in ["apt-get install postgresql", "dnf install postgresql-server", "brew install postgresql"] {
                assert!(msg.contains(cmd), "{msg}");
            }
        }
    }

    #[test]
    fn binaries_come_from_the_env_dir_then_path_then_the_newest_debian_version() {
        let root = tempfile::tempdir().unwrap();
        let bin = |dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            for name in ["initdb", "postgres"] {
                std::fs::write(dir.join(name), "").unwrap();
                std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Binaries { initdb: dir.join("initdb"), postgres: dir.join("postgres") }
        };
        let lib = root.path().join("lib");
        bin(&lib.join("9.6/bin"));
        let newest = bin(&lib.join("16/bin"));
        bin(&lib.join("15/bin"));
        let on_path = bin(&root.path().join("path"));
        let env = bin(&root.path().join("env"));
        let nothing = root.path().join("nothing");
        let path = Some(std::env::join_paths([&nothing, &root.path().join("path")]).unwrap());

        // postgres is looked up next to the real initdb: compare real paths (macOS's /tmp is a
        // symlink).
        let real = |b: Binaries| (std::fs::canonicalize(b.initdb).unwrap(), std::fs::canonicalize(b.postgres).unwrap());
        let found = |env: Option<&Path>, path: Option<OsString>| {
            real(Binaries::find_in(env.map(|p| p.into()), path, &lib).unwrap())
        };
        assert_eq!(found(None, Some(nothing.clone().into())), real(newest));
        assert_eq!(found(None, path.clone()), real(on_path));
        assert_eq!(found(Some(&root.path().join("env")), path), real(env));

        // postgres next to the real initdb behind a symlink.
        let links = root.path().join("links");
        std::fs::create_dir(&links).unwrap();
        std::os::unix::fs::symlink(lib.join("16/bin/initdb"), links.join("initdb")).unwrap();
        let newest = real(bin(&lib.join("16/bin")));
        let via_link = Binaries::find_in(None, Some(links.clone().into()), &nothing).unwrap();
        assert_eq!(via_link.initdb, links.join("initdb"));
        assert_eq!(via_link.postgres, newest.1);
    }
}
