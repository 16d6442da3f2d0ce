//! Image references (`[host[:port]/]name[:tag][@digest]`), parsed by hand.
//!
//! oci-client's `Reference::from_str` matches docker's reference grammar with one large
//! regular expression, which the `regex` crate compiles on first use: about 60 ms, the
//! longest single step of a conversion's start. This parser accepts and rejects the same
//! strings (the tests compare the two) and builds the same `Reference`.

use oci_client::Reference;

const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// Parses `s` as docker's reference grammar does, with its defaults: `docker.io` for
/// a name without a host, `library/` for a single-component Docker Hub name, and the
/// tag `latest` when neither tag nor digest is given. The error says what is wrong.
pub fn parse_reference(s: &str) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("repository name must have at least one component".into());
    }
    let invalid = || "invalid reference format".to_string();
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    // A tag follows the last ':' after the last '/' (a ':' before it is a port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        if !valid_tag(t) {
            return Err(invalid());
        }
    }
    if let Some(d) = digest {
        if !valid_digest_syntax(d) {
            return Err(invalid());
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // The first of several components is a host when the grammar allows it there.
    let host = if components.len() > 1 && valid_host(components[0]) {
        Some(components.remove(0))
    } else {
        None
    };
    if !components.iter().all(|c| valid_path_component(c)) {
        return Err(invalid());
    }
    let (mut registry, mut repository) = match host {
        Some(h) if h.contains('.') || h.contains(':') || h == "localhost" => {
            (h.to_string(), components.join("/"))
        }
        // A host-shaped first component without '.', ':' or "localhost" is a path.
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if registry == "index.docker.io" {
        registry = "docker.io".into();
    }
    if registry == "docker.io" && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(format!(
            "repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
        ));
    }
    if let Some(d) = digest {
        let want = match d.split_once(':') {
            Some(("sha256", _)) => 64,
            Some(("sha384", _)) => 96,
            Some(("sha512", _)) => 128,
            _ => return Err("unsupported digest algorithm".into()),
        };
        if d.len() - d.find(':').map_or(0, |i| i + 1) != want {
            return Err("invalid checksum digest length".into());
        }
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

fn alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

/// `label(.label)*(:port)?`, each label alphanumerics with inner '-'.
fn valid_host(h: &str) -> bool {
    let (name, port) = match h.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    name.split('.').all(|l| {
        let b = l.as_bytes();
        !b.is_empty()
            && alnum(b[0])
            && alnum(b[b.len() - 1])
            && b.iter().all(|&c| alnum(c) || c == b'-')
    })
}

/// `[a-z0-9]+` runs joined by one '.', one or two '_', or any number of '-'.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let lower = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !lower(b[0]) || !lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// `algorithm:hex` with the algorithm `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*`
/// and at least 32 hex digits.
fn valid_digest_syntax(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|part| {
        let b = part.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(|c| c.is_ascii_alphanumeric())
    });
    alg_ok && hex.len() >= 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input gets the same answer as oci-spec's regular expression: the same
    /// reference, or an error from both.
    #[test]
    fn agrees_with_the_regular_expression_parser() {
        let d64 = "sha256:".to_string() + &"ab".repeat(32);
        let long = "a".repeat(250);
        let inputs = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "user/repo:tag".into(),
            "docker.io/busybox".into(),
            "index.docker.io/library/busybox:latest".into(),
            "localhost/repo".into(),
            "localhost:5000/repo:v1".into(),
            "127.0.0.1:5077/py:v1".into(),
            "127.0.0.1:5077/a/b/c:v1".into(),
            "[::1]:5000/repo".into(),
            "registry.example.com/team/app".into(),
            "reg-1.example.com:443/a_b/c__d/e-f/g.h:V1.0_rc-1".into(),
            format!("127.0.0.1:5000/repo@{d64}"),
            format!("127.0.0.1:5000/repo:v1@{d64}"),
            format!("repo@{d64}"),
            "repo@sha256:abc".into(),
            "repo@sha384:".to_string() + &"0".repeat(96),
            "repo@md5:".to_string() + &"0".repeat(32),
            "repo@sha256:".to_string() + &"0".repeat(63),
            "Repo".into(),
            "repo:".into(),
            "repo:-tag".into(),
            ":tag".into(),
            "/repo".into(),
            "repo/".into(),
            "a//b".into(),
            "a/b_.c".into(),
            "a/b___c".into(),
            "a/b--c".into(),
            "a/b..c".into(),
            "-host.com/repo".into(),
            "host-.com/repo".into(),
            "host.com:/repo".into(),
            "host.com:x/repo".into(),
            "Host.Com/repo".into(),
            "UPPER/repo".into(),
            "my_host/repo".into(),
            "a/b:c:d".into(),
            "a@b@c".into(),
            "repo:".to_string() + &"t".repeat(128),
            "repo:".to_string() + &"t".repeat(129),
            format!("docker.io/{long}"),
            format!("{long}/{long}"),
            "tcp://host/repo".into(),
            "host.com/repo tag".into(),
            "é/repo".into(),
        ];
        for s in &inputs {
            let ours = parse_reference(s).map(|r| r.whole());
            let theirs = s.parse::<Reference>().map(|r| r.whole());
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{s}: {ours:?} vs {theirs:?}");
            if let (Ok(a), Ok(b)) = (&ours, &theirs) {
                assert_eq!(a, b, "{s}");
                let (x, y) = (parse_reference(s).unwrap(), s.parse::<Reference>().unwrap());
                assert_eq!(
                    (x.registry(), x.repository(), x.tag(), x.digest()),
                    (y.registry(), y.repository(), y.tag(), y.digest()),
                    "{s}"
                );
            }
        }
    }
}
