//! The agent's TOML config file. Every error names the file, the line and the field.
//!
//! ```toml
//! project = "default"            # flags override these
//! name = "laptop"
//! connector_class = "portway"
//! relays = ["http://127.0.0.1:3340/"]
//!
//! [labels]
//! team = "web"
//!
//! [[tunnel]]
//! name = "web"
//! target = "127.0.0.1:3000"
//! protocol = "http"              # or "tcp", "tls", "udp"
//! hostnames = ["web.example.com"]
//!
//! [[tunnel]]
//! name = "db"
//! target = "127.0.0.1:5432"
//! protocol = "tcp"
//! public_port = 20001            # or `public = true`: a TCPProxy at any port of the range
//! proxy_protocol = true          # a PROXY v2 header naming the public client (tcp, tls)
//!
//! [[tunnel]]
//! name = "mail"
//! target = "127.0.0.1:8443"
//! protocol = "tls"               # passed through on the edge's TLS port, undecrypted
//! hostnames = ["mail.example.com"]   # optional; the canonical name is always served
//! cert_dir = "mail-cert"         # key.pem made here, cert.pem issued for the names (tls);
//!                                # relative to this file's directory
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use portway_api::validation;
use serde::Deserialize;
use toml::Spanned;

use crate::tunnel::{Protocol, PublicPort, Target, Tunnel};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    project: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    connector_class: Option<Spanned<String>>,
    #[serde(default)]
    relays: Vec<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default, rename = "tunnel")]
    tunnels: Vec<TunnelEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelEntry {
    name: Spanned<String>,
    target: Spanned<String>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    hostnames: Vec<Spanned<String>>,
    /// A tcp tunnel published at a public TCP port: any (`true`)...
    #[serde(default)]
    public: Option<Spanned<bool>>,
    /// ...or this one.
    #[serde(default)]
    public_port: Option<Spanned<u16>>,
    /// A PROXY protocol v2 header before each connection's bytes (tcp and tls tunnels).
    #[serde(default)]
    proxy_protocol: Option<Spanned<bool>>,
    /// Where a tls tunnel keeps its key and the certificate issued for it.
    #[serde(default)]
    cert_dir: Option<Spanned<String>>,
}

/// What the file says; absent values leave the flags' (or defaults') in place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileConfig {
    pub project: Option<String>,
    pub name: Option<String>,
    pub connector_class: Option<String>,
    pub relays: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub tunnels: Vec<Tunnel>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Loads and checks a config file.
///
/// # Errors
/// When the file cannot be read, does not parse, has unknown keys, or holds invalid
/// values; the error names the file, line and field.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses config text (`path` is only used in messages).
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: e.message().to_owned(),
        }
    })?;
    let invalid = |span: Range<usize>, field: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        line: line_col(text, span.start).0,
        field,
        message,
    };
    let checked = |v: &Option<Spanned<String>>,
                   field: &str,
                   rule: fn(&str) -> Result<(), String>|
     -> Result<Option<String>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => rule(s.get_ref())
                .map(|()| Some(s.get_ref().clone()))
                .map_err(|e| invalid(s.span(), field.into(), e)),
        }
    };
    let mut out = FileConfig {
        project: checked(&file.project, "project", validation::dns1123_label)?,
        name: checked(&file.name, "name", validation::dns1123_subdomain)?,
        connector_class: checked(
            &file.connector_class,
            "connector_class",
            validation::dns1123_subdomain,
        )?,
        ..Default::default()
    };
    for (i, r) in file.relays.iter().enumerate() {
        validation::http_url(r.get_ref(), true)
            .map_err(|e| invalid(r.span(), format!("relays[{i}]"), e))?;
        out.relays.push(r.get_ref().clone());
    }
    for (k, v) in &file.labels {
        validation::qualified_name(k.get_ref())
            .map_err(|e| invalid(k.span(), format!("labels.{}", k.get_ref()), e))?;
        validation::label_value(v.get_ref())
            .map_err(|e| invalid(v.span(), format!("labels.{}", k.get_ref()), e))?;
        out.labels.insert(k.get_ref().clone(), v.get_ref().clone());
    }
    for (i, t) in file.tunnels.iter().enumerate() {
        let field = |f: &str| format!("tunnel[{i}].{f}");
        let target = Target::parse(t.target.get_ref())
            .map_err(|e| invalid(t.target.span(), field("target"), e))?;
        let protocol = match t
            .protocol
            .as_ref()
            .map(|p| (p.get_ref().as_str(), p.span()))
        {
            None | Some(("http", _)) => Protocol::Http,
            Some(("tcp", _)) => Protocol::Tcp,
            Some(("tls", _)) => Protocol::Tls,
            Some(("udp", _)) => Protocol::Udp,
            Some((other, span)) => {
                return Err(invalid(
                    span,
                    field("protocol"),
                    format!("{other:?} is not one of \"http\", \"tcp\", \"tls\", \"udp\""),
                ));
            }
        };
        let tunnel = Tunnel {
            name: t.name.get_ref().clone(),
            target,
            protocol,
            hostnames: t
                .hostnames
                .iter()
                .map(|h| h.get_ref().to_ascii_lowercase())
                .collect(),
            public: match (&t.public, &t.public_port) {
                (_, Some(p)) if *p.get_ref() == 0 => {
                    return Err(invalid(
                        p.span(),
                        field("public_port"),
                        "must be 1-65535".into(),
                    ));
                }
                (_, Some(p)) => Some(PublicPort::Port(*p.get_ref())),
                (Some(p), None) if *p.get_ref() => Some(PublicPort::Any),
                _ => None,
            },
            proxy_protocol: t.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref()),
            cert_dir: t.cert_dir.as_ref().map(|d| {
                let dir = Path::new(d.get_ref());
                path.parent().map_or(dir.to_owned(), |base| base.join(dir))
            }),
            access: None,
        };
        if let Err((f, e)) = tunnel.check() {
            let span = match f {
                "name" => t.name.span(),
                "proxy_protocol" => t
                    .proxy_protocol
                    .as_ref()
                    .map_or(t.name.span(), Spanned::span),
                "cert_dir" => t.cert_dir.as_ref().map_or(t.name.span(), Spanned::span),
                "public" => t
                    .public
                    .as_ref()
                    .map(Spanned::span)
                    .or(t.public_port.as_ref().map(Spanned::span))
                    .unwrap_or(t.name.span()),
                _ => t.hostnames.first().map_or(t.name.span(), Spanned::span),
            };
            return Err(invalid(span, field(f), e));
        }
        if out.tunnels.iter().any(|o: &Tunnel| o.name == tunnel.name) {
            return Err(invalid(
                t.name.span(),
                field("name"),
                format!("{:?} is used by another tunnel", tunnel.name),
            ));
        }
        out.tunnels.push(tunnel);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, Path::new("agent.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_a_full_file() {
        let c = parse(
            "project = \"p1\"\nname = \"laptop\"\nrelays = [\"http://127.0.0.1:3340/\"]\n[labels]\nteam = \"web\"\n\n[[tunnel]]\nname = \"web\"\ntarget = \"127.0.0.1:3000\"\nhostnames = [\"Web.Example.com\"]\n\n[[tunnel]]\nname = \"db\"\ntarget = \"localhost:5432\"\nprotocol = \"tcp\"\n",
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(c.project.as_deref(), Some("p1"));
        assert_eq!(c.labels["team"], "web");
        assert_eq!(c.tunnels[0].hostnames, ["web.example.com"]);
        assert_eq!(c.tunnels[1].protocol, Protocol::Tcp);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        assert_eq!(
            err("[[tunnel]]\nname = \"web\"\ntarget = \"127.0.0.1:99999\"\n"),
            "agent.toml:3: tunnel[0].target: \"127.0.0.1:99999\": port \"99999\" is not a number between 1 and 65535"
        );
        let unknown =
            err("[[tunnel]]\nname = \"web\"\ntarget = \"127.0.0.1:1\"\ncolour = \"red\"\n");
        assert!(
            unknown.starts_with("agent.toml:4:1: unknown field `colour`"),
            "{unknown}"
        );
        let not_hostport = err("\n[[tunnel]]\nname = \"web\"\ntarget = \"localhost\"\n");
        assert!(
            not_hostport.starts_with("agent.toml:4: tunnel[0].target:"),
            "{not_hostport}"
        );
        let proto = err("[[tunnel]]\nname = \"web\"\ntarget = \"a:1\"\nprotocol = \"sctp\"\n");
        assert!(
            proto.starts_with("agent.toml:4: tunnel[0].protocol:"),
            "{proto}"
        );
        let dup = err(
            "[[tunnel]]\nname = \"a\"\ntarget = \"x:1\"\n[[tunnel]]\nname = \"a\"\ntarget = \"x:2\"\n",
        );
        assert!(dup.starts_with("agent.toml:5: tunnel[1].name:"), "{dup}");
        let label = err("[labels]\n\"bad key\" = \"x\"\n");
        assert!(
            label.starts_with("agent.toml:2: labels.bad key:"),
            "{label}"
        );
        let syntax = err("name = \n");
        assert!(syntax.starts_with("agent.toml:1:"), "{syntax}");
        let cert = err("[[tunnel]]\nname = \"a\"\ntarget = \"x:1\"\ncert_dir = \"c\"\n");
        assert!(
            cert.starts_with("agent.toml:4: tunnel[0].cert_dir: only tls tunnels"),
            "{cert}"
        );
    }

    #[test]
    fn a_tls_tunnels_cert_dir_is_relative_to_the_file() {
        let c = parse(
            "[[tunnel]]\nname = \"mail\"\ntarget = \"127.0.0.1:8443\"\nprotocol = \"tls\"\ncert_dir = \"mail-cert\"\n",
            Path::new("/etc/portway/agent.toml"),
        )
        .unwrap();
        assert_eq!(
            c.tunnels[0].cert_dir.as_deref(),
            Some(Path::new("/etc/portway/mail-cert"))
        );
        let flag = Tunnel::parse_flag("mail=127.0.0.1:8443,tls,cert-dir=/var/lib/c").unwrap();
        assert_eq!(flag.cert_dir.as_deref(), Some(Path::new("/var/lib/c")));
        let wrong = Tunnel::parse_flag("db=127.0.0.1:5432,tcp,cert-dir=/c").unwrap_err();
        assert!(wrong.contains("cert_dir"), "{wrong}");
    }
}
