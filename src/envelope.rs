//! Sealed, padded metadata objects: config, index files and snapshots.
//!
//! Layout: `magic[8] || ephemeral_public[32] || nonce[24] || ciphertext || tag[16]`. The
//! plaintext is `postcard(value) || zeros`, padded so that the whole object is
//! [`padding::padded_len`] of its unpadded size. The magic (which also carries the object
//! kind's version) is the AAD. Everything after the magic is authenticated: a changed ephemeral key
//! derives another session key and fails the tag check.
//!
//! Objects that every writer must read (obsolete lists, format 4) are sealed under a symmetric
//! key instead ([`seal_shared`]): `magic[8] || nonce[24] || ciphertext || tag[16]`, padded alike.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crypto::{CipherKey, OpeningKey, SEAL_OVERHEAD, SealingKey};
use crate::error::{Error, Result};
use crate::padding;

const HEADER_LEN: usize = 8 + 32;

pub fn seal<T: Serialize>(magic: &[u8; 8], recipient: &SealingKey, value: &T) -> Vec<u8> {
    seal_plaintext(
        magic,
        recipient,
        postcard::to_allocvec(value).expect("metadata serializes"),
    )
}

/// Seals an encoded value (padding it): [`seal`] after serialization; fuzzing seals arbitrary
/// plaintexts with it, to reach the decoders behind the authentication.
pub(crate) fn seal_plaintext(
    magic: &[u8; 8],
    recipient: &SealingKey,
    mut plain: Vec<u8>,
) -> Vec<u8> {
    let unpadded = (HEADER_LEN + SEAL_OVERHEAD + plain.len()) as u64;
    plain.resize(
        plain.len() + (padding::padded_len(unpadded) - unpadded) as usize,
        0,
    );
    let (ephemeral_public, key) = recipient.new_session();
    let sealed = key.seal(magic, &plain);
    // Let go first: a backup's index file is ~1.5 MB, held here up to three times.
    drop(plain);
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&ephemeral_public);
    out.extend_from_slice(&sealed);
    out
}

pub fn open<T: DeserializeOwned>(
    magic: &[u8; 8],
    reader: &OpeningKey,
    bytes: &[u8],
    object: &str,
) -> Result<T> {
    if bytes.len() < HEADER_LEN + SEAL_OVERHEAD {
        return Err(Error::corrupt(
            object,
            format!("truncated to {} bytes", bytes.len()),
        ));
    }
    check_magic(magic, &bytes[..8], object)?;
    let ephemeral_public: [u8; 32] = bytes[8..HEADER_LEN].try_into().expect("32 bytes");
    let plain = reader
        .session(&ephemeral_public)?
        .and_then(|key| key.open(magic, &bytes[HEADER_LEN..]))
        .ok_or_else(|| {
            Error::corrupt(
                object,
                "authentication failed (damaged, or not of this repository)",
            )
        })?;
    decode_padded(&plain, object)
}

/// Seals `value` under a key every writer holds (docs/FORMAT.md §10: obsolete lists).
pub fn seal_shared<T: Serialize>(magic: &[u8; 8], key: &CipherKey, value: &T) -> Vec<u8> {
    let mut plain = postcard::to_allocvec(value).expect("metadata serializes");
    let unpadded = (8 + SEAL_OVERHEAD + plain.len()) as u64;
    plain.resize(
        plain.len() + (padding::padded_len(unpadded) - unpadded) as usize,
        0,
    );
    let mut out = magic.to_vec();
    out.extend(key.seal(magic, &plain));
    out
}

/// Opens what [`seal_shared`] sealed.
pub fn open_shared<T: DeserializeOwned>(
    magic: &[u8; 8],
    key: &CipherKey,
    bytes: &[u8],
    object: &str,
) -> Result<T> {
    if bytes.len() < 8 + SEAL_OVERHEAD {
        return Err(Error::corrupt(
            object,
            format!("truncated to {} bytes", bytes.len()),
        ));
    }
    check_magic(magic, &bytes[..8], object)?;
    let plain = key.open(magic, &bytes[8..]).ok_or_else(|| {
        Error::corrupt(
            object,
            "authentication failed (damaged, or not of this repository)",
        )
    })?;
    decode_padded(&plain, object)
}

fn decode_padded<T: DeserializeOwned>(plain: &[u8], object: &str) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes(plain)
        .map_err(|e| Error::corrupt(object, format!("does not decode: {e}")))?;
    if rest.iter().any(|&b| b != 0) {
        return Err(Error::corrupt(object, "non-zero padding"));
    }
    Ok(value)
}

/// Magics are `BKP` + three letters of object kind + two digits of that kind's layout version
/// (per kind: `BKPSNP01` is current in repository format 2; docs/FORMAT.md §5). A known kind
/// with a version this bkp does not know was written by a newer bkp.
pub fn check_magic(expected: &[u8; 8], found: &[u8], object: &str) -> Result<()> {
    if found == expected {
        return Ok(());
    }
    let version = |magic: &[u8]| {
        std::str::from_utf8(&magic[6..])
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    if found.len() == 8 && found[..6] == expected[..6] {
        if version(found) > version(expected) {
            return Err(Error::UnsupportedFormat {
                object: object.to_string(),
                found: version(found),
                supported: version(expected),
            });
        }
        return Err(Error::corrupt(
            object,
            format!("version {} of its kind does not exist", version(found)),
        ));
    }
    Err(Error::corrupt(object, "unexpected object type (bad magic)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn sealed_metadata_is_padded_and_authenticated() {
        let key = MasterKey::generate();
        let sealed = seal(b"BKPTST01", key.metadata.sealing(), &vec![1u32, 2, 3]);
        assert_eq!(sealed.len() as u64, padding::MIN_OBJECT_LEN);
        let back: Vec<u32> = open(b"BKPTST01", &key.metadata, &sealed, "t").unwrap();
        assert_eq!(back, vec![1, 2, 3]);
        for i in [0, 9, 60, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(
                open::<Vec<u32>>(b"BKPTST01", &key.metadata, &bad, "t").is_err(),
                "{i}"
            );
        }
        let other = MasterKey::generate();
        assert!(open::<Vec<u32>>(b"BKPTST01", &other.metadata, &sealed, "t").is_err());
        assert!(matches!(
            open::<Vec<u32>>(b"BKPTST02", &key.metadata, &sealed, "t"),
            Err(Error::Corrupt { .. })
        ));
        let newer = seal(b"BKPTST03", key.metadata.sealing(), &vec![1u32]);
        assert!(matches!(
            open::<Vec<u32>>(b"BKPTST02", &key.metadata, &newer, "t"),
            Err(Error::UnsupportedFormat {
                found: 3,
                supported: 2,
                ..
            })
        ));
    }
}
