//! Tunnels the agent offers: a name, a target `host:port` on the device, a protocol, and
//! for HTTP tunnels the public hostnames to publish.

use std::fmt;

use portway_api::validation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Published through an HTTPProxy when it has hostnames.
    #[default]
    Http,
    /// Advertised only; reachable by CONNECT.
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// A `host:port` target as seen from the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Target {
    /// Parses `host:port` (`[v6]:port` for IPv6).
    ///
    /// # Errors
    /// A sentence saying what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (host, port) = rest
                    .split_once("]:")
                    .ok_or_else(|| format!("{s:?} is not [ipv6]:port"))?;
                (host.to_owned(), port)
            }
            None => {
                let (host, port) = s
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{s:?} is not host:port"))?;
                (host.to_ascii_lowercase(), port)
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: port {port:?} is not a number between 1 and 65535"))?;
        if port == 0 {
            return Err(format!("{s:?}: port must be between 1 and 65535"));
        }
        validation::service_address(&host).map_err(|e| format!("{s:?}: host {e}"))?;
        if host.starts_with("*.") {
            return Err(format!("{s:?}: a target must be one host, not a wildcard"));
        }
        Ok(Self { host, port })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// Unique among the agent's tunnels; a DNS label.
    pub name: String,
    pub target: Target,
    pub protocol: Protocol,
    /// Public hostnames (HTTP tunnels only).
    pub hostnames: Vec<String>,
}

impl Tunnel {
    /// Parses the `--tunnel` flag: `NAME=HOST:PORT[,http|tcp][,HOSTNAME...]`.
    ///
    /// # Errors
    /// A sentence naming the part that is wrong.
    pub fn parse_flag(s: &str) -> Result<Self, String> {
        let (name, rest) = s.split_once('=').ok_or_else(|| {
            format!("--tunnel {s:?}: expected NAME=HOST:PORT[,http|tcp][,HOSTNAME...]")
        })?;
        let mut parts = rest.split(',').map(str::trim);
        let target = Target::parse(parts.next().unwrap_or_default())
            .map_err(|e| format!("--tunnel {name}: target {e}"))?;
        let mut t = Self {
            name: name.trim().to_owned(),
            target,
            protocol: Protocol::Http,
            hostnames: Vec::new(),
        };
        for p in parts.filter(|p| !p.is_empty()) {
            match p {
                "http" => t.protocol = Protocol::Http,
                "tcp" => t.protocol = Protocol::Tcp,
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
        if self.protocol == Protocol::Tcp && !self.hostnames.is_empty() {
            return Err(("hostnames", "only http tunnels have hostnames".into()));
        }
        if self.hostnames.len() > validation::MAX_ITEMS {
            return Err((
                "hostnames",
                format!("at most {} hostnames", validation::MAX_ITEMS),
            ));
        }
        for h in &self.hostnames {
            validation::hostname(h, true).map_err(|e| ("hostnames", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("127.0.0.1:3000").unwrap(),
            Target {
                host: "127.0.0.1".into(),
                port: 3000
            }
        );
        assert_eq!(Target::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(Target::parse("LocalHost:80").unwrap().host, "localhost");
        assert!(
            Target::parse("localhost")
                .unwrap_err()
                .contains("host:port")
        );
        assert!(Target::parse("localhost:0").is_err());
        assert!(
            Target::parse("localhost:99999")
                .unwrap_err()
                .contains("port")
        );
        assert!(Target::parse("bad host:80").is_err());
        assert!(Target::parse("*.example.com:80").is_err());
    }

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
    }
}
