//! End-to-end test harness of redtx: real `redis-server` processes and the real binaries
//! (`redtx-coordinator`, `redtx-participant`, `redtx`), killed with real signals.
//!
//! # Layout
//! - [`bin`]: path of a workspace binary next to the running test (built once if missing).
//! - [`Proc`]: a spawned binary whose output is kept line by line (`wait_for_line`), with
//!   `kill9`/`term`/`wait_exit`; killed on drop, and its output printed if the test panicked.
//! - [`cli`]: runs the `redtx` CLI to completion with a time limit.
//! - [`redis_conn`], [`scan`], [`poll`]: small synchronous Redis and polling helpers.
//! - [`Bank`]: the standard fixture: two Redis servers (A: streams and `bank-a`'s data,
//!   B: `bank-b`'s data), a coordinator, participants `bank-a` and `bank-b`, and helpers to seed
//!   accounts, move money and check that nothing is left locked ([`Bank::assert_clean`]).
//!
//! Every test starts its own servers and processes on free ports, so tests run in parallel.
//! Synchronisation is by polling with generous time limits (slow CI), never by fixed sleeps.

use redis::Commands;
use redtx_common::record::{TxnRecord, TxnState};
use redtx_common::server::RedisServer;
use redtx_common::spec::{Branch, IncrbyOp, Op, TxnSpec};
use redtx_common::Client;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use redtx_common::keys;

/// Generous limit for anything that should happen "soon" on a loaded 2-core CI machine.
pub const LONG: Duration = Duration::from_secs(30);

/// Fail point environment variable of the workers.
pub const FAILPOINT: &str = "REDTX_FAILPOINT";

/// Coordinator arguments that make recovery quick in fault tests.
pub const FAST_COORD: &[&str] = &["--claim-idle", "500ms", "--resend-every", "200ms"];
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

/// Path of the workspace binary `name` (`redtx`, `redtx-coordinator`, `redtx-participant`) built
/// with the running test's profile. If it is missing, `cargo build --bins` is run once.
pub fn bin(name: &str) -> PathBuf {
    let dir = profile_dir();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.exists() {
        return path;
    }
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args(["build", "--bins"]);
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
        panic!("binary {name} is missing and could not be built: {e}");
    }
    assert!(path.exists(), "binary {} is missing even after cargo build --bins", path.display());
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
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
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
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("----- last output of {} (pid {}) -----\n{}\n-----", self.label, self.pid(), tail.join("\n"));
        }
    }
}

/// Spawns `redtx-coordinator --redis url extra...` with `envs`.
pub fn coordinator(url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut args = vec!["--redis".to_string(), url.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn("coordinator", &bin("redtx-coordinator"), &args, envs)
}

/// Spawns `redtx-participant --redis url --name name --data data_url extra...` with `envs`.
pub fn participant(url: &str, name: &str, data_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut args = vec![
        "--redis".to_string(),
        url.to_string(),
        "--name".to_string(),
        name.to_string(),
        "--data".to_string(),
        data_url.to_string(),
    ];
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

/// [`cli`] with an explicit time limit.
pub fn cli_with_timeout(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
    let mut cmd = Command::new(bin("redtx"));
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("REDTX_REDIS_URL")
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
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
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
pub fn drained(conn: &mut redis::Connection, stream: &str) -> bool {
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
// The bank fixture

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
}

/// How to start a [`Bank`].
#[derive(Debug, Clone)]
pub struct BankOptions {
    /// Start a coordinator.
    pub coordinator: bool,
    /// Instances of `bank-a` to start.
    pub bank_a: usize,
    /// Instances of `bank-b` to start.
    pub bank_b: usize,
    /// Extra coordinator arguments.
    pub coord_args: Vec<String>,
    /// Extra participant arguments.
    pub part_args: Vec<String>,
    /// Fail point for the coordinator.
    pub coord_failpoint: Option<String>,
    /// Fail point for `bank-a` (first instance).
    pub a_failpoint: Option<String>,
    /// Fail point for `bank-b` (first instance).
    pub b_failpoint: Option<String>,
}

impl Default for BankOptions {
    /// One coordinator, one instance of each bank, fast recovery settings, no fail points.
    fn default() -> Self {
        BankOptions {
            coordinator: true,
            bank_a: 1,
            bank_b: 1,
            coord_args: FAST_COORD.iter().map(|s| s.to_string()).collect(),
            part_args: FAST_PART.iter().map(|s| s.to_string()).collect(),
            coord_failpoint: None,
            a_failpoint: None,
            b_failpoint: None,
        }
    }
}

/// Two Redis servers, a coordinator and the participants `bank-a` and `bank-b`.
pub struct Bank {
    /// Streams, records and `bank-a`'s data.
    pub a: RedisServer,
    /// `bank-b`'s data.
    pub b: RedisServer,
    /// The coordinators started so far (usually one).
    pub coordinators: Vec<Proc>,
    /// `bank-a` instances.
    pub bank_a: Vec<Proc>,
    /// `bank-b` instances.
    pub bank_b: Vec<Proc>,
    /// The options it was started with.
    pub opts: BankOptions,
    /// Runtime for the async [`Client`].
    pub rt: tokio::runtime::Runtime,
    client: OnceLock<Client>,
}

impl Bank {
    /// Starts servers and processes with the default options.
    pub fn start() -> Bank {
        Bank::start_with(BankOptions::default())
    }

    /// Starts servers and processes as `opts` says.
    pub fn start_with(opts: BankOptions) -> Bank {
        let a = RedisServer::start().expect("start redis A");
        let b = RedisServer::start().expect("start redis B");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut bank = Bank {
            a,
            b,
            coordinators: Vec::new(),
            bank_a: Vec::new(),
            bank_b: Vec::new(),
            opts: opts.clone(),
            rt,
            client: OnceLock::new(),
        };
        if opts.coordinator {
            bank.start_coordinator(opts.coord_failpoint.as_deref());
        }
        for i in 0..opts.bank_a {
            bank.start_participant(Side::A, if i == 0 { opts.a_failpoint.as_deref() } else { None });
        }
        for i in 0..opts.bank_b {
            bank.start_participant(Side::B, if i == 0 { opts.b_failpoint.as_deref() } else { None });
        }
        bank
    }

    /// URL of the Redis holding the streams (server A).
    pub fn url(&self) -> String {
        self.a.url()
    }

    /// URL of the data Redis of `side`.
    pub fn data_url(&self, side: Side) -> String {
        match side {
            Side::A => self.a.url(),
            Side::B => self.b.url(),
        }
    }

    /// Starts one more coordinator (with `failpoint` armed if given).
    pub fn start_coordinator(&mut self, failpoint: Option<&str>) -> &mut Proc {
        let args: Vec<&str> = self.opts.coord_args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = failpoint.map(|f| vec![(FAILPOINT, f)]).unwrap_or_default();
        let mut p = coordinator(&self.url(), &args, &envs);
        p.label = format!("coordinator#{}", self.coordinators.len() + 1);
        self.coordinators.push(p);
        self.coordinators.last_mut().unwrap()
    }

    /// Starts one more instance of `side`'s participant (with `failpoint` armed if given).
    pub fn start_participant(&mut self, side: Side, failpoint: Option<&str>) -> &mut Proc {
        let args: Vec<&str> = self.opts.part_args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = failpoint.map(|f| vec![(FAILPOINT, f)]).unwrap_or_default();
        let mut p = participant(&self.url(), side.name(), &self.data_url(side), &args, &envs);
        let list = match side {
            Side::A => &mut self.bank_a,
            Side::B => &mut self.bank_b,
        };
        p.label = format!("{}#{}", side.name(), list.len() + 1);
        list.push(p);
        list.last_mut().unwrap()
    }

    /// A synchronous connection to the stream Redis (A).
    pub fn stream_conn(&self) -> redis::Connection {
        redis_conn(&self.url())
    }

    /// A synchronous connection to `side`'s data Redis.
    pub fn data_conn(&self, side: Side) -> redis::Connection {
        redis_conn(&self.data_url(side))
    }

    /// The producer client (connected on first use, shared).
    pub fn client(&self) -> &Client {
        self.client.get_or_init(|| self.rt.block_on(Client::connect(&self.url())).expect("client connect"))
    }

    /// Sets `acct:<name>` at `side` to `amount` (directly, outside any transaction).
    pub fn seed(&self, side: Side, account: &str, amount: i64) {
        let _: () = self.data_conn(side).set(account, amount).unwrap();
    }

    /// The balance at `side` (0 if the key does not exist).
    pub fn balance(&self, side: Side, account: &str) -> i64 {
        let v: Option<i64> = self.data_conn(side).get(account).unwrap();
        v.unwrap_or(0)
    }

    /// Every `acct:*` key of both banks with its balance.
    pub fn balances(&self) -> BTreeMap<(Side, String), i64> {
        let mut out = BTreeMap::new();
        for side in [Side::A, Side::B] {
            let mut c = self.data_conn(side);
            for k in scan(&mut c, "acct:*") {
                let v: i64 = c.get(&k).unwrap();
                out.insert((side, k), v);
            }
        }
        out
    }

    /// The sum of every `acct:*` balance of both banks.
    pub fn total(&self) -> i64 {
        self.balances().values().sum()
    }

    /// Submits through the producer library; returns the id.
    pub fn submit(&self, spec: &TxnSpec) -> String {
        self.rt.block_on(self.client().submit(spec)).unwrap_or_else(|e| panic!("submit {}: {e}", spec.id))
    }

    /// Waits (library) until `id` is terminal.
    pub fn wait(&self, id: &str) -> TxnRecord {
        self.rt.block_on(self.client().wait(id, LONG)).unwrap_or_else(|e| panic!("wait {id}: {e}\n{}", self.dump(id)))
    }

    /// Submits and waits through the producer library.
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
        let h: HashMap<String, Vec<u8>> = self.stream_conn().hgetall(keys::txn_record(id)).unwrap();
        h.into_iter().collect()
    }

    /// The record's `state` field, if any.
    pub fn state(&self, id: &str) -> Option<String> {
        self.stream_conn().hget(keys::txn_record(id), "state").unwrap()
    }

    /// Polls until the record of `id` is in one of `states`; returns the record.
    pub fn wait_state(&self, id: &str, states: &[TxnState], timeout: Duration) -> TxnRecord {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.record(id) {
                if states.contains(&r.state) {
                    return r;
                }
            }
            if Instant::now() >= deadline {
                panic!("{id} did not reach {states:?} within {timeout:?}\n{}", self.dump(id));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A readable dump of `id`'s record and barriers, for failure messages.
    pub fn dump(&self, id: &str) -> String {
        let rec: Vec<(String, String)> =
            self.raw_record(id).into_iter().filter(|(k, _)| k != "spec").map(|(k, v)| (k, lossy(&v))).collect();
        let mut s = format!("record {}: {rec:?}", keys::txn_record(id));
        for side in [Side::A, Side::B] {
            let mut c = self.data_conn(side);
            let bar: HashMap<String, Vec<u8>> = c.hgetall(keys::barrier(side.name(), id)).unwrap_or_default();
            let bar: BTreeMap<String, String> = bar.into_iter().map(|(k, v)| (k, lossy(&v))).collect();
            s.push_str(&format!("\nbarrier {}: {bar:?}", keys::barrier(side.name(), id)));
        }
        s
    }

    /// The barrier state of `id` at `side`, if any.
    pub fn barrier_state(&self, side: Side, id: &str) -> Option<String> {
        self.data_conn(side).hget(keys::barrier(side.name(), id), "state").unwrap()
    }

    /// Locks (`rtx:lock:*`) and barriers in state `prepared` left on either data Redis.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for side in [Side::A, Side::B] {
            let mut c = self.data_conn(side);
            for k in scan(&mut c, "rtx:lock:*") {
                let owner: Option<String> = c.get(&k).unwrap_or(None);
                out.push(format!("{side:?}: lock {k} held by {owner:?}"));
            }
            for k in scan(&mut c, "rtx:bar:*") {
                let st: Option<String> = c.hget(&k, "state").unwrap_or(None);
                if st.as_deref() == Some("prepared") {
                    out.push(format!("{side:?}: barrier {k} still prepared"));
                }
            }
        }
        out
    }

    /// Panics unless no lock and no prepared barrier is left on either data Redis.
    pub fn assert_clean(&self) {
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    }

    /// Polls until [`Bank::assert_clean`] would pass.
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

/// A spec moving `amount` from `from` to `to`; the debit is guarded by `min: 0`. Two accounts at
/// the same bank make one branch with two ops.
pub fn transfer(from: (Side, &str), to: (Side, &str), amount: i64) -> TxnSpec {
    let debit = Op::Incrby(IncrbyOp { key: from.1.to_string(), by: -amount, min: Some(0), max: None });
    let credit = Op::incrby(to.1, amount);
    let branches = if from.0 == to.0 {
        vec![Branch { participant: from.0.name().into(), ops: vec![debit, credit] }]
    } else {
        vec![
            Branch { participant: from.0.name().into(), ops: vec![debit] },
            Branch { participant: to.0.name().into(), ops: vec![credit] },
        ]
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
