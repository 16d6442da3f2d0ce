//! containerd's filter expressions, for `List` (`ctr snapshot ls` and containerd's
//! garbage collector use them): `field`, `field==value`, `field!=value`,
//! `field~=regex`, clauses joined by `,` (all must hold); a list of filters matches
//! when any one does. Fields of a snapshot: `name`, `parent`, `kind` (`view`,
//! `active`, `committed`) and `labels.<key>`, where a key with dots or slashes is
//! quoted: `labels."containerd.io/gc.root"`. Values may be quoted with `"`.

use crate::store::{Kind, Record};
use regex::Regex;

/// One comparison.
#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(Regex),
}

/// A parsed filter: clauses that must all hold.
#[derive(Debug)]
pub struct Filter {
    clauses: Vec<(Vec<String>, Op)>,
}

/// Parses `text`; the error names the filter and what is wrong with it.
pub fn parse(text: &str) -> Result<Filter, String> {
    let bad = |why: &str| format!("filter '{text}': {why}");
    let mut clauses = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let quoted = |i: &mut usize| -> Result<String, String> {
        // chars[*i] is the opening quote.
        let mut out = String::new();
        *i += 1;
        while *i < chars.len() {
            match chars[*i] {
                '\\' if *i + 1 < chars.len() => {
                    out.push(chars[*i + 1]);
                    *i += 2;
                }
                '"' => {
                    *i += 1;
                    return Ok(out);
                }
                c => {
                    out.push(c);
                    *i += 1;
                }
            }
        }
        Err(bad("unterminated quote"))
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            break;
        }
        // Field path.
        let mut path = Vec::new();
        loop {
            skip_ws(&mut i);
            let part = if i < chars.len() && chars[i] == '"' {
                quoted(&mut i)?
            } else {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                chars[start..i].iter().collect()
            };
            if part.is_empty() {
                return Err(bad("a field name is missing"));
            }
            path.push(part);
            if i < chars.len() && chars[i] == '.' {
                i += 1;
                continue;
            }
            break;
        }
        skip_ws(&mut i);
        let rest: String = chars[i..].iter().collect();
        let op = if rest.starts_with("==") || rest.starts_with("!=") || rest.starts_with("~=") {
            let kind = &rest[..2];
            i += 2;
            skip_ws(&mut i);
            let value = if i < chars.len() && chars[i] == '"' {
                quoted(&mut i)?
            } else {
                let start = i;
                while i < chars.len() && chars[i] != ',' {
                    i += 1;
                }
                chars[start..i]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string()
            };
            match kind {
                "==" => Op::Eq(value),
                "!=" => Op::Ne(value),
                _ => Op::Matches(
                    Regex::new(&value).map_err(|e| bad(&format!("bad regular expression: {e}")))?,
                ),
            }
        } else {
            Op::Present
        };
        match path[0].as_str() {
            "name" | "parent" | "kind" if path.len() == 1 => {}
            "labels" if path.len() == 2 => {}
            _ => return Err(bad(&format!("unknown field '{}'", path.join(".")))),
        }
        clauses.push((path, op));
        skip_ws(&mut i);
        if i < chars.len() {
            if chars[i] != ',' {
                return Err(bad(&format!("unexpected '{}'", chars[i])));
            }
            i += 1;
        }
    }
    Ok(Filter { clauses })
}

impl Filter {
    /// Whether snapshot `name` matches every clause.
    pub fn matches(&self, name: &str, rec: &Record) -> bool {
        self.clauses.iter().all(|(path, op)| {
            let value: Option<&str> = match path[0].as_str() {
                "name" => Some(name),
                "parent" => Some(rec.parent.as_str()),
                "kind" => Some(match rec.kind {
                    Kind::View => "view",
                    Kind::Active => "active",
                    Kind::Committed => "committed",
                }),
                _ => rec.labels.get(&path[1]).map(String::as_str),
            };
            match op {
                Op::Present => value.is_some_and(|v| !v.is_empty()),
                Op::Eq(v) => value == Some(v.as_str()),
                Op::Ne(v) => value != Some(v.as_str()),
                Op::Matches(re) => value.is_some_and(|s| re.is_match(s)),
            }
        })
    }
}

/// Whether a snapshot matches any of `filters` (all when there are none).
pub fn any_matches(filters: &[Filter], name: &str, rec: &Record) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(name, rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rec(parent: &str, labels: &[(&str, &str)]) -> Record {
        Record {
            id: 1,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: std::time::SystemTime::UNIX_EPOCH,
            updated: std::time::SystemTime::UNIX_EPOCH,
            size: 0,
            inodes: 0,
        }
    }

    #[test]
    fn containerd_filters_match() {
        let r = rec("p1", &[("containerd.io/gc.root", "x"), ("team", "a b")]);
        let yes = [
            "parent==p1",
            "kind==committed",
            r#"labels."containerd.io/gc.root""#,
            r#"labels."containerd.io/gc.root"==x"#,
            "labels.team==\"a b\"",
            "name~=^sha256:, kind!=view",
            "name==sha256:abc",
            // What containerd asks after a remote snapshot's ALREADY_EXISTS.
            r#"labels."containerd.io/gc.root"==x,parent=="p1""#,
        ];
        let top = rec("", &[]);
        assert!(parse(r#"name==a,parent=="""#).unwrap().matches("a", &top));
        assert!(!parse("parent").unwrap().matches("a", &top));
        for f in yes {
            assert!(parse(f).unwrap().matches("sha256:abc", &r), "{f}");
        }
        let no = [
            "parent==p2",
            "labels.other",
            "kind==active",
            "name~=^x, parent==p1",
        ];
        for f in no {
            assert!(!parse(f).unwrap().matches("sha256:abc", &r), "{f}");
        }
        let filters = vec![parse("parent==zz").unwrap(), parse("parent==p1").unwrap()];
        assert!(any_matches(&filters, "n", &r));
        assert!(any_matches(&[], "n", &r));
    }

    #[test]
    fn bad_filters_are_named() {
        for (f, want) in [
            ("size==3", "unknown field 'size'"),
            ("name~=(", "bad regular expression"),
            ("labels.\"x", "unterminated quote"),
            ("==x", "field name is missing"),
        ] {
            let e = parse(f).unwrap_err();
            assert!(e.contains(want) && e.contains(f), "{f}: {e}");
        }
    }
}
