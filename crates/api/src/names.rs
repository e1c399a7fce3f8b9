//! Generated object names: DNS labels made from a readable base and a stable hash, so
//! that whatever a user named the parts, the generated name is valid and unique.

/// FNV-1a: a stable hash for generated names (std's hasher may change between releases).
fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// A DNS label (Service and HTTPProxy names must be one) from `base` plus a hash of
/// `parts`.
pub fn label_name(base: &str, parts: &[&str]) -> String {
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let prefix: String = cleaned.chars().take(54).collect();
    format!("{}-{:08x}", prefix.trim_end_matches('-'), fnv(parts))
}
