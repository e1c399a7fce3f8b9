//! A `host:port` a tunnel reaches on a device, as the agent, the operator and the sidecar
//! name it.

use std::fmt;

use crate::validation;

/// A `host:port` target as seen from the device. The host is lowercase and never
/// bracketed; [`Display`](fmt::Display) adds the brackets an IPv6 address needs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
}
