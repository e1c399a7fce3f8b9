//! The `Proxy-Status` response field (RFC 9209): how the agent says, in its answer to a
//! tunnel request, what went wrong between it and the app, and how the gateway reads it.

/// The field name.
pub const NAME: &str = "proxy-status";

/// The proxy name Portway's agent reports under.
const PROXY: &str = "portway-agent";

/// A `Proxy-Status` value: `error` is one of RFC 9209's error types (such as
/// `connection_refused`), `details` a sentence for people.
pub fn value(error: &str, details: &str) -> String {
    let mut quoted = String::with_capacity(details.len() + 2);
    for c in details.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            // An sf-string holds printable ASCII only.
            ' '..='~' => quoted.push(c),
            _ => quoted.push('?'),
        }
    }
    format!("{PROXY}; error={error}; details=\"{quoted}\"")
}

/// The `details` parameter of a `Proxy-Status` value, unescaped.
pub fn details(value: &str) -> Option<String> {
    let start = value.find("details=\"")? + "details=\"".len();
    let mut out = String::new();
    let mut chars = value[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_survive_the_round_trip() {
        let v = value(
            "connection_refused",
            r#"the app at "127.0.0.1:3000" \ refused"#,
        );
        assert_eq!(
            v,
            r#"portway-agent; error=connection_refused; details="the app at \"127.0.0.1:3000\" \\ refused""#
        );
        assert_eq!(
            details(&v).as_deref(),
            Some(r#"the app at "127.0.0.1:3000" \ refused"#)
        );
        assert_eq!(details("portway-agent; error=x"), None);
        assert_eq!(details("p; details=\"unterminated"), None);
    }
}
