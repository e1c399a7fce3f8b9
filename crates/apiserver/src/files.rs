//! Files the server writes into its data directory: tokens and kubeconfigs.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Writes `contents` to `path` atomically (temp file + rename), readable by the owner only.
///
/// # Errors
/// When the directory is not writable.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
