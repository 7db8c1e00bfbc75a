//! Series: the snapshots that share a tag set (one database's nightly dumps), and the markers
//! that let `latest` find a series' newest snapshot with one listing, whatever the repository
//! holds (docs/FORMAT.md §11.1).
//!
//! ```text
//! series/<series name>/<newest first>-<snapshot id>     empty marker objects
//! ```
//! A series name is the tag set, encrypted deterministically (SIV: the IV is a keyed hash of
//! the plaintext and authenticates it), so that one listing of `series/` gives every series'
//! tags without revealing them, and equal tag sets get equal names. `newest first` is
//! `u64::MAX - time` (in nanoseconds) in hex, so that a listing, in name order, starts with the newest.

use std::time::{Duration, SystemTime};

use crate::crypto::MasterKey;
use crate::id::Id;

pub const SERIES_DIR: &str = "series";

/// Bytes of the synthetic IV at the start of a series name.
const SIV_LEN: usize = 16;
/// Tag sets are padded to a multiple of this before encryption, hiding their exact length.
const PAD_TO: usize = 16;
/// The longest series name a reader decodes (S3 object names are at most 1,024 bytes).
const MAX_NAME_BYTES: usize = 400;

/// The keys of series names, derived from the chunk-id key (which any writer holds, a future
/// put-only one too).
pub struct SeriesKeys {
    siv: [u8; 32],
    stream: [u8; 32],
}

impl SeriesKeys {
    pub fn new(key: &MasterKey) -> SeriesKeys {
        SeriesKeys {
            siv: blake3::derive_key("bkp v3 series name iv", &key.chunk_id_key),
            stream: blake3::derive_key("bkp v3 series name encryption", &key.chunk_id_key),
        }
    }

    fn keystream(&self, siv: &[u8], out: &mut [u8]) {
        let mut hasher = blake3::Hasher::new_keyed(&self.stream);
        hasher.update(siv);
        hasher.finalize_xof().fill(out);
    }

    /// The series name of a tag set (sorted and unique, as in a snapshot).
    pub fn name(&self, tags: &[String]) -> String {
        let mut plain = postcard::to_stdvec(tags).expect("tags serialize");
        plain.resize(plain.len().div_ceil(PAD_TO) * PAD_TO, 0);
        let hash = blake3::keyed_hash(&self.siv, &plain);
        let siv = &hash.as_bytes()[..SIV_LEN];
        let mut stream = vec![0u8; plain.len()];
        self.keystream(siv, &mut stream);
        let cipher: Vec<u8> = plain.iter().zip(&stream).map(|(p, k)| p ^ k).collect();
        format!("{}{}", hex::encode(siv), hex::encode(cipher))
    }

    /// The tag set a series name stands for; `None` if it is not one of this repository's
    /// (planted, damaged, or of another key).
    pub fn tags(&self, name: &str) -> Option<Vec<String>> {
        if name.len() > 2 * MAX_NAME_BYTES {
            return None;
        }
        let bytes = hex::decode(name).ok()?;
        if bytes.len() < SIV_LEN + PAD_TO || !(bytes.len() - SIV_LEN).is_multiple_of(PAD_TO) {
            return None;
        }
        let (siv, cipher) = bytes.split_at(SIV_LEN);
        let mut plain = vec![0u8; cipher.len()];
        self.keystream(siv, &mut plain);
        plain.iter_mut().zip(cipher).for_each(|(p, c)| *p ^= c);
        if &blake3::keyed_hash(&self.siv, &plain).as_bytes()[..SIV_LEN] != siv {
            return None;
        }
        let (tags, rest): (Vec<String>, _) = postcard::take_from_bytes(&plain).ok()?;
        rest.iter().all(|&b| b == 0).then_some(tags)
    }
}

pub const CATALOG_DIR: &str = "catalogs";

/// The folder of a series' catalogs, `catalogs/<name>/`.
pub fn catalog_dir(name: &str) -> String {
    format!("{CATALOG_DIR}/{name}")
}

/// The folder of a series' markers, `series/<name>/`.
pub fn series_dir(name: &str) -> String {
    format!("{SERIES_DIR}/{name}")
}

/// The marker of snapshot `id`, taken at `time`, in series `name`.
pub fn marker_name(name: &str, time: SystemTime, id: &Id) -> String {
    format!(
        "{}/{:016x}-{id}",
        series_dir(name),
        u64::MAX - unix_nanos(time)
    )
}

/// A marker's time (nanoseconds since the epoch) and snapshot id.
pub struct Marker {
    pub nanos: u64,
    pub id: Id,
}

pub fn parse_marker(object: &str) -> Option<Marker> {
    let rest = object.strip_prefix(SERIES_DIR)?.strip_prefix('/')?;
    let (_series, file) = rest.split_once('/')?;
    let (newest_first, id) = file.split_once('-')?;
    if newest_first.len() != 16 {
        return None;
    }
    let nanos = u64::MAX - u64::from_str_radix(newest_first, 16).ok()?;
    Some(Marker {
        nanos,
        id: id.parse().ok()?,
    })
}

/// Nanoseconds since the epoch (u64 holds them until the year 2554), 0 before it.
pub fn unix_nanos(time: SystemTime) -> u64 {
    let nanos = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SeriesKeys {
        SeriesKeys::new(&MasterKey::from_seed(7))
    }

    #[test]
    fn names_hide_tags_and_decode_back() {
        let keys = keys();
        for tags in [
            vec![],
            vec!["shop".to_string()],
            vec!["a".into(), "b,c".into(), "ünïcode/with slash".into()],
        ] {
            let name = keys.name(&tags);
            assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
            assert!(!name.contains("shop"));
            assert_eq!(keys.tags(&name), Some(tags.clone()));
            assert_eq!(keys.name(&tags), name, "deterministic");
        }
        assert_ne!(keys.name(&["a".into()]), keys.name(&["b".into()]));
    }

    #[test]
    fn foreign_or_damaged_names_are_refused() {
        let keys = keys();
        let name = keys.name(&["shop".into()]);
        let other = SeriesKeys::new(&MasterKey::from_seed(8));
        assert_eq!(other.tags(&name), None, "another repository's key");
        let mut flipped = name.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(keys.tags(std::str::from_utf8(&flipped).unwrap()), None);
        for junk in ["", "zz", "00", &"0".repeat(64), &"f".repeat(2000)] {
            assert_eq!(keys.tags(junk), None, "{junk}");
        }
    }

    #[test]
    fn markers_sort_newest_first_and_parse_back() {
        let id = Id([3; 32]);
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let new = old + Duration::from_nanos(1);
        let (a, b) = (marker_name("s", old, &id), marker_name("s", new, &id));
        assert!(b < a, "the newer marker sorts first");
        let parsed = parse_marker(&a).unwrap();
        assert_eq!((parsed.nanos, parsed.id), (1_000_000_000_000_000, id));
        assert!(parse_marker("series/s/123-abc").is_none());
        assert!(parse_marker("snapshots/x").is_none());
    }
}
