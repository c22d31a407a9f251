//! Protocol versions and capability tokens.
//!
//! The protocol is versioned as `major.minor`. A helper serves exactly one major version; a
//! client whose major differs is refused at `Initialize`. Minor versions only add things
//! (methods, optional fields, capability tokens), so a client gates optional behaviour on
//! [`Version::supports`] or on a capability token rather than on string equality.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A protocol version, `major.minor`.
///
/// Serialized as the string `"1.0"`.
///
/// ```
/// use cstor_protocol::Version;
/// let v: Version = "1.0".parse().unwrap();
/// assert_eq!(v, Version::new(1, 0));
/// assert!(Version::new(1, 2).supports(Version::new(1, 1)));
/// assert!(!Version::new(1, 0).supports(Version::new(1, 1)));
/// assert!(!Version::new(2, 0).supports(Version::new(1, 0)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Incompatible changes bump the major version.
    pub major: u32,
    /// Compatible additions bump the minor version.
    pub minor: u32,
}

impl Version {
    /// Builds a version.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// True when a peer speaking `self` offers everything that `wanted` defined: same major,
    /// and a minor at least as high.
    pub fn supports(self, wanted: Version) -> bool {
        self.major == wanted.major && self.minor >= wanted.minor
    }
}

/// The version this crate describes.
pub const PROTOCOL_VERSION: Version = Version::new(1, 1);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The error returned when a version string is not `MAJOR.MINOR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid protocol version {0:?}: expected MAJOR.MINOR, e.g. \"1.0\"")]
pub struct ParseVersionError(pub String);

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVersionError(s.to_owned());
        let (major, minor) = s.split_once('.').ok_or_else(err)?;
        let parse = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            p.parse::<u32>().map_err(|_| err())
        };
        Ok(Version::new(parse(major)?, parse(minor)?))
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Capability tokens a helper lists in its `Initialize` reply.
///
/// A token names a feature that a client may use; a client must ignore tokens it does not know.
pub mod capability {
    /// `GetLayer` returns a layer stream in the format of [`crate::stream`], version 1, and
    /// file contents through `FetchFds`.
    pub const LAYER_STREAM_V1: &str = "layer-stream-v1";
    /// Layer handles carry a lease that `KeepAlive` renews.
    pub const LEASES: &str = "leases";
    /// The helper reads additional image stores (`additionalimagestores`).
    pub const ADDITIONAL_IMAGE_STORES: &str = "additional-image-stores";
    /// Since 1.1: `Initialize` passes a pidfd of the helper process when asked
    /// (`helper_pidfd`).
    pub const HELPER_PIDFD: &str = "helper-pidfd";
    /// The helper serves ostree repositories: the methods of [`crate::ostree`].
    pub const OSTREE: &str = "ostree";

    /// Every token this version of the crate knows.
    pub const ALL: &[&str] = &[
        LAYER_STREAM_V1,
        LEASES,
        ADDITIONAL_IMAGE_STORES,
        HELPER_PIDFD,
        OSTREE,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        assert_eq!("1.0".parse::<Version>().unwrap().to_string(), "1.0");
        assert_eq!("12.345".parse::<Version>().unwrap(), Version::new(12, 345));
        for bad in ["", "1", "1.", ".1", "1.0.0", "a.b", "-1.0", "1.+2", " 1.0"] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn serde_as_string() {
        let v: Version = serde_json::from_str("\"1.3\"").unwrap();
        assert_eq!(v, Version::new(1, 3));
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"1.3\"");
        assert!(serde_json::from_str::<Version>("1.3").is_err());
    }
}
