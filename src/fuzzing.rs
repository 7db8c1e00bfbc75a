//! Entry points of the fuzz targets (`fuzz/`, run with cargo-fuzz) and of the test that replays
//! their corpora (`tests/fuzz_corpora.rs`). Each runs one decoder on arbitrary bytes as bkp
//! meets them in a store: it must return (an error is the expected outcome) without panicking,
//! hanging, or allocating far beyond its input. Objects that are authenticated are tried twice:
//! as stored bytes (everything before authentication: magics, lengths, offsets), and with the
//! input as the plaintext of a correctly sealed object (the decoder behind the authentication,
//! which a writer holding a key, or a put-only key, controls). Not part of the API.

use std::sync::OnceLock;

use crate::crypto::{KdfParams, KeyFile, MasterKey};
use crate::envelope;
use crate::id::Id;
use crate::index::{INDEX_MAGIC, IndexFile, SpillingIndex};
use crate::listing::{CATALOG_MAGIC, Catalog};
use crate::pack::{self, PackSession};
use crate::repo::{CONFIG_MAGIC, Config, OBSOLETE_MAGIC, ObsoleteList, SHARED_OBSOLETE_MAGIC};
use crate::snapshot::{SNAPSHOT_MAGIC, Snapshot};
use crate::tree::{TreeRoot, TreeWalker};

/// The same key in every run, so that a crash reproduces.
fn key() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(|| MasterKey::from_seed(7))
}

/// A sealed object whose plaintext is `plain`.
fn sealed(magic: &[u8; 8], plain: &[u8]) -> Vec<u8> {
    envelope::seal_plaintext(magic, key().metadata.sealing(), plain.to_vec())
}

/// `keys/<id>`: decoded, and opened when its cost is that of tests (a real cost per input
/// would only measure argon2).
pub fn key_file(bytes: &[u8]) {
    if let Ok(file) = KeyFile::decode(bytes, "keys/x")
        && file.kdf.memory_kib <= KdfParams::INSECURE_FAST.memory_kib
        && file.kdf.iterations <= 2
    {
        let _ = file.unwrap_with(b"password", "keys/x");
    }
}

/// `config`.
pub fn config(bytes: &[u8]) {
    for object in [bytes.to_vec(), sealed(CONFIG_MAGIC, bytes)] {
        if let Ok(config) = envelope::open::<Config>(CONFIG_MAGIC, &key().metadata, &object, "c") {
            let _ = config.chunker.validate();
        }
    }
}

/// The envelope itself, under every metadata magic.
pub fn envelope(bytes: &[u8]) {
    for magic in [CONFIG_MAGIC, INDEX_MAGIC, SNAPSHOT_MAGIC, OBSOLETE_MAGIC] {
        let _ = envelope::open::<Vec<u8>>(magic, &key().metadata, bytes, "e");
    }
}

/// A pack: its prefix and trailer, then its header, as stored bytes and as a pack around the
/// input as header plaintext; a header that decodes is also added to an index.
pub fn pack_header(bytes: &[u8]) {
    let session = PackSession::new(key());
    let split = bytes.first().map_or(0, |&b| b as usize).min(bytes.len());
    let around = pack::pack_around(&session, &bytes[..split], &bytes[split..]);
    for object in [bytes, &around[..]] {
        if let Ok((data_ephemeral, header)) = pack::read_header(object, &key().metadata, "p") {
            let pack = crate::index::IndexedPack {
                id: Id::of_object(object),
                len: object.len() as u64,
                data_ephemeral,
                header,
            };
            index_of(&IndexFile { packs: vec![pack] });
        }
    }
}

/// Builds both kinds of index from a decoded index file and looks up every chunk it names.
fn index_of(file: &IndexFile) {
    for decodable_only in [false, true] {
        let mut spilling = SpillingIndex::with_memory(1 << 20);
        for pack in &file.packs {
            if spilling.add(pack).is_err() {
                return;
            }
        }
        let Ok(index) = spilling.finish_for_lookups(decodable_only) else {
            return;
        };
        for pack in &file.packs {
            for frame in &pack.header.frames {
                for chunk in &frame.chunks {
                    let _ = index.chunk_frame(&chunk.id);
                }
            }
        }
    }
}

/// `index/<id>`.
pub fn index_file(bytes: &[u8]) {
    for object in [bytes.to_vec(), sealed(INDEX_MAGIC, bytes)] {
        if let Ok(file) = IndexFile::open(&key().metadata, &object, "i") {
            index_of(&file);
        }
    }
}

/// `snapshots/<id>`, and a walk of its tree over nodes cut from the input.
pub fn snapshot(bytes: &[u8]) {
    for object in [bytes.to_vec(), sealed(SNAPSHOT_MAGIC, bytes)] {
        if let Ok(snapshot) = Snapshot::open(&key().metadata, &object, "s") {
            let _ = snapshot.dump_complete();
            walk(&snapshot.tree, bytes);
        }
    }
}

/// A tree node: the input as a root (first byte: height) and as every node it names.
pub fn tree_node(bytes: &[u8]) {
    let Some((&height, rest)) = bytes.split_first() else {
        return;
    };
    let root = TreeRoot {
        height: height % 4,
        ids: rest
            .chunks_exact(Id::LEN)
            .filter_map(Id::from_slice)
            .collect(),
    };
    walk(&root, rest);
}

/// Walks `root` for a bounded number of steps, every node being `node`.
fn walk(root: &TreeRoot, node: &[u8]) {
    let mut walker = TreeWalker::new(root);
    for _ in 0..10_000 {
        match walker.next_id(&mut |_| Ok(node.to_vec())) {
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}

/// `obsolete/<id>`.
pub fn obsolete_list(bytes: &[u8]) {
    for object in [bytes.to_vec(), sealed(OBSOLETE_MAGIC, bytes)] {
        let _ = envelope::open::<ObsoleteList>(OBSOLETE_MAGIC, &key().metadata, &object, "o");
    }
    let shared = key().shared_key();
    let mut sealed = SHARED_OBSOLETE_MAGIC.to_vec();
    sealed.extend(shared.seal(SHARED_OBSOLETE_MAGIC, bytes));
    for object in [bytes.to_vec(), sealed] {
        let _ = envelope::open_shared::<ObsoleteList>(SHARED_OBSOLETE_MAGIC, &shared, &object, "o");
    }
}

/// `catalogs/<series>/<id>`.
pub fn catalog(bytes: &[u8]) {
    for object in [bytes.to_vec(), sealed(CATALOG_MAGIC, bytes)] {
        if let Ok(catalog) = envelope::open::<Catalog>(CATALOG_MAGIC, &key().metadata, &object, "c")
        {
            for (_, snapshot) in catalog.snapshots {
                let _ = Snapshot::from(snapshot).dump_complete();
            }
        }
    }
}

/// A series folder's name (`series/<name>/`, the input as text) and a marker's name.
pub fn series_name(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = crate::series::SeriesKeys::new(key()).tags(&text);
    let _ = crate::series::parse_marker(&text);
}

/// The dump kind, version, database and completeness, from a stream cut into blocks at the
/// input's first byte.
pub fn dump_header(bytes: &[u8]) {
    let _ = crate::dump::detect(bytes);
    let step = bytes.first().map_or(1, |&b| b as usize + 1);
    let mut inspector = crate::dump::DumpInspector::default();
    for block in bytes.chunks(step) {
        let _ = inspector.observe(block);
    }
    let _ = inspector.finish();
}

/// A dump's table of contents (the input's first byte picks the kind and the block size,
/// the rest is the stream): never a panic, and sections that cover the stream exactly, each
/// start told as a place to cut, however the stream is cut into blocks. A dump's content is
/// whatever the database's users wrote into it.
pub fn dump_toc(bytes: &[u8]) {
    let Some((&first, stream)) = bytes.split_first() else {
        return;
    };
    let kind = match first % 3 {
        0 => crate::DumpKind::PostgresPlain,
        1 => crate::DumpKind::MySql,
        _ => crate::DumpKind::PostgresCustom,
    };
    let read = |step: usize| {
        crate::toc::read_in_blocks(kind, stream, step).expect("a kind with a table of contents")
    };
    let (sections, starts) = read(usize::from(first >> 2) + 1);
    assert_eq!(
        (sections.clone(), starts.clone()),
        read(stream.len().max(1)),
        "the block size matters"
    );
    if sections.is_empty() {
        // An empty stream, or a compressed custom archive: no table of contents, no cuts.
        assert!(stream.is_empty() || kind == crate::DumpKind::PostgresCustom);
        assert!(starts.is_empty());
        return;
    }
    let mut at = 0;
    for section in &sections {
        assert_eq!(section.start, at, "{section:?}");
        assert!(section.end >= section.start, "{section:?}");
        at = section.end;
    }
    assert_eq!(at, stream.len() as u64);
    let told: Vec<u64> = sections
        .iter()
        .map(|s| s.start)
        .filter(|&s| s > 0)
        .collect();
    assert_eq!(starts, told);
}

/// A decoder run on arbitrary bytes.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 12] = [
    ("key_file", key_file),
    ("config", config),
    ("envelope", envelope),
    ("pack_header", pack_header),
    ("index_file", index_file),
    ("snapshot", snapshot),
    ("tree_node", tree_node),
    ("obsolete_list", obsolete_list),
    ("dump_header", dump_header),
    ("catalog", catalog),
    ("series_name", series_name),
    ("dump_toc", dump_toc),
];

#[cfg(test)]
mod round_trips {
    //! Every decoder gives back what its encoder wrote, for any value (proptest).
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::chunker::ChunkerParams;
    use crate::frame::{ChunkEntry, FrameRef};
    use crate::index::IndexedPack;
    use crate::pack::{FrameEntry, MovedFrame, PackHeader};
    use crate::snapshot::AddedBytes;
    use crate::tree::TreeBuilder;

    fn id() -> impl Strategy<Value = Id> {
        any::<[u8; 32]>().prop_map(Id)
    }

    fn time() -> impl Strategy<Value = SystemTime> {
        (0u64..1 << 40, 0u32..1_000_000_000)
            .prop_map(|(s, n)| SystemTime::UNIX_EPOCH + Duration::new(s, n))
    }

    fn frame_ref() -> impl Strategy<Value = FrameRef> {
        (id(), any::<u32>()).prop_map(|(pack, frame)| FrameRef { pack, frame })
    }

    fn header() -> impl Strategy<Value = PackHeader> {
        let chunk = (id(), any::<u32>()).prop_map(|(id, len)| ChunkEntry { id, len });
        let frame = (
            any::<u64>(),
            any::<u32>(),
            vec(chunk, 0..6),
            vec(frame_ref(), 0..3),
        )
            .prop_map(|(offset, sealed_len, chunks, bases)| FrameEntry {
                offset,
                sealed_len,
                chunks,
                bases,
            });
        let moved =
            (any::<u32>(), frame_ref()).prop_map(|(frame, from)| MovedFrame { frame, from });
        (vec(frame, 0..5), vec(moved, 0..3))
            .prop_map(|(frames, moved)| PackHeader { frames, moved })
    }

    fn open<T: serde::de::DeserializeOwned>(magic: &[u8; 8], object: &[u8]) -> T {
        envelope::open(magic, &key().metadata, object, "x").unwrap()
    }

    fn seal<T: serde::Serialize>(magic: &[u8; 8], value: &T) -> Vec<u8> {
        envelope::seal(magic, key().metadata.sealing(), value)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn config(format_version: u32, repository_id in id(), sizes: (u32, u32, u32), created in time()) {
            let config = Config {
                format_version,
                repository_id,
                chunker: ChunkerParams { min_size: sizes.0, avg_size: sizes.1, max_size: sizes.2 },
                created,
            };
            prop_assert_eq!(open::<Config>(CONFIG_MAGIC, &seal(CONFIG_MAGIC, &config)), config);
        }

        #[test]
        fn key_file(seed: u8, password in vec(any::<u8>(), 1..40), created: i64) {
            let master = MasterKey::from_seed(seed);
            let file = KeyFile::wrap(&master, &password, KdfParams::INSECURE_FAST, created).unwrap();
            let decoded = KeyFile::decode(&file.encode(), "k").unwrap();
            prop_assert_eq!(decoded.created, created);
            let opened = decoded.unwrap_with(&password, "k").unwrap().unwrap().key;
            prop_assert_eq!(opened.repository_id, master.repository_id);
            prop_assert_eq!(opened.chunk_id(b"x"), master.chunk_id(b"x"));
            prop_assert_eq!(opened.chunker_key, master.chunker_key);
        }

        #[test]
        fn pack_header(header in header(), frames in vec(any::<u8>(), 0..300)) {
            let session = PackSession::new(key());
            let plain = postcard::to_allocvec(&header).unwrap();
            let bytes = pack::pack_around(&session, &frames, &plain);
            let (ephemeral, back) = pack::read_header(&bytes, &key().metadata, "p").unwrap();
            prop_assert_eq!(ephemeral, session.data_ephemeral);
            prop_assert_eq!(back, header);
        }

        #[test]
        fn index_file(packs in vec((id(), any::<u64>(), any::<[u8; 32]>(), header()), 0..4)) {
            let file = IndexFile {
                packs: packs
                    .into_iter()
                    .map(|(id, len, data_ephemeral, header)| IndexedPack { id, len, data_ephemeral, header })
                    .collect(),
            };
            let sealed = seal(INDEX_MAGIC, &file);
            prop_assert_eq!(IndexFile::open(&key().metadata, &sealed, "i").unwrap(), file);
        }

        #[test]
        fn snapshot(
            time in time(),
            hostname in ".{0,20}",
            tags in vec("[a-z]{1,8}", 0..4),
            name in ".{0,30}",
            size: u64,
            stream_hash: [u8; 32],
            height: u8,
            ids in vec(id(), 0..10),
            added: (u64, u64, u64, u64),
            annotations in proptest::collection::btree_map(".{0,10}", ".{0,20}", 0..4),
            packs in vec((id(), any::<u64>(), proptest::option::of((any::<u64>(), any::<u64>()))), 0..5),
            toc in vec((".{0,12}", ".{0,20}", proptest::option::of(".{0,20}"), vec(any::<u64>(), 6), any::<[u8; 32]>()), 0..4),
        ) {
            let snapshot = Snapshot {
                time,
                hostname,
                tags,
                name,
                size,
                stream_hash,
                tree: TreeRoot { height, ids },
                added: AddedBytes { chunks: added.0, new_chunks: added.1, new_raw: added.2, stored: added.3 },
                annotations: annotations.into_iter().collect::<BTreeMap<_, _>>(),
                packs: packs
                    .into_iter()
                    .map(|(id, len, uses)| crate::snapshot::PackRef {
                        id,
                        len,
                        uses: uses.map(|(first, last)| crate::snapshot::ChunkSpan { first, last }),
                    })
                    .collect(),
                toc: toc
                    .into_iter()
                    .map(|(kind, name, table, n, digest)| crate::toc::Entry {
                        section: crate::toc::Section { kind, name, table, start: n[0], end: n[1], rows: n[2] },
                        first_chunk: n[3],
                        chunks: n[4],
                        digest,
                        new_bytes: n[5],
                        tree_path: vec![crate::tree::TreeStep { index: n[0] as u32, place: n[1] }],
                    })
                    .collect(),
            };
            prop_assert_eq!(open::<Snapshot>(SNAPSHOT_MAGIC, &seal(SNAPSHOT_MAGIC, &snapshot)), snapshot);
        }

        #[test]
        fn obsolete_list(time in time(), packs in vec(id(), 0..50)) {
            let list = ObsoleteList { time, packs };
            prop_assert_eq!(open::<ObsoleteList>(OBSOLETE_MAGIC, &seal(OBSOLETE_MAGIC, &list)), list.clone());
            let shared = key().shared_key();
            let sealed = envelope::seal_shared(SHARED_OBSOLETE_MAGIC, &shared, &list);
            prop_assert_eq!(sealed.len() as u64, crate::padding::padded_len(sealed.len() as u64));
            let opened: ObsoleteList =
                envelope::open_shared(SHARED_OBSOLETE_MAGIC, &shared, &sealed, "o").unwrap();
            prop_assert_eq!(opened, list);
        }

        #[test]
        fn tree(ids in vec(id(), 0..3000)) {
            let mut nodes = std::collections::HashMap::new();
            let mut store = |bytes: Vec<u8>, _place: u64| {
                let id = Id::of_object(&bytes);
                nodes.insert(id, bytes);
                Ok(id)
            };
            let mut builder = TreeBuilder::default();
            for (place, id) in ids.iter().enumerate() {
                builder.push(*id, place as u64, &mut store).unwrap();
            }
            let root = builder.finish(&mut store).unwrap();
            let mut walker = TreeWalker::new(&root);
            let mut back = Vec::new();
            while let Some(id) = walker.next_id(&mut |id| Ok(nodes[id].clone())).unwrap() {
                back.push(id);
            }
            prop_assert_eq!(back, ids);
        }
    }
}
