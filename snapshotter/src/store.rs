//! Snapshot metadata in one redb database (`<root>/metadata.redb`): every change is one
//! write transaction, durable when it returns, so the store survives restarts and
//! `kill -9` whole (redb commits are crash-safe).
//!
//! Tables: `snapshots` (key → [`Record`] as JSON), `instances` (meta snapshot id, in decimal →
//! [`InstanceRecord`]), `daemons` (daemon id → [`DaemonRecord`]), `ids` (the next
//! snapshot id).

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tonic::Status;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// A table of JSON records by string key.
type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const INSTANCES: Table = TableDefinition::new("instances");
const DAEMONS: Table = TableDefinition::new("daemons");
const IDS: TableDefinition<&str, u64> = TableDefinition::new("ids");

/// containerd's snapshot kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, not committable.
    View,
    /// Writable, committable.
    Active,
    /// Read-only, a parent for others.
    Committed,
}

/// One snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Its directory is `<root>/snapshots/<id>`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key ("" for none).
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Created.
    pub created: SystemTime,
    /// Last changed.
    pub updated: SystemTime,
    /// Bytes used (measured at commit).
    pub size: i64,
    /// Inodes used (measured at commit).
    pub inodes: i64,
}

/// One image served by a nydusd (a RAFS instance), by its meta snapshot's id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceRecord {
    /// The meta (bootstrap) snapshot's key.
    pub meta_key: String,
    /// The image reference.
    pub image: String,
    /// The daemon serving it.
    pub daemon_id: String,
    /// Where the image is seen (the overlay's lowerdir).
    pub mountpoint: PathBuf,
}

/// A nydusd started by the snapshotter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DaemonRecord {
    /// Its pid.
    pub pid: u32,
    /// Its process start time (see `nydusd::client::launcher::process_start_time`): a
    /// pid reused by another process after a reboot is not mistaken for the daemon.
    #[serde(default)]
    pub start_time: u64,
    /// Its API socket.
    pub apisock: PathBuf,
    /// Its FUSE mountpoint.
    pub mountpoint: PathBuf,
    /// Shared by every image.
    pub shared: bool,
}

/// The metadata database.
pub struct Store {
    db: Database,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("metadata store: {e}"))
}

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(internal)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain structs serialize")
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, String> {
        let db = Database::create(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            txn.open_table(SNAPSHOTS).map_err(|e| e.to_string())?;
            txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
            txn.open_table(DAEMONS).map_err(|e| e.to_string())?;
            txn.open_table(IDS).map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(Store { db })
    }

    /// The snapshot `key`.
    pub fn get(&self, key: &str) -> Result<Option<Record>, Status> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
        match t.get(key).map_err(internal)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// The snapshot `key`, or NOT_FOUND naming it.
    pub fn must_get(&self, key: &str) -> Result<Record, Status> {
        self.get(key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))
    }

    /// Every snapshot.
    pub fn list(&self) -> Result<Vec<(String, Record)>, Status> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(SNAPSHOTS).map_err(internal)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(internal)? {
            let (k, v) = row.map_err(internal)?;
            out.push((k.value().to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    /// Creates snapshot `key` of `kind` over `parent` with a new id: ALREADY_EXISTS when
    /// the key is taken, NOT_FOUND when the parent is missing, FAILED_PRECONDITION when
    /// it is not committed.
    pub fn create(
        &self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record, Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("snapshot key is empty"));
        }
        let txn = self.db.begin_write().map_err(internal)?;
        let rec = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            if t.get(key).map_err(internal)?.is_some() {
                return Err(Status::already_exists(format!(
                    "snapshot {key} already exists"
                )));
            }
            if !parent.is_empty() {
                let p: Record = match t.get(parent).map_err(internal)? {
                    Some(v) => decode(v.value())?,
                    None => {
                        return Err(Status::not_found(format!(
                            "parent snapshot {parent} of {key} does not exist"
                        )))
                    }
                };
                if p.kind != Kind::Committed {
                    return Err(Status::failed_precondition(format!(
                        "parent snapshot {parent} of {key} is not committed"
                    )));
                }
            }
            let mut ids = txn.open_table(IDS).map_err(internal)?;
            let id = ids.get("next").map_err(internal)?.map_or(1, |v| v.value());
            ids.insert("next", id + 1).map_err(internal)?;
            let now = SystemTime::now();
            let rec = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                size: 0,
                inodes: 0,
            };
            t.insert(key, encode(&rec).as_slice()).map_err(internal)?;
            rec
        };
        txn.commit().map_err(internal)?;
        Ok(rec)
    }

    /// Commits active snapshot `key` as `name`, with `labels` added to its own and the
    /// measured usage.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: (i64, i64),
    ) -> Result<Record, Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        let rec = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            if t.get(name).map_err(internal)?.is_some() {
                return Err(Status::already_exists(format!(
                    "snapshot {name} already exists"
                )));
            }
            let mut rec: Record = match t.remove(key).map_err(internal)? {
                Some(v) => decode(v.value())?,
                None => return Err(Status::not_found(format!("snapshot {key} does not exist"))),
            };
            if rec.kind != Kind::Active {
                return Err(Status::failed_precondition(format!(
                    "snapshot {key} is not active: only active snapshots can be committed"
                )));
            }
            rec.kind = Kind::Committed;
            rec.labels.extend(labels);
            rec.updated = SystemTime::now();
            (rec.size, rec.inodes) = usage;
            t.insert(name, encode(&rec).as_slice()).map_err(internal)?;
            rec
        };
        txn.commit().map_err(internal)?;
        Ok(rec)
    }

    /// Removes `key`; FAILED_PRECONDITION while another snapshot has it as parent.
    pub fn remove(&self, key: &str) -> Result<Record, Status> {
        self.remove_matching(key, None)
    }

    /// [`Store::remove`], only if `key` is still the snapshot with id `id`.
    pub fn remove_if(&self, key: &str, id: u64) -> Result<Record, Status> {
        self.remove_matching(key, Some(id))
    }

    fn remove_matching(&self, key: &str, id: Option<u64>) -> Result<Record, Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        let rec = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            for row in t.iter().map_err(internal)? {
                let (k, v) = row.map_err(internal)?;
                let r: Record = decode(v.value())?;
                if r.parent == key {
                    return Err(Status::failed_precondition(format!(
                        "snapshot {key} is the parent of {}: remove that first",
                        k.value()
                    )));
                }
            }
            let rec: Record = match t.get(key).map_err(internal)? {
                Some(v) => decode(v.value())?,
                None => return Err(Status::not_found(format!("snapshot {key} does not exist"))),
            };
            if id.is_some_and(|id| id != rec.id) {
                return Err(Status::not_found(format!(
                    "snapshot {key} is another snapshot now (id {})",
                    rec.id
                )));
            }
            t.remove(key).map_err(internal)?;
            rec
        };
        txn.commit().map_err(internal)?;
        Ok(rec)
    }

    /// Replaces `key`'s labels.
    pub fn set_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record, Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        let rec = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let mut rec: Record = match t.get(key).map_err(internal)? {
                Some(v) => decode(v.value())?,
                None => return Err(Status::not_found(format!("snapshot {key} does not exist"))),
            };
            rec.labels = labels;
            rec.updated = SystemTime::now();
            t.insert(key, encode(&rec).as_slice()).map_err(internal)?;
            rec
        };
        txn.commit().map_err(internal)?;
        Ok(rec)
    }

    /// Records (or replaces) the instance of meta snapshot `id`.
    pub fn put_instance(&self, id: u64, rec: &InstanceRecord) -> Result<(), Status> {
        self.put(INSTANCES, &id.to_string(), rec)
    }

    /// Forgets the instance of meta snapshot `id`.
    pub fn remove_instance(&self, id: u64) -> Result<(), Status> {
        self.delete(INSTANCES, &id.to_string())
    }

    /// Every instance.
    pub fn instances(&self) -> Result<Vec<(u64, InstanceRecord)>, Status> {
        self.all(INSTANCES)?
            .into_iter()
            .map(|(k, v)| Ok((k.parse().map_err(internal)?, v)))
            .collect()
    }

    /// Records (or replaces) daemon `id`.
    pub fn put_daemon(&self, id: &str, rec: &DaemonRecord) -> Result<(), Status> {
        self.put(DAEMONS, id, rec)
    }

    /// Forgets daemon `id`.
    pub fn remove_daemon(&self, id: &str) -> Result<(), Status> {
        self.delete(DAEMONS, id)
    }

    /// Every daemon.
    pub fn daemons(&self) -> Result<Vec<(String, DaemonRecord)>, Status> {
        self.all(DAEMONS)
    }

    fn put<T: Serialize>(&self, table: Table, key: &str, v: &T) -> Result<(), Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        txn.open_table(table)
            .map_err(internal)?
            .insert(key, encode(v).as_slice())
            .map_err(internal)?;
        txn.commit().map_err(internal)
    }

    fn delete(&self, table: Table, key: &str) -> Result<(), Status> {
        let txn = self.db.begin_write().map_err(internal)?;
        txn.open_table(table)
            .map_err(internal)?
            .remove(key)
            .map_err(internal)?;
        txn.commit().map_err(internal)
    }

    fn all<T: for<'a> Deserialize<'a>>(&self, table: Table) -> Result<Vec<(String, T)>, Status> {
        let txn = self.db.begin_read().map_err(internal)?;
        let t = txn.open_table(table).map_err(internal)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(internal)? {
            let (k, v) = row.map_err(internal)?;
            out.push((k.value().to_string(), decode(v.value())?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_keep_their_rules_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let s = Store::open(&path).unwrap();
            let a = s.create("a", Kind::Active, "", BTreeMap::new()).unwrap();
            assert_eq!(a.id, 1);
            let e = s
                .create("a", Kind::Active, "", BTreeMap::new())
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::AlreadyExists);
            let e = s
                .create("b", Kind::Active, "a", BTreeMap::new())
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
            let e = s
                .create("b", Kind::Active, "zz", BTreeMap::new())
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound);
            let labels = BTreeMap::from([("x".to_string(), "1".to_string())]);
            let c = s.commit("a", "c", labels, (4096, 2)).unwrap();
            assert_eq!((c.id, c.kind, c.size), (1, Kind::Committed, 4096));
            s.create("b", Kind::Active, "c", BTreeMap::new()).unwrap();
            let e = s.remove("c").unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition);
            s.put_daemon(
                "d1",
                &DaemonRecord {
                    pid: 7,
                    start_time: 1,
                    apisock: "/s".into(),
                    mountpoint: "/m".into(),
                    shared: false,
                },
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.must_get("c").unwrap().labels["x"], "1");
        assert!(s.get("a").unwrap().is_none());
        assert_eq!(
            s.create("d", Kind::View, "c", BTreeMap::new()).unwrap().id,
            3
        );
        assert_eq!(s.daemons().unwrap()[0].1.pid, 7);
        s.remove("b").unwrap();
        s.remove("d").unwrap();
        s.remove("c").unwrap();
        assert_eq!(s.must_get("c").unwrap_err().code(), tonic::Code::NotFound);
    }
}
