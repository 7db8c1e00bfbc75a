//! 32-byte identifiers: chunk ids (keyed BLAKE3 of the chunk) and object names (BLAKE3 of the
//! stored bytes). Shown as 64 lowercase hex digits; a unique prefix is enough to name a snapshot.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id(pub [u8; 32]);

impl Id {
    pub const LEN: usize = 32;

    /// The name of a stored object: the unkeyed BLAKE3 hash of its bytes, so anyone holding the
    /// store (no key needed) can check an object against its name.
    pub fn of_object(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits: what people read and type.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Id> {
        Some(Id(bytes.try_into().ok()?))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl FromStr for Id {
    type Err = Error;

    fn from_str(s: &str) -> Result<Id, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::invalid("id", format!("{s:?} is not 64 hex digits")))?;
        Ok(Id(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = Id::of_object(b"x");
        assert_eq!(id.to_hex().parse::<Id>().unwrap(), id);
        assert_eq!(id.short().len(), 8);
        assert!(id.to_hex().starts_with(&id.short()));
        assert!("zz".parse::<Id>().is_err());
    }
}
