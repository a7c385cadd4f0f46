//! Redis URLs with an ACL user and password, and TLS (`rediss://`), through the real binaries:
//! transactions commit, and no secret ever appears in what the processes print.

use redtx_common::server::{free_port, RedisServer, ServerOptions};
use redtx_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOT_PW: &str = "root-Pw-71c3";
const APP_PW: &str = "app-Pw-9f2e";

/// Runs one transfer between bank-a and bank-b (both on `data_url`) through a coordinator, two
/// participants and `redtx submit --wait`, all given `url`; returns every line they printed.
fn transfer_through_binaries(url: &str, data_url: &str, envs: &[(&str, &str)]) -> String {
    let mut procs = vec![
        coordinator(url, &[], envs),
        participant(url, "bank-a", data_url, &[], envs),
        participant(url, "bank-b", data_url, &[], envs),
    ];
    let spec = transfer_json(Some("sec-1"), (Side::A, "acct:alice"), (Side::B, "acct:bob"), 30);
    let mut cmd = Command::new(bin("redtx"));
    cmd.args(["submit", "--wait", "--json", "--redis", url])
        .args(partitions_args())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("REDTX_REDIS_URL")
        .env_remove("REDTX_PARTITIONS");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn redtx");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), spec.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = format!("{}\n{}", lossy(&out.stdout), lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "submit failed: {printed}");
    assert!(printed.contains("\"committed\""), "{printed}");
    for p in procs.iter_mut() {
        p.term();
        assert!(p.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()), "{} did not stop cleanly", p.label);
    }
    let mut all = printed;
    for p in &procs {
        all += &p.output();
    }
    all
}

#[test]
fn an_acl_user_with_a_password_works_and_no_password_is_printed() {
    let server =
        RedisServer::start_with(ServerOptions { password: Some(ROOT_PW.into()), ..Default::default() }).unwrap();
    let mut admin = redis_conn(&server.url());
    acl_user(&mut admin, "app", APP_PW);
    let _: () = redis::cmd("SET").arg("acct:alice").arg(100).query(&mut admin).unwrap();
    let url = format!("redis://app:{APP_PW}@127.0.0.1:{}", server.port());

    let printed = transfer_through_binaries(&url, &url, &[]);

    let balances: (i64, i64) = redis::cmd("MGET").arg("acct:alice").arg("acct:bob").query(&mut admin).unwrap();
    assert_eq!(balances, (70, 30));
    assert!(!printed.contains(APP_PW), "the password was printed:\n{printed}");
    assert!(printed.contains("app:***@"), "workers should name the (redacted) URL they use:\n{printed}");

    // A wrong password: a clear error, exit 4, the password not shown.
    let bad = format!("redis://app:wrong-{APP_PW}@127.0.0.1:{}", server.port());
    let out = redtx("status", &bad, &["sec-1"], None);
    assert_eq!(out.code, Some(4), "{}", out.all());
    assert!(!out.all().contains(APP_PW), "{}", out.all());
}

#[test]
fn tls_urls_work() {
    let certs = tempfile::tempdir().unwrap();
    make_tls_certs(certs.path());
    let tls_port = free_port().unwrap();
    let p = |f: &str| certs.path().join(f).display().to_string();
    let server = RedisServer::start_with(ServerOptions {
        password: Some(ROOT_PW.into()),
        extra: vec![
            ("tls-port".into(), tls_port.to_string()),
            ("tls-cert-file".into(), p("server.pem")),
            ("tls-key-file".into(), p("server.key")),
            ("tls-ca-cert-file".into(), p("ca.pem")),
            ("tls-auth-clients".into(), "no".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    let mut admin = redis_conn(&server.url());
    let _: () = redis::cmd("SET").arg("acct:alice").arg(100).query(&mut admin).unwrap();
    let url = format!("rediss://:{ROOT_PW}@localhost:{tls_port}");
    let ca = p("ca.pem");

    let printed = transfer_through_binaries(&url, &url, &[("SSL_CERT_FILE", &ca)]);

    let balances: (i64, i64) = redis::cmd("MGET").arg("acct:alice").arg("acct:bob").query(&mut admin).unwrap();
    assert_eq!(balances, (70, 30));
    assert!(!printed.contains(ROOT_PW), "the password was printed:\n{printed}");

    // Without the CA the certificate is refused: an error, not a silent plain-text fallback.
    let out = redtx("status", &url, &["sec-1"], None);
    assert_eq!(out.code, Some(4), "{}", out.all());
    assert!(!out.all().contains(ROOT_PW), "{}", out.all());
}
