//! `redtx submit` and `redtx status` with `--cluster` on a real Redis Cluster (3 masters, a
//! password): `--redis` takes a list of seeds (or one), submits land in their partition's slot,
//! `submit --wait` is woken by the outcome (written by hand, as the coordinator writes it: this
//! test runs no coordinator; tests/tests/cluster.rs runs whole deployments on a cluster), and the
//! mix-ups (a plain server as a cluster seed, a cluster node without `--cluster`, a list without
//! it) are refused with exit 2 and a clear
//! message. The same over TLS (`rediss://` seeds, the nodes talking TLS among themselves). No
//! password is ever printed.

use redis::Commands;
use redtx_common::cluster_server::{ClusterOptions, ClusterTls, RedisCluster};
use redtx_common::machine::{Timing, Txn};
use redtx_common::record::{create_fields, TxnState};
use redtx_common::server::{RedisServer, ServerOptions};
use redtx_common::spec::TxnSpec;
use redtx_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const PW: &str = "cli-Pw-5c0e";

/// Writes the record of `spec` as committed, then its outcome, on the cluster.
fn commit_by_hand(con: &mut redis::cluster::ClusterConnection, spec: &TxnSpec) {
    let p = keys::partition(&spec.id, PARTITIONS);
    let (mut txn, _) = Txn::create(spec.clone(), Timing { now_ms: redtx_common::now_ms(), resend_every_ms: 1000 });
    txn.progress.state = TxnState::Committed;
    txn.progress.finished_ms = Some(redtx_common::now_ms());
    let _: () = con.hset_multiple(keys::txn_record(p, &spec.id), &create_fields(&txn)).unwrap();
    let _: String =
        con.xadd(keys::outcomes_stream(p), "*", &[("id", spec.id.as_str()), ("state", "committed")]).unwrap();
}

#[test]
fn submit_and_status_with_cluster() {
    let cluster =
        RedisCluster::start_with(3, 0, ClusterOptions { password: Some(PW.into()), ..Default::default() }).unwrap();
    let seeds = cluster.seeds();
    let mut con = redis::cluster::ClusterClient::new(cluster.seed_urls()).unwrap().get_connection().unwrap();

    // Submit through every seed; each lands in its partition's stream on the master serving it.
    let spec1 = transfer_json(Some("cli-1"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 5);
    let out = redtx("submit", &seeds, &["--cluster", "-"], Some(spec1.as_bytes()));
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(out.stdout.trim(), "cli-1");
    let p = keys::partition("cli-1", PARTITIONS);
    let mut master = redis_conn(&cluster.master_url_of_slot(keys::partition_slot(p)).unwrap());
    let len: usize = master.xlen(keys::coord_stream(p)).unwrap();
    assert_eq!(len, 1, "the submit is in rtx:coord:{{{p}}} on the master of its slot");

    // --wait with a single seed: woken by the outcome.
    let spec2 = transfer_json(Some("cli-2"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 5);
    let mut waiting =
        spawn_redtx("submit", &cluster.url(2), &["--cluster", "--wait", "--timeout", "30s", "-"], spec2.as_bytes());
    let p2 = keys::partition("cli-2", PARTITIONS);
    poll("the second submit", LONG, || {
        (con.xlen::<_, usize>(keys::coord_stream(p2)).unwrap() > usize::from(p2 == p)).then_some(())
    });
    commit_by_hand(&mut con, &TxnSpec::from_json(spec2.as_bytes()).unwrap());
    let status = waiting.wait_exit(LONG).expect("submit --wait ends");
    assert_eq!(status.code(), Some(0), "{}", waiting.output());
    assert!(waiting.output().contains("cli-2 committed"), "{}", waiting.output());

    // Status through the cluster.
    let out = redtx("status", &seeds, &["--cluster", "--json", "cli-2"], None);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(out.json()["state"], "committed", "{}", out.all());
    let out = redtx("status", &seeds, &["--cluster", "cli-none"], None);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("(cluster)"), "names the cluster it looked in: {}", out.all());
    assert!(!out.all().contains(PW), "{}", out.all());

    // An ACL user (made on every node) works as well.
    const APP_PW: &str = "app-Pw-77b1";
    for i in 0..cluster.len() {
        acl_user(&mut redis_conn(&cluster.url(i)), "app", APP_PW);
    }
    let app_seeds: Vec<String> =
        (0..cluster.len()).map(|i| format!("redis://app:{APP_PW}@127.0.0.1:{}", cluster.port(i))).collect();
    let out = redtx("status", &app_seeds.join(","), &["--cluster", "--json", "cli-2"], None);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(out.json()["state"], "committed", "{}", out.all());
    let out = redtx("status", &app_seeds[0], &["--cluster", "cli-none"], None);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("app:***@") && !out.all().contains(APP_PW), "{}", out.all());

    // Mix-ups: exit 2, said plainly, no password printed.
    let plain =
        RedisServer::start_with(ServerOptions { aof: false, password: Some(PW.into()), ..Default::default() }).unwrap();
    let out = redtx("status", &plain.url(), &["--cluster", "cli-1"], None);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("is not a Redis Cluster node"), "{}", out.all());
    let out = redtx("status", &cluster.url(0), &["cli-1"], None);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("is a Redis Cluster node: pass --cluster"), "{}", out.all());
    let out = redtx("submit", &seeds, &["-"], Some(spec1.as_bytes()));
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.stderr.contains("needs --cluster"), "{}", out.all());
    assert!(!out.all().contains(PW), "{}", out.all());
    // A cluster that is down: exit 4 after the connection timeout, not a hang.
    drop(cluster);
    let out = cli_with_timeout(
        &["status", "--cluster", "--redis", &seeds, "--partitions", "4", "cli-1"],
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(4), "{}", out.all());
    assert!(!out.all().contains(PW), "{}", out.all());
}

#[test]
fn submit_wait_and_status_on_a_tls_cluster() {
    let certs = tempfile::tempdir().unwrap();
    make_tls_certs(certs.path());
    let file = |f: &str| certs.path().join(f);
    let tls = ClusterTls { cert: file("server.pem"), key: file("server.key"), ca: file("ca.pem") };
    let opts = ClusterOptions { password: Some(PW.into()), tls: Some(tls), ..Default::default() };
    let cluster = RedisCluster::start_with(3, 0, opts).unwrap();
    let seeds = cluster.tls_seed_urls().join(",");
    assert!(seeds.starts_with("rediss://"), "{seeds}");
    let mut con = redis::cluster::ClusterClient::new(cluster.seed_urls()).unwrap().get_connection().unwrap();
    let ca = file("ca.pem").display().to_string();
    let run = |args: &[&str], stdin: &str| {
        let mut cmd = Command::new(bin("redtx"));
        cmd.args(args)
            .args(partitions_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("REDTX_REDIS_URL")
            .env_remove("REDTX_PARTITIONS")
            .env("SSL_CERT_FILE", &ca);
        let mut child = cmd.spawn().expect("spawn redtx");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        child
    };

    // submit --wait over TLS; every partition reader connects over TLS to its node.
    let spec = transfer_json(Some("tls-1"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 5);
    let waiting = run(&["submit", "--cluster", "--redis", &seeds, "--wait", "--timeout", "30s", "-"], &spec);
    let p = keys::partition("tls-1", PARTITIONS);
    poll("the TLS submit", LONG, || (con.xlen::<_, usize>(keys::coord_stream(p)).unwrap() > 0).then_some(()));
    commit_by_hand(&mut con, &TxnSpec::from_json(spec.as_bytes()).unwrap());
    let out = waiting.wait_with_output().unwrap();
    let printed = format!("{}\n{}", lossy(&out.stdout), lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(printed.contains("tls-1 committed"), "{printed}");

    let out = run(&["status", "--cluster", "--redis", &seeds, "--json", "tls-1"], "").wait_with_output().unwrap();
    let printed = format!("{}\n{}", lossy(&out.stdout), lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(printed.contains("\"committed\""), "{printed}");
    assert!(!printed.contains(PW), "{printed}");
}
