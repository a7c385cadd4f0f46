//! Graceful shutdown: SIGINT/SIGTERM (or a test) trigger a [`Shutdown`]; workers stop reading,
//! finish the batch they hold, ack nothing unprocessed, and return.

use tokio::sync::watch;

/// A cloneable shutdown signal.
#[derive(Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal nobody triggered yet.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Shutdown { tx: std::sync::Arc::new(tx), rx }
    }

    /// A signal triggered by SIGINT or SIGTERM.
    pub fn on_signals() -> Self {
        let s = Shutdown::new();
        let t = s.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
            tracing::info!("shutdown requested: finishing the current batch");
            t.trigger();
        });
        s
    }

    /// Asks everyone holding a clone to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    /// Whether stop was asked.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once stop is asked.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}
