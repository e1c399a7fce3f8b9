//! Files the server writes into its data directory: tokens and kubeconfigs, all private
//! to the user running it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

pub use portway_tls::write_private;

/// What the data directory holds that nobody else may read: the database (SQLite's WAL
/// and shm files take the database file's mode), tokens, kubeconfigs, keys, the CA.
const PRIVATE_FILES: [&str; 10] = [
    "portway.db",
    "portway.db-wal",
    "portway.db-shm",
    "tokens.csv",
    "kubeconfig",
    "agent.kubeconfig",
    "sidecar.key",
    "portway.json",
    "pki/ca.key",
    "pki/ca.crt",
];

/// Creates `dir` (and missing parents) mode 0700, or takes group and other access away
/// from an existing one.
///
/// # Errors
/// When the directory cannot be created or its mode changed.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    tighten(dir, 0o700)
}

/// Makes the data directory private: the directory and `pki/` 0700, the files the servers
/// keep there 0600 (fixing looser ones left by earlier versions or by hand), and creates an
/// empty database file 0600 so SQLite never creates it (or its WAL) world-readable.
///
/// # Errors
/// When the directory or a file cannot be created or its mode changed.
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    private_dir(dir)?;
    if dir.join("pki").is_dir() {
        tighten(&dir.join("pki"), 0o700)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(PRIVATE_FILES[0]))?;
    for name in PRIVATE_FILES {
        let path = dir.join(name);
        if path.exists() {
            tighten(&path, 0o600)?;
        }
    }
    Ok(())
}

/// Takes away every permission outside `allowed` (group and other, and execute on files).
fn tighten(path: &Path, allowed: u32) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & !allowed != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "made private");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & allowed))?;
    }
    Ok(())
}

/// A fresh random bearer token (256 bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A kubeconfig with one cluster, user and context, all named `portway`.
pub fn kubeconfig(
    server: &str,
    ca_pem: Option<&str>,
    user: &str,
    token: &str,
    namespace: &str,
) -> String {
    let ca = ca_pem.map_or(String::new(), |pem| {
        format!("\n    certificate-authority-data: {}", STANDARD.encode(pem))
    });
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: portway
  cluster:
    server: {server}{ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: portway
  context:
    cluster: portway
    user: {user}
    namespace: {namespace}
current-context: portway
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_new_data_dir_and_its_database_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/data");
        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let db_path = dir.join("portway.db");
        assert_eq!(mode(&db_path), 0o600);
        // SQLite gives its WAL and shm files the database file's mode.
        let db = rusqlite::Connection::open(&db_path).unwrap();
        db.pragma_update(None, "journal_mode", "WAL").unwrap();
        db.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        for f in ["portway.db", "portway.db-wal", "portway.db-shm"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        write_private(&dir.join("tokens.csv"), b"t,u,admin,*\n").unwrap();
        assert_eq!(mode(&dir.join("tokens.csv")), 0o600);
    }

    #[test]
    fn a_loose_data_dir_is_tightened_on_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("pki")).unwrap();
        for f in [
            "portway.db",
            "tokens.csv",
            "kubeconfig",
            "pki/ca.key",
            "other.txt",
        ] {
            std::fs::write(dir.join(f), "x").unwrap();
            chmod(&dir.join(f), 0o644);
        }
        chmod(&dir.join("kubeconfig"), 0o755);
        chmod(&dir.join("pki"), 0o755);
        chmod(&dir, 0o775);
        // A leftover temp file does not make the next write readable by others.
        std::fs::write(dir.join("kubeconfig.tmp"), "old").unwrap();
        chmod(&dir.join("kubeconfig.tmp"), 0o666);

        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("pki")), 0o700);
        for f in ["portway.db", "tokens.csv", "kubeconfig", "pki/ca.key"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&dir.join("other.txt")), 0o644, "not ours: left alone");
        write_private(&dir.join("kubeconfig"), b"new").unwrap();
        assert_eq!(mode(&dir.join("kubeconfig")), 0o600);
    }
}
