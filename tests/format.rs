//! Format conformance: decodes the committed fixture repositories (formats 1 to 4)
//! following only docs/FORMAT.md, with the primitive crates and no bkp code, and checks that
//! bkp itself still reads them. If either fails, the code and the specification have drifted
//! apart.

mod common;

use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use common::{bkp, files_under};

const FIXTURE: &str = "tests/fixtures/repo-v1";
const PASSWORD: &str = "fixture";
/// The fixture's two snapshots, oldest first: a 313 KB plain pg_dump and the same dump with a row
/// changed, a row deleted and a row added (stored as a delta frame against the first one's frame).
const STREAMS: [(u64, &str); 2] = [
    (
        313_070,
        "c5d0a379e26b93d3bec943baf1415f7a0fb3acddaaeed4c4b731a23db73371ce",
    ),
    (
        313_081,
        "df742166a66342017b7ed6522b508b3b45ebc445fa9bdf11684249cc3a727406",
    ),
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

/// A postcard reader, written from FORMAT.md §1.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        out
    }
    fn array32(&mut self) -> [u8; 32] {
        self.bytes(32).try_into().unwrap()
    }
    fn varint(&mut self) -> u64 {
        let (mut value, mut shift) = (0u64, 0);
        loop {
            let byte = self.bytes(1)[0];
            value |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
            shift += 7;
        }
    }
    fn zigzag(&mut self) -> i64 {
        let v = self.varint();
        ((v >> 1) as i64) ^ -((v & 1) as i64)
    }
    fn vec_bytes(&mut self) -> &'a [u8] {
        let n = self.varint() as usize;
        self.bytes(n)
    }
    fn string(&mut self) -> String {
        String::from_utf8(self.vec_bytes().to_vec()).unwrap()
    }
    fn option32(&mut self) -> Option<[u8; 32]> {
        match self.bytes(1)[0] {
            0 => None,
            1 => Some(self.array32()),
            t => panic!("bad option tag {t}"),
        }
    }
    fn rest_is_zero(&self) -> bool {
        self.buf[self.pos..].iter().all(|&b| b == 0)
    }
}

fn open_sealed(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&Key::from(*key));
    let nonce: [u8; 24] = sealed[..24].try_into().unwrap();
    let (ct, tag) = sealed[24..].split_at(sealed.len() - 24 - 16);
    let tag: [u8; 16] = tag.try_into().unwrap();
    let mut out = ct.to_vec();
    cipher
        .decrypt_inout_detached(
            &XNonce::from(nonce),
            aad,
            out.as_mut_slice().into(),
            &tag.into(),
        )
        .expect("authentic");
    out
}

struct Role {
    public: [u8; 32],
    secret: [u8; 32],
    psk: [u8; 32],
}

impl Role {
    fn session_key(&self, ephemeral: &[u8]) -> [u8; 32] {
        let shared = x25519_dalek::x25519(self.secret, ephemeral.try_into().unwrap());
        assert_ne!(shared, [0; 32]);
        let material = [ephemeral, &self.public, &shared, &self.psk].concat();
        blake3::derive_key("bkp v1 session key", &material)
    }
}

struct Keys {
    repository_id: [u8; 32],
    data: Role,
    metadata: Role,
    chunk_id_key: [u8; 32],
    chunker_key: [u8; 32],
}

fn padme(len: u64) -> u64 {
    let e = 63 - len.leading_zeros() as u64;
    let s = 64 - e.leading_zeros() as u64;
    let mask = (1u64 << (e - s)) - 1;
    (len + mask) & !mask
}

/// §4: the rest of a key file from its KDF parameters on (`len` bytes after the magic), opened
/// with `password`; returns the sealed plaintext.
fn open_key_file_body(r: &mut Reader, len: usize, password: &str, aad: &[u8]) -> Vec<u8> {
    let (m, t, p) = (r.varint() as u32, r.varint() as u32, r.varint() as u32);
    let salt = r.bytes(16);
    let created = r.zigzag();
    assert!(created > 1_700_000_000, "created {created}");
    let sealed = r.vec_bytes();
    assert_eq!(r.pos, len);
    let mut kek = [0u8; 32];
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(m, t, p, Some(32)).unwrap(),
    )
    .hash_password_into(password.as_bytes(), salt, &mut kek)
    .unwrap();
    open_sealed(&kek, aad, sealed)
}

fn unlock_key_file(bytes: &[u8]) -> Keys {
    assert_eq!(&bytes[..8], b"BKPKEY01");
    let mut r = Reader::new(&bytes[8..]);
    let plain = open_key_file_body(&mut r, bytes.len() - 8, PASSWORD, b"BKPKEY01");
    let mut r = Reader::new(&plain);
    let repository_id = r.array32();
    let mut role = || {
        let public = r.array32();
        let secret = r.option32().expect("a full key");
        let psk = r.array32();
        Role {
            public,
            secret,
            psk,
        }
    };
    let data = role();
    let metadata = role();
    let keys = Keys {
        repository_id,
        data,
        metadata,
        chunk_id_key: r.array32(),
        chunker_key: r.array32(),
    };
    assert_eq!(r.pos, plain.len());
    for role in [&keys.data, &keys.metadata] {
        assert_eq!(
            x25519_dalek::x25519(role.secret, x25519_dalek::X25519_BASEPOINT_BYTES),
            role.public
        );
    }
    keys
}

/// A put-only key's material (§4.1): what it holds besides the config copy.
struct PutOnlyMaterial {
    repository_id: [u8; 32],
    data_public: [u8; 32],
    data_psk: [u8; 32],
    metadata_public: [u8; 32],
    metadata_psk: [u8; 32],
    chunk_id_key: [u8; 32],
    chunker_key: [u8; 32],
}

/// FORMAT.md §4.1: a `BKPKEY02` file of role PutOnly; returns its material and config copy.
fn unlock_put_only_key_file(bytes: &[u8], password: &str) -> (PutOnlyMaterial, Vec<u8>) {
    assert_eq!(&bytes[..8], b"BKPKEY02");
    let mut r = Reader::new(&bytes[8..]);
    assert_eq!(r.varint(), 1, "role PutOnly");
    let plain = open_key_file_body(&mut r, bytes.len() - 8, password, b"BKPKEY02\x01");
    let mut r = Reader::new(&plain);
    let repository_id = r.array32();
    let mut role = || {
        let public = r.array32();
        assert_eq!(r.option32(), None, "no secret half");
        (public, r.array32())
    };
    let (data_public, data_psk) = role();
    let (metadata_public, metadata_psk) = role();
    let material = PutOnlyMaterial {
        repository_id,
        data_public,
        data_psk,
        metadata_public,
        metadata_psk,
        chunk_id_key: r.array32(),
        chunker_key: r.array32(),
    };
    let config = r.vec_bytes().to_vec();
    assert_eq!(r.pos, plain.len());
    (material, config)
}

/// FORMAT.md §5: returns the plaintext (value plus zero padding).
fn open_metadata(keys: &Keys, magic: &[u8; 8], object: &[u8]) -> Vec<u8> {
    assert_eq!(&object[..8], magic);
    let key = keys.metadata.session_key(&object[8..40]);
    open_sealed(&key, magic, &object[40..])
}

/// A frame entry as FORMAT.md §6.4 lays it out.
#[derive(Debug, PartialEq)]
struct FrameEntry {
    offset: u64,
    sealed_len: u32,
    chunks: Vec<([u8; 32], u32)>,
    /// (pack id, frame number in that pack)
    bases: Vec<([u8; 32], u64)>,
}

fn read_pack_header(r: &mut Reader) -> Vec<FrameEntry> {
    (0..r.varint())
        .map(|_| FrameEntry {
            offset: r.varint(),
            sealed_len: r.varint() as u32,
            chunks: (0..r.varint())
                .map(|_| (r.array32(), r.varint() as u32))
                .collect(),
            bases: (0..r.varint()).map(|_| (r.array32(), r.varint())).collect(),
        })
        .collect()
}

fn zstd_decompress(compressed: &[u8], prefix: &[u8], capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    let mut context = zstd::zstd_safe::DCtx::create();
    if !prefix.is_empty() {
        context.ref_prefix(prefix).unwrap();
    }
    context.decompress(&mut out, compressed).unwrap();
    out
}

/// FORMAT.md §6.1, written from the pseudo-code there.
fn cut_points(
    stream: &[u8],
    chunker_key: &[u8; 32],
    min: usize,
    avg: usize,
    max: usize,
) -> Vec<usize> {
    let mut table = [0u8; 2048];
    blake3::Hasher::new_keyed(chunker_key)
        .update(b"bkp v1 fastcdc gear table")
        .finalize_xof()
        .fill(&mut table);
    let gear: Vec<u64> = table
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let bits = (avg as f64).log2().round() as usize;
    let (mask_s, mask_l) = (
        fastcdc::v2020::MASKS[bits + 1],
        fastcdc::v2020::MASKS[bits - 1],
    );
    let mut lens = Vec::new();
    let mut src = stream;
    while !src.is_empty() {
        let len = 'cut: {
            if src.len() <= min {
                break 'cut src.len();
            }
            let remaining = src.len().min(max);
            let center = avg.min(remaining);
            let mut hash = 0u64;
            let mut i = min / 2;
            for (limit, ms) in [(center / 2, mask_s), (remaining / 2, mask_l)] {
                while i < limit {
                    let a = 2 * i;
                    hash = (hash << 2).wrapping_add(gear[src[a] as usize] << 1);
                    if hash & (ms << 1) == 0 {
                        break 'cut a;
                    }
                    hash = hash.wrapping_add(gear[src[a + 1] as usize]);
                    if hash & ms == 0 {
                        break 'cut a + 1;
                    }
                    i += 1;
                }
            }
            remaining
        };
        lens.push(len);
        src = &src[len..];
    }
    lens
}

/// What a fixture holds, as far as the specification's decoder checks it.
struct Fixture {
    dir: &'static str,
    format_version: u64,
    chunker: (usize, usize, usize),
    index_magic: &'static [u8; 8],
    pack_magic: &'static [u8; 8],
    /// Pack headers have `moved` (format 2, §6.4).
    moved: bool,
    packs: usize,
    delta_frames: usize,
    names: &'static [&'static str],
    /// (length, BLAKE3) of each snapshot's stream, oldest first.
    streams: &'static [(u64, &'static str)],
    /// Snapshots are `BKPSNP02`, with `packs` (§11.2), and have series markers (§11.1).
    format_3: bool,
    /// Snapshots are `BKPSNP03`: their packs say where the stream uses them (§11.2).
    pack_uses: bool,
    /// A put-only key file (`BKPKEY02`, §4.1) opens with this password, beside the full key.
    put_only_password: Option<&'static str>,
    /// Snapshots are `BKPSNP04`, with the dump's table of contents (§13).
    toc: bool,
}

const V1: Fixture = Fixture {
    dir: FIXTURE,
    format_version: 1,
    chunker: (2048, 8192, 65536),
    index_magic: b"BKPIDX01",
    pack_magic: b"BKPPCK01",
    moved: false,
    packs: 2,
    delta_frames: 1,
    names: &["fixture.sql"],
    streams: &STREAMS,
    format_3: false,
    pack_uses: false,
    put_only_password: None,
    toc: false,
};

const V2: Fixture = Fixture {
    dir: FIXTURE_V2,
    format_version: 2,
    chunker: (4096, 16384, 131072),
    index_magic: b"BKPIDX02",
    pack_magic: b"BKPPCK02",
    moved: true,
    packs: 3,
    delta_frames: 2,
    names: &["day1.sql", "day2.sql", "day3.sql"],
    streams: &[
        (STREAMS_V2[0].1 as u64, STREAMS_V2[0].2),
        (STREAMS_V2[1].1 as u64, STREAMS_V2[1].2),
        (STREAMS_V2[2].1 as u64, STREAMS_V2[2].2),
    ],
    format_3: false,
    pack_uses: false,
    put_only_password: None,
    toc: false,
};

/// The same three days, backed up by bkp 0.3 into a new (format 3) repository.
const V3: Fixture = Fixture {
    dir: "tests/fixtures/repo-v3",
    format_version: 3,
    format_3: true,
    ..V2
};

/// The same again, by bkp 0.3 once snapshots said where they use each pack (`BKPSNP03`).
const V3_USES: Fixture = Fixture {
    dir: "tests/fixtures/repo-v3-snp03",
    pack_uses: true,
    ..V3
};

/// A format 4 repository: day 1 by the full key, days 2 and 3 by a put-only key (§12), which
/// cannot read day 1 back and so stores whole base frames, no deltas.
const V4: Fixture = Fixture {
    dir: "tests/fixtures/repo-v4",
    format_version: 4,
    delta_frames: 0,
    put_only_password: Some("fixture-put-only"),
    ..V3_USES
};

/// Three days of a generated dump with pg_dump's table of contents comments, by bkp 0.3 once
/// snapshots recorded it (`BKPSNP04`, §13).
const V4_TOC: Fixture = Fixture {
    dir: "tests/fixtures/repo-v4-toc",
    format_version: 4,
    packs: 3,
    delta_frames: 2,
    streams: &[
        (
            626_328,
            "a203c0700cd14c7a0efb0f160ad5fc9444b219369ef5b5bc37d7e99abdb070b5",
        ),
        (
            628_284,
            "606383998a17c504d11400e66426d37975d30d2fe01de5153ffa1ee4d93bc41a",
        ),
        (
            630_697,
            "84e4b8bf11fcf7c42aaf693d430046aac0e00cd44a025120cd6745d007a419ea",
        ),
    ],
    put_only_password: None,
    toc: true,
    ..V3_USES
};

#[test]
fn format_v4_fixture_with_tables_of_contents_decodes_from_the_specification_alone() {
    decode_from_the_specification(&V4_TOC);
}

#[test]
fn format_v1_fixture_decodes_from_the_specification_alone() {
    decode_from_the_specification(&V1);
}

#[test]
fn format_v2_fixture_decodes_from_the_specification_alone() {
    decode_from_the_specification(&V2);
}

#[test]
fn format_v3_fixture_decodes_from_the_specification_alone() {
    decode_from_the_specification(&V3);
}

#[test]
fn format_v4_fixture_with_a_put_only_key_decodes_from_the_specification_alone() {
    decode_from_the_specification(&V4);
}

#[test]
fn format_v3_fixture_with_pack_uses_decodes_from_the_specification_alone() {
    decode_from_the_specification(&V3_USES);
}

/// §11.1: a series name decrypted with the keys derived from the chunk-id key, checked
/// against its synthetic IV; the tags it stands for.
fn series_tags(chunk_id_key: &[u8; 32], name: &str) -> Vec<String> {
    let bytes = hex::decode(name).unwrap();
    let (siv, cipher) = bytes.split_at(16);
    let k_iv = blake3::derive_key("bkp v3 series name iv", chunk_id_key);
    let k_stream = blake3::derive_key("bkp v3 series name encryption", chunk_id_key);
    let mut plain = vec![0u8; cipher.len()];
    blake3::Hasher::new_keyed(&k_stream)
        .update(siv)
        .finalize_xof()
        .fill(&mut plain);
    plain.iter_mut().zip(cipher).for_each(|(p, c)| *p ^= c);
    assert_eq!(plain.len() % 16, 0);
    assert_eq!(&blake3::keyed_hash(&k_iv, &plain).as_bytes()[..16], siv);
    let mut r = Reader::new(&plain);
    let tags = (0..r.varint()).map(|_| r.string()).collect();
    assert!(r.rest_is_zero());
    tags
}

fn decode_from_the_specification(fixture: &Fixture) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture.dir);
    let key_files: Vec<Vec<u8>> = files_under(&root, "keys")
        .iter()
        .map(|file| {
            let bytes = std::fs::read(file).unwrap();
            assert_eq!(
                file.file_name().unwrap().to_str().unwrap(),
                blake3::hash(&bytes).to_hex().as_str()
            );
            bytes
        })
        .collect();
    let (full, put_only): (Vec<_>, Vec<_>) = key_files
        .iter()
        .partition(|bytes| bytes.starts_with(b"BKPKEY01"));
    assert_eq!(full.len(), 1);
    let keys = unlock_key_file(full[0]);

    // §5: config.
    let config = std::fs::read(root.join("config")).unwrap();
    assert_eq!(config.len(), 4096);
    let plain = open_metadata(&keys, b"BKPCFG01", &config);
    let mut r = Reader::new(&plain);
    assert_eq!(r.varint(), fixture.format_version, "format version");
    assert_eq!(r.array32(), keys.repository_id);
    let (min, avg, max) = (
        r.varint() as usize,
        r.varint() as usize,
        r.varint() as usize,
    );
    assert_eq!((min, avg, max), fixture.chunker);
    let (_secs, _nanos) = (r.varint(), r.varint());
    let config_len = r.pos;
    assert!(r.rest_is_zero());

    // §4.1: a put-only key holds the public halves, PSKs and symmetric keys, no secret half,
    // and a copy of the config.
    match fixture.put_only_password {
        None => assert!(put_only.is_empty()),
        Some(password) => {
            assert_eq!(put_only.len(), 1);
            let (material, config) = unlock_put_only_key_file(put_only[0], password);
            assert_eq!(material.repository_id, keys.repository_id);
            assert_eq!(material.data_public, keys.data.public);
            assert_eq!(material.data_psk, keys.data.psk);
            assert_eq!(material.metadata_public, keys.metadata.public);
            assert_eq!(material.metadata_psk, keys.metadata.psk);
            assert_eq!(material.chunk_id_key, keys.chunk_id_key);
            assert_eq!(material.chunker_key, keys.chunker_key);
            assert_eq!(config, plain[..config_len]);
        }
    }

    // §7: the index files, each naming the packs of one backup.
    struct Pack {
        bytes: Vec<u8>,
        data_ephemeral: [u8; 32],
        frames: Vec<FrameEntry>,
    }
    let mut packs: Vec<([u8; 32], Pack)> = Vec::new();
    for index_file in files_under(&root, "index") {
        let plain = open_metadata(
            &keys,
            fixture.index_magic,
            &std::fs::read(&index_file).unwrap(),
        );
        let mut r = Reader::new(&plain);
        for _ in 0..r.varint() {
            let pack_id = r.array32();
            let pack_len = r.varint();
            let data_ephemeral = r.array32();
            let frames = read_pack_header(&mut r);
            if fixture.moved {
                // MovedFrame { frame, from: FrameRef }: no repack in the fixtures.
                assert_eq!(r.varint(), 0, "moved records");
            }

            // §6.4: the pack, its trailer and header agree with the index.
            let hex_id = hex::encode(pack_id);
            let pack = std::fs::read(root.join("packs").join(&hex_id[..2]).join(&hex_id)).unwrap();
            assert_eq!(blake3::hash(&pack).as_bytes(), &pack_id);
            assert_eq!(pack.len() as u64, pack_len);
            assert_eq!(pack_len, padme(pack_len).max(4096));
            assert_eq!(&pack[..8], fixture.pack_magic);
            assert_eq!(pack[8..40], data_ephemeral);
            let metadata_key = keys.metadata.session_key(&pack[40..72]);
            let trailer = open_sealed(
                &metadata_key,
                b"bkp v1 pack trailer",
                &pack[pack.len() - 56..],
            );
            let header_offset = u64::from_le_bytes(trailer[..8].try_into().unwrap()) as usize;
            let header_len = u64::from_le_bytes(trailer[8..].try_into().unwrap()) as usize;
            assert_eq!(header_offset + header_len + 56, pack.len());
            let header = open_sealed(
                &metadata_key,
                b"bkp v1 pack header",
                &pack[header_offset..header_offset + header_len],
            );
            assert_eq!(read_pack_header(&mut Reader::new(&header)), frames);
            let pack = Pack {
                bytes: pack,
                data_ephemeral,
                frames,
            };
            packs.push((pack_id, pack));
        }
        assert!(r.rest_is_zero());
    }
    assert_eq!(packs.len(), fixture.packs, "one pack per backup");

    // §6.3: open every frame, base frames first; collect chunks by id, checking their keyed ids.
    let open_frame = |pack: &Pack, frame: &FrameEntry, prefix: &[u8]| -> Vec<u8> {
        let data_key = keys.data.session_key(&pack.data_ephemeral);
        let start = frame.offset as usize;
        let sealed = &pack.bytes[start..start + frame.sealed_len as usize];
        let compressed = open_sealed(&data_key, b"bkp v1 frame", sealed);
        zstd_decompress(&compressed, prefix, 4 << 20)
    };
    let mut plaintexts: std::collections::HashMap<([u8; 32], u64), Vec<u8>> =
        std::collections::HashMap::new();
    for delta in [false, true] {
        for (pack_id, pack) in &packs {
            for (number, frame) in pack.frames.iter().enumerate() {
                if frame.bases.is_empty() == delta {
                    continue;
                }
                let prefix: Vec<u8> = frame
                    .bases
                    .iter()
                    .flat_map(|base| plaintexts[base].clone())
                    .collect();
                let raw = open_frame(pack, frame, &prefix);
                plaintexts.insert((*pack_id, number as u64), raw);
            }
        }
    }
    let delta_frames = packs
        .iter()
        .flat_map(|(_, p)| &p.frames)
        .filter(|f| !f.bases.is_empty())
        .count();
    assert_eq!(
        delta_frames, fixture.delta_frames,
        "the later backups stored their changes as deltas"
    );
    let mut chunks = std::collections::HashMap::new();
    // Each chunk's pack, and the packs of its frame's bases (§11.2 `packs`): one such list
    // per copy of the chunk (a put-only writer, which cannot read the repository, stores again
    // what is there already).
    let mut homes: std::collections::HashMap<[u8; 32], Vec<Vec<[u8; 32]>>> =
        std::collections::HashMap::new();
    for (pack_id, pack) in &packs {
        for (number, frame) in pack.frames.iter().enumerate() {
            let raw = &plaintexts[&(*pack_id, number as u64)];
            let mut at = 0;
            for (id, len) in &frame.chunks {
                let chunk = &raw[at..at + *len as usize];
                assert_eq!(blake3::keyed_hash(&keys.chunk_id_key, chunk).as_bytes(), id);
                chunks.insert(*id, chunk.to_vec());
                let mut home = vec![*pack_id];
                home.extend(frame.bases.iter().map(|(base_pack, _)| *base_pack));
                homes.entry(*id).or_default().push(home);
                at += *len as usize;
            }
            assert_eq!(at, raw.len());
        }
    }

    // §8: the snapshots; a snapshot's name is the hash of the object.
    let mut snapshots = Vec::new();
    let mut markers_expected = Vec::new();
    for file in files_under(&root, "snapshots") {
        let snapshot = std::fs::read(&file).unwrap();
        assert_eq!(
            file.file_name().unwrap().to_str().unwrap(),
            blake3::hash(&snapshot).to_hex().as_str()
        );
        assert_eq!(snapshot.len(), 4096);
        let magic: &[u8; 8] = match (fixture.format_3, fixture.pack_uses, fixture.toc) {
            (_, _, true) => b"BKPSNP04",
            (_, true, false) => b"BKPSNP03",
            (true, false, false) => b"BKPSNP02",
            (false, false, false) => b"BKPSNP01",
        };
        let plain = open_metadata(&keys, magic, &snapshot);
        let id = file.file_name().unwrap().to_str().unwrap().to_string();
        let mut r = Reader::new(&plain);
        let time = (r.varint(), r.varint());
        assert_eq!(r.string(), "fixture-host");
        let tags: Vec<String> = (0..r.varint()).map(|_| r.string()).collect();
        assert_eq!(tags, vec!["fixture"]);
        assert!(fixture.names.contains(&r.string().as_str()));
        let size = r.varint();
        let stream_hash = hex::encode(r.array32());
        let height = r.bytes(1)[0];
        let root_ids: Vec<[u8; 32]> = (0..r.varint()).map(|_| r.array32()).collect();
        let _added: Vec<u64> = (0..4).map(|_| r.varint()).collect();
        let annotations: Vec<(String, String)> =
            (0..r.varint()).map(|_| (r.string(), r.string())).collect();
        assert!(annotations.contains(&("dump.kind".into(), "postgres-plain".into())));
        let mut listed_packs: Vec<[u8; 32]> = Vec::new();
        // (first, last) stream chunk using each listed pack (§11.2, `BKPSNP03`).
        let mut uses: std::collections::BTreeMap<[u8; 32], (u64, u64)> = Default::default();
        if fixture.format_3 {
            for _ in 0..r.varint() {
                let (pack, len) = (r.array32(), r.varint());
                if fixture.pack_uses {
                    assert_eq!(r.bytes(1), [1], "every pack says where it is used");
                    uses.insert(pack, (r.varint(), r.varint()));
                }
                let hex_id = hex::encode(pack);
                let stored = root.join("packs").join(&hex_id[..2]).join(&hex_id);
                assert_eq!(std::fs::metadata(stored).unwrap().len(), len);
                listed_packs.push(pack);
            }
            assert!(listed_packs.is_sorted(), "packs are sorted by id");
        }
        // §13: the table of contents.
        let mut toc = Vec::new();
        if fixture.toc {
            for _ in 0..r.varint() {
                let kind = r.string();
                let name = r.string();
                let table = match r.bytes(1)[0] {
                    0 => None,
                    _ => Some(r.string()),
                };
                let (start, end, rows) = (r.varint(), r.varint(), r.varint());
                let (first_chunk, chunks) = (r.varint(), r.varint());
                let digest = r.array32();
                let _new_bytes = r.varint();
                let tree_path: Vec<(u64, u64)> =
                    (0..r.varint()).map(|_| (r.varint(), r.varint())).collect();
                toc.push(TocEntry {
                    kind,
                    name,
                    table,
                    start,
                    end,
                    rows,
                    first_chunk,
                    chunks,
                    digest,
                    tree_path,
                });
            }
        }
        assert!(r.rest_is_zero());
        let time_nanos = time.0 as u128 * 1_000_000_000 + time.1 as u128;
        snapshots.push((
            time,
            size,
            stream_hash,
            height,
            root_ids,
            listed_packs,
            uses,
            toc,
        ));
        markers_expected.push((id, tags, time_nanos));
    }
    snapshots.sort_by_key(|s| s.0);

    // §11.1: each snapshot has its series marker, named by its tags and time.
    let marker_files = if root.join("series").exists() {
        files_under(&root, "series")
    } else {
        Vec::new()
    };
    if fixture.format_3 {
        assert_eq!(marker_files.len(), markers_expected.len());
        for (id, tags, time_nanos) in &markers_expected {
            let marker = marker_files
                .iter()
                .find(|m| {
                    m.file_name()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .ends_with(id.as_str())
                })
                .unwrap_or_else(|| panic!("no marker for snapshot {id}"));
            assert_eq!(
                std::fs::metadata(marker).unwrap().len(),
                0,
                "markers are empty"
            );
            let series = name_of(marker.parent().unwrap());
            assert_eq!(&series_tags(&keys.chunk_id_key, series), tags);
            let file = marker.file_name().unwrap().to_str().unwrap();
            let (newest_first, marked) = file.split_once('-').unwrap();
            assert_eq!(marked, id);
            let nanos = u64::MAX - u64::from_str_radix(newest_first, 16).unwrap();
            assert_eq!(nanos as u128, *time_nanos);
        }
    } else {
        assert!(marker_files.is_empty());
    }

    // §14: restore drills, each filed under its series and named by its time and hash.
    if fixture.toc {
        let drills = files_under(&root, "drills");
        assert_eq!(drills.len(), 1, "the fixture's one drill");
        for file in drills {
            let bytes = std::fs::read(&file).unwrap();
            let name = file.file_name().unwrap().to_str().unwrap();
            let (newest_first, id) = name.split_once('-').unwrap();
            assert_eq!(id, blake3::hash(&bytes).to_hex().as_str());
            let plain = open_metadata(&keys, b"BKPDRL01", &bytes);
            let mut r = Reader::new(&plain);
            let snapshot = hex::encode(r.array32());
            let tags: Vec<String> = (0..r.varint()).map(|_| r.string()).collect();
            let series = name_of(file.parent().unwrap());
            assert_eq!(series_tags(&keys.chunk_id_key, series), tags);
            let time = (r.varint(), r.varint());
            let nanos = time.0 as u128 * 1_000_000_000 + time.1 as u128;
            assert_eq!(
                u64::MAX - u64::from_str_radix(newest_first, 16).unwrap(),
                nanos as u64
            );
            let _duration = (r.varint(), r.varint());
            let bytes_restored = r.varint();
            let _hostname = r.string();
            assert_eq!(r.string(), "wc -c");
            assert_eq!(r.bytes(1), [0], "the drill succeeded");
            assert!(r.rest_is_zero());
            // It restored the whole of the newest snapshot.
            let drilled = markers_expected
                .iter()
                .position(|(id, _, _)| *id == snapshot)
                .expect("a drill of one of the fixture's snapshots");
            let (_, _, drilled_nanos) = markers_expected[drilled];
            let newest = markers_expected.iter().map(|m| m.2).max().unwrap();
            assert_eq!(drilled_nanos, newest);
            assert_eq!(bytes_restored, fixture.streams[2].0);
        }
    }

    // §8: walk each tree and rebuild its stream, noting where each node and chunk is needed:
    // the number of stream chunks before it (§11.2).
    fn walk(
        ids: &[[u8; 32]],
        height: u8,
        chunks: &std::collections::HashMap<[u8; 32], Vec<u8>>,
        out: &mut Vec<([u8; 32], Vec<u8>)>,
        used: &mut Vec<([u8; 32], u64)>,
    ) {
        for id in ids {
            used.push((*id, out.len() as u64));
            let bytes = &chunks[id];
            if height == 0 {
                out.push((*id, bytes.clone()));
            } else {
                let children: Vec<[u8; 32]> = bytes
                    .chunks_exact(32)
                    .map(|c| c.try_into().unwrap())
                    .collect();
                walk(&children, height - 1, chunks, out, used);
            }
        }
    }
    assert_eq!(snapshots.len(), fixture.streams.len());
    for ((_, size, hash, height, root_ids, listed_packs, uses, toc), &(len, blake3_hex)) in
        snapshots.iter().zip(fixture.streams)
    {
        assert_eq!((*size, hash.as_str()), (len, blake3_hex));
        let mut stream_chunks = Vec::new();
        let mut used = Vec::new();
        walk(root_ids, *height, &chunks, &mut stream_chunks, &mut used);
        if fixture.format_3 {
            // §11.2: `packs` names, for every chunk or node of the snapshot, the pack of one
            // of its copies and the packs of that copy's frame's bases, and nothing else.
            let mut needed = Vec::new();
            for (id, _) in &used {
                let home = homes[id]
                    .iter()
                    .find(|home| home.iter().all(|pack| listed_packs.contains(pack)))
                    .unwrap_or_else(|| {
                        panic!("no copy of {} in the listed packs", hex::encode(id))
                    });
                needed.extend(home.iter().copied());
            }
            needed.sort();
            needed.dedup();
            assert_eq!(&needed, listed_packs);
        }
        if fixture.pack_uses {
            // Every pack a chunk or node needs is said to be used where it is needed.
            for (id, place) in &used {
                let home = homes[id]
                    .iter()
                    .find(|home| home.iter().all(|pack| uses.contains_key(pack)))
                    .unwrap();
                for pack in home {
                    let (first, last) = uses[pack];
                    assert!(
                        first <= *place && *place <= last,
                        "{place} in {first}..={last}"
                    );
                }
            }
        }
        let (stream_ids, stream_chunks): (Vec<[u8; 32]>, Vec<Vec<u8>>) =
            stream_chunks.into_iter().unzip();
        let stream = stream_chunks.concat();
        assert_eq!(stream.len() as u64, len);
        assert_eq!(blake3::hash(&stream).to_hex().as_str(), blake3_hex);

        // §6.1: the documented chunker reproduces the stored cut points (each section of a
        // dump cut as a stream of its own, §13).
        let lens: Vec<usize> = stream_chunks.iter().map(Vec::len).collect();
        let sections: Vec<std::ops::Range<usize>> = match fixture.toc {
            true => toc
                .iter()
                .map(|e| e.start as usize..e.end as usize)
                .collect(),
            false => std::iter::once(0..stream.len()).collect(),
        };
        let documented: Vec<usize> = sections
            .iter()
            .flat_map(|s| cut_points(&stream[s.clone()], &keys.chunker_key, min, avg, max))
            .collect();
        assert_eq!(documented, lens);

        // §13: the sections cover the stream, each made of whole chunks whose ids it digests.
        if fixture.toc {
            let kinds: Vec<(&str, &str)> = toc
                .iter()
                .map(|e| (e.kind.as_str(), e.name.as_str()))
                .collect();
            assert_eq!(kinds[0], ("PREAMBLE", ""));
            assert_eq!(kinds[1], ("TABLE", "public.t0"));
            assert_eq!(kinds[2], ("TABLE DATA", "public.t0"));
            assert_eq!(kinds.last(), Some(&("TRAILER", "")));
            assert_eq!(toc.len(), 10);
            let (mut at, mut chunk) = (0u64, 0u64);
            for entry in toc {
                assert_eq!(
                    (entry.start, entry.first_chunk),
                    (at, chunk),
                    "{}",
                    entry.name
                );
                let ids = &stream_ids[chunk as usize..(chunk + entry.chunks) as usize];
                let bytes: usize = ids.iter().map(|id| chunks[id].len()).sum();
                assert_eq!(entry.end - entry.start, bytes as u64);
                let mut digest = blake3::Hasher::new_derive_key("bkp v1 dump section digest");
                ids.iter().for_each(|id| {
                    digest.update(id);
                });
                assert_eq!(digest.finalize().as_bytes(), &entry.digest);
                // The tree path leads from the root to the section's first chunk, each step
                // naming the place (first stream chunk) of what it leads to.
                assert_eq!(entry.tree_path.len(), usize::from(*height) + 1);
                let (mut ids, mut before) = (root_ids.clone(), 0u64);
                for (depth, &(index, place)) in entry.tree_path.iter().enumerate() {
                    let level = *height - depth as u8;
                    for sibling in &ids[..index as usize] {
                        before += leaves(sibling, level, &chunks);
                    }
                    assert_eq!(place, before, "{} at depth {depth}", entry.name);
                    if level > 0 {
                        ids = chunks[&ids[index as usize]]
                            .chunks_exact(32)
                            .map(|c| c.try_into().unwrap())
                            .collect();
                    }
                }
                assert_eq!(before, entry.first_chunk);
                let section = &stream[entry.start as usize..entry.end as usize];
                if entry.kind == "TABLE DATA" {
                    // COPY rows: the lines between the COPY line and `\.`.
                    let text = std::str::from_utf8(section).unwrap();
                    let data = text.split_once(" FROM stdin;\n").unwrap().1;
                    let rows = data.split_once("\\.\n").unwrap().0.lines().count();
                    assert_eq!(entry.rows, rows as u64);
                    assert_eq!(entry.table.as_deref(), Some(entry.name.as_str()));
                } else {
                    assert_eq!(entry.rows, 0);
                }
                at = entry.end;
                chunk += entry.chunks;
            }
            assert_eq!((at, chunk), (len, stream_chunks.len() as u64));
        }
    }
}

/// Stream chunks below tree entry `id` at `height` (0: it is one).
fn leaves(id: &[u8; 32], height: u8, chunks: &std::collections::HashMap<[u8; 32], Vec<u8>>) -> u64 {
    if height == 0 {
        return 1;
    }
    chunks[id]
        .chunks_exact(32)
        .map(|child| leaves(child.try_into().unwrap(), height - 1, chunks))
        .sum()
}

/// The last component of `path`.
fn name_of(path: &Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

/// A table of contents entry (§13), as the specification's decoder reads it.
struct TocEntry {
    kind: String,
    name: String,
    table: Option<String>,
    start: u64,
    end: u64,
    rows: u64,
    first_chunk: u64,
    chunks: u64,
    digest: [u8; 32],
    /// (index, place) from the root down to the first chunk.
    tree_path: Vec<(u64, u64)>,
}

#[test]
fn format_v1_fixture_restores_with_bkp() {
    let restore = |snapshot: &str| {
        common::stdout_of(
            bkp(&fixture())
                .env("BKP_PASSWORD", PASSWORD)
                .args(["restore", snapshot]),
        )
    };
    let ids = ["dad90779", "4ee9b061"];
    for (id, (len, blake3_hex)) in ids.into_iter().zip(STREAMS) {
        let out = restore(id);
        assert_eq!(out.len() as u64, len);
        assert_eq!(blake3::hash(&out).to_hex().as_str(), blake3_hex);
    }
}

/// A repository written by bkp 0.2 (format version 2): three days of a generated plain pg_dump
/// (`gen_dump 600000 DAY`), days 2 and 3 stored as delta frames; made before format version 3.
const FIXTURE_V2: &str = "tests/fixtures/repo-v2";
/// (snapshot id prefix, stream length, BLAKE3 of the stream), oldest first.
const STREAMS_V2: [(&str, usize, &str); 3] = [
    (
        "bfb3a57c",
        625_752,
        "edc81286d5c735475bf78ff7ea7aff731f4f64a71a6a6ab57244b9c8c6a94938",
    ),
    (
        "4c1de557",
        627_708,
        "277e21aebcaece15bb25a6a9fcf825bd10781efd39e16980f262a41cca3d1444",
    ),
    (
        "9125e467",
        630_121,
        "8b52dc18ff17da84ca5f3c0067e3282bf2a95ba73bbff19bfee50e9c6aa56de4",
    ),
];

#[test]
fn format_v2_fixture_restores_and_checks_with_bkp() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE_V2);
    for (id, len, blake3_hex) in STREAMS_V2 {
        let out = common::stdout_of(
            bkp(&root)
                .env("BKP_PASSWORD", PASSWORD)
                .args(["restore", id]),
        );
        assert_eq!(out.len(), len, "{id}");
        assert_eq!(blake3::hash(&out).to_hex().as_str(), blake3_hex, "{id}");
    }
    let latest = common::stdout_of(
        bkp(&root)
            .env("BKP_PASSWORD", PASSWORD)
            .args(["restore", "latest", "--tag", "fixture"]),
    );
    assert_eq!(
        blake3::hash(&latest).to_hex().as_str(),
        STREAMS_V2[2].2,
        "latest is day 3"
    );
    let check = bkp(&root)
        .env("BKP_PASSWORD", PASSWORD)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

#[test]
fn format_v3_fixture_restores_and_checks_with_bkp() {
    restores_and_checks(&V3, ["8adf6ef2", "9f6fa936", "e9954a22"]);
}

#[test]
fn format_v3_fixture_with_pack_uses_restores_and_checks_with_bkp() {
    restores_and_checks(&V3_USES, ["048c067a", "3b1589ab", "1929413e"]);
}

#[test]
fn format_v4_fixture_restores_and_checks_with_bkp() {
    restores_and_checks(&V4, ["70aac3c8", "b7eaeef5", "fcb77b88"]);
}

#[test]
fn format_v4_fixture_with_tables_of_contents_restores_lists_and_diffs_with_bkp() {
    restores_and_checks(&V4_TOC, ["6e676050", "d1393c9d", "9a1afc18"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(V4_TOC.dir);
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_slice(&common::stdout_of(
            bkp(&root).env("BKP_PASSWORD", PASSWORD).args(args),
        ))
        .unwrap()
    };
    let listed = json(&["ls", "6e676050", "--json"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["public.t0", "public.t1", "public.t2", "public.t3"]);
    assert!(listed.as_array().unwrap().iter().all(|t| t["rows"] == 1200));
    // Every table of the generated dump changes from one day to the next.
    let diff = json(&["diff", "6e676050", "latest", "--tag", "fixture", "--json"]);
    let tables = diff["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 4);
    for table in tables {
        assert_eq!(table["status"], "changed", "{table}");
        assert_eq!(table["rows_before"], 1200, "{table}");
    }
    // A snapshot against itself: nothing changed.
    let same = json(&["diff", "d1393c9d", "d1393c9d", "--json"]);
    assert!(
        same["tables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "unchanged")
    );
}

/// Restores each of a fixture's snapshots (ids oldest first) and `latest`, and checks it.
fn restores_and_checks(fixture: &Fixture, ids: [&str; 3]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture.dir);
    let run = |args: &[&str]| {
        bkp(&root)
            .env("BKP_PASSWORD", PASSWORD)
            .args(args)
            .output()
            .unwrap()
    };
    for (id, (len, blake3_hex)) in ids.into_iter().zip(fixture.streams) {
        let out = run(&["restore", id]).stdout;
        assert_eq!(out.len() as u64, *len, "{id}");
        assert_eq!(blake3::hash(&out).to_hex().as_str(), *blake3_hex, "{id}");
    }
    let latest = run(&["restore", "latest", "--tag", "fixture"]).stdout;
    assert_eq!(
        blake3::hash(&latest).to_hex().as_str(),
        fixture.streams[2].1
    );
    let check = run(&["check", "--read-data"]);
    assert!(check.status.success(), "{check:?}");
}
