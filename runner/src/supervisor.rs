//! One task per connector that starts it, stops it and starts it again on
//! command (pause, resume, restart, a reloaded config), and says what state
//! it is in. Stopping always goes through the connector's own stop token:
//! in-flight batches commit, then the source and sink are dropped, so every
//! transition keeps the commit protocol's guarantees.

use crate::connector::Connector;
use crate::registry::ConnectorConfig;
use crate::stats::{Event, Stats};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Building the connector, opening its dedup store.
    Starting,
    /// Reading and committing (see [`Supervised::readiness`] for whether
    /// every partition is open and the sink answers).
    Running,
    /// Reading nothing on request: what was read is committed, partitions
    /// stay held (a Kafka consumer stays in its group); `resume` reads on.
    Paused,
    /// Stopping to start again (restart, or a changed config).
    Restarting,
    /// Stopped by a permanent error; `restart` tries again.
    Failed,
    /// Its sources ended and everything read is committed.
    Finished,
    /// Stopped with the process, or removed from the config.
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Paused => "paused",
            State::Restarting => "restarting",
            State::Failed => "failed",
            State::Finished => "finished",
            State::Stopped => "stopped",
        }
    }

    /// Nothing more happens without a command.
    pub fn is_at_rest(self) -> bool {
        matches!(self, State::Failed | State::Finished | State::Stopped)
    }
}

/// What the admin API (or SIGHUP) asks of a connector.
pub enum Command {
    Pause,
    Resume,
    Restart,
    /// Run with this config from now on (it changed on reload).
    Reload(Box<ConnectorConfig>),
    /// Removed from the config: stop for good.
    Remove,
}

/// A refused command, and why.
#[derive(Debug, thiserror::Error)]
#[error("connector `{connector}` is {state}: {message}")]
pub struct Refused {
    pub connector: String,
    pub state: &'static str,
    pub message: &'static str,
}

struct Inner {
    state: State,
    /// Why it failed, when it did.
    failure: Option<Event>,
    /// The connector built from the current config, once built.
    current: Option<Arc<Connector>>,
    /// This connector's `[connectors.NAME]` table as written, to tell on
    /// reload whether it changed.
    raw: toml::Value,
    /// The last run was cut off at the shutdown grace period.
    abandoned: bool,
}

/// A connector under supervision.
pub struct Supervised {
    pub name: String,
    pub stats: Arc<Stats>,
    inner: Mutex<Inner>,
    commands: mpsc::UnboundedSender<Command>,
    /// Woken on every state change.
    changed: Arc<Notify>,
}

/// How the process stops its connectors.
#[derive(Clone)]
pub struct Shutdown {
    /// Cancelled by SIGTERM/SIGINT: connectors commit what they hold and stop.
    pub stop: CancellationToken,
    /// Cancelled one grace period after `stop`: stop waiting.
    pub give_up: CancellationToken,
    pub grace: Duration,
}

/// Readiness of one connector and, if not ready, why.
pub struct Readiness {
    pub ready: bool,
    pub reason: Option<String>,
}

impl Supervised {
    /// Start supervising `cfg`; returns the connector and its task.
    pub fn spawn(
        name: &str,
        cfg: ConnectorConfig,
        raw: toml::Value,
        stats: Arc<Stats>,
        changed: Arc<Notify>,
        shutdown: Shutdown,
    ) -> (Arc<Supervised>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = Arc::new(Supervised {
            name: name.into(),
            stats,
            inner: Mutex::new(Inner {
                state: State::Starting,
                failure: None,
                current: None,
                raw,
                abandoned: false,
            }),
            commands: tx,
            changed,
        });
        me.publish(State::Starting);
        let task = tokio::spawn(me.clone().supervise(cfg, rx, shutdown));
        (me, task)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind: go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    pub fn failure(&self) -> Option<Event> {
        self.lock().failure.clone()
    }

    pub fn current(&self) -> Option<Arc<Connector>> {
        self.lock().current.clone()
    }

    pub fn raw(&self) -> toml::Value {
        self.lock().raw.clone()
    }

    pub fn abandoned(&self) -> bool {
        self.lock().abandoned
    }

    fn set_state(&self, state: State) {
        self.lock().state = state;
        self.publish(state);
    }

    /// Push the state to the metrics and wake whoever waits on changes.
    fn publish(&self, state: State) {
        self.publish_metrics(state);
        self.changed.notify_waiters();
    }

    fn publish_metrics(&self, state: State) {
        let ready = self.readiness_in(state).ready;
        self.stats
            .metrics()
            .set_state(&self.name, state.as_str(), ready);
    }

    /// Bring the state and readiness gauges up to date (readiness also
    /// moves without a state change: a partition opens, a retry starts).
    pub fn refresh_metrics(&self) {
        self.publish_metrics(self.state());
    }

    /// Ready: running with its sink prepared, every partition open and no
    /// operation failing right now; or paused or finished on purpose.
    pub fn readiness(&self) -> Readiness {
        self.readiness_in(self.state())
    }

    fn readiness_in(&self, state: State) -> Readiness {
        let not = |reason: String| Readiness {
            ready: false,
            reason: Some(reason),
        };
        match state {
            State::Running => {
                if let Some(f) = self.stats.failing() {
                    return not(format!("{} (retrying)", f.message));
                }
                if !self.stats.prepared() {
                    return not("opening its sink".into());
                }
                let opening = self.stats.partitions_opening();
                if opening > 0 {
                    return not(format!(
                        "opening {opening} partition(s): reading committed positions"
                    ));
                }
                Readiness {
                    ready: true,
                    reason: None,
                }
            }
            State::Paused | State::Finished => Readiness {
                ready: true,
                reason: None,
            },
            State::Starting | State::Restarting => not(state.as_str().to_string()),
            State::Failed => not(match self.failure() {
                Some(f) => format!("failed: {}", f.message),
                None => "failed".into(),
            }),
            State::Stopped => not("stopped".into()),
        }
    }

    /// Ask for a transition; refused when it makes no sense in the
    /// current state.
    pub fn command(&self, cmd: Command) -> Result<(), Refused> {
        let state = self.state();
        let refuse = |message| {
            Err(Refused {
                connector: self.name.clone(),
                state: state.as_str(),
                message,
            })
        };
        match (&cmd, state) {
            (_, State::Stopped) => return refuse("the process is stopping"),
            (Command::Pause, State::Paused) => return refuse("already paused"),
            (Command::Pause, State::Failed | State::Finished) => {
                return refuse("nothing runs to pause; `restart` starts it again")
            }
            (Command::Resume, s) if s != State::Paused => {
                return refuse("only a paused connector resumes; `restart` starts it again")
            }
            _ => {}
        }
        self.commands.send(cmd).map_err(|_| Refused {
            connector: self.name.clone(),
            state: state.as_str(),
            message: "its supervisor has ended",
        })
    }

    /// Run with a changed config from now on.
    pub fn reload(&self, cfg: ConnectorConfig, raw: toml::Value) -> Result<(), Refused> {
        self.command(Command::Reload(Box::new(cfg)))?;
        self.lock().raw = raw;
        Ok(())
    }

    async fn supervise(
        self: Arc<Self>,
        mut cfg: ConnectorConfig,
        mut commands: mpsc::UnboundedReceiver<Command>,
        shutdown: Shutdown,
    ) {
        let mut wanted = true;
        // Paused through the API: the connector runs but does not read, so
        // it keeps what it holds (a Kafka consumer stays in its group). A
        // restart or a reload keeps it paused.
        let mut paused = false;
        loop {
            if shutdown.stop.is_cancelled() {
                break;
            }
            if !wanted {
                // Paused, failed or finished: wait for a command.
                tokio::select! {
                    _ = shutdown.stop.cancelled() => break,
                    cmd = commands.recv() => match cmd {
                        None | Some(Command::Remove) => break,
                        Some(Command::Pause | Command::Resume) => {}
                        Some(Command::Restart) => wanted = true,
                        Some(Command::Reload(new)) => cfg = *new,
                    }
                }
                continue;
            }
            self.lock().failure = None;
            // A failure being retried when it last stopped is history now.
            self.stats.succeeded();
            self.set_state(State::Starting);
            let conn = match self.start(&cfg).await {
                Ok(c) => c,
                Err(message) => {
                    self.fail(message);
                    wanted = false;
                    continue;
                }
            };
            let token = CancellationToken::new();
            conn.set_paused(paused);
            let mut run = tokio::spawn(conn.clone().run(token.clone()));
            self.set_state(if paused {
                State::Paused
            } else {
                State::Running
            });
            let next = loop {
                tokio::select! {
                    joined = &mut run => {
                        match joined {
                            Ok(Ok(())) => {
                                info!(connector = %self.name, "finished: every message read is committed");
                                self.set_state(State::Finished);
                            }
                            Ok(Err(e)) => self.fail(e.to_string()),
                            Err(e) => self.fail(format!("task failed: {e}")),
                        }
                        wanted = false;
                        break Next::Ended;
                    }
                    _ = shutdown.stop.cancelled() => break Next::Stop,
                    cmd = commands.recv() => match cmd {
                        Some(Command::Pause) => {
                            info!(connector = %self.name, "pausing: committing what was read, then reading nothing until resumed");
                            paused = true;
                            conn.set_paused(true);
                            self.set_state(State::Paused);
                        }
                        Some(Command::Resume) => {
                            info!(connector = %self.name, "resumed");
                            paused = false;
                            conn.set_paused(false);
                            self.set_state(State::Running);
                        }
                        Some(Command::Restart) => break Next::Restart,
                        Some(Command::Reload(new)) => {
                            cfg = *new;
                            break Next::Restart;
                        }
                        None | Some(Command::Remove) => break Next::Stop,
                    }
                }
            };
            match next {
                Next::Ended => {
                    // Finished or failed: kept around for `restart` and the API.
                    self.stats.set_prepared(false);
                }
                Next::Stop => {
                    // Process stopping or connector removed.
                    token.cancel();
                    self.stop_run(&mut run, &shutdown).await;
                    self.stats.set_prepared(false);
                    break;
                }
                Next::Restart => {
                    info!(connector = %self.name, "restarting: committing in-flight batches, then stopping");
                    self.set_state(State::Restarting);
                    token.cancel();
                    let stopped_cleanly = self.stop_run(&mut run, &shutdown).await;
                    self.stats.set_prepared(false);
                    // A batch that could not commit while stopping fails the
                    // connector instead: restarting would hit the same error.
                    wanted = stopped_cleanly;
                }
            }
        }
        if !matches!(self.state(), State::Failed | State::Finished) {
            self.set_state(State::Stopped);
        } else {
            self.changed.notify_waiters();
        }
    }

    /// Build the connector and say what it guarantees.
    async fn start(&self, cfg: &ConnectorConfig) -> Result<Arc<Connector>, String> {
        // Drop the previous connector first: its embedded dedup store (one
        // process per file) must be closed before the new one opens it.
        // Its last tasks (a reader being aborted) let go within moments.
        let previous = self.lock().current.take();
        if let Some(old) = previous {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let c = Connector::build_with(&self.name, cfg.clone(), self.stats.clone())
            .map_err(|e| e.to_string())?;
        let c = Arc::new(c);
        let info = c.sink.info();
        info!(connector = %c.name, guarantee = %info.guarantee, why = %info.why, dead_letters = %c.dead_letters.describe(), "starting");
        if let Some(line) = c.dedup_line().await {
            let (l, warnings) = line.map_err(|e| format!("connector `{}`: {e}", c.name))?;
            info!(connector = %c.name, "{l}");
            for w in warnings {
                warn!(connector = %c.name, "{w}");
            }
        }
        self.lock().current = Some(c.clone());
        Ok(c)
    }

    /// Wait for a stopping run, up to the grace period; then abandon it.
    /// `false` when it stopped on an error (the connector is then failed).
    async fn stop_run(
        &self,
        run: &mut tokio::task::JoinHandle<Result<(), crate::connector::RunError>>,
        shutdown: &Shutdown,
    ) -> bool {
        tokio::select! {
            joined = &mut *run => match joined {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    self.fail(e.to_string());
                    false
                }
                Err(e) => {
                    self.fail(format!("task failed: {e}"));
                    false
                }
            },
            _ = tokio::time::sleep(shutdown.grace) => {
                // The sink's epoch fences whatever the abandoned batch
                // still does once the connector opens its partitions again.
                self.abandon(run, shutdown);
                true
            }
            _ = shutdown.give_up.cancelled() => {
                self.abandon(run, shutdown);
                true
            }
        }
    }

    fn abandon(
        &self,
        run: &tokio::task::JoinHandle<Result<(), crate::connector::RunError>>,
        shutdown: &Shutdown,
    ) {
        warn!(connector = %self.name, grace_ms = shutdown.grace.as_millis() as u64, "in-flight batch abandoned after the shutdown grace period; it will be read again");
        run.abort();
        self.lock().abandoned = true;
    }

    fn fail(&self, message: String) {
        error!(connector = %self.name, "{message}");
        let e = self.stats.error(&message);
        self.lock().failure = Some(e);
        self.set_state(State::Failed);
    }
}

/// What a running connector's loop turned to.
enum Next {
    /// The run ended by itself: finished or failed.
    Ended,
    /// The process stops or the connector is removed.
    Stop,
    /// `restart` or a changed config: stop, then start again.
    Restart,
}
