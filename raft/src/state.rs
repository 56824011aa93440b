//! Applying commands to the cluster state.
//!
//! [`ClusterState::apply`] is pure and deterministic: no clock, no
//! randomness, no I/O. Every time it needs comes in the command
//! (`now_ms`, stamped by the proposer), so every replica that applies the
//! same log reaches the same state. A rejected command changes nothing.

use crate::model::{
    ClusterState, Command, CommandResult, HostFacts, JoinToken, Member, NodeId, Rejection,
};

/// The node that bootstraps a cluster always has this id.
pub const BOOTSTRAP_NODE_ID: NodeId = 1;

/// How long a dead (used, revoked or expired) token is kept before a later
/// `CreateToken` prunes it.
pub const DEAD_TOKEN_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// A token's expiry comes from the clock of the member that created it;
/// checked against another member's clock (the signer of a join), it is
/// honoured this long past its expiry, so hosts whose clocks are this far
/// apart still admit a fresh joiner. Against its creator's own clock it
/// expires exactly.
pub const TOKEN_CLOCK_SKEW_MS: u64 = 2 * 60 * 1000;

impl JoinToken {
    /// Whether the token can still admit its member at `now_ms` on the
    /// clock of member `by`.
    pub fn is_valid_at(&self, now_ms: u64, by: NodeId) -> bool {
        !self.used && !self.revoked && !self.expired_at(now_ms, by)
    }

    /// Past its expiry at `now_ms` on the clock of member `by`.
    pub fn expired_at(&self, now_ms: u64, by: NodeId) -> bool {
        let grace = if by == self.created_by {
            0
        } else {
            TOKEN_CLOCK_SKEW_MS
        };
        now_ms >= self.expires_ms.saturating_add(grace)
    }

    /// Whether the token has certainly been dead for more than
    /// [`DEAD_TOKEN_RETENTION_MS`] at `now_ms`.
    ///
    /// The state does not record when a token was used or revoked, but
    /// either can only happen before the token expires (or after it was
    /// already dead), so a token dies at the latest at `expires_ms`: a dead
    /// token is pruned once `now_ms > expires_ms + 24h`.
    fn is_prunable_at(&self, now_ms: u64) -> bool {
        !self.is_valid_at(now_ms, self.created_by)
            && now_ms.saturating_sub(self.expires_ms) > DEAD_TOKEN_RETENTION_MS
    }
}

/// Admin certificates remembered per member.
const MAX_ADMIN_SERIALS: usize = 16;

impl ClusterState {
    /// Apply one committed command. Deterministic; a `Rejected` result
    /// means the state was left untouched.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        if let Command::Once { request, command } = cmd {
            if let Some((_, first)) = self.recent_requests.iter().find(|(r, _)| r == request) {
                return first.clone();
            }
            let result = self.apply(command);
            if self.recent_requests.len() >= crate::model::RECENT_REQUESTS {
                self.recent_requests.pop_front();
            }
            self.recent_requests.push_back((*request, result.clone()));
            return result;
        }
        match self.try_apply(cmd) {
            Ok(result) => result,
            Err(rejection) => CommandResult::Rejected(rejection),
        }
    }

    /// Each command of a group commit, as if alone.
    fn apply_batch(&mut self, commands: &[Command]) -> CommandResult {
        CommandResult::Batch(commands.iter().map(|c| self.apply(c)).collect())
    }

    /// The member with this name, if any.
    pub fn member_by_name(&self, name: &str) -> Option<&Member> {
        self.members.values().find(|m| m.name == name)
    }

    /// Whether the certificate with this hex serial was revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked_serials.iter().any(|s| s == serial)
    }

    /// Every branch validates first and mutates only once nothing can fail,
    /// so an `Err` leaves `self` unchanged.
    fn try_apply(&mut self, cmd: &Command) -> Result<CommandResult, Rejection> {
        match cmd {
            // Reached only for a `Once` nested in another; the outer one
            // already deduplicates.
            Command::Once { command, .. } => self.try_apply(command),
            Command::Barrier => Ok(CommandResult::Done),
            Command::Batch(commands) => Ok(self.apply_batch(commands)),
            #[cfg(feature = "test-hooks")]
            Command::TestFill { instances, jobs } => Ok(self.test_fill(*instances, *jobs)),
            Command::InitCluster { config } => {
                if self.config.voters != 0 {
                    return Err(Rejection::AlreadyInitialised);
                }
                self.config = config.clone();
                // Id 1 belongs to the bootstrap node even before its own
                // AddMember commits: a join racing with it must not get 1.
                self.next_node_id = self.next_node_id.max(BOOTSTRAP_NODE_ID + 1);
                Ok(CommandResult::Done)
            }
            Command::AddMember {
                id,
                name,
                addr,
                cert_serial,
                now_ms,
            } => Ok(self.add_member(*id, name, addr, cert_serial, *now_ms)),
            Command::CreateToken {
                name,
                secret_hash,
                now_ms,
                expires_ms,
                by,
            } => self.create_token(name, secret_hash, (*now_ms, *by), *expires_ms),
            Command::JoinMember {
                name,
                secret_hash,
                addr,
                cert_serial,
                now_ms,
                by,
            } => self.join_member(name, secret_hash, addr, cert_serial, (*now_ms, *by)),
            Command::UpdateFacts { id, facts } => {
                let member = self.members.get_mut(id).ok_or(Rejection::NoMember(*id))?;
                member.facts = Some(HostFacts::clone(facts));
                Ok(CommandResult::Done)
            }
            Command::RemoveMember { id } => {
                let member = self.members.remove(id).ok_or(Rejection::NoMember(*id))?;
                // What it owned is lost with it, visibly; never run elsewhere
                // without its files.
                let owned: Vec<String> = self
                    .instances
                    .values()
                    .filter(|i| i.owner == *id)
                    .map(|i| i.name.clone())
                    .collect();
                for name in &owned {
                    let Some(instance) = self.instances.get_mut(name) else {
                        continue;
                    };
                    instance.observed = crate::instances::ObservedState::Lost;
                    instance.detail = Some(format!(
                        "its owner {} was removed from the cluster; 'ferry delete {}' drops the record",
                        member.name, instance.name
                    ));
                }
                let serials = std::iter::once(member.cert_serial).chain(member.admin_serials);
                for serial in serials {
                    if !self.is_revoked(&serial) {
                        self.revoked_serials.push(serial);
                    }
                }
                self.removed_members.insert(*id);
                Ok(CommandResult::Done)
            }
            Command::RevokeToken { name } => {
                let token = self
                    .tokens
                    .get_mut(name)
                    .ok_or_else(|| Rejection::NoToken(name.clone()))?;
                token.revoked = true;
                Ok(CommandResult::Done)
            }
            Command::RecordAdminCert { id, serial } => self.record_admin_cert(*id, serial),
            Command::Instance(cmd) => Ok(self.apply_instance(cmd)?),
            Command::Job(cmd) => Ok(self.apply_job(cmd)?),
            Command::Host(cmd) => self.apply_host(cmd),
        }
    }

    fn record_admin_cert(&mut self, id: NodeId, serial: &str) -> Result<CommandResult, Rejection> {
        let member = self.members.get_mut(&id).ok_or(Rejection::NoMember(id))?;
        if !member.admin_serials.iter().any(|s| s == serial) {
            // One per data dir is the usual; the list stays bounded.
            if member.admin_serials.len() >= MAX_ADMIN_SERIALS {
                member.admin_serials.remove(0);
            }
            member.admin_serials.push(serial.to_string());
        }
        Ok(CommandResult::Done)
    }

    fn add_member(
        &mut self,
        id: NodeId,
        name: &str,
        addr: &str,
        cert_serial: &str,
        now_ms: u64,
    ) -> CommandResult {
        let facts = self.members.get(&id).and_then(|m| m.facts.clone());
        let member = Member::online(id, name, addr, cert_serial, now_ms);
        self.members.insert(id, Member { facts, ..member });
        self.next_node_id = self.next_node_id.max(id.saturating_add(1));
        CommandResult::Done
    }

    /// `now`: the time and the member whose clock it is.
    fn create_token(
        &mut self,
        name: &str,
        secret_hash: &str,
        (now_ms, by): (u64, NodeId),
        expires_ms: u64,
    ) -> Result<CommandResult, Rejection> {
        if self.member_by_name(name).is_some() {
            return Err(Rejection::NameTaken(name.to_string()));
        }
        if let Some(existing) = self.tokens.get(name).filter(|t| t.is_valid_at(now_ms, by)) {
            // The same secret is the same request committed twice
            // (a forward retried after a lost reply): done already.
            if existing.secret_hash == secret_hash {
                return Ok(CommandResult::Done);
            }
            return Err(Rejection::TokenExists(name.to_string()));
        }
        let dead: Vec<String> = self
            .tokens
            .values()
            .filter(|t| t.is_prunable_at(now_ms))
            .map(|t| t.name.clone())
            .collect();
        for name in &dead {
            self.tokens.remove(name);
        }
        self.tokens.insert(
            name.to_string(),
            JoinToken {
                name: name.to_string(),
                secret_hash: secret_hash.to_string(),
                created_ms: now_ms,
                expires_ms,
                created_by: by,
                used: false,
                revoked: false,
            },
        );
        Ok(CommandResult::Done)
    }

    /// Whether a join of `name` with a secret of this hash would be taken
    /// at `now_ms` on the clock of member `by`: the token exists for that
    /// name, is unused, unrevoked and unexpired, and the secret matches.
    /// Apply checks it; members check it before signing anything.
    pub fn check_join(
        &self,
        name: &str,
        secret_hash: &str,
        (now_ms, by): (u64, NodeId),
    ) -> Result<(), Rejection> {
        if self.member_by_name(name).is_some() {
            return Err(Rejection::NameTaken(name.to_string()));
        }
        let token = self
            .tokens
            .get(name)
            .ok_or_else(|| Rejection::NoToken(name.to_string()))?;
        if token.revoked {
            return Err(Rejection::TokenRevoked(name.to_string()));
        }
        if token.used {
            return Err(Rejection::TokenUsed(name.to_string()));
        }
        if token.expired_at(now_ms, by) {
            return Err(Rejection::TokenExpired(name.to_string()));
        }
        if token.secret_hash != secret_hash {
            return Err(Rejection::TokenMismatch(name.to_string()));
        }
        Ok(())
    }

    fn join_member(
        &mut self,
        name: &str,
        secret_hash: &str,
        addr: &str,
        cert_serial: &str,
        (now_ms, by): (u64, NodeId),
    ) -> Result<CommandResult, Rejection> {
        self.check_join(name, secret_hash, (now_ms, by))?;
        // Validated: from here on nothing fails.
        if let Some(token) = self.tokens.get_mut(name) {
            token.used = true;
        }
        // Never the bootstrap node's id, even if this commits
        // before the bootstrap records do.
        let id: NodeId = self.next_node_id.max(BOOTSTRAP_NODE_ID + 1);
        self.next_node_id = id.saturating_add(1);
        let member = Member::online(id, name, addr, cert_serial, now_ms);
        self.members.insert(id, member);
        Ok(CommandResult::Joined { id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterConfig, MemberState};

    const HOUR: u64 = 60 * 60 * 1000;
    const T0: u64 = 1_700_000_000_000;

    fn config() -> ClusterConfig {
        ClusterConfig {
            voters: 3,
            ca_fingerprint: "ab".repeat(32),
            subnet: None,
            job_history: 0,
        }
    }

    fn init() -> Command {
        Command::InitCluster { config: config() }
    }

    fn add(id: NodeId, name: &str) -> Command {
        Command::AddMember {
            id,
            name: name.into(),
            addr: format!("10.0.0.{id}:7000"),
            cert_serial: format!("serial-{name}"),
            now_ms: T0,
        }
    }

    fn token(name: &str, secret: &str, now_ms: u64, expires_ms: u64) -> Command {
        Command::CreateToken {
            name: name.into(),
            secret_hash: secret.into(),
            now_ms,
            expires_ms,
            by: BOOTSTRAP_NODE_ID,
        }
    }

    /// A join signed on the clock of the token's creator.
    fn join(name: &str, secret: &str, now_ms: u64) -> Command {
        join_signed_by(name, secret, now_ms, BOOTSTRAP_NODE_ID)
    }

    fn join_signed_by(name: &str, secret: &str, now_ms: u64, by: NodeId) -> Command {
        Command::JoinMember {
            name: name.into(),
            secret_hash: secret.into(),
            addr: format!("{name}:7000"),
            cert_serial: format!("serial-{name}"),
            now_ms,
            by,
        }
    }

    fn facts() -> HostFacts {
        HostFacts {
            arch: "x86_64".into(),
            cpu_model: "test cpu".into(),
            cpu_flags: vec!["avx2".into(), "sse4_2".into()],
            kernel: "6.8.0".into(),
            memory_total_bytes: 1 << 34,
            ..Default::default()
        }
    }

    /// A bootstrapped cluster (node 1 "alpha") with a token for "beta"
    /// valid from T0 for one hour, secret "s3cret".
    fn bootstrapped() -> ClusterState {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&init()), CommandResult::Done);
        assert_eq!(s.apply(&add(1, "alpha")), CommandResult::Done);
        assert_eq!(
            s.apply(&token("beta", "s3cret", T0, T0 + HOUR)),
            CommandResult::Done
        );
        s
    }

    /// Apply `cmd`, assert it is rejected with `want`, and that the state
    /// did not change at all.
    fn assert_rejected_unchanged(s: &mut ClusterState, cmd: &Command, want: Rejection) {
        let before = s.clone();
        assert_eq!(s.apply(cmd), CommandResult::Rejected(want));
        assert_eq!(*s, before, "a rejected command changed the state");
    }

    #[test]
    fn removing_a_member_revokes_its_node_and_admin_certificates() {
        let mut s = ClusterState::default();
        s.apply(&Command::AddMember {
            id: 2,
            name: "n2".into(),
            addr: "127.0.0.1:2".into(),
            cert_serial: "aa".into(),
            now_ms: 1,
        });
        let record = Command::RecordAdminCert {
            id: 2,
            serial: "bb".into(),
        };
        assert_eq!(s.apply(&record), CommandResult::Done);
        s.apply(&record);
        assert_eq!(s.members[&2].admin_serials, ["bb"], "recorded once");
        s.apply(&Command::RemoveMember { id: 2 });
        assert!(s.is_revoked("aa") && s.is_revoked("bb"));
    }

    #[test]
    fn init_reserves_id_one_for_the_bootstrap_node() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&init()), CommandResult::Done);
        assert_eq!(s.config, config());
        assert_eq!(s.next_node_id, 2);
    }

    #[test]
    fn a_join_racing_the_bootstrap_member_record_does_not_take_its_id() {
        let mut s = ClusterState::default();
        s.apply(&init());
        s.apply(&token("n2", "secret", 0, 1_000));
        assert_eq!(
            s.apply(&join("n2", "secret", 10)),
            CommandResult::Joined { id: 2 }
        );
        assert_eq!(s.apply(&add(1, "n1")), CommandResult::Done);
        assert_eq!(s.members.len(), 2);
    }

    #[test]
    fn init_twice_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        let other = Command::InitCluster {
            config: ClusterConfig {
                voters: 5,
                ca_fingerprint: "cd".into(),
                subnet: None,
                job_history: 0,
            },
        };
        assert_rejected_unchanged(&mut s, &other, Rejection::AlreadyInitialised);
    }

    #[test]
    fn add_member_advances_next_node_id_and_keeps_facts_on_replace() {
        let mut s = bootstrapped();
        assert_eq!(s.next_node_id, 2);
        s.apply(&Command::UpdateFacts {
            id: 1,
            facts: facts(),
        });
        s.apply(&Command::AddMember {
            id: 1,
            name: "alpha".into(),
            addr: "10.9.9.9:7000".into(),
            cert_serial: "serial-alpha-2".into(),
            now_ms: T0 + 5,
        });
        let m = &s.members[&1];
        assert_eq!(m.addr, "10.9.9.9:7000");
        assert_eq!(m.facts, Some(facts()));
        assert_eq!(m.state, MemberState::Online);

        s.apply(&add(7, "gamma"));
        assert_eq!(s.next_node_id, 8);
        assert_eq!(s.members[&7].facts, None);
        // A lower id does not move next_node_id back.
        s.apply(&add(3, "delta"));
        assert_eq!(s.next_node_id, 8);
    }

    #[test]
    fn join_with_valid_token_allocates_next_id_and_consumes_token() {
        let mut s = bootstrapped();
        assert_eq!(
            s.apply(&join("beta", "s3cret", T0 + 1)),
            CommandResult::Joined { id: 2 }
        );
        assert_eq!(s.next_node_id, 3);
        let m = s.member_by_name("beta").expect("beta joined");
        assert_eq!(m.id, 2);
        assert_eq!(m.addr, "beta:7000");
        assert_eq!(m.cert_serial, "serial-beta");
        assert_eq!(m.joined_ms, T0 + 1);
        assert_eq!(m.state, MemberState::Online);
        assert!(s.tokens["beta"].used);
    }

    #[test]
    fn a_join_before_any_bootstrap_record_never_takes_the_bootstrap_id() {
        let mut s = ClusterState::default();
        s.apply(&token("solo", "x", T0, T0 + HOUR));
        assert_eq!(
            s.apply(&join("solo", "x", T0)),
            CommandResult::Joined { id: 2 }
        );
        assert_eq!(s.next_node_id, 3);
    }

    #[test]
    fn join_with_taken_name_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        // A token for "alpha" cannot be created (name taken), so plant one
        // directly to prove the name check comes first.
        s.tokens.insert(
            "alpha".into(),
            JoinToken {
                name: "alpha".into(),
                secret_hash: "x".into(),
                created_ms: T0,
                expires_ms: T0 + HOUR,
                created_by: BOOTSTRAP_NODE_ID,
                used: false,
                revoked: false,
            },
        );
        assert_rejected_unchanged(
            &mut s,
            &join("alpha", "x", T0),
            Rejection::NameTaken("alpha".into()),
        );
    }

    #[test]
    fn join_without_token_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &join("gamma", "s3cret", T0),
            Rejection::NoToken("gamma".into()),
        );
    }

    #[test]
    fn join_with_revoked_token_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_eq!(
            s.apply(&Command::RevokeToken {
                name: "beta".into()
            }),
            CommandResult::Done
        );
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "s3cret", T0 + 1),
            Rejection::TokenRevoked("beta".into()),
        );
    }

    #[test]
    fn join_with_used_token_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_eq!(
            s.apply(&join("beta", "s3cret", T0 + 1)),
            CommandResult::Joined { id: 2 }
        );
        // Remove the member so the name is free again: the token stays used.
        assert_eq!(
            s.apply(&Command::RemoveMember { id: 2 }),
            CommandResult::Done
        );
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "s3cret", T0 + 2),
            Rejection::TokenUsed("beta".into()),
        );
    }

    #[test]
    fn join_with_expired_token_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "s3cret", T0 + 2 * HOUR),
            Rejection::TokenExpired("beta".into()),
        );
    }

    #[test]
    fn join_with_wrong_secret_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "wrong", T0 + 1),
            Rejection::TokenMismatch("beta".into()),
        );
    }

    #[test]
    fn a_signer_other_than_the_creator_has_the_stated_clock_skew_of_grace() {
        let mut s = bootstrapped();
        // Another member's clock may run up to the skew ahead of the
        // creator's: it still admits, and at expires_ms + skew no longer.
        let expires = T0 + HOUR + TOKEN_CLOCK_SKEW_MS;
        assert_rejected_unchanged(
            &mut s,
            &join_signed_by("beta", "s3cret", expires, 2),
            Rejection::TokenExpired("beta".into()),
        );
        assert_eq!(
            s.apply(&join_signed_by("beta", "s3cret", expires - 1, 2)),
            CommandResult::Joined { id: 2 }
        );
    }

    #[test]
    fn token_expiry_boundary_last_valid_millisecond_is_before_expires_ms() {
        let mut s = bootstrapped();
        // On its creator's own clock the token expires exactly.
        let expires = T0 + HOUR;
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "s3cret", expires),
            Rejection::TokenExpired("beta".into()),
        );
        // One millisecond before, it admits.
        assert_eq!(
            s.apply(&join("beta", "s3cret", expires - 1)),
            CommandResult::Joined { id: 2 }
        );
    }

    #[test]
    fn join_rejections_are_checked_in_documented_order() {
        // Revoked + used + expired + wrong secret: revoked wins.
        let mut s = bootstrapped();
        let t = s.tokens.get_mut("beta").unwrap();
        t.revoked = true;
        t.used = true;
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "wrong", T0 + 2 * HOUR),
            Rejection::TokenRevoked("beta".into()),
        );
        // Used + expired + wrong secret: used wins.
        s.tokens.get_mut("beta").unwrap().revoked = false;
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "wrong", T0 + 2 * HOUR),
            Rejection::TokenUsed("beta".into()),
        );
        // Expired + wrong secret: expired wins.
        s.tokens.get_mut("beta").unwrap().used = false;
        assert_rejected_unchanged(
            &mut s,
            &join("beta", "wrong", T0 + 2 * HOUR),
            Rejection::TokenExpired("beta".into()),
        );
    }

    #[test]
    fn create_token_for_member_name_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &token("alpha", "x", T0, T0 + HOUR),
            Rejection::NameTaken("alpha".into()),
        );
    }

    #[test]
    fn create_token_while_one_is_valid_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &token("beta", "other", T0 + 1, T0 + 2 * HOUR),
            Rejection::TokenExists("beta".into()),
        );
    }

    #[test]
    fn create_token_committed_twice_is_done_and_keeps_the_first() {
        let mut s = bootstrapped();
        let before = s.tokens.get("beta").cloned();
        // Same secret as the committed token: the duplicate of a retry.
        let again = token("beta", "s3cret", T0 + 1, T0 + 2 * HOUR);
        assert_eq!(s.apply(&again), CommandResult::Done);
        assert_eq!(s.tokens.get("beta").cloned(), before);
    }

    #[test]
    fn a_request_applied_twice_returns_its_first_result_and_changes_nothing() {
        let mut s = bootstrapped();
        let once = |command: Command| Command::Once {
            request: 42,
            command: Box::new(command),
        };
        let first = s.apply(&once(token("gamma", "x", T0, T0 + HOUR)));
        assert_eq!(first, CommandResult::Done);
        let after_first = s.clone();
        // The retry, even after other writes, is not applied again.
        s.apply(&token("delta", "y", T0, T0 + HOUR));
        let mut expected = s.clone();
        assert_eq!(s.apply(&once(token("gamma", "x", T0, T0 + HOUR))), first);
        assert_eq!(s, expected);
        assert!(after_first.tokens.contains_key("gamma"));
        // A rejected request stays rejected on retry.
        let rejected = Command::Once {
            request: 7,
            command: Box::new(token("alpha", "z", T0, T0 + HOUR)),
        };
        let first = s.apply(&rejected);
        assert!(matches!(first, CommandResult::Rejected(_)));
        expected = s.clone();
        assert_eq!(s.apply(&rejected), first);
        assert_eq!(s, expected);
    }

    #[test]
    fn a_batch_applies_each_command_as_if_alone_and_answers_each() {
        let mut alone = bootstrapped();
        let once = |request, command| Command::Once {
            request,
            command: Box::new(command),
        };
        let commands = vec![
            once(1, token("gamma", "x", T0, T0 + HOUR)),
            // A member's name: refused, and changes nothing.
            once(2, token("alpha", "z", T0, T0 + HOUR)),
            // A retry of request 1 inside the same batch: its first result.
            once(1, token("gamma", "x", T0, T0 + HOUR)),
            once(3, token("delta", "y", T0, T0 + HOUR)),
        ];
        let want: Vec<CommandResult> = commands.iter().map(|c| alone.apply(c)).collect();
        let mut batched = bootstrapped();
        let got = batched.apply(&Command::Batch(commands));
        assert_eq!(got, CommandResult::Batch(want));
        assert_eq!(batched, alone);
        assert!(batched.tokens.contains_key("gamma") && batched.tokens.contains_key("delta"));
    }

    #[test]
    fn recent_requests_are_bounded() {
        let mut s = bootstrapped();
        for request in 0..(crate::model::RECENT_REQUESTS as u64 + 10) {
            s.apply(&Command::Once {
                request,
                command: Box::new(Command::RevokeToken {
                    name: "nobody".into(),
                }),
            });
        }
        assert_eq!(s.recent_requests.len(), crate::model::RECENT_REQUESTS);
    }

    #[test]
    fn create_token_replaces_a_dead_token() {
        for kill in ["revoke", "expire", "use"] {
            let mut s = bootstrapped();
            let now = match kill {
                "revoke" => {
                    s.apply(&Command::RevokeToken {
                        name: "beta".into(),
                    });
                    T0 + 1
                }
                "use" => {
                    s.apply(&join("beta", "s3cret", T0 + 1));
                    s.apply(&Command::RemoveMember { id: 2 });
                    T0 + 2
                }
                _ => T0 + HOUR,
            };
            assert_eq!(
                s.apply(&token("beta", "fresh", now, now + HOUR)),
                CommandResult::Done,
                "{kill}"
            );
            let t = &s.tokens["beta"];
            assert_eq!(t.secret_hash, "fresh", "{kill}");
            assert!(!t.used && !t.revoked, "{kill}");
            assert_eq!(t.created_ms, now, "{kill}");
        }
    }

    #[test]
    fn create_token_prunes_tokens_dead_for_more_than_a_day() {
        let mut s = bootstrapped();
        s.apply(&token("old-expired", "x", T0, T0 + HOUR));
        s.apply(&token("old-revoked", "x", T0, T0 + HOUR));
        s.apply(&Command::RevokeToken {
            name: "old-revoked".into(),
        });
        s.apply(&token("still-valid", "x", T0, T0 + 30 * HOUR));
        // Exactly 24h after expiry: not yet "more than" 24h.
        let boundary = T0 + HOUR + DEAD_TOKEN_RETENTION_MS;
        s.apply(&token("probe1", "x", boundary, boundary + HOUR));
        assert!(s.tokens.contains_key("old-expired"));
        assert!(s.tokens.contains_key("old-revoked"));
        // One millisecond later both dead tokens (and "beta", expired too)
        // are pruned; the valid one stays.
        s.apply(&token("probe2", "x", boundary + 1, boundary + HOUR));
        assert!(!s.tokens.contains_key("old-expired"));
        assert!(!s.tokens.contains_key("old-revoked"));
        assert!(!s.tokens.contains_key("beta"));
        assert!(s.tokens.contains_key("still-valid"));
        assert!(s.tokens.contains_key("probe1"));
        assert!(s.tokens.contains_key("probe2"));
    }

    #[test]
    fn update_facts_sets_facts_of_known_member() {
        let mut s = bootstrapped();
        assert_eq!(
            s.apply(&Command::UpdateFacts {
                id: 1,
                facts: facts()
            }),
            CommandResult::Done
        );
        assert_eq!(s.members[&1].facts, Some(facts()));
    }

    #[test]
    fn update_facts_of_unknown_member_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &Command::UpdateFacts {
                id: 42,
                facts: facts(),
            },
            Rejection::NoMember(42),
        );
    }

    #[test]
    fn remove_member_revokes_its_certificate_once() {
        let mut s = bootstrapped();
        assert_eq!(
            s.apply(&Command::RemoveMember { id: 1 }),
            CommandResult::Done
        );
        assert!(s.members.is_empty());
        assert!(s.is_revoked("serial-alpha"));
        assert!(!s.is_revoked("serial-beta"));
        // Re-adding with the same serial and removing again does not
        // duplicate the revocation.
        s.apply(&add(1, "alpha"));
        s.apply(&Command::RemoveMember { id: 1 });
        assert_eq!(s.revoked_serials, vec!["serial-alpha".to_string()]);
    }

    #[test]
    fn remove_unknown_member_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &Command::RemoveMember { id: 9 },
            Rejection::NoMember(9),
        );
    }

    #[test]
    fn revoke_missing_token_is_rejected_and_changes_nothing() {
        let mut s = bootstrapped();
        assert_rejected_unchanged(
            &mut s,
            &Command::RevokeToken {
                name: "nobody".into(),
            },
            Rejection::NoToken("nobody".into()),
        );
    }

    #[test]
    fn member_by_name_finds_members_and_only_members() {
        let s = bootstrapped();
        assert_eq!(s.member_by_name("alpha").map(|m| m.id), Some(1));
        assert!(s.member_by_name("beta").is_none());
    }

    #[test]
    fn apply_is_deterministic_for_same_log() {
        let log = vec![
            init(),
            add(1, "alpha"),
            token("beta", "s", T0, T0 + HOUR),
            token("gamma", "g", T0, T0 + HOUR),
            join("beta", "s", T0 + 10),
            join("gamma", "wrong", T0 + 11),
            join("gamma", "g", T0 + 12),
            Command::UpdateFacts {
                id: 2,
                facts: facts(),
            },
            Command::RevokeToken {
                name: "beta".into(),
            },
            Command::RemoveMember { id: 3 },
            token(
                "delta",
                "d",
                T0 + 2 * DEAD_TOKEN_RETENTION_MS,
                T0 + 3 * HOUR,
            ),
            init(),
        ];
        let mut a = ClusterState::default();
        let mut b = ClusterState::default();
        let ra: Vec<_> = log.iter().map(|c| a.apply(c)).collect();
        let rb: Vec<_> = log.iter().map(|c| b.apply(c)).collect();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert_eq!(ra[6], CommandResult::Joined { id: 3 });
        assert_eq!(
            ra[5],
            CommandResult::Rejected(Rejection::TokenMismatch("gamma".into()))
        );
        assert_eq!(
            ra[11],
            CommandResult::Rejected(Rejection::AlreadyInitialised)
        );
        assert!(a.is_revoked("serial-gamma"));
    }
}
