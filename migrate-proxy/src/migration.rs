//! One migration's shared state across its connections (main channel,
//! multifd channels): failure of any connection aborts all of them, the
//! destination connects to QEMU in the source's connection order, and the
//! outcome is known when every connection has ended.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::addr::Stream;
use crate::error::ProxyError;
use crate::spec::Spec;

/// How long a connection waits for the one before it to reach QEMU.
const TURN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    started: u32,
    finished: u32,
    last_change: Option<Instant>,
    failure: Option<String>,
    streams: Vec<Stream>,
    used_indices: HashSet<u32>,
    next_turn: u32,
    bytes: u64,
}

/// A migration in progress on this proxy.
pub struct Migration {
    /// What it was armed with.
    pub spec: Spec,
    state: Mutex<State>,
    changed: Condvar,
}

impl Migration {
    /// A migration armed with `spec`.
    pub fn new(spec: Spec) -> Migration {
        Migration {
            spec,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not wedge the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims connection index `index` (destination); false if used before.
    pub fn claim_index(&self, index: u32) -> bool {
        self.lock().used_indices.insert(index)
    }

    /// Whether any connection has claimed its index (joined).
    pub fn any_claimed(&self) -> bool {
        !self.lock().used_indices.is_empty()
    }

    /// Whether connection `index` is still free (nothing is claimed: a
    /// connection claims its index only once it has proven the key).
    pub fn index_free(&self, index: u32) -> bool {
        !self.lock().used_indices.contains(&index)
    }

    /// A connection starts; its sockets are cut if the migration fails.
    /// Returns `Err(Aborted)` if it already failed.
    pub fn start_connection(&self, streams: &[&Stream]) -> Result<(), ProxyError> {
        let mut st = self.lock();
        if st.failure.is_some() {
            for s in streams {
                s.abort();
            }
            return Err(ProxyError::Aborted);
        }
        st.started += 1;
        st.last_change = Some(Instant::now());
        for s in streams {
            if let Ok(c) = s.try_clone() {
                st.streams.push(c);
            }
        }
        Ok(())
    }

    /// Adds a socket to cut on failure (the QEMU side, once connected).
    pub fn add_stream(&self, s: &Stream) -> Result<(), ProxyError> {
        let mut st = self.lock();
        if st.failure.is_some() {
            s.abort();
            return Err(ProxyError::Aborted);
        }
        if let Ok(c) = s.try_clone() {
            st.streams.push(c);
        }
        Ok(())
    }

    /// A connection ended.
    pub fn finish_connection(&self, result: Result<u64, ProxyError>) {
        let mut st = self.lock();
        st.finished += 1;
        st.last_change = Some(Instant::now());
        match result {
            Ok(bytes) => st.bytes += bytes,
            Err(ProxyError::Aborted) => {}
            Err(e) => Self::fail_locked(&mut st, e.to_string()),
        }
        self.changed.notify_all();
    }

    /// Fails the migration: every connection is cut.
    pub fn fail(&self, why: String) {
        let mut st = self.lock();
        Self::fail_locked(&mut st, why);
        self.changed.notify_all();
    }

    fn fail_locked(st: &mut State, why: String) {
        if st.failure.is_none() {
            tracing::warn!("migration failed: {why}");
            st.failure = Some(why);
        }
        for s in st.streams.drain(..) {
            s.abort();
        }
    }

    /// Whether it failed.
    pub fn failed(&self) -> bool {
        self.lock().failure.is_some()
    }

    /// Destination: waits until connection `index` may connect to QEMU
    /// (all lower indices have), so QEMU sees its channels in order.
    pub fn wait_turn(&self, index: u32) -> Result<(), ProxyError> {
        let deadline = Instant::now() + TURN_TIMEOUT;
        let mut st = self.lock();
        while st.next_turn != index {
            if st.failure.is_some() {
                return Err(ProxyError::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProxyError::Timeout("waiting for the earlier connections"));
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Destination: connection `index` reached QEMU; let the next one go.
    pub fn end_turn(&self) {
        let mut st = self.lock();
        st.next_turn += 1;
        self.changed.notify_all();
    }

    /// The outcome if it is known: `Ok(bytes)` once at least one
    /// connection ran and all ended cleanly with no new one for `grace`;
    /// `Err` on failure; `None` while it is still going (or not started).
    pub fn poll_outcome(&self, grace: Duration) -> Option<Result<u64, String>> {
        let st = self.lock();
        Self::outcome_locked(&st, grace)
    }

    fn outcome_locked(st: &State, grace: Duration) -> Option<Result<u64, String>> {
        if let Some(f) = &st.failure {
            return Some(Err(f.clone()));
        }
        let quiet = st.last_change.map(|t| t.elapsed());
        if st.started > 0 && st.finished == st.started && quiet.is_some_and(|q| q >= grace) {
            return Some(Ok(st.bytes));
        }
        None
    }

    /// Connections started so far.
    pub fn connections(&self) -> u32 {
        self.lock().started
    }

    /// Blocks until [`Self::poll_outcome`] has an answer.
    pub fn wait_outcome(&self, grace: Duration) -> Result<u64, String> {
        let mut st = self.lock();
        loop {
            if let Some(o) = Self::outcome_locked(&st, grace) {
                return o;
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
