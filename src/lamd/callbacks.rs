//! lamd's side of the ranks' checkpoint callbacks (the rank side is [`crate::cr`]).
//!
//! Each rank has a callback socket; a rank that calls `cr::init` says `Hello` on it and is
//! *library-enabled*. Before a dump lamd runs a **round**: `Prepare` to every enabled rank, then it
//! waits (relaying rank output meanwhile, so a callback that prints cannot block) until each one
//! answers `Ready`, bounded by the job's callback timeout. A TEMP_FAILURE, a PERM_FAILURE or the
//! timeout cancels the round: every prepared rank gets `Resume(Cancelled)` and the checkpoint
//! fails cleanly while the job goes on (PERM_FAILURE: that rank then exits, which ends the job).
//! After the dump the ranks get `Resume(Continue)`; after a CRIU restore the ranks that were
//! waiting get `Resume(Restarted)` on their fresh socket.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};

use super::Daemon;
use crate::schema::wire::{Channel, Frame, FromDaemon, FromRank, Resumed, ToRank};
use crate::schema::{Engine, Rank, RankCr};

/// The ranks of a round that is ready to be dumped.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Waiting in `checkpoint()` for `Resume`.
    pub ready: Vec<Rank>,
    /// Asked to be left out (OMIT): not waiting.
    pub omitted: Vec<Rank>,
}

impl Daemon {
    /// Reads a rank's callback socket outside of a round.
    pub(super) fn on_rank_socket(&mut self, rank: Rank) {
        for msg in self.read_rank(rank) {
            self.on_rank_message(rank, msg, None);
        }
    }

    /// Reads every complete message; at EOF the socket is dropped (the rank is gone).
    fn read_rank(&mut self, rank: Rank) -> Vec<FromRank> {
        let Some(slot) = self.ranks.get_mut(&rank) else {
            return Vec::new();
        };
        let Some(fd) = &slot.cr else {
            return Vec::new();
        };
        if slot.cr_out.pending() > 0 {
            let _ = slot.cr_out.flush(fd.as_fd());
        }
        let open = slot.cr_reader.fill(fd.as_fd()).unwrap_or(false);
        let mut msgs = Vec::new();
        loop {
            match slot.cr_reader.next_frame::<FromRank>() {
                Ok(Some(Frame::Message(m))) => msgs.push(m),
                Ok(Some(Frame::Data { .. })) => {}
                Ok(None) => break,
                Err(_) => {
                    // A rank that speaks garbage loses its callbacks, not its place in the job.
                    eprintln!("lamd: rank {rank}: malformed callback message; ignoring its socket");
                    slot.cr = None;
                    slot.cr_enabled = false;
                    return msgs;
                }
            }
        }
        if !open {
            slot.cr = None;
            slot.cr_enabled = false;
        }
        msgs
    }

    /// Handles one message; `round` is the round under way, if any, with its bookkeeping.
    fn on_rank_message(&mut self, rank: Rank, msg: FromRank, round: Option<&mut RoundState>) {
        match msg {
            FromRank::Hello { .. } => {
                if let Some(s) = self.ranks.get_mut(&rank) {
                    s.cr_enabled = true;
                }
            }
            FromRank::RequestCheckpoint => {
                self.launcher
                    .out
                    .push(&FromDaemon::CheckpointRequest { rank });
            }
            FromRank::Ready { round: r, flags } => {
                let Some(st) = round else { return };
                if r != st.round || !st.waiting.remove(&rank) {
                    return; // a late answer to a cancelled round
                }
                let code = flags >> 16;
                match flags & 0xffff {
                    0 => st.prepared.ready.push(rank),
                    4 => st.prepared.omitted.push(rank),
                    2 => {
                        st.prepared.ready.push(rank);
                        st.failure.get_or_insert(format!(
                            "rank {rank} failed the checkpoint permanently \
                             (PERM_FAILURE, code {code}); it ends the job"
                        ));
                    }
                    _ => {
                        st.prepared.ready.push(rank);
                        st.failure.get_or_insert(format!(
                            "rank {rank} cancelled the checkpoint (TEMP_FAILURE, code {code})"
                        ));
                    }
                }
            }
        }
    }

    /// Runs the callbacks of every library-enabled rank and waits until all are ready.
    /// `node_dir` is the node's directory of the checkpoint (state files go there).
    pub(crate) fn prepare_ranks(
        &mut self,
        engine: Engine,
        epoch_dir: &Path,
        node_dir: &str,
        timeout: Duration,
    ) -> Result<Prepared, String> {
        for s in self.ranks.values_mut() {
            s.cr_mark = RankCr::Unaware;
            s.state = None;
        }
        if engine == Engine::SelfState {
            if let Some((rank, _)) = self
                .ranks
                .iter()
                .find(|(_, s)| s.status.is_none() && !s.cr_enabled)
            {
                return Err(format!(
                    "rank {rank} has not initialised the lamcr library \
                     (the self engine needs every running rank to save its state)"
                ));
            }
        }
        self.cr_round += 1;
        let mut st = RoundState {
            round: self.cr_round,
            waiting: BTreeSet::new(),
            prepared: Prepared::default(),
            failure: None,
        };
        let enabled: Vec<Rank> = self
            .ranks
            .iter()
            .filter(|(_, s)| s.status.is_none() && s.cr_enabled && s.cr.is_some())
            .map(|(r, _)| *r)
            .collect();
        for rank in enabled {
            let state_path = (engine == Engine::SelfState).then(|| {
                let rel = crate::engine::self_state::state_file(node_dir, rank);
                epoch_dir.join(rel).display().to_string()
            });
            self.send_rank(
                rank,
                &ToRank::Prepare {
                    round: st.round,
                    engine,
                    state_path,
                    timeout_ms: timeout.as_millis() as u64,
                },
            );
            st.waiting.insert(rank);
        }
        let deadline = Instant::now() + timeout;
        while !st.waiting.is_empty() && st.failure.is_none() {
            if Instant::now() >= deadline {
                let late: Vec<String> = st.waiting.iter().map(|r| r.to_string()).collect();
                st.failure = Some(format!(
                    "rank {} did not reach the checkpoint within {} \
                     (its callbacks or a critical section took longer; see --callback-timeout)",
                    late.join(", rank "),
                    humantime::format_duration(timeout)
                ));
                break;
            }
            self.wait_round_once(&mut st, deadline);
        }
        if let Some(reason) = st.failure {
            let prepared: Vec<Rank> = st
                .prepared
                .ready
                .iter()
                .chain(st.waiting.iter())
                .copied()
                .collect();
            self.resume_ranks(&prepared, Resumed::Cancelled);
            return Err(reason);
        }
        for r in &st.prepared.ready {
            if let Some(s) = self.ranks.get_mut(r) {
                s.cr_mark = RankCr::Ready;
                if engine == Engine::SelfState {
                    s.state = Some(crate::engine::self_state::state_file(node_dir, *r));
                }
            }
        }
        for r in &st.prepared.omitted {
            if let Some(s) = self.ranks.get_mut(r) {
                s.cr_mark = RankCr::Omitted;
            }
        }
        Ok(st.prepared)
    }

    /// One wake-up of the round's wait: answers from ranks, and rank output relayed meanwhile.
    fn wait_round_once(&mut self, st: &mut RoundState, deadline: Instant) {
        #[derive(Clone, Copy)]
        enum Src {
            Rank(Rank),
            Out(Rank, Channel),
            Launcher,
        }
        let mut fds = Vec::new();
        let mut srcs = Vec::new();
        let relay = self.relaying();
        for (rank, slot) in &self.ranks {
            if let (Some(fd), true) = (&slot.cr, st.waiting.contains(rank)) {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                srcs.push(Src::Rank(*rank));
            }
            if relay {
                for (fd, ch) in [
                    (&slot.stdout, Channel::Stdout),
                    (&slot.stderr, Channel::Stderr),
                ] {
                    if let Some(fd) = fd {
                        fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                        srcs.push(Src::Out(*rank, ch));
                    }
                }
            }
        }
        if self.link_pending() > 0 {
            fds.push(PollFd::new(self.launcher.fd.as_fd(), PollFlags::POLLOUT));
            srcs.push(Src::Launcher);
        }
        let timeout = crate::event::timeout_until(Some(deadline), None);
        let Ok(ready) = crate::event::ready(&mut fds, &srcs, timeout) else {
            return;
        };
        drop(fds);
        for (src, _) in ready {
            match src {
                Src::Rank(rank) => {
                    for msg in self.read_rank(rank) {
                        self.on_rank_message(rank, msg, Some(st));
                    }
                    if self.ranks.get(&rank).is_some_and(|s| s.cr.is_none()) {
                        // The rank closed its socket or died: it cannot answer.
                        st.waiting.remove(&rank);
                    }
                }
                Src::Out(rank, ch) => self.relay(rank, ch, false),
                Src::Launcher => {
                    let _ = self.flush_link();
                }
            }
        }
    }

    /// Tells ranks how their `checkpoint()` returns.
    pub(crate) fn resume_ranks(&mut self, ranks: &[Rank], how: Resumed) {
        let round = self.cr_round;
        for r in ranks {
            self.send_rank(*r, &ToRank::Resume { round, how });
        }
    }

    fn send_rank(&mut self, rank: Rank, msg: &ToRank) {
        if let Some(slot) = self.ranks.get_mut(&rank) {
            if let Some(fd) = &slot.cr {
                slot.cr_out.push(msg);
                let _ = slot.cr_out.flush(fd.as_fd());
            }
        }
    }
}

pub(crate) struct RoundState {
    round: u64,
    waiting: BTreeSet<Rank>,
    prepared: Prepared,
    failure: Option<String>,
}
