//! Lua scripts: declared once (`include_str!` of a file in `lua/`), called by SHA, pipelined.
//!
//! Each crate declares its scripts as `static` [`LuaScript`]s. [`run`] sends a batch of calls as
//! one pipeline of `EVALSHA`; a call answered `NOSCRIPT` (a restarted or flushed Redis) is
//! loaded and re-sent. Per-call failures come back per call, so one bad call never hides the
//! others' replies.
//!
//! Any connection works ([`RedisConn`](crate::conn::RedisConn) included). On a Redis Cluster
//! one [`run`] is one pipeline, sent whole to one node: every call of it must have its keys in
//! one slot (one partition); `SCRIPT LOAD` after a `NOSCRIPT` goes to every node.

use crate::{Error, Result};
use redis::aio::ConnectionLike;
use redis::{RedisResult, ToRedisArgs, Value};
use std::fmt::Display;
use std::sync::OnceLock;

/// One Lua script of `lua/`.
pub struct LuaScript {
    /// Short name, for errors and logs.
    pub name: &'static str,
    /// The source.
    pub source: &'static str,
    sha: OnceLock<String>,
}

impl LuaScript {
    /// Declares a script (usually `static X: LuaScript = LuaScript::new("x", include_str!(...))`).
    pub const fn new(name: &'static str, source: &'static str) -> Self {
        LuaScript { name, source, sha: OnceLock::new() }
    }

    /// SHA1 of the source, as `EVALSHA` wants it.
    pub fn sha(&self) -> &str {
        self.sha.get_or_init(|| redis::Script::new(self.source).get_hash().to_string())
    }

    /// Starts a call of this script.
    pub fn call(&'static self) -> Call {
        // Room for a typical participant transition (a barrier, a key and its lock; a dozen
        // arguments), so building one does not regrow the buffers.
        Call {
            script: self,
            keys: redis::Cmd::with_capacity(4, 128),
            args: redis::Cmd::with_capacity(16, 256),
            shared: redis::Cmd::new(),
        }
    }

    /// `SCRIPT LOAD`s this script.
    pub async fn load(&self, conn: &mut (impl ConnectionLike + Send + Sync)) -> RedisResult<()> {
        let _: String = redis::cmd("SCRIPT").arg("LOAD").arg(self.source).query_async(conn).await?;
        Ok(())
    }
}

/// One pending call of a script with its KEYS and ARGV. Each list is one contiguous buffer
/// (a `redis::Cmd` used as an argument list): appending an argument copies its bytes once and
/// allocates nothing per argument.
///
/// A call may also have *shared* values: input that every call of a batch has alike (a
/// participant's name, the clock, its retention), sent once per [`Call::batch`] instead of once
/// per call. Sent alone ([`Call::run`]), a call's ARGV is its shared values then its own.
#[derive(Clone)]
pub struct Call {
    script: &'static LuaScript,
    keys: redis::Cmd,
    args: redis::Cmd,
    shared: redis::Cmd,
}

impl Call {
    /// Appends to KEYS.
    pub fn key(mut self, k: impl ToRedisArgs) -> Self {
        self.keys.arg(k);
        self
    }

    /// Appends to ARGV.
    pub fn arg(mut self, a: impl ToRedisArgs) -> Self {
        self.args.arg(a);
        self
    }

    /// Appends to the shared values.
    pub fn shared(mut self, a: impl ToRedisArgs) -> Self {
        self.shared.arg(a);
        self
    }

    /// Whether this call and `other` may go in one [`Call::batch`]: the same script and the
    /// same shared values.
    pub fn batches_with(&self, other: &Call) -> bool {
        std::ptr::eq(self.script, other.script) && self.shared.args_iter().eq(other.shared.args_iter())
    }

    /// Appends every argument of `list` to ARGV.
    pub fn args_of(mut self, list: &redis::Cmd) -> Self {
        append(&mut self.args, list);
        self
    }

    /// The script this call runs.
    pub fn script(&self) -> &'static LuaScript {
        self.script
    }

    /// Its first KEY, if it has one.
    pub fn first_key(&self) -> Option<Vec<u8>> {
        match self.keys.args_iter().next()? {
            redis::Arg::Simple(k) => Some(k.to_vec()),
            _ => None,
        }
    }

    /// One call of this script carrying every call of `calls` (all [`Call::batches_with`] the
    /// first), laid out as `lua/lib/batch.lua` reads a batch: KEYS concatenated; ARGV = the
    /// count, the number of shared values and the values (once), each call's KEYS and ARGV
    /// sizes, then every call's own ARGV.
    pub fn batch(calls: &[&Call]) -> Call {
        let first = calls.first().expect("a batch holds at least one call");
        assert!(calls.iter().all(|c| c.batches_with(first)), "a batch runs one script with one set of shared values");
        let mut out = first.script.call();
        out.args.arg(calls.len()).arg(first.shared.args_iter().len());
        append(&mut out.args, &first.shared);
        for c in calls {
            out.args.arg(c.keys.args_iter().len()).arg(c.args.args_iter().len());
        }
        for c in calls {
            append(&mut out.keys, &c.keys);
            append(&mut out.args, &c.args);
        }
        out
    }

    fn evalsha(&self) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.script.sha()).arg(self.keys.args_iter().len());
        append(&mut c, &self.keys);
        append(&mut c, &self.shared);
        append(&mut c, &self.args);
        c
    }

    /// Runs this one call.
    pub async fn run(
        &self,
        conn: &mut (impl ConnectionLike + Send + Sync),
        url: &(impl Display + Sync),
    ) -> Result<Value> {
        let mut out = run(conn, url, std::slice::from_ref(self)).await?;
        out.pop().expect("one reply per call").map_err(|e| Error::redis(url, e))
    }
}

/// Appends every argument of `from` to `to` (a `redis::Cmd` used as an argument list).
pub fn append(to: &mut redis::Cmd, from: &redis::Cmd) {
    use redis::RedisWrite;
    let size = |a: redis::Arg<&[u8]>| if let redis::Arg::Simple(b) = a { b.len() } else { 0 };
    to.reserve_space_for_args(from.args_iter().map(size));
    for a in from.args_iter() {
        if let redis::Arg::Simple(bytes) = a {
            to.arg(bytes);
        }
    }
}

/// Runs `calls` on `conn`: as one pipeline ([`run`]) on one server; on a Redis Cluster each call
/// on its own (its keys are one partition's, and calls of several partitions cannot share a
/// pipeline), all sent at once (the cluster connection pipelines the calls to each node). One
/// reply per call, in order. On one server the outer error is a connection-level failure; on a
/// cluster a call that could not reach its node (its master down, a redirect that outlived the
/// retries) gets that error as its own reply, and the others' replies stand.
pub async fn run_each(
    conn: &crate::conn::RedisConn,
    url: &crate::conn::RedisTarget,
    calls: &[Call],
) -> Result<Vec<RedisResult<Value>>> {
    if !conn.is_cluster() {
        return run(&mut conn.clone(), url, calls).await;
    }
    let tasks: Vec<_> = calls
        .iter()
        .cloned()
        .map(|call| {
            let (mut conn, url) = (conn.clone(), url.clone());
            tokio::spawn(async move { run(&mut conn, &url, std::slice::from_ref(&call)).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await.map_err(|e| Error::Io(std::io::Error::other(e)))? {
            Ok(mut r) => out.push(r.pop().expect("one reply per call")),
            Err(Error::Redis { source, .. }) => out.push(Err(source)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Runs `calls` as one pipeline and returns one reply per call, in order. The outer error is a
/// connection-level failure (nothing known about which calls ran); inner errors are per call.
pub async fn run(
    conn: &mut (impl ConnectionLike + Send + Sync),
    url: &(impl Display + Sync),
    calls: &[Call],
) -> Result<Vec<RedisResult<Value>>> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let mut replies = pipeline(conn, url, calls.iter()).await?;
    let missing: Vec<usize> = (0..calls.len()).filter(|&i| is_noscript(&replies[i])).collect();
    if !missing.is_empty() {
        for i in &missing {
            calls[*i].script.load(conn).await.map_err(|e| Error::redis(url, e))?;
        }
        let again = pipeline(conn, url, missing.iter().map(|&i| &calls[i])).await?;
        for (i, r) in missing.into_iter().zip(again) {
            replies[i] = r;
        }
    }
    Ok(replies)
}

async fn pipeline<'a>(
    conn: &mut (impl ConnectionLike + Send + Sync),
    url: &(impl Display + Sync),
    calls: impl Iterator<Item = &'a Call>,
) -> Result<Vec<RedisResult<Value>>> {
    let mut p = redis::pipe();
    p.ignore_errors();
    for c in calls {
        p.add_command(c.evalsha());
    }
    p.query_async(conn).await.map_err(|e| Error::redis(url, e))
}

fn is_noscript(r: &RedisResult<Value>) -> bool {
    matches!(r, Err(e) if e.code() == Some("NOSCRIPT"))
}

/// Reads a script reply that is an array, as a list of byte strings (integers become their
/// decimal text, nil becomes empty).
pub fn reply_strings(script: &'static str, v: &Value) -> Result<Vec<String>> {
    let Value::Array(items) = v else {
        return Err(Error::ScriptReply { script, detail: format!("expected an array, got {v:?}") });
    };
    items
        .iter()
        .map(|i| match i {
            Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Ok(s.clone()),
            Value::Int(n) => Ok(n.to_string()),
            Value::Nil => Ok(String::new()),
            other => Err(Error::ScriptReply { script, detail: format!("unexpected item {other:?}") }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    static S: LuaScript = LuaScript::new("s", "return 1");

    fn strings(c: &redis::Cmd) -> Vec<String> {
        c.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    #[test]
    fn a_batch_sends_the_shared_values_once() {
        let a = S.call().key("k1").shared("x").shared(7).arg("a1").arg("a2");
        let b = S.call().key("k2").key("k3").shared("x").shared(7).arg("b1");
        assert!(a.batches_with(&b));
        assert!(!a.batches_with(&S.call().shared("x").shared(8)), "other shared values");
        let e = Call::batch(&[&a, &b]).evalsha();
        let want =
            ["EVALSHA", S.sha(), "3", "k1", "k2", "k3", "2", "2", "x", "7", "1", "2", "2", "1", "a1", "a2", "b1"];
        assert_eq!(strings(&e), want);
        // Alone, a call's ARGV is its shared values then its own.
        assert_eq!(strings(&a.evalsha()), ["EVALSHA", S.sha(), "1", "k1", "x", "7", "a1", "a2"]);
    }

    #[test]
    #[should_panic(expected = "one set of shared values")]
    fn a_batch_refuses_calls_of_other_shared_values() {
        let _ = Call::batch(&[&S.call().shared(1), &S.call().shared(2)]);
    }
}
