//! What the scheduler knows: announced hosts, tasks and the peers downloading them, and
//! the choice of parents. Synchronous and free of I/O, so that every rule is tested
//! without a network; [`super::service`] drives it from the gRPC streams.
//!
//! Choosing parents for a child peer, among the peers of its task:
//! - only peers that are downloading (`Running`, `BackToSource`) or done (`Succeeded`),
//!   on an announced host that shares and is alive (announced within three of its
//!   announce intervals, at least [`MIN_LIVENESS`]), and never the child's own host;
//! - never a peer the child reported failing (a failed piece naming it, or a
//!   reschedule listing it);
//! - never a peer that descends from the child through parents handed out before (that
//!   would be a cycle: pieces going round and none arriving);
//! - ranked by: seed peers first, then how much of the task a peer has, scaled by the
//!   free share of its upload bandwidth (from `AnnounceHost`) and divided by the
//!   uploads it is already serving through this scheduler;
//! - at most `limit` of them.

use dragonfly_api::common::v2::{Host, Peer, Piece, Task};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// A host that announced itself within this long is alive, whatever its interval.
pub const MIN_LIVENESS: Duration = Duration::from_secs(10);

/// Where a peer is in its download.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerState {
    /// Registered, not started.
    Pending,
    /// Downloading from parents.
    Running,
    /// Downloading from the origin.
    BackToSource,
    /// Has the whole task.
    Succeeded,
    /// Gave up, or its stream ended before it finished.
    Failed,
}

impl PeerState {
    /// Every state, for metrics.
    pub const ALL: [PeerState; 5] = [
        PeerState::Pending,
        PeerState::Running,
        PeerState::BackToSource,
        PeerState::Succeeded,
        PeerState::Failed,
    ];

    /// The name Dragonfly uses for the state.
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Pending => "Pending",
            PeerState::Running => "Running",
            PeerState::BackToSource => "BackToSource",
            PeerState::Succeeded => "Succeeded",
            PeerState::Failed => "Failed",
        }
    }

    /// Whether a peer in this state can serve pieces to others.
    pub fn can_serve(self) -> bool {
        matches!(
            self,
            PeerState::Running | PeerState::BackToSource | PeerState::Succeeded
        )
    }
}

/// One announced host.
#[derive(Clone, Debug)]
pub struct HostEntry {
    /// As announced.
    pub host: Host,
    /// When it was last announced.
    pub announced: Instant,
    /// The interval it announces itself at, if it said.
    pub interval: Option<Duration>,
}

impl HostEntry {
    /// Seed peers announce a non-zero host type (1 = super seed, 2 = strong, 3 = weak).
    pub fn is_seed(&self) -> bool {
        self.host.r#type != 0
    }

    /// Whether it announced itself recently enough to be taken as running: within
    /// three of its intervals, and at least [`MIN_LIVENESS`].
    pub fn is_alive(&self) -> bool {
        let window = self.interval.map_or(MIN_LIVENESS, |i| {
            i.min(MAX_ANNOUNCE_INTERVAL)
                .saturating_mul(3)
                .max(MIN_LIVENESS)
        });
        self.announced.elapsed() <= window
    }

    /// The free share (0..=1) of its upload bandwidth, 1 when it does not say.
    fn free_tx_share(&self) -> f64 {
        match &self.host.network {
            Some(n) if n.max_tx_bandwidth > 0 => {
                let used = n.tx_bandwidth.unwrap_or(0).min(n.max_tx_bandwidth);
                (n.max_tx_bandwidth - used) as f64 / n.max_tx_bandwidth as f64
            }
            _ => 1.0,
        }
    }
}

/// One peer: one host downloading one task.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Its host.
    pub host_id: String,
    /// Where it is.
    pub state: PeerState,
    /// Numbers of the pieces it has.
    pub pieces: HashSet<u32>,
    /// Parents handed to it, latest answer last (ids of peers of the same task).
    pub parents: Vec<String>,
    /// Parents it reported failing.
    pub failed_parents: HashSet<String>,
    /// Answers sent on its stream.
    pub answers: u32,
    /// Whether the entry was learnt from a host after a restart, not registered.
    pub restored: bool,
    /// Whether its download asked for the origin (`need_back_to_source`).
    pub need_back_to_source: bool,
}

/// At most this many failing parents are remembered per peer.
pub const MAX_FAILED_PARENTS: usize = 1024;
/// At most this many piece numbers are remembered per peer (64 TiB of 64 MiB pieces).
pub const MAX_PIECES: usize = 1 << 20;
/// The longest announce interval taken from a host (a longer one counts as this).
pub const MAX_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// One task (a blob) and its peers.
#[derive(Clone, Debug, Default)]
pub struct TaskEntry {
    /// Peers by id.
    pub peers: HashMap<String, PeerEntry>,
    /// The download as the first peer registered it (what a seed is asked to fetch).
    pub download: Option<dragonfly_api::common::v2::Download>,
    /// Content length, once a peer knows it.
    pub content_length: Option<u64>,
    /// Number of pieces, once a peer knows it.
    pub piece_count: Option<u32>,
    /// Pieces fetched from the origin by seed peers, with the digest they reported.
    pub origin_pieces: BTreeMap<u32, Piece>,
    /// When a seed was last asked to fetch the task.
    pub seed_triggered: Option<Instant>,
    /// Ordinary peers sent back to the origin.
    pub back_to_source_peers: u32,
    /// When triggering a seed peer last failed or timed out.
    pub seed_failed: Option<Instant>,
    /// Whether the announced hosts were asked if they hold the task.
    pub probed: bool,
    /// Whether they are being asked now (other children wait for the answer).
    pub probing: bool,
}

/// Why a message cannot be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    /// A host, task or peer that is not known.
    NotFound(String),
    /// A message that does not fit where the stream is.
    FailedPrecondition(String),
}

/// The scheduler's whole model.
#[derive(Debug, Default)]
pub struct State {
    /// Hosts by id.
    pub hosts: HashMap<String, HostEntry>,
    /// Tasks by id.
    pub tasks: HashMap<String, TaskEntry>,
    /// Seed hosts that could not be triggered, and when: not picked again for
    /// [`SEED_FAILURE_MEMORY`].
    pub failed_seeds: HashMap<String, Instant>,
}

/// How long a seed peer that could not be triggered is not picked again.
pub const SEED_FAILURE_MEMORY: Duration = Duration::from_secs(60);

impl State {
    /// Records (or refreshes) a host.
    pub fn announce_host(&mut self, host: Host) {
        self.announce_host_every(host, None);
    }

    /// Records (or refreshes) a host that announces itself every `interval`.
    pub fn announce_host_every(&mut self, host: Host, interval: Option<Duration>) {
        // A seed that announces itself again (back after a restart) may be triggered.
        self.failed_seeds.remove(&host.id);
        self.hosts.insert(
            host.id.clone(),
            HostEntry {
                host,
                announced: Instant::now(),
                interval: interval.map(|i| i.min(MAX_ANNOUNCE_INTERVAL)),
            },
        );
    }

    /// Forgets hosts not announced for `host_ttl` (with their peers), failed peers,
    /// and tasks left without peers; returns how many hosts and peers went.
    pub fn collect_garbage(&mut self, host_ttl: Duration) -> (usize, usize) {
        let stale: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.announced.elapsed() > host_ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            self.hosts.remove(id);
        }
        let mut peers = 0;
        for task in self.tasks.values_mut() {
            let before = task.peers.len();
            task.peers
                .retain(|_, p| p.state != PeerState::Failed && !stale.contains(&p.host_id));
            peers += before - task.peers.len();
        }
        self.tasks.retain(|_, t| !t.peers.is_empty());
        (stale.len(), peers)
    }

    /// Forgets a host and its peers.
    pub fn delete_host(&mut self, host_id: &str) -> Result<(), StateError> {
        if self.hosts.remove(host_id).is_none() {
            return Err(StateError::NotFound(format!("host {host_id}")));
        }
        for task in self.tasks.values_mut() {
            task.peers.retain(|_, p| p.host_id != host_id);
        }
        self.tasks.retain(|_, t| !t.peers.is_empty());
        Ok(())
    }

    /// Whether any announced host that is alive is a seed peer.
    pub fn has_seed_host(&self) -> bool {
        self.hosts.values().any(|h| h.is_seed() && h.is_alive())
    }

    /// Adds a peer for a registration.
    pub fn register(
        &mut self,
        host_id: &str,
        task_id: &str,
        peer_id: &str,
        download: &dragonfly_api::common::v2::Download,
    ) -> Result<(), StateError> {
        if !self.hosts.contains_key(host_id) {
            return Err(StateError::FailedPrecondition(format!(
                "host {host_id} was never announced (AnnounceHost comes first)"
            )));
        }
        let task = self.tasks.entry(task_id.to_string()).or_default();
        if let Some(p) = task.peers.get(peer_id) {
            if !p.restored {
                return Err(StateError::FailedPrecondition(format!(
                    "peer {peer_id} is already registered for task {task_id}"
                )));
            }
        }
        if task.download.is_none() {
            task.download = Some(download.clone());
        }
        if task.content_length.is_none() {
            task.content_length = download.actual_content_length;
        }
        if task.piece_count.is_none() {
            task.piece_count = download
                .actual_piece_count
                .map(|n| n.min(u32::MAX as u64) as u32);
        }
        task.peers.insert(
            peer_id.to_string(),
            PeerEntry {
                host_id: host_id.to_string(),
                state: PeerState::Pending,
                pieces: HashSet::new(),
                parents: Vec::new(),
                failed_parents: HashSet::new(),
                answers: 0,
                restored: false,
                need_back_to_source: download.need_back_to_source,
            },
        );
        Ok(())
    }

    /// The peer of a stream message, which must have registered.
    pub fn peer_mut(&mut self, task_id: &str, peer_id: &str) -> Result<&mut PeerEntry, StateError> {
        self.tasks
            .get_mut(task_id)
            .and_then(|t| t.peers.get_mut(peer_id))
            .ok_or_else(|| {
                StateError::FailedPrecondition(format!(
                    "peer {peer_id} of task {task_id} has not registered \
                     (RegisterPeerRequest comes first)"
                ))
            })
    }

    /// The peers that descend from `ancestor` through parents handed out to peers
    /// still downloading from parents (a finished peer, or one fetching from the
    /// origin, takes nothing from its old parents: it cannot close a cycle).
    fn descendants<'a>(task: &'a TaskEntry, ancestor: &'a str) -> HashSet<&'a str> {
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, p) in &task.peers {
            if matches!(p.state, PeerState::Pending | PeerState::Running) {
                for parent in &p.parents {
                    children
                        .entry(parent.as_str())
                        .or_default()
                        .push(id.as_str());
                }
            }
        }
        let mut seen = HashSet::new();
        let mut todo = vec![ancestor];
        while let Some(p) = todo.pop() {
            for c in children.get(p).into_iter().flatten() {
                if seen.insert(*c) {
                    todo.push(c);
                }
            }
        }
        seen
    }

    /// Uploads each host is serving: running children that were handed one of its
    /// peers as a parent, over all tasks.
    fn uploads(&self) -> HashMap<&str, u32> {
        let mut out: HashMap<&str, u32> = HashMap::new();
        for task in self.tasks.values() {
            for child in task.peers.values() {
                if child.state != PeerState::Running {
                    continue;
                }
                for parent in &child.parents {
                    if let Some(p) = task.peers.get(parent) {
                        *out.entry(p.host_id.as_str()).or_default() += 1;
                    }
                }
            }
        }
        out
    }

    /// Up to `limit` parents for `child` of `task_id`, best first (module docs).
    pub fn candidates(&self, task_id: &str, child: &str, limit: usize) -> Vec<String> {
        let Some(task) = self.tasks.get(task_id) else {
            return Vec::new();
        };
        let Some(me) = task.peers.get(child) else {
            return Vec::new();
        };
        let uploads = self.uploads();
        let below = Self::descendants(task, child);
        let piece_count = task.piece_count.unwrap_or(0).max(1) as f64;
        let mut scored: Vec<(f64, &String, &str)> = Vec::new();
        for (id, p) in &task.peers {
            if id == child || p.host_id == me.host_id || !p.state.can_serve() {
                continue;
            }
            if me.failed_parents.contains(id) || below.contains(id.as_str()) {
                continue;
            }
            let Some(host) = self.hosts.get(&p.host_id) else {
                continue;
            };
            if host.host.disable_shared || !host.is_alive() {
                continue;
            }
            let have = if p.state == PeerState::Succeeded {
                1.0
            } else {
                (p.pieces.len() as f64 / piece_count).min(1.0) * 0.9
            };
            let seed = if host.is_seed() { 2.0 } else { 0.0 };
            let load = 1.0 + *uploads.get(p.host_id.as_str()).unwrap_or(&0) as f64;
            let score = (1.0 + seed + have) * (0.5 + 0.5 * host.free_tx_share()) / load;
            scored.push((score, id, p.host_id.as_str()));
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        // One peer per host (a host with several downloads of the task, e.g. ranges,
        // is one parent).
        let mut hosts = HashSet::new();
        scored
            .into_iter()
            .filter(|(_, _, host)| hosts.insert(*host))
            .take(limit)
            .map(|(_, id, _)| id.clone())
            .collect()
    }

    /// The `Peer` messages for parents, with their hosts as announced and, for the
    /// pieces they have that a seed fetched from the origin, the digests it reported.
    pub fn parent_messages(&self, task_id: &str, parents: &[String]) -> Vec<Peer> {
        let Some(task) = self.tasks.get(task_id) else {
            return Vec::new();
        };
        parents
            .iter()
            .filter_map(|id| {
                let p = task.peers.get(id)?;
                let host = self.hosts.get(&p.host_id)?;
                let pieces = task
                    .origin_pieces
                    .values()
                    .filter(|piece| {
                        p.state == PeerState::Succeeded || p.pieces.contains(&piece.number)
                    })
                    .cloned()
                    .collect();
                Some(Peer {
                    id: id.clone(),
                    state: p.state.name().to_string(),
                    host: Some(host.host.clone()),
                    pieces,
                    ..Default::default()
                })
            })
            .collect()
    }

    /// A peer's `Task` view for `StatTask`.
    pub fn task_message(&self, task_id: &str) -> Result<Task, StateError> {
        let task = self
            .tasks
            .get(task_id)
            .ok_or_else(|| StateError::NotFound(format!("task {task_id}")))?;
        let succeeded = task.peers.values().any(|p| p.state == PeerState::Succeeded);
        let running = task.peers.values().any(|p| p.state.can_serve());
        Ok(Task {
            id: task_id.to_string(),
            url: task
                .download
                .as_ref()
                .map(|d| d.url.clone())
                .unwrap_or_default(),
            content_length: task.content_length.unwrap_or(0),
            piece_count: task.piece_count.unwrap_or(0),
            state: if succeeded {
                "Succeeded"
            } else if running {
                "Running"
            } else {
                "Pending"
            }
            .to_string(),
            peer_count: task.peers.len() as u32,
            has_available_peer: running,
            pieces: task.origin_pieces.values().cloned().collect(),
            ..Default::default()
        })
    }

    /// Records that the host `host_id` holds the whole task (it said so when asked):
    /// a peer entry that can be handed out as a parent, whose id names the host.
    pub fn restore_peer(&mut self, task_id: &str, host_id: &str) {
        if !self.hosts.contains_key(host_id) {
            return;
        }
        let task = self.tasks.entry(task_id.to_string()).or_default();
        if task.peers.values().any(|p| p.host_id == host_id) {
            return;
        }
        task.peers.insert(
            format!("{host_id}-{task_id}"),
            PeerEntry {
                host_id: host_id.to_string(),
                state: PeerState::Succeeded,
                pieces: HashSet::new(),
                parents: Vec::new(),
                failed_parents: HashSet::new(),
                answers: 0,
                restored: true,
                need_back_to_source: false,
            },
        );
    }

    /// The seed host to trigger: the one serving the fewest uploads (then by id).
    pub fn pick_seed(&self) -> Option<Host> {
        let uploads = self.uploads();
        self.hosts
            .values()
            .filter(|h| h.is_seed() && h.is_alive())
            .filter(|h| {
                self.failed_seeds
                    .get(&h.host.id)
                    .is_none_or(|t| t.elapsed() >= SEED_FAILURE_MEMORY)
            })
            .min_by(|a, b| {
                let ua = uploads.get(a.host.id.as_str()).unwrap_or(&0);
                let ub = uploads.get(b.host.id.as_str()).unwrap_or(&0);
                ua.cmp(ub).then_with(|| a.host.id.cmp(&b.host.id))
            })
            .map(|h| h.host.clone())
    }

    /// Counts of peers by state, for metrics.
    pub fn peers_by_state(&self) -> BTreeMap<PeerState, u64> {
        let mut out: BTreeMap<PeerState, u64> = PeerState::ALL.iter().map(|s| (*s, 0)).collect();
        for t in self.tasks.values() {
            for p in t.peers.values() {
                *out.entry(p.state).or_default() += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dragonfly_api::common::v2::{Download, Network};

    fn host(id: &str, seed: bool, max_tx: u64, tx: u64) -> Host {
        Host {
            id: id.into(),
            r#type: u32::from(seed),
            ip: "127.0.0.1".into(),
            network: Some(Network {
                max_tx_bandwidth: max_tx,
                tx_bandwidth: Some(tx),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn state_with(hosts: &[(&str, bool)]) -> State {
        let mut s = State::default();
        for (h, seed) in hosts {
            s.announce_host(host(h, *seed, 0, 0));
        }
        s
    }

    fn add(s: &mut State, host: &str, peer: &str, state: PeerState) {
        s.register(host, "t", peer, &Download::default()).unwrap();
        s.peer_mut("t", peer).unwrap().state = state;
    }

    #[test]
    fn a_register_needs_an_announced_host_and_happens_once() {
        let mut s = state_with(&[("h1", false)]);
        let e = s
            .register("nobody", "t", "p", &Download::default())
            .unwrap_err();
        assert!(matches!(e, StateError::FailedPrecondition(m) if m.contains("never announced")));
        s.register("h1", "t", "p", &Download::default()).unwrap();
        assert!(s.register("h1", "t", "p", &Download::default()).is_err());
        assert!(s.peer_mut("t", "other").is_err());
    }

    #[test]
    fn parents_are_never_self_same_host_failing_or_idle_and_seeds_come_first() {
        let mut s = state_with(&[("a", false), ("b", false), ("c", false), ("seed", true)]);
        add(&mut s, "a", "child", PeerState::Running);
        add(&mut s, "a", "same-host", PeerState::Succeeded);
        add(&mut s, "b", "done", PeerState::Succeeded);
        add(&mut s, "c", "pending", PeerState::Pending);
        add(&mut s, "c", "bad", PeerState::Succeeded);
        add(&mut s, "seed", "seedpeer", PeerState::BackToSource);
        s.peer_mut("t", "child")
            .unwrap()
            .failed_parents
            .insert("bad".into());
        assert_eq!(s.candidates("t", "child", 4), ["seedpeer", "done"]);
        assert_eq!(s.candidates("t", "child", 1), ["seedpeer"]);
    }

    #[test]
    fn a_parent_descending_from_the_child_is_never_handed_out() {
        let mut s = state_with(&[("a", false), ("b", false), ("c", false)]);
        add(&mut s, "a", "x", PeerState::Running);
        add(&mut s, "b", "y", PeerState::Running);
        add(&mut s, "c", "z", PeerState::Running);
        s.peer_mut("t", "y").unwrap().parents = vec!["x".into()];
        s.peer_mut("t", "z").unwrap().parents = vec!["y".into()];
        // x -> y -> z: z and y descend from x.
        assert!(s.candidates("t", "x", 4).is_empty());
        assert_eq!(s.candidates("t", "z", 4).len(), 2);
    }

    #[test]
    fn busy_hosts_and_hosts_short_of_upload_bandwidth_rank_lower() {
        let mut s = State::default();
        s.announce_host(host("child", false, 0, 0));
        s.announce_host(host("idle", false, 1000, 0));
        s.announce_host(host("saturated", false, 1000, 990));
        s.announce_host(host("busy", false, 1000, 0));
        s.announce_host(host("other", false, 0, 0));
        add(&mut s, "child", "me", PeerState::Running);
        add(&mut s, "idle", "idle", PeerState::Succeeded);
        add(&mut s, "saturated", "saturated", PeerState::Succeeded);
        add(&mut s, "busy", "busy", PeerState::Succeeded);
        for i in 0..3 {
            let id = format!("kid{i}");
            add(&mut s, "other", &id, PeerState::Running);
            s.peer_mut("t", &id).unwrap().parents = vec!["busy".into()];
        }
        let got = s.candidates("t", "me", 10);
        assert_eq!(got[0], "idle", "{got:?}");
        assert_eq!(got.last().unwrap(), "busy", "{got:?}");
        let pos = |n: &str| got.iter().position(|g| g == n).unwrap();
        assert!(pos("saturated") < pos("busy"), "{got:?}");
    }

    #[test]
    fn hosts_silent_for_three_intervals_are_not_handed_out_and_are_collected() {
        let mut s = state_with(&[("a", false), ("b", false), ("c", false)]);
        add(&mut s, "a", "child", PeerState::Running);
        add(&mut s, "b", "quiet", PeerState::Succeeded);
        add(&mut s, "c", "failed", PeerState::Failed);
        s.hosts.get_mut("b").unwrap().interval = Some(Duration::from_secs(1));
        assert_eq!(s.candidates("t", "child", 4), ["quiet"]);
        s.hosts.get_mut("b").unwrap().announced -= Duration::from_secs(11);
        assert!(s.candidates("t", "child", 4).is_empty());
        assert_eq!(s.collect_garbage(Duration::from_secs(10)), (1, 2));
        assert_eq!(s.tasks["t"].peers.len(), 1);
    }

    #[test]
    fn a_finished_peer_is_no_cycle_and_a_host_counts_once() {
        let mut s = state_with(&[("a", false), ("b", false)]);
        add(&mut s, "a", "x", PeerState::Running);
        add(&mut s, "b", "y", PeerState::Succeeded);
        add(&mut s, "b", "y-range", PeerState::Succeeded);
        // y once took pieces from x, but has them all now: no cycle through it.
        s.peer_mut("t", "y").unwrap().parents = vec!["x".into()];
        assert_eq!(s.candidates("t", "x", 4).len(), 1);
        let mut s2 = State::default();
        let mut h = host("h", false, 0, 0);
        h.port = 1;
        s2.announce_host_every(h, Some(Duration::MAX));
        assert!(
            s2.hosts["h"].is_alive(),
            "a huge interval must not overflow"
        );
    }

    #[test]
    fn deleting_a_host_drops_its_peers_and_empty_tasks() {
        let mut s = state_with(&[("a", false), ("b", false)]);
        add(&mut s, "a", "p1", PeerState::Running);
        s.delete_host("a").unwrap();
        assert!(s.tasks.is_empty());
        assert!(matches!(s.delete_host("a"), Err(StateError::NotFound(_))));
        assert!(matches!(s.task_message("t"), Err(StateError::NotFound(_))));
    }

    #[test]
    fn parents_carry_the_digests_seeds_reported_for_origin_pieces() {
        let mut s = state_with(&[("a", false), ("seed", true)]);
        add(&mut s, "a", "child", PeerState::Running);
        add(&mut s, "seed", "sp", PeerState::BackToSource);
        s.peer_mut("t", "sp").unwrap().pieces.insert(0);
        s.tasks.get_mut("t").unwrap().origin_pieces.insert(
            0,
            Piece {
                number: 0,
                digest: "crc32:123".into(),
                ..Default::default()
            },
        );
        let msgs = s.parent_messages("t", &["sp".into()]);
        assert_eq!(msgs[0].pieces[0].digest, "crc32:123");
        assert_eq!(msgs[0].host.as_ref().unwrap().id, "seed");
    }
}
