//! Durable state: environments and the audit log, in SQLite (WAL mode) under the state
//! directory, with numbered migrations.
//!
//! The audit log is a hash chain: each entry's hash covers its fields and the previous
//! entry's hash, and the newest hash and count are also written to `audit.head` beside the
//! database, so editing, deleting or truncating entries is detected by [`Store::verify_audit`].

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::spec::Spec;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE envs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_active_at INTEGER NOT NULL,
        vmm_pid INTEGER,
        api_socket TEXT
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );",
    // Revoked stream tokens (by token id), kept until the token's own expiry. Tokens of a
    // destroyed environment need no rows: its id is never reused and counts as revoked.
    "CREATE TABLE token_revocations (
        token_id TEXT PRIMARY KEY,
        env_id INTEGER,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER NOT NULL,
        actor TEXT NOT NULL
    );",
];

/// Creates `path` (a directory with its parents, or an empty file) if missing and makes it
/// 0700 (directory) or 0600 (file).
fn make_private(path: &Path, dir: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
    } else {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
    }
    let mode = if dir { 0o700 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot create state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit head file {path}")]
    Head {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored spec of {name} is unreadable: {source}")]
    Spec {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown state {0:?} in the database")]
    State(String),
    #[error("an environment named {0:?} already exists")]
    NameTaken(String),
    #[error("no environment named {0:?}")]
    NotFound(String),
}

/// Lifecycle state of an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvState {
    Requested,
    Building,
    Booting,
    Ready,
    Stopped,
    Destroyed,
    Failed,
}

impl EnvState {
    pub const ALL: [EnvState; 7] = [
        EnvState::Requested,
        EnvState::Building,
        EnvState::Booting,
        EnvState::Ready,
        EnvState::Stopped,
        EnvState::Destroyed,
        EnvState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::Requested => "requested",
            EnvState::Building => "building",
            EnvState::Booting => "booting",
            EnvState::Ready => "ready",
            EnvState::Stopped => "stopped",
            EnvState::Destroyed => "destroyed",
            EnvState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<EnvState> {
        EnvState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The lifecycle: requested → building → booting → ready → stopped → destroyed; any live
    /// state may fail or be stopped; stopped and failed environments may be destroyed.
    pub fn can_become(self, next: EnvState) -> bool {
        use EnvState::*;
        matches!(
            (self, next),
            (Requested, Building)
                | (Building, Booting)
                | (Booting, Ready)
                | (Ready, Stopped)
                | (Booting, Stopped)
                | (Building, Stopped)
                | (Requested, Stopped)
                | (Stopped, Destroyed)
                | (Failed, Destroyed)
                | (Requested | Building | Booting | Ready, Failed)
        )
    }

    /// Holds host resources (counts against admission).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            EnvState::Requested | EnvState::Building | EnvState::Booting | EnvState::Ready
        )
    }
}

/// One environment as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvRecord {
    pub id: i64,
    pub name: String,
    pub spec: Spec,
    pub state: EnvState,
    pub reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_active_at: i64,
    pub vmm_pid: Option<i32>,
    pub api_socket: Option<String>,
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub ts: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A revoked stream token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevocation {
    /// The token's id, 16 hex digits.
    pub token_id: String,
    /// The environment's id, when the whole token was given.
    pub env_id: Option<i64>,
    pub expires_at: i64,
    pub revoked_at: i64,
    pub actor: String,
}

/// What `verify_audit` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    pub ok: bool,
    pub entries: i64,
    /// The first problem found, naming the entry.
    pub problem: Option<String>,
}

pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The SQLite store. Not `Sync`: hostd wraps it in a mutex.
pub struct Store {
    conn: Connection,
    head_path: PathBuf,
}

impl Store {
    /// Opens (creating and migrating) `state.db` in `dir`.
    ///
    /// The directory is made 0700 and the database, its WAL files and `audit.head` 0600
    /// (specs and the audit log are for hostd's user alone), fixing the modes of files an
    /// older hostd left readable.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.into(),
            source,
        };
        make_private(dir, true).map_err(dir_err)?;
        let db = dir.join("state.db");
        // Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the
        // database's mode.
        make_private(&db, false).map_err(dir_err)?;
        for f in ["state.db-wal", "state.db-shm", "audit.head"] {
            let path = dir.join(f);
            if path.exists() {
                make_private(&path, false).map_err(dir_err)?;
            }
        }
        let conn = Connection::open(&db)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store {
            conn,
            head_path: dir.join("audit.head"),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let done: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// `PRAGMA journal_mode` (for tests and health).
    pub fn journal_mode(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))?)
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    // ---- environments ------------------------------------------------------------------

    /// Stores a new environment in state requested. A destroyed environment of the same
    /// name is renamed `NAME~ID` to free the name; a live one makes this fail.
    pub fn insert_env(&mut self, spec: &Spec) -> Result<EnvRecord, StoreError> {
        self.retire_name(&spec.name)?;
        let now = now_s();
        let json = serde_json::to_string(spec).expect("spec serialises");
        let res = self.conn.execute(
            "INSERT INTO envs (name, spec, state, created_at, updated_at, last_active_at) VALUES (?1, ?2, ?3, ?4, ?4, ?4)",
            params![spec.name, json, EnvState::Requested.as_str(), now],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::NameTaken(spec.name.clone()))
            }
            r => r?,
        };
        self.env(&spec.name)?
            .ok_or_else(|| StoreError::NotFound(spec.name.clone()))
    }

    pub fn name_taken(&self, name: &str) -> Result<bool, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM envs WHERE name = ?1 AND state != 'destroyed'",
            [name],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    pub fn env(&self, name: &str) -> Result<Option<EnvRecord>, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {ENV_COLS} FROM envs WHERE name = ?1"),
                [name],
                env_row,
            )
            .optional()?;
        row.transpose()
    }

    /// Every environment not yet destroyed, oldest first (`all` includes destroyed ones).
    pub fn envs(&self, all: bool) -> Result<Vec<EnvRecord>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ENV_COLS} FROM envs {} ORDER BY id",
            if all {
                ""
            } else {
                "WHERE state != 'destroyed'"
            }
        ))?;
        let rows = stmt.query_map([], env_row)?;
        rows.map(|row| row?).collect()
    }

    pub fn set_state(
        &mut self,
        name: &str,
        state: EnvState,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE envs SET state = ?2, reason = ?3, updated_at = ?4 WHERE name = ?1",
            params![name, state.as_str(), reason, now_s()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(name.into()));
        }
        Ok(())
    }

    pub fn set_vmm(
        &mut self,
        name: &str,
        pid: Option<i32>,
        socket: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE envs SET vmm_pid = ?2, api_socket = ?3, updated_at = ?4 WHERE name = ?1",
            params![name, pid, socket, now_s()],
        )?;
        Ok(())
    }

    pub fn touch(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE envs SET last_active_at = ?2 WHERE name = ?1",
            params![name, now_s()],
        )?;
        Ok(())
    }

    /// Frees a destroyed environment's name for reuse by renaming the old row.
    fn retire_name(&mut self, name: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE envs SET name = name || '~' || id WHERE name = ?1 AND state = 'destroyed'",
            [name],
        )?;
        Ok(())
    }

    // ---- audit -------------------------------------------------------------------------

    /// Appends one audit entry to the chain.
    pub fn audit(
        &mut self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<AuditEntry, StoreError> {
        let tx = self.conn.transaction()?;
        let (last_seq, prev_hash): (i64, String) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, GENESIS.to_string()));
        let mut e = AuditEntry {
            seq: last_seq + 1,
            ts: now_s(),
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
            prev_hash,
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        tx.execute(
            "INSERT INTO audit (seq, ts, actor, action, target, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![e.seq, e.ts, e.actor, e.action, e.target, e.detail, e.prev_hash, e.hash],
        )?;
        tx.commit()?;
        self.write_head(e.seq, &e.hash)?;
        Ok(e)
    }

    fn write_head(&self, seq: i64, hash: &str) -> Result<(), StoreError> {
        let tmp = self.head_path.with_extension("head.tmp");
        let err = |source| StoreError::Head {
            path: self.head_path.clone(),
            source,
        };
        // A temporary file left by a crash keeps whatever mode it had: start afresh.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(format!("{seq} {hash}\n").as_bytes())
            .map_err(err)?;
        std::fs::rename(&tmp, &self.head_path).map_err(err)
    }

    pub fn audit_entries(&self, limit: Option<i64>) -> Result<Vec<AuditEntry>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, ts, actor, action, target, detail, prev_hash, hash FROM audit ORDER BY seq DESC LIMIT ?1",
        )?;
        let mut rows = stmt
            .query_map([limit.unwrap_or(i64::MAX)], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    ts: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    detail: r.get(5)?,
                    prev_hash: r.get(6)?,
                    hash: r.get(7)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Walks the chain from the first entry: sequence numbers contiguous from 1, each
    /// `prev_hash` equal to the previous hash, each hash recomputed, and the newest entry
    /// equal to `audit.head`.
    pub fn verify_audit(&self) -> Result<AuditReport, StoreError> {
        let entries = self.audit_entries(None)?;
        let n = entries.len() as i64;
        let bad = |problem: String| {
            Ok(AuditReport {
                ok: false,
                entries: n,
                problem: Some(problem),
            })
        };
        let mut prev = GENESIS.to_string();
        for (i, e) in entries.iter().enumerate() {
            let want_seq = i as i64 + 1;
            if e.seq != want_seq {
                return bad(format!(
                    "entry {want_seq} is missing (next entry is {})",
                    e.seq
                ));
            }
            if e.prev_hash != prev {
                return bad(format!(
                    "entry {} does not link to entry {}",
                    e.seq,
                    e.seq - 1
                ));
            }
            if entry_hash(e) != e.hash {
                return bad(format!("entry {} was modified (hash mismatch)", e.seq));
            }
            prev = e.hash.clone();
        }
        let head = match std::fs::read_to_string(&self.head_path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(StoreError::Head {
                    path: self.head_path.clone(),
                    source,
                })
            }
        };
        match head {
            None if n == 0 => {}
            None => return bad(format!("{} is missing", self.head_path.display())),
            Some(h) => {
                let mut parts = h.split_whitespace();
                let seq: i64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
                let hash = parts.next().unwrap_or("");
                if seq != n || hash != prev {
                    return bad(format!(
                        "the log ends at entry {n} but {} records entry {seq}: entries were deleted or added",
                        self.head_path.display()
                    ));
                }
            }
        }
        Ok(AuditReport {
            ok: true,
            entries: n,
            problem: None,
        })
    }

    // ---- token revocations ---------------------------------------------------------------

    /// Records that stream token `token_id` (of environment `env_id` if known, expiring at
    /// `expires_at`) no longer counts. Returns false if it was already revoked.
    pub fn revoke_token(
        &mut self,
        token_id: &str,
        env_id: Option<i64>,
        expires_at: i64,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO token_revocations (token_id, env_id, expires_at, revoked_at, actor) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token_id, env_id, expires_at, now_s(), actor],
        )?;
        Ok(n == 1)
    }

    /// Revoked tokens not yet expired at `now`; rows of expired tokens are deleted (expiry
    /// refuses those anyway).
    pub fn token_revocations(&mut self, now: i64) -> Result<Vec<TokenRevocation>, StoreError> {
        self.conn.execute(
            "DELETE FROM token_revocations WHERE expires_at <= ?1",
            [now],
        )?;
        let mut stmt = self.conn.prepare(
            "SELECT token_id, env_id, expires_at, revoked_at, actor FROM token_revocations ORDER BY revoked_at",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenRevocation {
                token_id: r.get(0)?,
                env_id: r.get(1)?,
                expires_at: r.get(2)?,
                revoked_at: r.get(3)?,
                actor: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Ids of destroyed environments: every token issued for one of them is revoked.
    pub fn destroyed_env_ids(&self) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM envs WHERE state = 'destroyed' ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Direct access for tests that tamper with the database.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// SHA-256 over the length-prefixed fields, so no two different entries encode alike.
fn entry_hash(e: &AuditEntry) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        e.seq.to_string().as_str(),
        e.ts.to_string().as_str(),
        &e.actor,
        &e.action,
        &e.target,
        &e.detail,
        &e.prev_hash,
    ] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    hex::encode(ctx.finish().as_ref())
}

const ENV_COLS: &str =
    "id, name, spec, state, reason, created_at, updated_at, last_active_at, vmm_pid, api_socket";

/// One `envs` row (the columns [`ENV_COLS`]) as a record. The outer error is the
/// database's; the inner one says the row holds what this version cannot read.
fn env_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<EnvRecord, StoreError>> {
    let name: String = r.get("name")?;
    let spec = match serde_json::from_str(&r.get::<_, String>("spec")?) {
        Ok(spec) => spec,
        Err(source) => return Ok(Err(StoreError::Spec { name, source })),
    };
    let state: String = r.get("state")?;
    let Some(state) = EnvState::parse(&state) else {
        return Ok(Err(StoreError::State(state)));
    };
    Ok(Ok(EnvRecord {
        id: r.get("id")?,
        name,
        spec,
        state,
        reason: r.get("reason")?,
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
        last_active_at: r.get("last_active_at")?,
        vmm_pid: r.get("vmm_pid")?,
        api_socket: r.get("api_socket")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> Spec {
        let composer =
            crate::composer::Composer::new(proto::spec::Catalog::embedded(), Default::default());
        match composer.compose("python headless").outcome {
            crate::composer::Outcome::Spec(s) => Spec {
                name: name.into(),
                ..*s
            },
            other => panic!("{other:?}"),
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn opens_in_wal_mode_with_all_migrations() {
        let (_d, s) = store();
        assert_eq!(s.journal_mode().unwrap(), "wal");
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
    }

    #[test]
    fn state_files_are_private_and_modes_left_by_older_versions_are_fixed() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let mut s = Store::open(&dir).unwrap();
        s.audit("t", "a", "x", "").unwrap();
        assert_eq!(mode(&dir), 0o700);
        for f in ["state.db", "state.db-wal", "state.db-shm", "audit.head"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        drop(s);

        // What older versions left: a world-readable directory, database and head file,
        // and a stale temporary head file.
        chmod(&dir, 0o755);
        for f in ["state.db", "audit.head"] {
            chmod(&dir.join(f), 0o644);
        }
        std::fs::write(dir.join("audit.head.tmp"), "stale").unwrap();
        chmod(&dir.join("audit.head.tmp"), 0o666);
        let mut s = Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for f in ["state.db", "audit.head"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        s.audit("t", "b", "x", "").unwrap();
        assert_eq!(mode(&dir.join("audit.head")), 0o600);
        assert!(s.verify_audit().unwrap().ok);
    }

    #[test]
    fn reopening_keeps_environments() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path())
            .unwrap()
            .insert_env(&spec("a"))
            .unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.envs(false).unwrap().len(), 1);
        assert_eq!(s.env("a").unwrap().unwrap().state, EnvState::Requested);
    }

    #[test]
    fn destroyed_name_can_be_reused_and_old_record_is_kept() {
        let (_d, mut s) = store();
        s.insert_env(&spec("a")).unwrap();
        s.set_state("a", EnvState::Destroyed, None).unwrap();
        assert!(!s.name_taken("a").unwrap());
        s.insert_env(&spec("a")).unwrap();
        assert_eq!(s.env("a").unwrap().unwrap().state, EnvState::Requested);
        assert_eq!(s.envs(true).unwrap().len(), 2);
    }

    #[test]
    fn revoked_tokens_are_kept_until_they_expire_and_destroyed_envs_are_listed() {
        let (_d, mut s) = store();
        let old = s.insert_env(&spec("dev")).unwrap();
        assert!(s
            .revoke_token("00000000000000aa", Some(old.id), 100, "op")
            .unwrap());
        assert!(!s
            .revoke_token("00000000000000aa", Some(old.id), 100, "op")
            .unwrap());
        s.revoke_token("00000000000000bb", None, 300, "op").unwrap();
        s.set_state("dev", EnvState::Destroyed, None).unwrap();
        let new = s.insert_env(&spec("dev")).unwrap();

        let listed = s.token_revocations(200).unwrap();

        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].token_id, "00000000000000bb");
        assert_eq!(s.token_revocations(200).unwrap(), listed);
        assert_ne!(new.id, old.id, "a reused name gets a new id");
        assert_eq!(s.destroyed_env_ids().unwrap(), vec![old.id]);
    }

    #[test]
    fn rows_this_version_cannot_read_say_what_is_wrong() {
        let (_d, mut s) = store();
        s.insert_env(&spec("a")).unwrap();
        let tamper = |sql: &str| s.connection().execute(sql, []).unwrap();

        tamper("UPDATE envs SET state = 'melted'");
        let unknown_state = s.env("a");
        tamper("UPDATE envs SET state = 'ready', spec = '{'");
        let unreadable_spec = s.envs(false);

        assert!(
            matches!(&unknown_state, Err(StoreError::State(st)) if st == "melted"),
            "{unknown_state:?}"
        );
        assert!(
            matches!(&unreadable_spec, Err(StoreError::Spec { name, .. }) if name == "a"),
            "{unreadable_spec:?}"
        );
    }

    #[test]
    fn duplicate_name_is_refused() {
        let (_d, mut s) = store();
        s.insert_env(&spec("a")).unwrap();
        assert!(matches!(
            s.insert_env(&spec("a")),
            Err(StoreError::NameTaken(_))
        ));
    }

    #[test]
    fn lifecycle_transitions_follow_the_documented_graph() {
        use EnvState::*;
        let allowed = [
            (Requested, Building),
            (Building, Booting),
            (Booting, Ready),
            (Ready, Stopped),
            (Stopped, Destroyed),
            (Ready, Failed),
            (Building, Failed),
            (Booting, Failed),
            (Failed, Destroyed),
        ];
        for (a, b) in allowed {
            assert!(a.can_become(b), "{a:?} -> {b:?}");
        }
        for (a, b) in [
            (Destroyed, Ready),
            (Ready, Building),
            (Failed, Ready),
            (Ready, Destroyed),
            (Destroyed, Failed),
        ] {
            assert!(!a.can_become(b), "{a:?} -> {b:?} must be refused");
        }
    }

    /// A store whose audit chain holds `n` entries.
    fn store_with_audit(n: usize) -> (tempfile::TempDir, Store) {
        let (d, mut s) = store();
        for i in 0..n {
            s.audit("uid:0", "create", &format!("env{i}"), "{}")
                .unwrap();
        }
        (d, s)
    }

    /// What verifying says of a chain of five entries after `sql` tampered with it.
    fn verify_after(sql: &str) -> AuditReport {
        let (_d, s) = store_with_audit(5);
        s.connection().execute(sql, []).unwrap();
        s.verify_audit().unwrap()
    }

    #[test]
    fn intact_audit_chain_verifies() {
        let (_d, s) = store_with_audit(5);
        let report = s.verify_audit().unwrap();
        let intact = AuditReport {
            ok: true,
            entries: 5,
            problem: None,
        };
        assert_eq!(report, intact);
    }

    #[test]
    fn edited_audit_entry_is_detected() {
        let r = verify_after("UPDATE audit SET actor = 'uid:1000' WHERE seq = 3");
        assert!(!r.ok);
        assert_eq!(r.problem.unwrap(), "entry 3 was modified (hash mismatch)");
    }

    #[test]
    fn deleted_audit_entry_is_detected() {
        let r = verify_after("DELETE FROM audit WHERE seq = 2");
        assert_eq!(r.problem.unwrap(), "entry 2 is missing (next entry is 3)");
    }

    #[test]
    fn truncated_audit_tail_is_detected() {
        let r = verify_after("DELETE FROM audit WHERE seq = 5");
        assert!(!r.ok);
        assert!(r.problem.unwrap().contains("entries were deleted"));
    }

    #[test]
    fn rehashed_edit_is_still_detected_by_the_next_link() {
        let (_d, s) = store_with_audit(3);
        // Edit entry 2 and recompute its own hash: entry 3 no longer links to it.
        let mut e = s.audit_entries(None).unwrap()[1].clone();
        e.detail = "{\"forged\":true}".into();
        e.hash = entry_hash(&e);
        s.connection()
            .execute(
                "UPDATE audit SET detail = ?1, hash = ?2 WHERE seq = 2",
                params![e.detail, e.hash],
            )
            .unwrap();
        assert_eq!(
            s.verify_audit().unwrap().problem.unwrap(),
            "entry 3 does not link to entry 2"
        );
    }
}
