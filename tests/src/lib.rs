//! End-to-end test kit of redtx: real `redis-server` processes and the real binaries
//! (`redtx-coordinator`, `redtx-participant`, `redtx`), killed and stopped with real signals.
//! The one harness shared by every test in `tests/tests/`.
//!
//! # Layout
//! - [`bin`], [`example`]: path of a workspace binary or example of the running test's profile (`cargo build --bins --examples`
//!   once per test process, so the binaries are never stale).
//! - [`Proc`]: a spawned binary whose output is kept line by line (`wait_for_line`), with
//!   `kill9`/`term`/`stop`/`cont`/`wait_exit`; killed on drop, its output printed if the test
//!   panicked. [`coordinator`] and [`participant`] spawn the workers with `--partitions`.
//! - [`cli`], [`redtx`]: run the `redtx` CLI to completion with a time limit.
//! - Partitions: a test deployment uses [`PARTITIONS`] (4, so partitioning is exercised) unless
//!   [`ClusterOptions::partitions`] says otherwise;
//!   [`record_key`], [`coord_streams`], [`participant_streams`], [`dead_letters`] name the
//!   per-partition keys.
//! - [`redis_conn`], [`scan`], [`poll`], [`xrange`], [`drained`]: small synchronous Redis and
//!   polling helpers.
//! - [`Cluster`]: a stream Redis, data Redis servers, coordinators and named participants, with
//!   the producer [`Client`], records, barriers and leftovers (locks, prepared barriers). The
//!   streams may be on a Redis Cluster instead ([`Cluster::start_on`], [`Bank::start_on_cluster`],
//!   [`Shop::start_on_cluster`]): the workers then run with `--cluster`. A participant's data may
//!   be on a Redis Cluster too ([`ClusterOptions::data_on_cluster`], [`Cluster::start_with_data`],
//!   [`Bank::start_with_data`]): the data cluster given, else the streams' cluster (then the
//!   participant runs without `--data`, on its default).
//! - [`Bank`]: the 2PC fixture: servers A (streams and `bank-a`'s data) and B (`bank-b`'s data),
//!   accounts, transfers, balances; a [`TransferLoad`] of producers moving money until stopped,
//!   and [`Bank::check_transfers`] (every transfer ended, balances exactly as committed).
//! - Who does the work: [`Cluster::worker_stats`] (each process's `rtx:stats:*` hash),
//!   [`Cluster::lease_owners`] and [`Cluster::wait_spread`] (which coordinator process owns
//!   which partition), [`Cluster::pending_at`], and [`Proc::logged_count`] for the counts of a
//!   `coordinator stopped` / `participant stopped` line.
//! - [`Shop`]: the saga fixture: `orders` (on the stream Redis), `stock` and `payment` (each on
//!   its own Redis); orders as three-step sagas, and the conservation checks
//!   ([`Shop::check`]): stock + sold and balance + spent constant, every step applied and
//!   compensated at most once, no order half-done.
//!
//! - [`make_tls_certs`]: a CA and a server certificate (`openssl`) for the TLS tests.
//!
//! Every test starts its own servers and processes on free ports, so tests run in parallel.
//! Synchronisation waits for events (a line printed, a record state, a barrier) with generous
//! time limits (slow CI), never for a fixed time.

use redis::Commands;
use redtx_common::cluster_server::RedisCluster;
use redtx_common::machine::Phase;
use redtx_common::protocol::Message;
use redtx_common::record::{TxnRecord, TxnState};
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_common::spec::{Branch, ExpectOp, HincrbyOp, IncrbyOp, Op, TxnSpec};
pub use redtx_common::stats::{pid_of_worker, WorkerStats};
use redtx_common::Client;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use redtx_common::keys;

/// Generous limit for anything that should happen "soon" on a loaded 2-core CI machine.
pub const LONG: Duration = Duration::from_secs(30);

/// Fail point environment variable of the workers.
pub const FAILPOINT: &str = "REDTX_FAILPOINT";

/// Partitions of every test deployment: more than one, so routing by partition is exercised.
pub const PARTITIONS: u32 = 4;

/// Coordinator arguments that make recovery quick in fault tests (a dead coordinator's
/// partitions move after 2 s).
pub const FAST_COORD: &[&str] = &["--lease", "2s", "--claim-idle", "500ms", "--resend-every", "200ms"];
/// Participant arguments that make recovery quick in fault tests.
pub const FAST_PART: &[&str] = &["--claim-idle", "500ms"];

// ---------------------------------------------------------------------------------------------
// Binaries

/// The workspace root (`tests/..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `target/<profile>/`: the directory holding the binaries of the running test's profile.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let deps = exe.parent().expect("exe dir");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Set to skip the `cargo build --bins` that [`bin`] runs once per test process (the binaries
/// are then used as found).
pub const SKIP_BUILD_ENV: &str = "REDTX_TEST_SKIP_BUILD";

/// Path of the workspace binary `name` (`redtx`, `redtx-coordinator`, `redtx-participant`) built
/// with the running test's profile. `cargo test` does not build other packages' binaries, so
/// `cargo build --bins` runs once per test process (a no-op when they are up to date): a test
/// never runs against a stale binary.
pub fn bin(name: &str) -> PathBuf {
    let dir = profile_dir();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if std::env::var_os(SKIP_BUILD_ENV).is_some() {
            return Ok(());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args(["build", "--bins", "--examples"]);
        // The variables `cargo test` sets for this package would make some build scripts
        // (`rerun-if-env-changed`) rebuild their crates: build as a plain `cargo build` would.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"]
                .iter()
                .any(|p| k.starts_with(p))
                || k == "OUT_DIR"
            {
                cmd.env_remove(k.as_ref());
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        // The binaries must land in this target dir.
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build --bins failed: {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        panic!("binary {name} could not be built: {e}");
    }
    assert!(path.exists(), "binary {} is missing even after cargo build --bins", path.display());
    path
}

/// Path of the workspace example `name` (e.g. `inventory`, the SDK's example participant),
/// built like [`bin`].
pub fn example(name: &str) -> PathBuf {
    // `bin` builds the examples too.
    let dir = bin("redtx").parent().expect("profile dir").join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "example {} is missing even after cargo build --examples", path.display());
    path
}

// ---------------------------------------------------------------------------------------------
// Processes

#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Lines {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }
}

fn pump(src: impl Read + Send + 'static, sink: Arc<Lines>, tag: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&buf);
                    sink.push(format!("{tag}{}", s.trim_end_matches(['\n', '\r'])));
                }
            }
        }
    })
}

/// A spawned real binary. Its stdout and stderr are kept line by line (stderr lines are
/// prefixed with `! ` in [`Proc::output`]). Killed (SIGKILL) on drop.
pub struct Proc {
    /// A label for messages (`coordinator`, `bank-b#2`, ...).
    pub label: String,
    child: Child,
    lines: Arc<Lines>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `program args...` with extra environment variables. `RUST_LOG` defaults to `info`.
    pub fn spawn(label: &str, program: &Path, args: &[String], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env_remove(FAILPOINT);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc::adopt(label, child)
    }

    /// Takes over a spawned child whose stdout and stderr are piped.
    pub fn adopt(label: &str, mut child: Child) -> Proc {
        let lines = Arc::new(Lines::default());
        pump(child.stdout.take().unwrap(), lines.clone(), "");
        pump(child.stderr.take().unwrap(), lines.clone(), "! ");
        Proc { label: label.to_string(), child, lines, status: None }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed so far, one line each (stderr lines start with `! `).
    pub fn output(&self) -> String {
        self.lines.lock_lines().join("\n")
    }

    /// Waits until a line containing `needle` was printed (on stdout or stderr). Panics with the
    /// output after `timeout`, or if the process exits first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lines.lines.lock().unwrap();
        loop {
            if guard.iter().any(|l| l.contains(needle)) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(guard);
                panic!("{}: no line containing {needle:?} within {timeout:?}; output:\n{}", self.label, self.output());
            }
            let (g, _) =
                self.lines.changed.wait_timeout(guard, (deadline - now).min(Duration::from_millis(100))).unwrap();
            guard = g;
            if !guard.iter().any(|l| l.contains(needle)) {
                drop(guard);
                if let Some(s) = self.try_status() {
                    // Give the pipes a moment to deliver the last lines.
                    std::thread::sleep(Duration::from_millis(100));
                    if self.lines.lock_lines().iter().any(|l| l.contains(needle)) {
                        return;
                    }
                    panic!("{} exited ({s}) before printing {needle:?}; output:\n{}", self.label, self.output());
                }
                guard = self.lines.lines.lock().unwrap();
            }
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// SIGKILL (`kill -9`): no chance to clean up. Waits for the process to be gone.
    pub fn kill9(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM: asks for a graceful shutdown (does not wait).
    pub fn term(&mut self) {
        if self.try_status().is_none() {
            let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        }
    }

    /// SIGSTOP: the process freezes (its connections stay open, it reads nothing) until
    /// [`Proc::cont`].
    pub fn stop(&mut self) {
        self.signal("STOP");
    }

    /// SIGCONT: a stopped process goes on.
    pub fn cont(&mut self) {
        self.signal("CONT");
    }

    fn signal(&mut self, sig: &str) {
        if self.try_status().is_none() {
            let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
            assert!(ok.is_ok_and(|s| s.success()), "kill -{sig} {} failed", self.label);
        }
    }

    /// Whether a line containing `needle` was printed so far.
    pub fn printed(&self, needle: &str) -> bool {
        self.lines.lock_lines().iter().any(|l| l.contains(needle))
    }

    /// The value of the log field `field` (`handled=12345` gives `12345`) in the last line
    /// containing `needle`, if any.
    pub fn logged(&self, needle: &str, field: &str) -> Option<String> {
        let lines = self.lines.lock_lines();
        let line = lines.iter().rev().find(|l| l.contains(needle))?;
        let at = format!("{field}=");
        line.split_whitespace().find_map(|w| w.strip_prefix(at.as_str())).map(|v| v.trim_matches('"').to_string())
    }

    /// [`Proc::logged`] as a number.
    pub fn logged_count(&self, needle: &str, field: &str) -> Option<u64> {
        self.logged(needle, field)?.parse().ok()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

trait LockLines {
    fn lock_lines(&self) -> Vec<String>;
}

impl LockLines for Arc<Lines> {
    fn lock_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let lines = self.lines.lock_lines();
            // `REDTX_TEST_TAIL=<n>` shows more of it.
            let n = std::env::var("REDTX_TEST_TAIL").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
            let tail = &lines[lines.len().saturating_sub(n)..];
            eprintln!("----- last output of {} (pid {}) -----\n{}\n-----", self.label, self.pid(), tail.join("\n"));
        }
    }
}

/// `--partitions <PARTITIONS>`, for a worker or CLI command line.
pub fn partitions_args() -> Vec<String> {
    partitions_args_for(PARTITIONS)
}

/// `--partitions <partitions>`.
pub fn partitions_args_for(partitions: u32) -> Vec<String> {
    vec!["--partitions".to_string(), partitions.to_string()]
}

/// Spawns `redtx-coordinator --redis url --partitions 4 extra...` with `envs`.
pub fn coordinator(url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    coordinator_over(url, PARTITIONS, extra, envs)
}

/// Spawns `redtx-coordinator --redis url --partitions <partitions> extra...` with `envs`.
pub fn coordinator_over(url: &str, partitions: u32, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut args = vec!["--redis".to_string(), url.to_string()];
    args.extend(partitions_args_for(partitions));
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn("coordinator", &bin("redtx-coordinator"), &args, envs)
}

/// Spawns `redtx-participant --redis url --name name --data data_url --partitions 4 extra...`
/// with `envs`.
pub fn participant(url: &str, name: &str, data_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    participant_over(url, PARTITIONS, name, data_url, extra, envs)
}

/// [`participant`] over `partitions` partitions.
pub fn participant_over(
    url: &str,
    partitions: u32,
    name: &str,
    data_url: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    participant_with(url, partitions, name, Some(data_url), extra, envs)
}

/// [`participant_over`], with `--data` only when `data_url` is given (else the data is on the
/// stream Redis, or with `--cluster` on the streams' cluster).
pub fn participant_with(
    url: &str,
    partitions: u32,
    name: &str,
    data_url: Option<&str>,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Proc {
    let mut args = vec!["--redis".to_string(), url.to_string(), "--name".to_string(), name.to_string()];
    if let Some(d) = data_url {
        args.extend(["--data".to_string(), d.to_string()]);
    }
    args.extend(partitions_args_for(partitions));
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(name, &bin("redtx-participant"), &args, envs)
}

/// What a finished CLI run printed and returned.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl CliOutput {
    /// stdout and stderr together, for "does not contain" checks and messages.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// stdout parsed as one JSON value.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!("stdout is not one JSON value ({e}): {:?}; stderr: {}", self.stdout, self.stderr)
        })
    }
}

/// Runs `redtx args...` with `stdin`, killing it after `timeout` (then panics).
pub fn cli(args: &[&str], stdin: Option<&[u8]>) -> CliOutput {
    cli_with_timeout(args, stdin, LONG)
}

/// Runs `redtx <sub> --redis <url> --partitions 4 rest...` (see [`cli`]).
pub fn redtx(sub: &str, url: &str, rest: &[&str], stdin: Option<&[u8]>) -> CliOutput {
    let mut args = vec![sub.to_string(), "--redis".to_string(), url.to_string()];
    args.extend(partitions_args());
    args.extend(rest.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cli(&args, stdin)
}

/// Starts `redtx <sub> --redis <url> --partitions 4 rest...` in the background, its stdin
/// `stdin` (then closed); [`Proc::wait_exit`] gives its exit code, [`Proc::output`] what it
/// printed.
pub fn spawn_redtx(sub: &str, url: &str, rest: &[&str], stdin: &[u8]) -> Proc {
    let mut args = vec![sub.to_string(), "--redis".to_string(), url.to_string()];
    args.extend(partitions_args());
    args.extend(rest.iter().map(|s| s.to_string()));
    let mut cmd = Command::new(bin("redtx"));
    cmd.args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("REDTX_REDIS_URL")
        .env_remove("REDTX_PARTITIONS")
        .env_remove(FAILPOINT);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd.spawn().expect("spawn redtx");
    let mut w = child.stdin.take().unwrap();
    w.write_all(stdin).expect("write redtx stdin");
    drop(w);
    Proc::adopt(&format!("redtx {sub}"), child)
}

/// [`cli`] with an explicit time limit.
pub fn cli_with_timeout(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
    let mut cmd = Command::new(bin("redtx"));
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("REDTX_REDIS_URL")
        .env_remove("REDTX_PARTITIONS")
        .env_remove(FAILPOINT);
    let mut child = cmd.spawn().expect("spawn redtx");
    let writer = stdin.map(|bytes| {
        let mut w = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        // The CLI may refuse the input before reading all of it: ignore EPIPE.
        std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redtx {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    CliOutput {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_t.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_t.join().unwrap()).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Redis and polling helpers

/// A synchronous connection to `url`.
pub fn redis_conn(url: &str) -> redis::Connection {
    let c = redis::Client::open(url).expect("redis url");
    c.get_connection_with_timeout(Duration::from_secs(10)).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Makes the ACL user `name` with `password`, allowed every key, channel and command.
pub fn acl_user(conn: &mut redis::Connection, name: &str, password: &str) {
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(name)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query(conn)
        .unwrap_or_else(|e| panic!("ACL SETUSER {name}: {e}"));
}

/// Every key matching `pattern`, by `SCAN` (never `KEYS`).
pub fn scan(conn: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query(conn).unwrap();
        out.extend(keys);
        if next == 0 {
            out.sort();
            out.dedup();
            return out;
        }
        cursor = next;
    }
}

/// Calls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_every(what, timeout, Duration::from_millis(20), f)
}

/// [`poll`] calling `f` every `every` (for a costlier look, such as a `SCAN`).
pub fn poll_every<T>(what: &str, timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// A stream's entries as `(id, fields)`, fields as raw bytes.
pub fn xrange(conn: &mut redis::Connection, stream: &str) -> Vec<(String, BTreeMap<String, Vec<u8>>)> {
    let v: redis::Value = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(conn).unwrap();
    let mut out = Vec::new();
    if let redis::Value::Array(entries) = v {
        for e in entries {
            let redis::Value::Array(parts) = e else { continue };
            let mut it = parts.into_iter();
            let id: String = redis::from_redis_value(it.next().unwrap()).unwrap();
            let fields: Vec<Vec<u8>> = redis::from_redis_value(it.next().unwrap()).unwrap();
            let mut map = BTreeMap::new();
            for kv in fields.chunks(2) {
                if let [k, v] = kv {
                    map.insert(String::from_utf8_lossy(k).into_owned(), v.clone());
                }
            }
            out.push((id, map));
        }
    }
    out
}

/// Whether every consumer group of `stream` has read everything (`last-delivered-id` is the
/// stream's `last-generated-id`) and acked it all (no pending). A missing stream or a stream
/// without groups counts as not drained.
pub fn drained(conn: &mut impl redis::ConnectionLike, stream: &str) -> bool {
    let info: HashMap<String, redis::Value> = match redis::cmd("XINFO").arg("STREAM").arg(stream).query(conn) {
        Ok(m) => m,
        Err(_) => return false,
    };
    let Some(last) = info.get("last-generated-id").and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
    else {
        return false;
    };
    let groups: Vec<HashMap<String, redis::Value>> = match redis::cmd("XINFO").arg("GROUPS").arg(stream).query(conn) {
        Ok(g) => g,
        Err(_) => return false,
    };
    !groups.is_empty()
        && groups.iter().all(|g| {
            let pending = g.get("pending").and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok());
            let delivered = g.get("last-delivered-id").and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
            pending == Some(0) && delivered.as_deref() == Some(last.as_str())
        })
}

// ---------------------------------------------------------------------------------------------
// Partitions

/// The partition of transaction `id` in a test deployment.
pub fn partition(id: &str) -> u32 {
    keys::partition(id, PARTITIONS)
}

/// The record key of transaction `id` (`rtx:txn:{P}:<id>`).
pub fn record_key(id: &str) -> String {
    keys::txn_record(partition(id), id)
}

/// The coordinator stream of every partition.
pub fn coord_streams() -> Vec<String> {
    (0..PARTITIONS).map(keys::coord_stream).collect()
}

/// The streams of every partition of participant `name`.
pub fn participant_streams(name: &str) -> Vec<String> {
    (0..PARTITIONS).map(|p| keys::participant_stream(name, p)).collect()
}

/// The sum of `XLEN` over `streams` (missing streams count 0).
pub fn xlen_sum(conn: &mut redis::Connection, streams: &[String]) -> u64 {
    streams.iter().map(|s| conn.xlen::<_, u64>(s).unwrap()).sum()
}

/// One dead letter: the partition's dead-letter stream it is in, and its fields (`stream`,
/// `id`, `reason`, `orig.t`, ...), as text.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `rtx:dead:{P}`.
    pub dead_stream: String,
    /// The fields.
    pub fields: BTreeMap<String, String>,
}

impl DeadLetter {
    /// A field, or "".
    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("")
    }
}

/// Every dead letter of every partition.
pub fn dead_letters(conn: &mut redis::Connection) -> Vec<DeadLetter> {
    dead_letters_over(conn, PARTITIONS)
}

/// Every dead letter of partitions `0..partitions`.
pub fn dead_letters_over(conn: &mut redis::Connection, partitions: u32) -> Vec<DeadLetter> {
    let mut out = Vec::new();
    for p in 0..partitions {
        let dead_stream = keys::dead_letter_stream(p);
        for (_, f) in xrange(conn, &dead_stream) {
            let fields = f.into_iter().map(|(k, v)| (k, lossy(&v))).collect();
            out.push(DeadLetter { dead_stream: dead_stream.clone(), fields });
        }
    }
    out
}

/// The messages of `stream` about transaction `id`, in stream order, batch entries expanded
/// (undecodable messages are skipped).
pub fn messages_of(conn: &mut redis::Connection, stream: &str, id: &str) -> Vec<Message> {
    xrange(conn, stream)
        .into_iter()
        .flat_map(|(_, f)| {
            let map = f.into_iter().map(|(k, v)| (k, redis::Value::BulkString(v))).collect();
            redtx_common::protocol::items_of_entry(&map).unwrap_or_default()
        })
        .filter_map(|item| item.msg.ok())
        .filter(|m| m.txn() == id)
        .collect()
}

/// A producer [`Client`] for a test deployment (its partition count).
pub async fn connect_client(url: &str) -> redtx_common::Result<Client> {
    Ok(Client::connect(url).await?.with_partitions(PARTITIONS))
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// How to start a [`Cluster`] (the fixture decides the servers and participants).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Coordinators to start.
    pub coordinators: usize,
    /// Extra coordinator arguments.
    pub coord_args: Vec<String>,
    /// Extra participant arguments.
    pub part_args: Vec<String>,
    /// Fail point of the first coordinator.
    pub coord_failpoint: Option<String>,
    /// Fail point of the first instance of a participant, by name.
    pub failpoints: BTreeMap<String, String>,
    /// Instances of a participant, by name, where the fixture's default (one) does not fit;
    /// 0: not started.
    pub instances: BTreeMap<String, usize>,
    /// `--partitions` of every process and of the producer client.
    pub partitions: u32,
    /// Participants whose data is on a Redis Cluster ([`Cluster::data_cluster`]) instead of a
    /// server.
    pub data_on_cluster: BTreeSet<String>,
}

impl Default for ClusterOptions {
    /// One coordinator, one instance of each participant, fast recovery settings, no fail points.
    fn default() -> Self {
        ClusterOptions {
            coordinators: 1,
            coord_args: FAST_COORD.iter().map(|s| s.to_string()).collect(),
            part_args: FAST_PART.iter().map(|s| s.to_string()).collect(),
            coord_failpoint: None,
            failpoints: BTreeMap::new(),
            instances: BTreeMap::new(),
            partitions: PARTITIONS,
            data_on_cluster: BTreeSet::new(),
        }
    }
}

impl ClusterOptions {
    /// Arms `fp` in the first instance of participant `name`.
    pub fn failpoint(mut self, name: &str, fp: &str) -> Self {
        self.failpoints.insert(name.to_string(), fp.to_string());
        self
    }

    /// Arms `fp` in the first coordinator.
    pub fn coord_failpoint(mut self, fp: &str) -> Self {
        self.coord_failpoint = Some(fp.to_string());
        self
    }

    /// Starts `n` instances of participant `name`.
    pub fn instances(mut self, name: &str, n: usize) -> Self {
        self.instances.insert(name.to_string(), n);
        self
    }

    /// Runs the deployment over `n` partitions (instead of [`PARTITIONS`]).
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }

    /// Puts participant `name`'s data on the Redis Cluster ([`Cluster::data_cluster`]).
    pub fn data_on_cluster(mut self, name: &str) -> Self {
        self.data_on_cluster.insert(name.to_string());
        self
    }

    /// Starts `n` coordinators.
    pub fn coordinators(mut self, n: usize) -> Self {
        self.coordinators = n;
        self
    }

    /// Adds coordinator arguments.
    pub fn coord_args(mut self, args: &[&str]) -> Self {
        self.coord_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Adds participant arguments.
    pub fn part_args(mut self, args: &[&str]) -> Self {
        self.part_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
}

/// Redis servers (`servers[0]` holds the streams and records, unless they are on a Redis
/// Cluster), coordinators and named participants, each with its data on one of the servers.
pub struct Cluster {
    /// The servers; `servers[0]` holds the streams and records unless `streams` is set.
    pub servers: Vec<RedisServer>,
    /// The Redis Cluster holding the streams and records, if they are on one (the workers and
    /// the client then use `--cluster` with its seeds).
    pub streams: Option<RedisCluster>,
    /// A Redis Cluster holding the data of the participants of
    /// [`ClusterOptions::data_on_cluster`] (they run with `--data <seeds> --data-cluster`); if
    /// none, their data is on `streams`.
    pub data: Option<RedisCluster>,
    /// The coordinators started so far.
    pub coordinators: Vec<Proc>,
    /// The instances of each participant started so far.
    pub workers: BTreeMap<String, Vec<Proc>>,
    /// Which server holds each participant's data.
    homes: BTreeMap<String, usize>,
    /// The options it was started with.
    pub opts: ClusterOptions,
    /// Runtime for the async [`Client`].
    pub rt: tokio::runtime::Runtime,
    client: OnceLock<Client>,
}

impl Cluster {
    /// Starts `servers` Redis servers with `server_opts`, then the coordinators and, for each
    /// `(name, server index)` of `participants`, its instances (as `opts` says).
    pub fn start(
        servers: usize,
        server_opts: ServerOptions,
        participants: &[(&str, usize)],
        opts: ClusterOptions,
    ) -> Cluster {
        Cluster::start_on(None, servers, server_opts, participants, opts)
    }

    /// [`start`](Self::start), with the streams and records on `streams` (a Redis Cluster) when
    /// given: the servers then hold only the participants' data.
    pub fn start_on(
        streams: Option<RedisCluster>,
        servers: usize,
        server_opts: ServerOptions,
        participants: &[(&str, usize)],
        opts: ClusterOptions,
    ) -> Cluster {
        Cluster::start_with_data(streams, None, servers, server_opts, participants, opts)
    }

    /// [`start_on`](Self::start_on), with the data of the participants of
    /// [`ClusterOptions::data_on_cluster`] on `data` (a Redis Cluster), or on `streams` when
    /// `data` is `None` (their server index in `participants` is then unused).
    pub fn start_with_data(
        streams: Option<RedisCluster>,
        data: Option<RedisCluster>,
        servers: usize,
        server_opts: ServerOptions,
        participants: &[(&str, usize)],
        opts: ClusterOptions,
    ) -> Cluster {
        assert!(
            opts.data_on_cluster.is_empty() || data.is_some() || streams.is_some(),
            "data on a cluster needs a cluster"
        );
        let servers: Vec<RedisServer> = (0..servers.max(1))
            .map(|i| RedisServer::start_with(server_opts.clone()).unwrap_or_else(|e| panic!("start redis #{i}: {e}")))
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut c = Cluster {
            servers,
            streams,
            data,
            coordinators: Vec::new(),
            workers: BTreeMap::new(),
            homes: participants.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            opts: opts.clone(),
            rt,
            client: OnceLock::new(),
        };
        for i in 0..opts.coordinators {
            c.start_coordinator(if i == 0 { opts.coord_failpoint.as_deref() } else { None });
        }
        for (name, _) in participants {
            let n = opts.instances.get(*name).copied().unwrap_or(1);
            for i in 0..n {
                let fp = if i == 0 { opts.failpoints.get(*name).cloned() } else { None };
                c.start_worker(name, fp.as_deref());
            }
        }
        c
    }

    /// URL of the Redis holding the streams and records (a cluster's seeds, comma-separated).
    pub fn url(&self) -> String {
        match &self.streams {
            Some(c) => c.seeds(),
            None => self.servers[0].url(),
        }
    }

    /// `--cluster` when the streams are on a Redis Cluster, for a worker's command line.
    fn cluster_flag(&self) -> Vec<&'static str> {
        if self.streams.is_some() {
            vec!["--cluster"]
        } else {
            Vec::new()
        }
    }

    /// URL of participant `name`'s data Redis (a cluster's seeds, comma-separated).
    pub fn data_url(&self, name: &str) -> String {
        match self.data_cluster_of(name) {
            Some(c) => c.seeds(),
            None => self.servers[self.home(name)].url(),
        }
    }

    /// The Redis Cluster holding participants' data: [`Cluster::data`], else the streams'.
    pub fn data_cluster(&self) -> Option<&RedisCluster> {
        self.data.as_ref().or(self.streams.as_ref())
    }

    /// The Redis Cluster holding participant `name`'s data, if it is on one.
    pub fn data_cluster_of(&self, name: &str) -> Option<&RedisCluster> {
        self.opts.data_on_cluster.contains(name).then(|| self.data_cluster().expect("a data cluster"))
    }

    /// A synchronous cluster connection to the Redis Cluster holding participants' data.
    pub fn data_cluster_conn(&self) -> redis::cluster::ClusterConnection {
        let c = self.data_cluster().expect("a data cluster");
        redis::cluster::ClusterClient::new(c.seed_urls()).unwrap().get_connection().unwrap()
    }

    /// Runs `cmd` on participant `name`'s data Redis (on a cluster, on the node of its key).
    pub fn data_query<T: redis::FromRedisValue>(&self, name: &str, cmd: &redis::Cmd) -> T {
        let r = match self.data_cluster_of(name) {
            Some(_) => cmd.query(&mut self.data_cluster_conn()),
            None => cmd.query(&mut self.data_conn(name)),
        };
        r.unwrap_or_else(|e| panic!("on the data Redis of {name}: {e}"))
    }

    /// Every key matching `pattern` on participant `name`'s data Redis (every master of a
    /// cluster).
    pub fn data_scan(&self, name: &str, pattern: &str) -> Vec<String> {
        match self.data_cluster_of(name) {
            Some(c) => {
                c.masters().unwrap().into_iter().flat_map(|m| scan(&mut redis_conn(&c.url(m)), pattern)).collect()
            }
            None => scan(&mut self.data_conn(name), pattern),
        }
    }

    /// The key of participant `name`'s barrier of `id`: on a cluster, its home barrier.
    pub fn barrier_key(&self, name: &str, id: &str) -> String {
        match self.data_cluster_of(name) {
            Some(_) => keys::home_barrier(self.partition(id), name, id),
            None => keys::barrier(name, id),
        }
    }

    fn home(&self, name: &str) -> usize {
        *self.homes.get(name).unwrap_or_else(|| panic!("no participant {name:?} in this cluster"))
    }

    /// The participant names.
    pub fn participants(&self) -> Vec<String> {
        self.homes.keys().cloned().collect()
    }

    /// Starts one more coordinator (with `failpoint` armed if given).
    pub fn start_coordinator(&mut self, failpoint: Option<&str>) -> &mut Proc {
        let mut args: Vec<&str> = self.opts.coord_args.iter().map(String::as_str).collect();
        args.extend(self.cluster_flag());
        let envs: Vec<(&str, &str)> = failpoint.map(|f| vec![(FAILPOINT, f)]).unwrap_or_default();
        let mut p = coordinator_over(&self.url(), self.opts.partitions, &args, &envs);
        p.label = format!("coordinator#{}", self.coordinators.len() + 1);
        self.coordinators.push(p);
        self.coordinators.last_mut().unwrap()
    }

    /// Starts one more instance of participant `name` (with `failpoint` armed if given).
    pub fn start_worker(&mut self, name: &str, failpoint: Option<&str>) -> &mut Proc {
        let mut args: Vec<&str> = self.opts.part_args.iter().map(String::as_str).collect();
        args.extend(self.cluster_flag());
        let envs: Vec<(&str, &str)> = failpoint.map(|f| vec![(FAILPOINT, f)]).unwrap_or_default();
        let data = match (self.data_cluster_of(name).is_some(), self.data.is_some()) {
            (true, true) => {
                args.push("--data-cluster");
                Some(self.data_url(name))
            }
            // The streams' cluster: the participant's default.
            (true, false) => None,
            (false, _) => Some(self.data_url(name)),
        };
        let mut p = participant_with(&self.url(), self.opts.partitions, name, data.as_deref(), &args, &envs);
        let list = self.workers.entry(name.to_string()).or_default();
        p.label = format!("{name}#{}", list.len() + 1);
        list.push(p);
        list.last_mut().unwrap()
    }

    /// The instances of participant `name` started so far.
    pub fn procs(&mut self, name: &str) -> &mut Vec<Proc> {
        self.workers.entry(name.to_string()).or_default()
    }

    /// Every process started so far.
    pub fn all_procs(&mut self) -> Vec<&mut Proc> {
        self.coordinators.iter_mut().chain(self.workers.values_mut().flatten()).collect()
    }

    /// Panics unless every process started so far (and not killed by the test) still runs.
    pub fn assert_running(&mut self, procs: &[&str]) {
        for p in self.all_procs() {
            if procs.contains(&p.label.as_str()) {
                assert!(p.is_running(), "{} died:\n{}", p.label, p.output());
            }
        }
    }

    /// A synchronous connection to the stream Redis (one server: on a cluster use
    /// [`stream_cluster_conn`](Self::stream_cluster_conn)).
    pub fn stream_conn(&self) -> redis::Connection {
        assert!(self.streams.is_none(), "the streams are on a Redis Cluster: use stream_cluster_conn");
        redis_conn(&self.url())
    }

    /// A synchronous cluster connection to the Redis Cluster holding the streams.
    pub fn stream_cluster_conn(&self) -> redis::cluster::ClusterConnection {
        let c = self.streams.as_ref().expect("the streams are on a Redis Cluster");
        redis::cluster::ClusterClient::new(c.seed_urls()).unwrap().get_connection().unwrap()
    }

    /// A synchronous connection to participant `name`'s data Redis (one server: on a cluster use
    /// [`data_query`](Self::data_query) or [`data_cluster_conn`](Self::data_cluster_conn)).
    pub fn data_conn(&self, name: &str) -> redis::Connection {
        assert!(self.data_cluster_of(name).is_none(), "{name}'s data is on a Redis Cluster: use data_query");
        redis_conn(&self.data_url(name))
    }

    /// The producer client (connected on first use, shared; clone it for tasks of its own).
    pub fn client(&self) -> &Client {
        self.client.get_or_init(|| {
            let partitions = self.opts.partitions;
            let connect = async {
                match &self.streams {
                    Some(c) => {
                        let seeds = c.seed_urls();
                        let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
                        Ok(Client::connect_cluster(&seeds).await?.with_partitions(partitions))
                    }
                    None => Ok(Client::connect(&self.url()).await?.with_partitions(partitions)),
                }
            };
            self.rt.block_on(connect).map_err(|e: redtx_common::Error| e).expect("client connect")
        })
    }

    /// The deployment's partition count.
    pub fn partitions(&self) -> u32 {
        self.opts.partitions
    }

    /// The record key of transaction `id` in this deployment.
    pub fn record_key(&self, id: &str) -> String {
        keys::txn_record(self.partition(id), id)
    }

    /// The partition of transaction `id` in this deployment.
    pub fn partition(&self, id: &str) -> u32 {
        keys::partition(id, self.opts.partitions)
    }

    /// Submits through the producer library; returns the id.
    pub fn submit(&self, spec: &TxnSpec) -> String {
        self.rt.block_on(self.client().submit(spec)).unwrap_or_else(|e| panic!("submit {}: {e}", spec.id))
    }

    /// Waits (library) until `id` is settled: terminal, `aborting` or `stuck`.
    pub fn wait_settled(&self, id: &str) -> TxnRecord {
        self.rt.block_on(self.client().wait(id, LONG)).unwrap_or_else(|e| panic!("wait {id}: {e}\n{}", self.dump(id)))
    }

    /// Waits until `id` is terminal (committed, aborted, completed, compensated).
    pub fn wait(&self, id: &str) -> TxnRecord {
        let rec = self.wait_settled(id);
        if rec.state.is_terminal() {
            return rec;
        }
        self.wait_state(id, &TERMINAL, LONG)
    }

    /// Submits and waits until terminal.
    pub fn run(&self, spec: &TxnSpec) -> TxnRecord {
        let id = self.submit(spec);
        self.wait(&id)
    }

    /// The record of `id`, if any.
    pub fn record(&self, id: &str) -> Option<TxnRecord> {
        self.rt.block_on(self.client().status(id)).unwrap()
    }

    /// The raw record hash of `id`.
    pub fn raw_record(&self, id: &str) -> BTreeMap<String, Vec<u8>> {
        let h: HashMap<String, Vec<u8>> = self.stream_conn().hgetall(self.record_key(id)).unwrap();
        h.into_iter().collect()
    }

    /// The record's `state` field, if any.
    pub fn state(&self, id: &str) -> Option<String> {
        self.stream_conn().hget(self.record_key(id), "state").unwrap()
    }

    /// Polls until the record of `id` is in one of `states`; returns the record.
    pub fn wait_state(&self, id: &str, states: &[TxnState], timeout: Duration) -> TxnRecord {
        self.wait_record(id, &format!("{states:?}"), timeout, |r| states.contains(&r.state))
    }

    /// Polls until the record of `id` satisfies `ok`; returns the record.
    pub fn wait_record(&self, id: &str, what: &str, timeout: Duration, ok: impl Fn(&TxnRecord) -> bool) -> TxnRecord {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.record(id) {
                if ok(&r) {
                    return r;
                }
            }
            if Instant::now() >= deadline {
                panic!("{id} did not reach {what} within {timeout:?}\n{}", self.dump(id));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A readable dump of `id`'s record and barriers, for failure messages.
    pub fn dump(&self, id: &str) -> String {
        let mut s = match self.record(id) {
            Some(r) => format!("record {}: {r:?}", self.record_key(id)),
            None => format!("record {}: none", self.record_key(id)),
        };
        for name in self.participants() {
            s.push_str(&format!("\nbarrier {}: {:?}", self.barrier_key(&name, id), self.barrier(&name, id)));
        }
        s
    }

    /// The barrier hash of `id` at participant `name` (without the staged ops).
    pub fn barrier(&self, name: &str, id: &str) -> BTreeMap<String, String> {
        let h: HashMap<String, Vec<u8>> = self.data_query(name, redis::cmd("HGETALL").arg(self.barrier_key(name, id)));
        h.into_iter().filter(|(k, _)| k != "ops" && k != "keys").map(|(k, v)| (k, lossy(&v))).collect()
    }

    /// The barrier state of `id` at participant `name`, if any.
    pub fn barrier_state(&self, name: &str, id: &str) -> Option<String> {
        self.data_query(name, redis::cmd("HGET").arg(self.barrier_key(name, id)).arg("state"))
    }

    /// Polls until the barrier of `id` at `name` is in `state`.
    pub fn wait_barrier(&self, name: &str, id: &str, state: &str) {
        let deadline = Instant::now() + LONG;
        while self.barrier_state(name, id).as_deref() != Some(state) {
            if Instant::now() >= deadline {
                panic!("barrier of {id} at {name} not {state} within {LONG:?}\n{}", self.dump(id));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The holder of the lock of user key `key` at participant `name`'s data Redis.
    pub fn lock(&self, name: &str, key: &str) -> Option<String> {
        let lock = if self.data_cluster_of(name).is_some() { keys::cluster_lock(key) } else { keys::lock(key) };
        self.data_query(name, redis::cmd("GET").arg(lock))
    }

    /// Locks (`rtx:lock:*`) and barriers in state `prepared` left on any data Redis; on a data
    /// cluster (every master) also group barriers left `prepared` and home barriers left
    /// `running`.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        if let Some(c) = self.participants().iter().find_map(|n| self.data_cluster_of(n)) {
            for m in c.masters().unwrap() {
                let mut con = redis_conn(&c.url(m));
                for k in scan(&mut con, "rtx:lock:*") {
                    let owner: Option<String> = con.get(&k).unwrap_or(None);
                    out.push(format!("data cluster node {m}: lock {k} held by {owner:?}"));
                }
                for pattern in ["rtx:bar:*", "rtx:grp:*", "rtx:undo:*"] {
                    for k in scan(&mut con, pattern) {
                        let st: Option<String> = con.hget(&k, "state").unwrap_or(None);
                        if matches!(st.as_deref(), Some("prepared" | "running")) {
                            out.push(format!("data cluster node {m}: barrier {k} still {st:?}"));
                        }
                    }
                }
            }
        }
        for name in self.participants() {
            if self.data_cluster_of(&name).is_some() {
                continue;
            }
            let home = self.home(&name);
            if !seen.insert(home) {
                continue;
            }
            let mut c = self.data_conn(&name);
            for k in scan(&mut c, &keys::lock("*")) {
                let owner: Option<String> = c.get(&k).unwrap_or(None);
                out.push(format!("server #{home}: lock {k} held by {owner:?}"));
            }
            for k in scan(&mut c, "rtx:bar:*") {
                let st: Option<String> = c.hget(&k, "state").unwrap_or(None);
                if st.as_deref() == Some("prepared") {
                    out.push(format!("server #{home}: barrier {k} still prepared"));
                }
            }
        }
        out
    }

    /// Panics unless no lock and no prepared barrier is left on any data Redis.
    pub fn assert_clean(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    }

    /// Polls until [`Cluster::assert_clean`] would pass.
    pub fn wait_clean(&self) {
        let deadline = Instant::now() + LONG;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("still left behind after {LONG:?}:\n{}", left.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `XLEN` of a stream on the stream Redis.
    pub fn xlen(&self, stream: &str) -> u64 {
        self.stream_conn().xlen(stream).unwrap()
    }

    /// Every dead letter of every partition.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        dead_letters_over(&mut self.stream_conn(), self.opts.partitions)
    }

    /// The messages about `id` on its partition's coordinator stream, in order.
    pub fn coord_messages(&self, id: &str) -> Vec<Message> {
        messages_of(&mut self.stream_conn(), &keys::coord_stream(self.partition(id)), id)
    }

    /// The messages about `id` sent to participant `name`, in order.
    pub fn sent_to(&self, name: &str, id: &str) -> Vec<Message> {
        messages_of(&mut self.stream_conn(), &keys::participant_stream(name, self.partition(id)), id)
    }

    /// Every stream of the deployment: the coordinators' and each participant's, per partition.
    pub fn streams(&self) -> Vec<String> {
        let n = self.opts.partitions;
        let mut out: Vec<String> = (0..n).map(keys::coord_stream).collect();
        for name in self.participants() {
            out.extend((0..n).map(|p| keys::participant_stream(&name, p)));
        }
        out
    }

    /// Polls until every stream of the deployment is drained ([`drained`]: read to its end and
    /// nothing pending, in every group).
    pub fn wait_drained(&self) {
        let streams = self.streams();
        let what = "every stream drained";
        match &self.streams {
            None => {
                let mut c = self.stream_conn();
                poll(what, LONG, || streams.iter().all(|s| drained(&mut c, s)).then_some(()));
            }
            Some(_) => {
                let mut c = self.stream_cluster_conn();
                poll(what, LONG, || streams.iter().all(|s| drained(&mut c, s)).then_some(()));
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Who does the work: stats hashes, leases, pending entries

    /// Every worker's stats hash (`rtx:stats:*`, see `redtx_common::stats`), live or lapsing.
    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        let mut c = self.stream_conn();
        let mut out = Vec::new();
        for k in scan(&mut c, keys::STATS_PATTERN) {
            let h: HashMap<String, String> = c.hgetall(&k).unwrap_or_default();
            out.extend(WorkerStats::from_hash(&h));
        }
        out
    }

    /// The stats hash of the worker process `pid`, once it wrote one.
    pub fn stats_of(&self, pid: u32) -> Option<WorkerStats> {
        self.worker_stats().into_iter().find(|s| s.pid == Some(pid))
    }

    /// Polls until the stats of process `pid` satisfy `ok` (they are rewritten every two
    /// seconds); returns them.
    pub fn wait_stats(&self, pid: u32, what: &str, ok: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
        let what = format!("stats of pid {pid}: {what}");
        poll_every(&what, LONG, Duration::from_millis(100), || self.stats_of(pid).filter(|s| ok(s)))
    }

    /// The owner of every leased partition, as the owner's process id.
    pub fn lease_owners(&self) -> BTreeMap<u32, u32> {
        let mut c = self.stream_conn();
        let mut out = BTreeMap::new();
        for p in 0..self.opts.partitions {
            let v: Option<String> = c.get(keys::lease(p)).unwrap();
            if let Some(pid) = v.and_then(|v| v.split_once(':').and_then(|(_, owner)| pid_of_worker(owner))) {
                out.insert(p, pid);
            }
        }
        out
    }

    /// The partitions whose lease process `pid` holds now.
    pub fn partitions_of(&self, pid: u32) -> Vec<u32> {
        self.lease_owners().into_iter().filter(|(_, o)| *o == pid).map(|(p, _)| p).collect()
    }

    /// Polls until every partition is leased, each by one of the coordinator processes `pids`,
    /// and they are spread as the coordinators aim to (each owns at least one and at most
    /// `ceil(partitions / pids.len())`); returns the partitions of each, in the order of `pids`.
    pub fn wait_spread(&self, pids: &[u32]) -> Vec<Vec<u32>> {
        let n = self.opts.partitions as usize;
        let most = n.div_ceil(pids.len().max(1));
        let what = format!("the {n} partitions spread over coordinators {pids:?}, at most {most} each");
        poll_every(&what, LONG, Duration::from_millis(50), || {
            let owners = self.lease_owners();
            let each: Vec<Vec<u32>> =
                pids.iter().map(|pid| owners.iter().filter(|(_, o)| *o == pid).map(|(p, _)| *p).collect()).collect();
            let all_ours = owners.len() == n && owners.values().all(|o| pids.contains(o));
            (all_ours && each.iter().all(|e| !e.is_empty() && e.len() <= most)).then_some(each)
        })
    }

    /// Entries pending at consumer `consumer` of group `group`, summed over `streams`.
    pub fn pending_at(&self, streams: &[String], group: &str, consumer: &str) -> u64 {
        let mut c = self.stream_conn();
        let mut n = 0;
        for s in streams {
            let r: redis::RedisResult<redis::Value> =
                redis::cmd("XPENDING").arg(s).arg(group).arg("-").arg("+").arg(100_000).arg(consumer).query(&mut c);
            if let Ok(redis::Value::Array(entries)) = r {
                n += entries.len() as u64;
            }
        }
        n
    }

    /// The last lines of every process, for failure messages.
    pub fn tails(&self) -> String {
        self.coordinators
            .iter()
            .chain(self.workers.values().flatten())
            .map(|p| format!("{}:\n{}", p.label, p.output().lines().rev().take(15).collect::<Vec<_>>().join("\n")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The terminal states.
pub const TERMINAL: [TxnState; 4] =
    [TxnState::Committed, TxnState::Aborted, TxnState::Completed, TxnState::Compensated];

// ---------------------------------------------------------------------------------------------
// The bank fixture (2PC)

/// Which bank (participant) an account lives at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// `bank-a`, data on server A (which also holds the streams).
    A,
    /// `bank-b`, data on server B.
    B,
}

impl Side {
    /// The participant's name.
    pub fn name(self) -> &'static str {
        match self {
            Side::A => "bank-a",
            Side::B => "bank-b",
        }
    }

    /// `a` or `b`.
    pub fn letter(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// Two Redis servers with AOF (A: streams, records and `bank-a`'s data; B: `bank-b`'s data), a
/// coordinator and the participants `bank-a` and `bank-b`.
pub struct Bank(pub Cluster);

impl std::ops::Deref for Bank {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl std::ops::DerefMut for Bank {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl Bank {
    /// Starts servers and processes with the default options.
    pub fn start() -> Bank {
        Bank::start_with(ClusterOptions::default())
    }

    /// Starts servers and processes as `opts` says.
    pub fn start_with(opts: ClusterOptions) -> Bank {
        Bank(Cluster::start(2, ServerOptions::default(), &[("bank-a", 0), ("bank-b", 1)], opts))
    }

    /// The streams and records on `streams` (a Redis Cluster), each bank's data on a server of
    /// its own (A: `servers[0]`, B: `servers[1]`).
    pub fn start_on_cluster(streams: RedisCluster, opts: ClusterOptions) -> Bank {
        Bank(Cluster::start_on(Some(streams), 2, ServerOptions::default(), &[("bank-a", 0), ("bank-b", 1)], opts))
    }

    /// The streams on `streams` (a Redis Cluster; else on server A), the data of the banks
    /// named in [`ClusterOptions::data_on_cluster`] on `data` (a Redis Cluster; else on
    /// `streams`), the other banks' data on their servers as usual. Banks that share a data
    /// cluster name their accounts apart ([`Bank::account`]).
    pub fn start_with_data(streams: Option<RedisCluster>, data: Option<RedisCluster>, opts: ClusterOptions) -> Bank {
        let parts = [("bank-a", 0), ("bank-b", 1)];
        Bank(Cluster::start_with_data(streams, data, 2, ServerOptions::default(), &parts, opts))
    }

    /// Whether both banks keep their data on one Redis Cluster (their account keys then differ:
    /// [`Bank::account`]).
    pub fn shared(&self) -> bool {
        self.data_cluster_of(Side::A.name()).is_some() && self.data_cluster_of(Side::B.name()).is_some()
    }

    /// The key of account `i` at `side`: `acct:<i>`, or `acct:<a|b>:<i>` when both banks share a
    /// data cluster.
    pub fn account(&self, side: Side, i: usize) -> String {
        if self.shared() {
            format!("acct:{}:{i}", side.letter())
        } else {
            format!("acct:{i}")
        }
    }

    /// The `SCAN` pattern of `side`'s accounts.
    fn accounts_pattern(&self, side: Side) -> String {
        if self.shared() {
            format!("acct:{}:*", side.letter())
        } else {
            "acct:*".to_string()
        }
    }

    /// Server A: streams, records and `bank-a`'s data.
    pub fn a(&mut self) -> &mut RedisServer {
        &mut self.0.servers[0]
    }

    /// Starts one more instance of `side`'s participant (with `failpoint` armed if given).
    pub fn start_participant(&mut self, side: Side, failpoint: Option<&str>) -> &mut Proc {
        self.0.start_worker(side.name(), failpoint)
    }

    /// The instances of `side`'s participant.
    pub fn bank(&mut self, side: Side) -> &mut Vec<Proc> {
        self.0.procs(side.name())
    }

    /// A synchronous connection to `side`'s data Redis.
    pub fn side_conn(&self, side: Side) -> redis::Connection {
        self.data_conn(side.name())
    }

    /// Sets `account` at `side` to `amount` (directly, outside any transaction).
    pub fn seed(&self, side: Side, account: &str, amount: i64) {
        let _: () = self.data_query(side.name(), redis::cmd("SET").arg(account).arg(amount));
    }

    /// Accounts `acct:0` .. `acct:<per_bank - 1>` at both banks, each set to `amount`; returns
    /// them, bank A's first.
    pub fn seed_accounts(&self, per_bank: usize, amount: i64) -> Vec<(Side, String)> {
        let accounts: Vec<(Side, String)> =
            [Side::A, Side::B].iter().flat_map(|s| (0..per_bank).map(move |i| (*s, format!("acct:{i}")))).collect();
        for (s, k) in &accounts {
            self.seed(*s, k, amount);
        }
        accounts
    }

    /// The balance at `side` (0 if the key does not exist).
    pub fn balance(&self, side: Side, account: &str) -> i64 {
        let v: Option<i64> = self.data_query(side.name(), redis::cmd("GET").arg(account));
        v.unwrap_or(0)
    }

    /// Every account key of both banks (`acct:*`, see [`Bank::account`]) with its balance.
    pub fn balances(&self) -> BTreeMap<(Side, String), i64> {
        let mut out = BTreeMap::new();
        for side in [Side::A, Side::B] {
            for k in self.data_scan(side.name(), &self.accounts_pattern(side)) {
                let v: i64 = self.data_query(side.name(), redis::cmd("GET").arg(&k));
                out.insert((side, k), v);
            }
        }
        out
    }

    /// The sum of every `acct:*` balance of both banks.
    pub fn total(&self) -> i64 {
        self.balances().values().sum()
    }

    /// The barrier state of `id` at `side`, if any.
    pub fn side_barrier(&self, side: Side, id: &str) -> Option<String> {
        self.barrier_state(side.name(), id)
    }

    /// Opens `per_bank` accounts at each bank (`acct:0`, `acct:1`, ...) holding `start` each;
    /// returns them, bank A's first.
    pub fn open_accounts(&self, per_bank: usize, start: i64) -> Vec<(Side, String)> {
        let accounts: Vec<(Side, String)> =
            [Side::A, Side::B].iter().flat_map(|s| (0..per_bank).map(move |i| (*s, self.account(*s, i)))).collect();
        for (side, key) in &accounts {
            self.seed(*side, key, start);
        }
        accounts
    }

    /// Starts `producers` tasks, each moving a random amount (1 to 60, the debit guarded by
    /// `min 0`) between two random `accounts` and waiting for the outcome, over and over until
    /// [`TransferLoad::finish`]. Some transfers abort (insufficient funds, or a conflict on an
    /// account another transfer holds); none may fail to end within a minute.
    pub fn start_load(&self, accounts: &[(Side, String)], producers: usize) -> TransferLoad {
        self.start_load_where(accounts, producers, |_| true)
    }

    /// [`start_load`](Self::start_load) with transaction ids drawn until `keep` takes one (to
    /// keep a load off some partitions).
    pub fn start_load_where(
        &self,
        accounts: &[(Side, String)],
        producers: usize,
        keep: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> TransferLoad {
        let keep = Arc::new(keep);
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicUsize::new(0));
        let tasks = (0..producers)
            .map(|p| {
                let (client, accounts) = (self.client().clone(), accounts.to_vec());
                let (stop, ended, keep) = (stop.clone(), ended.clone(), keep.clone());
                self.rt.spawn(async move {
                    let mut done = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let (from, to) = random_pair(accounts.len());
                        let amount = rand::Rng::random_range(&mut rand::rng(), 1..=60);
                        let (from, to) = (accounts[from].clone(), accounts[to].clone());
                        let mut spec =
                            transfer((from.0, &from.1), (to.0, &to.1), amount).with_timeout(Duration::from_secs(10));
                        while !keep(&spec.id) {
                            spec = spec.with_id(redtx_common::spec::new_txn_id());
                        }
                        let record = client
                            .submit_and_wait(&spec, Duration::from_secs(60))
                            .await
                            .unwrap_or_else(|e| panic!("producer {p}: transfer {}: {e}", spec.id));
                        done.push(Transfer { from, to, amount, record });
                        ended.fetch_add(1, Ordering::Relaxed);
                    }
                    done
                })
            })
            .collect();
        TransferLoad { stop, ended, tasks }
    }

    /// Checks transfers that a load made, starting from every one of `accounts` at `start`:
    /// those answered `aborting` are waited for until `aborted`; every one ended committed or
    /// aborted, as its stored record says; every balance is exactly what the committed transfers
    /// make it (so money is conserved and nothing applied twice or half-way), none below 0.
    /// Returns (committed, aborted).
    pub fn check_transfers(&self, accounts: &[(Side, String)], start: i64, done: &mut [Transfer]) -> (usize, usize) {
        let mut expected: BTreeMap<(Side, String), i64> = accounts.iter().map(|a| (a.clone(), start)).collect();
        let (mut committed, mut aborted) = (0, 0);
        for d in done.iter_mut() {
            if d.record.state == TxnState::Aborting {
                // Settled: nothing applied anywhere; the acks of the abort follow.
                d.record = self.wait(&d.record.id);
            }
            let stored = self.record(&d.record.id).unwrap_or_else(|| panic!("no record of {}", d.record.id));
            assert_eq!(stored.state, d.record.state, "{}: the producer saw another outcome", d.record.id);
            match d.record.state {
                TxnState::Committed => {
                    committed += 1;
                    *expected.get_mut(&d.from).expect("a known account") -= d.amount;
                    *expected.get_mut(&d.to).expect("a known account") += d.amount;
                }
                TxnState::Aborted => {
                    aborted += 1;
                    assert!(d.record.reason.is_some(), "abort without a reason: {:?}", d.record);
                }
                s => panic!("{} ended {s}: {:?}", d.record.id, d.record),
            }
        }
        let actual = self.balances();
        assert_eq!(
            actual.values().sum::<i64>(),
            start * accounts.len() as i64,
            "money was created or destroyed: {actual:?}"
        );
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(k, v)| actual.get(*k) != Some(v))
            .map(|(k, v)| format!("{k:?}: expected {v}, found {:?}", actual.get(k)))
            .collect();
        assert!(wrong.is_empty(), "balances differ from the committed transfers:\n{}", wrong.join("\n"));
        assert!(actual.values().all(|v| *v >= 0), "a min 0 guard let a balance go negative: {actual:?}");
        (committed, aborted)
    }
}

/// A transfer of a [`TransferLoad`] and how it ended for its producer (`aborting` counts as
/// ended: the abort is decided).
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The account debited.
    pub from: (Side, String),
    /// The account credited.
    pub to: (Side, String),
    /// How much.
    pub amount: i64,
    /// The record the producer got.
    pub record: TxnRecord,
}

/// Producers moving money until told to stop ([`Bank::start_load`]).
pub struct TransferLoad {
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Transfer>>>,
}

impl TransferLoad {
    /// Transfers ended so far.
    pub fn ended(&self) -> usize {
        self.ended.load(Ordering::Relaxed)
    }

    /// Waits until `more` further transfers have ended: the deployment makes progress.
    pub fn wait_progress(&self, more: usize) {
        let target = self.ended() + more;
        poll(&format!("{more} more transfers ending"), LONG, || (self.ended() >= target).then_some(()));
    }

    /// Stops the producers after the transfer each has in flight; returns every transfer.
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> Vec<Transfer> {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.into_iter().flat_map(|t| rt.block_on(t).expect("a producer failed")).collect()
    }
}

/// Bytes as text, lossily.
pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Two different indexes below `n` (n >= 2), uniformly at random: a random transfer's ends.
pub fn random_pair(n: usize) -> (usize, usize) {
    use rand::Rng;
    let mut rng = rand::rng();
    let from = rng.random_range(0..n);
    let mut to = rng.random_range(0..n - 1);
    if to >= from {
        to += 1;
    }
    (from, to)
}

/// An `incrby` with optional bounds.
pub fn incrby(key: &str, by: i64, min: Option<i64>, max: Option<i64>) -> Op {
    Op::Incrby(IncrbyOp { key: key.to_string(), by, min, max })
}

/// A spec moving `amount` from `from` to `to`; the debit is guarded by `min: 0`. Two accounts at
/// the same bank make one branch with two ops.
pub fn transfer(from: (Side, &str), to: (Side, &str), amount: i64) -> TxnSpec {
    let debit = incrby(from.1, -amount, Some(0), None);
    let credit = Op::incrby(to.1, amount);
    let branches = if from.0 == to.0 {
        vec![Branch::kv(from.0.name(), vec![debit, credit])]
    } else {
        vec![Branch::kv(from.0.name(), vec![debit]), Branch::kv(to.0.name(), vec![credit])]
    };
    TxnSpec::new(branches)
}

/// The JSON form of a transfer, as `redtx submit` reads it.
pub fn transfer_json(id: Option<&str>, from: (Side, &str), to: (Side, &str), amount: i64) -> String {
    let mut v = serde_json::json!({
        "mode": "2pc",
        "timeout": "10s",
        "branches": [
            {"participant": from.0.name(), "ops": [{"op": "incrby", "key": from.1, "by": -amount, "min": 0}]},
            {"participant": to.0.name(), "ops": [{"op": "incrby", "key": to.1, "by": amount}]},
        ]
    });
    if let Some(id) = id {
        v["id"] = serde_json::Value::String(id.to_string());
    }
    v.to_string()
}

// ---------------------------------------------------------------------------------------------
// The shop fixture (sagas)

/// The shop's participants, in step order.
pub const SHOP_STEPS: [&str; 3] = ["orders", "stock", "payment"];

/// One order: `qty` of `sku` for `customer` at `price` each, as a three-step saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The order id (the saga's id).
    pub id: String,
    /// Who pays (`bal:<customer>` at `payment`).
    pub customer: String,
    /// What is sold (`stock:<sku>` at `stock`).
    pub sku: String,
    /// How many.
    pub qty: i64,
    /// Price of one.
    pub price: i64,
}

impl Order {
    /// An order.
    pub fn new(id: &str, customer: &str, sku: &str, qty: i64, price: i64) -> Order {
        Order { id: id.into(), customer: customer.into(), sku: sku.into(), qty, price }
    }

    /// What it costs.
    pub fn amount(&self) -> i64 {
        self.qty * self.price
    }

    /// The step marker of this order at each participant: a hash `step:<id>` whose field `a`
    /// counts applied actions and `c` applied compensations (each must end 0 or 1).
    pub fn marker(&self) -> String {
        format!("step:{}", self.id)
    }

    fn mark(&self, field: &str, by: i64) -> Op {
        Op::Hincrby(HincrbyOp { key: self.marker(), field: field.into(), by, min: None, max: None })
    }

    /// The saga: 0 `orders` places it (refused while `shop:closed` exists), 1 `stock` takes the
    /// goods (refused below 0), 2 `payment` charges the customer (refused below 0). Each
    /// compensation undoes its action. Timeout 30 s; up to 10 attempts per step, 2 s each.
    pub fn saga(&self) -> TxnSpec {
        let (qty, amount) = (self.qty, self.amount());
        let stock = format!("stock:{}", self.sku);
        let sold = format!("sold:{}", self.sku);
        let bal = format!("bal:{}", self.customer);
        let spent = format!("spent:{}", self.customer);
        let mut spec = TxnSpec::saga(vec![
            Branch::kv_step(
                "orders",
                vec![
                    Op::Expect(ExpectOp { key: "shop:closed".into(), value: None }),
                    self.mark("a", 1),
                    Op::incrby("orders:placed", 1),
                ],
                vec![self.mark("c", 1), Op::incrby("orders:placed", -1)],
            ),
            Branch::kv_step(
                "stock",
                vec![incrby(&stock, -qty, Some(0), None), Op::incrby(&sold, qty), self.mark("a", 1)],
                vec![Op::incrby(&stock, qty), Op::incrby(&sold, -qty), self.mark("c", 1)],
            ),
            Branch::kv_step(
                "payment",
                vec![incrby(&bal, -amount, Some(0), None), Op::incrby(&spent, amount), self.mark("a", 1)],
                vec![Op::incrby(&bal, amount), Op::incrby(&spent, -amount), self.mark("c", 1)],
            ),
        ])
        .with_id(self.id.clone())
        .with_timeout(Duration::from_secs(30));
        spec.retry.limit = 10;
        spec.retry.step_timeout_ms = 2000;
        spec
    }
}

/// Three Redis servers without persistence (0: streams, records and `orders`' data; 1: `stock`;
/// 2: `payment`), a coordinator and the participants `orders`, `stock` and `payment`.
pub struct Shop {
    /// The cluster.
    pub cluster: Cluster,
    /// Stock seeded, by sku.
    stock0: Mutex<BTreeMap<String, i64>>,
    /// Balances seeded, by customer.
    balance0: Mutex<BTreeMap<String, i64>>,
}

impl std::ops::Deref for Shop {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for Shop {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// One step of one order as found: the marker's `a` and `c`, and the barrier state.
type StepSeen = (Option<i64>, Option<i64>, Option<String>);

/// What [`Shop::check`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShopSummary {
    /// Orders completed.
    pub completed: usize,
    /// Orders compensated.
    pub compensated: usize,
}

impl Shop {
    /// Starts servers and processes with the default options.
    pub fn start() -> Shop {
        Shop::start_with(ClusterOptions::default())
    }

    /// Starts servers and processes as `opts` says.
    pub fn start_with(opts: ClusterOptions) -> Shop {
        let server = ServerOptions { aof: false, ..ServerOptions::default() };
        let cluster = Cluster::start(3, server, &[("orders", 0), ("stock", 1), ("payment", 2)], opts);
        Shop { cluster, stock0: Mutex::default(), balance0: Mutex::default() }
    }

    /// The streams and records on `streams` (a Redis Cluster), each participant's data on a
    /// server of its own.
    pub fn start_on_cluster(streams: RedisCluster, opts: ClusterOptions) -> Shop {
        let server = ServerOptions { aof: false, ..ServerOptions::default() };
        let parts = [("orders", 0), ("stock", 1), ("payment", 2)];
        let cluster = Cluster::start_on(Some(streams), 3, server, &parts, opts);
        Shop { cluster, stock0: Mutex::default(), balance0: Mutex::default() }
    }

    /// Puts `n` of `sku` in stock (none sold).
    pub fn seed_stock(&self, sku: &str, n: i64) {
        let mut c = self.data_conn("stock");
        let _: () = redis::pipe().set(format!("stock:{sku}"), n).set(format!("sold:{sku}"), 0).query(&mut c).unwrap();
        self.stock0.lock().unwrap().insert(sku.to_string(), n);
    }

    /// Gives `customer` a balance of `n` (nothing spent).
    pub fn seed_customer(&self, customer: &str, n: i64) {
        let mut c = self.data_conn("payment");
        let _: () =
            redis::pipe().set(format!("bal:{customer}"), n).set(format!("spent:{customer}"), 0).query(&mut c).unwrap();
        self.balance0.lock().unwrap().insert(customer.to_string(), n);
    }

    /// An integer key at participant `name` (0 if missing).
    pub fn int(&self, name: &str, key: &str) -> i64 {
        let v: Option<i64> = self.data_conn(name).get(key).unwrap();
        v.unwrap_or(0)
    }

    /// The step marker `(a, c)` of `order` at participant `name`: actions and compensations
    /// applied.
    pub fn marker(&self, name: &str, order: &Order) -> (i64, i64) {
        let (a, c): (Option<i64>, Option<i64>) =
            redis::cmd("HMGET").arg(order.marker()).arg("a").arg("c").query(&mut self.data_conn(name)).unwrap();
        (a.unwrap_or(0), c.unwrap_or(0))
    }

    /// Checks the shop after `orders` ended with the records given: each is completed or
    /// compensated; a completed order applied every action once and no compensation, every
    /// barrier `done`; a compensated one has every applied action compensated exactly once and
    /// nothing else, its barriers `failed`/`compensated`/absent; stock + sold and balance + spent
    /// are as seeded, sold and spent are exactly what the completed orders say,
    /// `orders:placed` counts the completed orders; no lock and no prepared barrier is left.
    pub fn check(&self, orders: &[(Order, TxnRecord)]) -> ShopSummary {
        let mut sum = ShopSummary::default();
        let mut problems = Vec::new();
        // Step markers and barriers of every order, one pipeline per participant.
        let mut markers: BTreeMap<&str, Vec<StepSeen>> = BTreeMap::new();
        for name in SHOP_STEPS {
            let mut c = self.data_conn(name);
            let mut out = Vec::with_capacity(orders.len());
            for chunk in orders.chunks(256) {
                let mut p = redis::pipe();
                for (o, _) in chunk {
                    p.cmd("HMGET").arg(o.marker()).arg("a").arg("c");
                    p.hget(keys::barrier(name, &o.id), "state");
                }
                let v: Vec<redis::Value> = p.query(&mut c).unwrap();
                for pair in v.chunks(2) {
                    let (a, cc): (Option<i64>, Option<i64>) = redis::from_redis_value(pair[0].clone()).unwrap();
                    let st: Option<String> = redis::from_redis_value(pair[1].clone()).unwrap();
                    out.push((a, cc, st));
                }
            }
            markers.insert(name, out);
        }
        let mut sold: BTreeMap<String, i64> = BTreeMap::new();
        let mut spent: BTreeMap<String, i64> = BTreeMap::new();
        for (i, (o, rec)) in orders.iter().enumerate() {
            let steps: Vec<(i64, i64, Option<String>)> = SHOP_STEPS
                .iter()
                .map(|n| {
                    let (a, c, st) = markers[n][i].clone();
                    (a.unwrap_or(0), c.unwrap_or(0), st)
                })
                .collect();
            match rec.state {
                TxnState::Completed => {
                    sum.completed += 1;
                    *sold.entry(o.sku.clone()).or_default() += o.qty;
                    *spent.entry(o.customer.clone()).or_default() += o.amount();
                    for (n, (a, c, st)) in SHOP_STEPS.iter().zip(&steps) {
                        if (*a, *c) != (1, 0) || st.as_deref() != Some("done") {
                            problems.push(format!("{} completed, but at {n}: a={a} c={c} barrier {st:?}", o.id));
                        }
                    }
                    if rec.branches.iter().any(|b| b.phase != Phase::Done) {
                        problems.push(format!("{} completed, but its steps are {:?}", o.id, rec.branches));
                    }
                }
                TxnState::Compensated => {
                    sum.compensated += 1;
                    for (n, (a, c, st)) in SHOP_STEPS.iter().zip(&steps) {
                        let barrier_ok = matches!(
                            (a, st.as_deref()),
                            (1, Some("compensated")) | (0, None | Some("failed") | Some("compensated"))
                        );
                        if *a > 1 || c != a || !barrier_ok {
                            problems.push(format!("{} compensated, but at {n}: a={a} c={c} barrier {st:?}", o.id));
                        }
                    }
                }
                s => problems.push(format!("{} ended {s}: {rec:?}", o.id)),
            }
        }
        let mut c = self.data_conn("stock");
        for (sku, n0) in self.stock0.lock().unwrap().iter() {
            let (stock, sold_now): (i64, i64) =
                redis::pipe().get(format!("stock:{sku}")).get(format!("sold:{sku}")).query(&mut c).unwrap();
            let want = sold.get(sku).copied().unwrap_or(0);
            if stock + sold_now != *n0 || sold_now != want || stock < 0 {
                problems
                    .push(format!("{sku}: stock {stock} + sold {sold_now} (completed orders: {want}), seeded {n0}"));
            }
        }
        let mut c = self.data_conn("payment");
        for (cust, n0) in self.balance0.lock().unwrap().iter() {
            let (bal, spent_now): (i64, i64) =
                redis::pipe().get(format!("bal:{cust}")).get(format!("spent:{cust}")).query(&mut c).unwrap();
            let want = spent.get(cust).copied().unwrap_or(0);
            if bal + spent_now != *n0 || spent_now != want || bal < 0 {
                problems
                    .push(format!("{cust}: balance {bal} + spent {spent_now} (completed orders: {want}), seeded {n0}"));
            }
        }
        let placed = self.int("orders", "orders:placed");
        if placed != sum.completed as i64 {
            problems.push(format!("orders:placed is {placed}, {} orders completed", sum.completed));
        }
        problems.extend(self.leftovers());
        assert!(
            problems.is_empty(),
            "{} problem(s):\n{}",
            problems.len(),
            problems.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
        );
        sum
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A CA (`ca.pem`) and a server certificate (`server.pem`, key `server.key`) for 127.0.0.1
/// and localhost, made with `openssl` in `dir`.
pub fn make_tls_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out =
            Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is needed for the TLS test");
        assert!(out.status.success(), "openssl {args:?}: {}", lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=redtx test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}
