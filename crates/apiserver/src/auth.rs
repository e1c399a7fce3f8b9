//! Bearer-token authentication from a tokens file, and authorisation by role.
//!
//! The tokens file is CSV like kube-apiserver's: `token,user,roles,namespaces`, where
//! `roles` is a comma-separated list (quote it when it has several) of `admin`,
//! `operator`, `agent`, `viewer`, and `namespaces` is a comma-separated list or `*`.
//!
//! | role       | namespaced kinds                                                   | cluster-scoped kinds |
//! |------------|--------------------------------------------------------------------|----------------------|
//! | `admin`    | every verb, every namespace                                        | every verb |
//! | `operator` | every verb, every namespace                                        | ConnectorClass, GatewayClass: every verb; Namespace: read |
//! | `agent`    | Connector, ConnectorAdvertisement, HTTPProxy, TCPProxy, Lease: every verb, own namespaces only | ConnectorClass: read; own Namespace: get |
//! | `viewer`   | read (get, list, watch), own namespaces only                       | Namespace (own), ConnectorClass, GatewayClass: read |
//!
//! Every user may read discovery, OpenAPI and the CustomResourceDefinitions, and ask what
//! it may do and who it is (SelfSubjectAccessReview, SelfSubjectReview).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::ApiError;
use crate::registry::Res;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Operator,
    Agent,
    Viewer,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "admin" => Some(Self::Admin),
            "operator" => Some(Self::Operator),
            "agent" => Some(Self::Agent),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Agent => "agent",
            Self::Viewer => "viewer",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    All,
    Only(Vec<String>),
}

impl Namespaces {
    fn allows(&self, ns: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(list) => list.iter().any(|n| n == ns),
        }
    }
}

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub roles: Vec<Role>,
    pub namespaces: Namespaces,
    /// Set for a joined device's credential: what it is bound to (see `devices`).
    pub device: Option<crate::devices::Binding>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    pub const ALL: [Self; 8] = [
        Self::Get,
        Self::List,
        Self::Watch,
        Self::Create,
        Self::Update,
        Self::Patch,
        Self::Delete,
        Self::DeleteCollection,
    ];

    /// A Kubernetes verb, as `as_str` writes it.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Watch => "watch",
            Self::Create => "create",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::DeleteCollection => "deletecollection",
        }
    }

    fn is_read(self) -> bool {
        matches!(self, Self::Get | Self::List | Self::Watch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading tokens file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
}

/// One user of a tokens file: a line `token,user,roles[,namespaces]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenLine {
    pub token: String,
    pub user: String,
    pub roles: Vec<Role>,
    pub namespaces: Namespaces,
}

impl TokenLine {
    /// Parses one line of a tokens file; `None` for a blank line or a `#` comment. Fields
    /// are trimmed; a list of several roles or namespaces is quoted, as in CSV.
    ///
    /// # Errors
    /// What is wrong with the line, for the caller to place in its file.
    pub fn parse(line: &str) -> Option<Result<Self, String>> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .comment(Some(b'#'))
            .trim(csv::Trim::All)
            .from_reader(line.as_bytes());
        let record = match reader.records().next()? {
            Ok(record) => record,
            Err(e) => return Some(Err(e.to_string())),
        };
        if record.iter().all(str::is_empty) {
            return None;
        }
        Some(Self::from_record(&record))
    }

    fn from_record(record: &csv::StringRecord) -> Result<Self, String> {
        if record.len() < 3 {
            return Err("expected token,user,roles[,namespaces]".into());
        }
        let (token, user) = (&record[0], &record[1]);
        if token.len() < 16 {
            return Err("token must be at least 16 characters".into());
        }
        let roles = record[2]
            .split(',')
            .filter(|r| !r.trim().is_empty())
            .map(|r| {
                Role::parse(r).ok_or_else(|| {
                    format!("unknown role {r:?}; use admin, operator, agent or viewer")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if roles.is_empty() {
            return Err("at least one role is required".into());
        }
        let ns_field = record.get(3).unwrap_or_default();
        let namespaces = if ns_field == "*" {
            Namespaces::All
        } else {
            Namespaces::Only(
                ns_field
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )
        };
        let scoped = roles
            .iter()
            .all(|r| matches!(r, Role::Agent | Role::Viewer));
        if scoped && namespaces == Namespaces::Only(vec![]) {
            return Err("agent and viewer users need namespaces (a list, or *)".into());
        }
        Ok(Self {
            token: token.to_owned(),
            user: user.to_owned(),
            roles,
            namespaces,
        })
    }
}

/// The users known by bearer token.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Arc<User>>,
}

impl Tokens {
    /// # Errors
    /// When the file cannot be read, or a line is malformed (the error names the line).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// # Errors
    /// When a line is malformed; the error names `source` and the line.
    pub fn parse(text: &str, source: &str) -> Result<Self, TokensError> {
        let mut by_token = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| TokensError::Line {
                path: source.to_owned(),
                line: i + 1,
                message,
            };
            let Some(parsed) = TokenLine::parse(line) else {
                continue;
            };
            let t = parsed.map_err(err)?;
            let user = User {
                name: t.user,
                roles: t.roles,
                namespaces: t.namespaces,
                device: None,
            };
            if by_token.insert(t.token, Arc::new(user)).is_some() {
                return Err(err("duplicate token".into()));
            }
        }
        Ok(Self { by_token })
    }

    /// The user an `Authorization: Bearer …` header names.
    pub fn authenticate(&self, header: Option<&str>) -> Option<Arc<User>> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        self.by_token.get(token).cloned()
    }
}

/// What a request touches, for authorisation.
pub struct Access<'a> {
    pub verb: Verb,
    pub res: Res,
    /// The namespace of the request; for Namespace objects, the namespace's own name.
    pub ns: Option<&'a str>,
    /// The `status` subresource.
    pub status: bool,
}

fn role_allows(role: Role, user: &User, a: &Access<'_>) -> bool {
    let in_own_ns =
        a.ns.is_some_and(|ns| user.namespaces.allows(ns)) || user.namespaces == Namespaces::All;
    let kind = a.res.kind;
    match role {
        Role::Admin => true,
        Role::Operator => match (a.res.namespaced, kind) {
            (true, _) => true,
            (false, "Namespace") => a.verb.is_read(),
            (false, _) => true,
        },
        // A proxy's or advertisement's status is the operator's word (what it granted, a
        // certificate it had signed): people and devices read it, never write it. A
        // connector's status is the device's own report.
        Role::Agent if a.status && !a.verb.is_read() && kind != "Connector" => false,
        Role::Agent => match (a.res.namespaced, kind) {
            (true, "Connector" | "ConnectorAdvertisement" | "HTTPProxy" | "TCPProxy" | "Lease") => {
                in_own_ns
            }
            // A device guards its own proxies (`portway http --basic-auth`): policies, and
            // the htpasswd Secrets they read, checked object by object in
            // `devices::check_write` (a person with the agent role may not). Secrets are
            // written, never read or listed: a device sees no other's password hashes.
            (true, "AccessPolicy") => in_own_ns,
            (true, "Secret") => in_own_ns && !a.verb.is_read() && user.device.is_some(),
            // A device reports its tunnels' life in its own project.
            (true, "Event") => in_own_ns,
            (true, _) => false,
            (false, "ConnectorClass") => a.verb.is_read(),
            (false, "Namespace") => a.verb == Verb::Get && in_own_ns,
            (false, _) => false,
        },
        // Secrets hold private keys: a project's viewers see its objects, never its keys.
        Role::Viewer => {
            a.verb.is_read()
                && match (a.res.namespaced, kind) {
                    (true, "Secret") => false,
                    (true, _) => in_own_ns,
                    (false, "Namespace") => in_own_ns,
                    (false, _) => true,
                }
        }
    }
}

/// The roles of `user` that allow the access; none means it is forbidden.
pub fn allowing_roles(user: &User, a: &Access<'_>) -> Vec<Role> {
    // A device's writes are checked object by object; a collection delete is not its job.
    if user.device.is_some() && a.verb == Verb::DeleteCollection {
        return Vec::new();
    }
    user.roles
        .iter()
        .copied()
        .filter(|r| role_allows(*r, user, a))
        .collect()
}

/// # Errors
/// 403 with Kubernetes' wording when no role of `user` allows the access.
pub fn authorize(user: &User, a: &Access<'_>) -> Result<(), ApiError> {
    if !allowing_roles(user, a).is_empty() {
        return Ok(());
    }
    let res = a.res;
    let scope = match (a.ns, res.namespaced) {
        (Some(ns), true) => format!("in the namespace \"{ns}\""),
        _ => "at the cluster scope".to_owned(),
    };
    let sub = if a.status { "/status" } else { "" };
    Err(ApiError::forbidden(format!(
        "{}{sub} is forbidden: User \"{}\" cannot {} resource \"{}{sub}\" in API group \"{}\" {scope}",
        res.key(),
        user.name,
        a.verb.as_str(),
        res.plural,
        res.group,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::registry;

    #[test]
    fn parses_roles_and_namespaces_and_names_bad_lines() {
        let t = Tokens::parse(
            "# comment\nadmintoken-0000000000,alice,admin\nagenttoken-0000000000,dev,agent,\"p1,p2\"\n",
            "tokens.csv",
        )
        .unwrap();
        let dev = t
            .authenticate(Some("Bearer agenttoken-0000000000"))
            .unwrap();
        assert_eq!(
            dev.namespaces,
            Namespaces::Only(vec!["p1".into(), "p2".into()])
        );
        assert!(t.authenticate(Some("Bearer nope")).is_none());
        assert!(t.authenticate(None).is_none());
        let err = Tokens::parse("x0000000000000000,u,wizard,*\n", "t.csv")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("t.csv:1:") && err.contains("wizard"),
            "{err}"
        );
        assert!(Tokens::parse("x0000000000000000,u,agent\n", "t").is_err());
    }

    #[test]
    fn token_line_skips_comments_and_blanks_and_reads_quoted_lists() {
        for skipped in ["", "   ", "# token,user,roles,namespaces", ",,,"] {
            assert_eq!(TokenLine::parse(skipped), None, "{skipped:?}");
        }
        let line = TokenLine::parse(" agenttoken-0000000000 , dev ,\"agent, viewer\",\"p1, p2\"")
            .unwrap()
            .unwrap();
        assert_eq!(
            line,
            TokenLine {
                token: "agenttoken-0000000000".into(),
                user: "dev".into(),
                roles: vec![Role::Agent, Role::Viewer],
                namespaces: Namespaces::Only(vec!["p1".into(), "p2".into()]),
            }
        );
        let admin = TokenLine::parse("admintoken-0000000000,alice,admin,*")
            .unwrap()
            .unwrap();
        assert_eq!(admin.namespaces, Namespaces::All);
        let operator = TokenLine::parse("optoken-000000000000,op,operator")
            .unwrap()
            .unwrap();
        assert_eq!(operator.namespaces, Namespaces::Only(vec![]));
    }

    #[test]
    fn token_line_says_what_is_wrong() {
        let err = |line: &str| TokenLine::parse(line).unwrap().unwrap_err();
        assert_eq!(
            err("x0000000000000000,u"),
            "expected token,user,roles[,namespaces]"
        );
        assert_eq!(
            err("short,u,admin,*"),
            "token must be at least 16 characters"
        );
        assert!(err("x0000000000000000,u,\"admin,wizard\",*").contains("\"wizard\""));
        assert_eq!(
            err("x0000000000000000,u,\" , \",*"),
            "at least one role is required"
        );
        assert_eq!(
            err("x0000000000000000,u,viewer"),
            "agent and viewer users need namespaces (a list, or *)"
        );
    }

    #[test]
    fn duplicate_tokens_are_named_by_line() {
        let err = Tokens::parse(
            "# users\n\nx0000000000000000,a,admin\nx0000000000000000,b,admin\n",
            "t.csv",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "t.csv:4: duplicate token");
    }

    #[test]
    fn role_table() {
        let reg = registry();
        let conn = reg.by_key("connectors.networking.datumapis.com").unwrap();
        let route = reg.by_key("httproutes.gateway.networking.k8s.io").unwrap();
        let class = reg
            .by_key("connectorclasses.networking.datumapis.com")
            .unwrap();
        let ns = reg.by_key("namespaces").unwrap();
        let user = |role, namespaces| User {
            name: "u".into(),
            roles: vec![role],
            namespaces,
            device: None,
        };
        let own = Namespaces::Only(vec!["p1".into()]);
        let ok = |u: &User, verb, res, ns| {
            let status = false;
            authorize(
                u,
                &Access {
                    verb,
                    res,
                    ns,
                    status,
                },
            )
            .is_ok()
        };
        let status_ok = |u: &User, verb, res, ns| {
            let status = true;
            authorize(
                u,
                &Access {
                    verb,
                    res,
                    ns,
                    status,
                },
            )
            .is_ok()
        };

        let agent = user(Role::Agent, own.clone());
        assert!(ok(&agent, Verb::Create, conn, Some("p1")));
        assert!(!ok(&agent, Verb::Get, conn, Some("p2")));
        assert!(!ok(&agent, Verb::List, conn, None));
        assert!(!ok(&agent, Verb::Get, route, Some("p1")));
        let tcp_proxy = reg.by_key("tcpproxies.networking.datumapis.com").unwrap();
        let tcp_route = reg.by_key("tcproutes.gateway.networking.k8s.io").unwrap();
        assert!(ok(&agent, Verb::Create, tcp_proxy, Some("p1")));
        assert!(!ok(&agent, Verb::Create, tcp_proxy, Some("p2")));
        assert!(!ok(&agent, Verb::Get, tcp_route, Some("p1")));
        assert!(!ok(&agent, Verb::Create, tcp_route, Some("p1")));
        let tls_route = reg.by_key("tlsroutes.gateway.networking.k8s.io").unwrap();
        assert!(!ok(&agent, Verb::Create, tls_route, Some("p1")));
        assert!(!ok(&agent, Verb::Get, tls_route, Some("p1")));
        assert!(ok(&agent, Verb::Watch, class, None));
        assert!(!ok(&agent, Verb::Update, class, None));
        assert!(ok(&agent, Verb::Get, ns, Some("p1")));
        assert!(!ok(&agent, Verb::Delete, ns, Some("p1")));
        // Status: a device reports its connector's; a proxy's is the operator's.
        assert!(status_ok(&agent, Verb::Patch, conn, Some("p1")));
        assert!(!status_ok(&agent, Verb::Patch, tcp_proxy, Some("p1")));
        assert!(!status_ok(&agent, Verb::Update, tcp_proxy, Some("p1")));
        assert!(status_ok(&agent, Verb::Get, tcp_proxy, Some("p1")));

        // Secrets: a device writes (its own, checked object by object), never reads; a
        // person with the agent role does neither.
        let secret = reg.by_key("secrets").unwrap();
        let policy = reg
            .by_key("accesspolicies.networking.datumapis.com")
            .unwrap();
        let device = User {
            device: Some(crate::devices::Binding {
                ns: "p1".into(),
                connector: "laptop".into(),
                connector_uid: "u".into(),
                node_id: "n".into(),
            }),
            ..user(Role::Agent, own.clone())
        };
        for verb in [Verb::Create, Verb::Patch, Verb::Update, Verb::Delete] {
            assert!(ok(&device, verb, secret, Some("p1")), "{verb:?}");
            assert!(!ok(&agent, verb, secret, Some("p1")), "{verb:?}");
        }
        for verb in [Verb::Get, Verb::List, Verb::Watch] {
            assert!(!ok(&device, verb, secret, Some("p1")), "{verb:?}");
        }
        assert!(!ok(&device, Verb::Create, secret, Some("p2")));
        assert!(ok(&device, Verb::Create, policy, Some("p1")));
        assert!(!status_ok(&device, Verb::Patch, policy, Some("p1")));

        let viewer = user(Role::Viewer, own);
        assert!(ok(&viewer, Verb::List, route, Some("p1")));
        assert!(!ok(&viewer, Verb::Patch, conn, Some("p1")));
        let operator = user(Role::Operator, Namespaces::All);
        assert!(ok(&operator, Verb::Create, route, Some("any")));
        assert!(ok(&operator, Verb::Patch, tcp_route, Some("any")));
        assert!(ok(&viewer, Verb::List, tcp_route, Some("p1")));
        assert!(!ok(&viewer, Verb::Create, tcp_proxy, Some("p1")));
        assert!(ok(&operator, Verb::Update, class, None));
        assert!(!ok(&operator, Verb::Delete, ns, Some("p1")));
        let err = authorize(
            &viewer,
            &Access {
                verb: Verb::Delete,
                res: conn,
                ns: Some("p1"),
                status: false,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "connectors.networking.datumapis.com is forbidden: User \"u\" cannot delete resource \"connectors\" in API group \"networking.datumapis.com\" in the namespace \"p1\""
        );
    }
}
