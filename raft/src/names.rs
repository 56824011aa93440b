//! Names are types: an instance or snapshot name is validated once,
//! where it enters (the CLI's arguments, a decoded frame), into one of
//! these. Every path under the data dir is built from them, so a name like
//! `../..` can never reach the filesystem. Decoding validates too
//! (`serde(try_from)`): a peer cannot send an unchecked name.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name '{name}': use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
}

fn valid(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn parse(name: &str) -> Result<Self, NameError> {
                if valid(name) {
                    Ok($ty(name.to_string()))
                } else {
                    Err(NameError {
                        kind: $kind,
                        name: name.to_string(),
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(name: String) -> Result<Self, NameError> {
                $ty::parse(&name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(name: &str) -> Result<Self, NameError> {
                $ty::parse(name)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// An instance's name: its directory under `instances/` on its owner.
    InstanceName,
    "instance"
);
name_type!(
    /// A snapshot's name: its directory under the instance's `snapshots/`.
    SnapshotName,
    "snapshot"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_parse() {
        for good in ["c1", "a", "web-1", &"x".repeat(63)] {
            assert!(InstanceName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            "../..",
            "a/b",
            "/etc",
            "-a",
            "a-",
            "A",
            "a.b",
            &"x".repeat(64),
        ] {
            let e = InstanceName::parse(bad).expect_err(bad);
            assert_eq!(e.name, bad);
        }
    }

    #[test]
    fn decoding_a_bad_name_fails() {
        let encoded = ferry_transport::codec::encode(&"../..".to_string()).expect("encode");
        let decoded: Result<InstanceName, _> = ferry_transport::codec::decode(&encoded);
        assert!(decoded.is_err());
        let encoded = ferry_transport::codec::encode(&"c1".to_string()).expect("encode");
        let decoded: InstanceName = ferry_transport::codec::decode(&encoded).expect("decode");
        assert_eq!(decoded.as_str(), "c1");
    }
}
