//! Group commit: writes proposed on this member while one is being
//! committed go into the next Raft entry together (`Command::Batch`).
//! openraft 0.9 appends and syncs every client write on its own before it
//! takes the next, so without this the throughput of many clients is one
//! fsync per write; with it, one fsync per batch. A lone write is proposed
//! as itself, so sequential latency is unchanged.

use std::sync::{Arc, Mutex};

use ferry_raft::{Command, CommandResult, Node, NodeId, Raft};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::oneshot;

/// What proposing one command gives: its result and the entry's index.
pub type Written = Result<(CommandResult, u64), RaftError<NodeId, ClientWriteError<NodeId, Node>>>;

/// Most commands in one entry (bounds the entry's size and apply time).
const MAX_BATCH: usize = 64;

#[derive(Default)]
struct Queue {
    waiting: Vec<(Command, oneshot::Sender<Written>)>,
    /// A task is proposing; it takes what waits when its entry commits.
    proposing: bool,
}

/// Proposes this member's writes to its Raft, batching those that wait.
#[derive(Clone)]
pub struct Batcher {
    raft: Raft,
    queue: Arc<Mutex<Queue>>,
}

fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

impl Batcher {
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn new(raft: Raft) -> Batcher {
        Batcher {
            raft,
            queue: Arc::default(),
        }
    }

    /// Propose `command` (as `Raft::client_write` would, batched with any
    /// others waiting). The proposing runs in a task of its own, so a
    /// caller that gives up does not stall the others.
    pub async fn client_write(&self, command: Command) -> Written {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut queue = lock(&self.queue);
            queue.waiting.push((command, tx));
            !std::mem::replace(&mut queue.proposing, true)
        };
        if start {
            tokio::spawn(self.clone().propose_all());
        }
        match rx.await {
            Ok(written) => written,
            Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
        }
    }

    async fn propose_all(self) {
        loop {
            let batch: Vec<_> = {
                let mut queue = lock(&self.queue);
                let take = queue.waiting.len().min(MAX_BATCH);
                if take == 0 {
                    queue.proposing = false;
                    return;
                }
                queue.waiting.drain(..take).collect()
            };
            self.propose(batch).await;
        }
    }

    async fn propose(&self, mut batch: Vec<(Command, oneshot::Sender<Written>)>) {
        if batch.len() == 1 {
            let (command, tx) = batch.remove(0);
            let written = self.raft.client_write(command).await;
            let _ = tx.send(written.map(|r| (r.data, r.log_id.index)));
            return;
        }
        let (commands, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match self.raft.client_write(Command::Batch(commands)).await {
            Ok(response) => {
                let index = response.log_id.index;
                let results = match response.data {
                    CommandResult::Batch(results) => results,
                    other => vec![other; waiters.len()],
                };
                for (tx, result) in waiters.into_iter().zip(results) {
                    let _ = tx.send(Ok((result, index)));
                }
            }
            Err(e) => {
                for tx in waiters {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ferry_raft::Rejection;

    use super::*;
    use crate::sim::net::{cluster, create, leader, MemNet};

    #[tokio::test]
    async fn writes_that_wait_together_share_an_entry_and_each_gets_its_own_result() {
        let net = MemNet::default();
        let nodes = cluster(&net, 3).await;
        let lead = leader(&nodes, None).await;
        let batcher = Batcher::new(nodes[(lead - 1) as usize].raft.clone());
        // Ten distinct names and one taken twice: the second is refused.
        let mut commands: Vec<Command> = (0..10).map(|i| create(&format!("c{i}"))).collect();
        commands.push(create("c0"));
        let written =
            futures::future::join_all(commands.into_iter().map(|c| batcher.client_write(c))).await;
        let written: Vec<(CommandResult, u64)> =
            written.into_iter().map(|w| w.expect("committed")).collect();
        let indexes: BTreeSet<u64> = written.iter().map(|(_, i)| *i).collect();
        assert!(
            indexes.len() <= 2,
            "eleven writes took {} entries",
            indexes.len()
        );
        for (result, _) in &written[..10] {
            assert_eq!(*result, CommandResult::Done);
        }
        assert!(matches!(
            written[10].0,
            CommandResult::Rejected(Rejection::Instance(_))
        ));
    }
}
