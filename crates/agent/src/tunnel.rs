//! Tunnels the agent offers: a name, a target `host:port` on the device, a protocol, and
//! for HTTP and TLS tunnels the public hostnames to publish.

use std::path::PathBuf;

use portway_api::validation;
// Re-exported: the agent's callers name it `tunnel::Target` (and `portway_agent::Target`).
pub use portway_api::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Published through an HTTPProxy when it has hostnames.
    #[default]
    Http,
    /// Advertised; published at a public TCP port (a TCPProxy) when `public` says so.
    Tcp,
    /// A TLS server on the device, always published by TLS passthrough on the edge's TLS
    /// port (a TCPProxy with `spec.tls`): under its canonical name and `hostnames`. The
    /// device terminates TLS; the edge never decrypts.
    Tls,
    /// A UDP service: advertised as UDP; published at a public UDP port of the built-in
    /// edge (a TCPProxy with a `udp://` backend) when `public` says so.
    Udp,
}

/// Which public TCP port a tcp tunnel asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicPort {
    /// Any: the edge's range gives one, kept while the tunnel lives.
    Any,
    Port(u16),
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tunnel {
    /// Unique among the agent's tunnels; a DNS label.
    pub name: String,
    pub target: Target,
    pub protocol: Protocol,
    /// Public hostnames (HTTP and TLS tunnels).
    pub hostnames: Vec<String>,
    /// Published at a public TCP port (TCP tunnels only).
    pub public: Option<PublicPort>,
    /// Each connection to the target starts with a PROXY protocol v2 header naming the
    /// public client (tcp and tls tunnels; like `ngrok --proxy-proto 2`).
    pub proxy_protocol: bool,
    /// A tls tunnel's certificate, kept here: the key made here (`key.pem`), never sent;
    /// the request for the tunnel's names (`request.pem`); the chain the control plane's
    /// issuer signed (`cert.pem`), renewed in place.
    pub cert_dir: Option<PathBuf>,
    /// Who may call an http tunnel's hostnames (`portway http --basic-auth ...`): written
    /// as an AccessPolicy guarding its HTTPProxy.
    pub access: Option<Access>,
}

/// An http tunnel's access rules: the policy's rules (its `targetRefs` and basic auth's
/// Secret are filled in), and the basic auth users as htpasswd text of hashes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Access {
    pub rules: portway_api::AccessPolicySpec,
    pub htpasswd: Option<String>,
}

/// The one-liner's access flags (`portway http --basic-auth ... --allow-ip ...`).
#[derive(Clone, Debug, Default)]
pub struct AccessFlags {
    /// `USER:PASSWORD` pairs; hashed here (bcrypt), only the hash leaves the machine.
    pub basic_auth: Vec<String>,
    pub allow_ip: Vec<String>,
    pub deny_ip: Vec<String>,
    /// Per client address: `N/s`, `N/m` or `N/h`.
    pub rate_limit: Option<String>,
    /// An issuer whose keys its OpenID configuration names.
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Vec<String>,
}

impl AccessFlags {
    /// The tunnel's access rules, or `None` when no flag asks for any.
    ///
    /// # Errors
    /// A sentence naming the flag and what is wrong with its value.
    pub fn access(&self) -> Result<Option<Access>, String> {
        use portway_api::access;
        let mut rules = portway_api::AccessPolicySpec::default();
        for (flag, list) in [("--allow-ip", &self.allow_ip), ("--deny-ip", &self.deny_ip)] {
            for c in list {
                access::cidr(c).map_err(|e| format!("{flag}: {e}"))?;
            }
        }
        if !self.allow_ip.is_empty() || !self.deny_ip.is_empty() {
            rules.ip = Some(portway_api::IpRules {
                allow: self.allow_ip.clone(),
                deny: self.deny_ip.clone(),
            });
        }
        if let Some(r) = &self.rate_limit {
            let rate = access::parse_rate(r).map_err(|e| format!("--rate-limit: {e}"))?;
            rules.rate_limit = Some(portway_api::RateLimit {
                per_client: Some(rate),
                per_tunnel: None,
            });
        }
        if let Some(issuer) = &self.jwt_issuer {
            access::fetch_url(issuer).map_err(|e| format!("--jwt-issuer: {e}"))?;
            rules.jwt = Some(portway_api::JwtAuth {
                issuer: issuer.clone(),
                audiences: self.jwt_audience.clone(),
                ..Default::default()
            });
        }
        let mut htpasswd = None;
        if !self.basic_auth.is_empty() {
            if self.jwt_issuer.is_some() {
                return Err(
                    "--basic-auth and --jwt-issuer both read the Authorization header: choose one"
                        .into(),
                );
            }
            let mut lines = String::new();
            for pair in &self.basic_auth {
                let (user, password) = pair
                    .split_once(':')
                    .filter(|(u, p)| !u.is_empty() && !p.is_empty())
                    .ok_or("--basic-auth: expected USER:PASSWORD")?;
                let hash = bcrypt::hash(password, 10).map_err(|e| format!("--basic-auth: {e}"))?;
                lines.push_str(&format!("{user}:{hash}\n"));
            }
            access::htpasswd(&lines).map_err(|e| format!("--basic-auth: {}", e.join("; ")))?;
            htpasswd = Some(lines);
            // The Secret's name is the agent's to fill in.
            rules.basic_auth = Some(portway_api::BasicAuth::default());
        }
        if rules == portway_api::AccessPolicySpec::default() {
            return Ok(None);
        }
        Ok(Some(Access { rules, htpasswd }))
    }
}

impl Tunnel {
    /// Parses the `--tunnel` flag: `NAME=HOST:PORT[,http|tcp|tls|udp][,HOSTNAME...]`,
    /// where tcp and udp tunnels take `public` or `public=PORT` instead of hostnames,
    /// tcp and tls ones take `proxy-protocol`, and tls ones `cert-dir=DIR`.
    ///
    /// # Errors
    /// A sentence naming the part that is wrong.
    pub fn parse_flag(s: &str) -> Result<Self, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| {
            format!("--tunnel {s:?}: expected NAME=HOST:PORT[,http|tcp|tls|udp][,HOSTNAME...]")
        })?;
        let mut parts = rest.split(',').map(str::trim);
        let target = Target::parse(parts.next().unwrap_or_default())
            .map_err(|e| format!("--tunnel {name}: target {e}"))?;
        let mut t = Self {
            name: name.trim().to_owned(),
            target,
            protocol: Protocol::Http,
            hostnames: Vec::new(),
            public: None,
            proxy_protocol: false,
            cert_dir: None,
            access: None,
        };
        for p in parts.filter(|p| !p.is_empty()) {
            match p {
                "http" => t.protocol = Protocol::Http,
                "tcp" => t.protocol = Protocol::Tcp,
                "tls" => t.protocol = Protocol::Tls,
                "udp" => t.protocol = Protocol::Udp,
                "public" => t.public = Some(PublicPort::Any),
                "proxy-protocol" => t.proxy_protocol = true,
                p if p.starts_with("cert-dir=") => {
                    t.cert_dir = Some(PathBuf::from(&p["cert-dir=".len()..]));
                }
                p if p.starts_with("public=") => {
                    let port = p["public=".len()..]
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| {
                            format!("--tunnel {name}: {p:?}: a port 1-65535 is wanted")
                        })?;
                    t.public = Some(PublicPort::Port(port));
                }
                host => t.hostnames.push(host.to_ascii_lowercase()),
            }
        }
        t.check()
            .map_err(|(field, e)| format!("--tunnel {name}: {field}: {e}"))?;
        Ok(t)
    }

    /// Checks name and hostnames; returns the failing field and why.
    ///
    /// # Errors
    /// `(field, reason)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        validation::dns1123_label(&self.name).map_err(|e| ("name", e))?;
        let ports = matches!(self.protocol, Protocol::Tcp | Protocol::Udp);
        if ports && !self.hostnames.is_empty() {
            return Err((
                "hostnames",
                "only http and tls tunnels have hostnames".into(),
            ));
        }
        if !ports && self.public.is_some() {
            return Err((
                "public",
                "only tcp and udp tunnels have a public port (http and tls ones have hostnames)"
                    .into(),
            ));
        }
        if matches!(self.protocol, Protocol::Http | Protocol::Udp) && self.proxy_protocol {
            return Err((
                "proxy_protocol",
                "only tcp and tls tunnels take the PROXY protocol (http ones get X-Forwarded-For)"
                    .into(),
            ));
        }
        if self.protocol != Protocol::Tls && self.cert_dir.is_some() {
            return Err((
                "cert_dir",
                "only tls tunnels keep a certificate of their own (the edge serves http ones with its own)"
                    .into(),
            ));
        }
        if self.hostnames.len() > validation::MAX_ITEMS {
            return Err((
                "hostnames",
                format!("at most {} hostnames", validation::MAX_ITEMS),
            ));
        }
        for h in &self.hostnames {
            // Passthrough names are exact: see `TlsPassthrough`.
            validation::hostname(h, self.protocol == Protocol::Http)
                .map_err(|e| ("hostnames", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        let t = Tunnel::parse_flag("web=127.0.0.1:3000,http,App.example.com").unwrap();
        assert_eq!(t.hostnames, ["app.example.com"]);
        assert_eq!(
            Tunnel::parse_flag("db=localhost:5432,tcp")
                .unwrap()
                .protocol,
            Protocol::Tcp
        );
        assert!(
            Tunnel::parse_flag("db=localhost:5432,tcp,x.example.com")
                .unwrap_err()
                .contains("hostnames")
        );
        assert!(
            Tunnel::parse_flag("Bad=localhost:1")
                .unwrap_err()
                .contains("name")
        );
        assert!(Tunnel::parse_flag("web").is_err());
        let db = Tunnel::parse_flag("db=127.0.0.1:5432,tcp,public=20001").unwrap();
        assert_eq!(db.public, Some(PublicPort::Port(20001)));
        let any = Tunnel::parse_flag("db=127.0.0.1:5432,tcp,public").unwrap();
        assert_eq!(any.public, Some(PublicPort::Any));
        assert!(
            Tunnel::parse_flag("web=127.0.0.1:1,http,public")
                .unwrap_err()
                .contains("public")
        );
        assert!(Tunnel::parse_flag("db=127.0.0.1:1,tcp,public=0").is_err());
        let tls = Tunnel::parse_flag("db=127.0.0.1:8443,tls,DB.example.com").unwrap();
        assert_eq!(
            (tls.protocol, tls.hostnames.as_slice()),
            (Protocol::Tls, ["db.example.com".to_owned()].as_slice())
        );
        assert!(
            Tunnel::parse_flag("db=127.0.0.1:8443,tls,*.example.com")
                .unwrap_err()
                .contains("hostnames")
        );
        assert!(Tunnel::parse_flag("db=127.0.0.1:8443,tls,public").is_err());
        let dns = Tunnel::parse_flag("dns=127.0.0.1:53,udp,public=20053").unwrap();
        assert_eq!(
            (dns.protocol, dns.public),
            (Protocol::Udp, Some(PublicPort::Port(20053)))
        );
        assert!(Tunnel::parse_flag("dns=127.0.0.1:53,udp,proxy-protocol").is_err());
        assert!(
            Tunnel::parse_flag("ssh=127.0.0.1:22,tcp,public,proxy-protocol")
                .unwrap()
                .proxy_protocol
        );
        assert!(
            Tunnel::parse_flag("web=127.0.0.1:80,http,proxy-protocol")
                .unwrap_err()
                .contains("proxy_protocol")
        );
    }
}
