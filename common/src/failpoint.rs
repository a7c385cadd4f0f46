//! Fail points: named places in the protocol where a test can freeze a real worker process, so
//! that it can be killed (`kill -9`) at exactly that step.
//!
//! Set `REDTX_FAILPOINT=name[,name...]` in a worker's environment. When the worker reaches a
//! listed point it logs `failpoint <name> reached` on stderr and stops making progress forever
//! (it keeps running, holding whatever it holds, until killed). Unset, a fail point costs one
//! cached lookup.

use std::sync::OnceLock;

/// Environment variable listing the armed fail points.
pub const FAILPOINT_ENV: &str = "REDTX_FAILPOINT";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(FAILPOINT_ENV)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Whether `name` is armed.
pub fn is_armed(name: &str) -> bool {
    armed().iter().any(|a| a == name)
}

/// If `name` is armed: announce it and never return.
pub async fn hit(name: &str) {
    if is_armed(name) {
        eprintln!("failpoint {name} reached");
        tracing::warn!(failpoint = name, "failpoint reached; freezing until killed");
        std::future::pending::<()>().await;
    }
}
