//! Tunnels added, edited and removed in the agent's config file, as a person would edit
//! it: the rest of the file (comments, order, other fields) stays as it was, the result
//! must read back as the agent reads it, and it replaces the file in one rename.

use std::path::{Path, PathBuf};

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use portway_agent::Tunnel;
use portway_agent::config::ConfigError;
use serde::Deserialize;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

/// A tunnel as the page's form gives it.
#[derive(Clone, Debug, Deserialize)]
pub struct TunnelForm {
    pub name: String,
    pub target: String,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub hostnames: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("no tunnel {0:?} in the config file")]
    NotFound(String),
    #[error("a tunnel named {0:?} exists already")]
    Exists(String),
    #[error(
        "tunnel {0:?} is given by a --tunnel flag: change the flag (the file does not hold it)"
    )]
    Flag(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl IntoResponse for EditError {
    fn into_response(self) -> Response {
        let (status, field) = match &self {
            Self::Invalid { field, .. } => (StatusCode::UNPROCESSABLE_ENTITY, Some(field.as_str())),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, None),
            Self::Exists(_) => (StatusCode::CONFLICT, Some("name")),
            Self::Flag(_) => (StatusCode::CONFLICT, None),
            Self::Io(..) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        crate::api::error(status, self.to_string(), field)
    }
}

fn parse(text: &str) -> Result<DocumentMut, EditError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| EditError::Invalid {
            field: "config".into(),
            message: format!("the config file does not parse: {}", e.message()),
        })
}

fn tunnels(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, EditError> {
    if !doc.contains_key("tunnel") {
        doc.insert("tunnel", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc["tunnel"]
        .as_array_of_tables_mut()
        .ok_or_else(|| EditError::Invalid {
            field: "tunnel".into(),
            message: "`tunnel` in the config file is not an array of tables ([[tunnel]])".into(),
        })
}

fn position(list: &ArrayOfTables, name: &str) -> Option<usize> {
    list.iter()
        .position(|t| t.get("name").and_then(Item::as_str) == Some(name))
}

/// Writes the form's fields into `t`, leaving the others it has.
fn fill(t: &mut Table, form: &TunnelForm) {
    t["name"] = value(form.name.trim());
    t["target"] = value(form.target.trim());
    match form
        .protocol
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        Some(p) => t["protocol"] = value(p),
        None => {
            t.remove("protocol");
        }
    }
    let hostnames: Array = form
        .hostnames
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .collect();
    if hostnames.is_empty() {
        t.remove("hostnames");
    } else {
        t["hostnames"] = value(hostnames);
    }
}

pub fn add(text: &str, form: &TunnelForm) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let list = tunnels(&mut doc)?;
    if position(list, form.name.trim()).is_some() {
        return Err(EditError::Exists(form.name.trim().to_owned()));
    }
    let mut t = Table::new();
    fill(&mut t, form);
    list.push(t);
    Ok(doc.to_string())
}

pub fn edit(text: &str, name: &str, form: &TunnelForm) -> Result<String, EditError> {
    if form.name.trim() != name {
        return Err(EditError::Invalid {
            field: "name".into(),
            message: "a tunnel keeps its name: remove it and add another".into(),
        });
    }
    let mut doc = parse(text)?;
    let list = tunnels(&mut doc)?;
    let i = position(list, name).ok_or_else(|| EditError::NotFound(name.to_owned()))?;
    let t = list
        .get_mut(i)
        .ok_or_else(|| EditError::NotFound(name.to_owned()))?;
    fill(t, form);
    Ok(doc.to_string())
}

pub fn remove(text: &str, name: &str) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let list = tunnels(&mut doc)?;
    let i = position(list, name).ok_or_else(|| EditError::NotFound(name.to_owned()))?;
    list.remove(i);
    Ok(doc.to_string())
}

/// One edit at a time: two at once would each write over the other's.
static EDITING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Reads the file, changes it, checks that the agent reads the result, and writes it.
/// Returns the tunnels then in effect: the file's and the flags'.
///
/// # Errors
/// What is wrong, naming the field.
pub fn apply(
    path: &Path,
    flags: &[Tunnel],
    change: impl FnOnce(&str) -> Result<String, EditError>,
) -> Result<Vec<Tunnel>, EditError> {
    let _one = EDITING.lock();
    let text = std::fs::read_to_string(path).map_err(|e| EditError::Io(path.to_owned(), e))?;
    let next = change(&text)?;
    let parsed = portway_agent::config::parse(&next, path).map_err(|e| match e {
        // `tunnel[2].target` is the form's `target`.
        ConfigError::Invalid { field, message, .. } => EditError::Invalid {
            field: field
                .rsplit_once('.')
                .map_or(field.clone(), |(_, f)| f.to_owned()),
            message,
        },
        e => EditError::Invalid {
            field: "config".into(),
            message: e.to_string(),
        },
    })?;
    if let Some(t) = parsed
        .tunnels
        .iter()
        .find(|t| flags.iter().any(|f| f.name == t.name))
    {
        return Err(EditError::Flag(t.name.clone()));
    }
    write(path, &next).map_err(|e| EditError::Io(path.to_owned(), e))?;
    tracing::info!(path = %path.display(), "config file edited in the local UI");
    let mut tunnels = parsed.tunnels;
    tunnels.extend(flags.iter().cloned());
    Ok(tunnels)
}

/// Replaces the file (the one a symlink points at) in one rename, keeping its
/// permissions; the new text goes to a fresh temporary file of unpredictable name first,
/// so no one else's file is written through a planted link.
fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = std::fs::canonicalize(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file()
        .set_permissions(std::fs::metadata(&path)?.permissions())?;
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# my device
project = "default"

[[tunnel]]
name = "web"   # the blog
target = "127.0.0.1:3000"
hostnames = ["blog.example.com"]

[[tunnel]]
name = "db"
target = "127.0.0.1:5432"
protocol = "tcp"
public_port = 20001
"#;

    fn form(name: &str, target: &str, protocol: Option<&str>, hostnames: &[&str]) -> TunnelForm {
        TunnelForm {
            name: name.into(),
            target: target.into(),
            protocol: protocol.map(Into::into),
            hostnames: hostnames.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    fn applied(
        text: &str,
        change: impl FnOnce(&str) -> Result<String, EditError>,
    ) -> Result<(String, Vec<Tunnel>), EditError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let tunnels = apply(&path, &[], change)?;
        Ok((std::fs::read_to_string(&path).unwrap(), tunnels))
    }

    #[test]
    fn add_edit_and_remove_keep_the_rest_of_the_file() {
        let (text, tunnels) = applied(FILE, |t| {
            add(
                t,
                &form("api", "127.0.0.1:8000", Some("http"), &["api.example.com"]),
            )
        })
        .unwrap();
        assert!(text.starts_with("# my device\n") && text.contains("name = \"web\"   # the blog"));
        assert_eq!(tunnels.len(), 3);
        assert_eq!(tunnels[2].hostnames, ["api.example.com"]);

        let (text, tunnels) = applied(FILE, |t| {
            edit(t, "db", &form("db", "127.0.0.1:5433", Some("tcp"), &[]))
        })
        .unwrap();
        assert!(
            text.contains("public_port = 20001"),
            "fields the form does not have stay:\n{text}"
        );
        assert_eq!(tunnels[1].target.port, 5433);

        let (text, tunnels) = applied(FILE, |t| remove(t, "web")).unwrap();
        assert!(!text.contains("the blog") && text.contains("# my device"));
        assert_eq!(tunnels.len(), 1);
    }

    #[test]
    fn a_bad_edit_names_its_field_and_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, FILE).unwrap();
        for (change, field) in [
            (form("x", "nowhere", None, &[]), "target"),
            (form("Bad_Name", "127.0.0.1:1", None, &[]), "name"),
            (form("x", "127.0.0.1:1", Some("smtp"), &[]), "protocol"),
            (
                form("x", "127.0.0.1:1", Some("tcp"), &["a.example.com"]),
                "hostnames",
            ),
        ] {
            match apply(&path, &[], |t| add(t, &change)) {
                Err(EditError::Invalid { field: f, .. }) => assert_eq!(f, field, "{change:?}"),
                other => panic!("{change:?}: {other:?}"),
            }
        }
        assert!(matches!(
            apply(&path, &[], |t| add(
                t,
                &form("web", "127.0.0.1:1", None, &[])
            )),
            Err(EditError::Exists(_))
        ));
        assert!(matches!(
            apply(&path, &[], |t| remove(t, "nope")),
            Err(EditError::NotFound(_))
        ));
        assert!(matches!(
            apply(&path, &[], |t| edit(
                t,
                "web",
                &form("web2", "127.0.0.1:1", None, &[])
            )),
            Err(EditError::Invalid { .. })
        ));
        let flag = Tunnel::parse_flag("cli=127.0.0.1:9").unwrap();
        assert!(matches!(
            apply(&path, &[flag], |t| add(
                t,
                &form("cli", "127.0.0.1:1", None, &[])
            )),
            Err(EditError::Flag(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
    }
}
