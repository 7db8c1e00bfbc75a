//! Keys and sealing.
//!
//! Key roles (docs/FORMAT.md §Keys): data and metadata are each sealed to an X25519 public key
//! plus a pre-shared key (PSK); chunk ids and the chunker have their own 256-bit keys. A writer
//! only ever needs the public halves, which is what leaves room for a put-only key file later.
//!
//! Sealing: a writer draws one ephemeral X25519 key per role per backup session and derives a
//! session key `BLAKE3-derive_key("bkp v1 session key", eph_pk || recipient_pk || dh || psk)`.
//! Every message under a session key is XChaCha20-Poly1305 with a fresh random 24-byte nonce:
//! `nonce || ciphertext || tag`. The AAD names what the message is, so a header can never be
//! passed off as a frame or a snapshot as an index.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result};
use crate::id::Id;

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const SESSION_KEY_CONTEXT: &str = "bkp v1 session key";

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS random source failing is not something a backup can recover from.
    getrandom::fill(&mut out).expect("the operating system's random source failed");
    out
}

/// A symmetric XChaCha20-Poly1305 key.
#[derive(Clone)]
pub struct CipherKey(XChaCha20Poly1305);

impl CipherKey {
    pub fn new(key: &[u8; 32]) -> CipherKey {
        CipherKey(XChaCha20Poly1305::new(&Key::from(*key)))
    }

    /// Seals `plaintext` (consumed, reused as the output buffer) as `nonce || ct || tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .0
            .encrypt_inout_detached(&XNonce::from(nonce), aad, (&mut out[NONCE_LEN..]).into())
            .expect("message length within XChaCha20-Poly1305 limits");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens `nonce || ct || tag`; `None` if it is not authentic under this key and AAD.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut out = ct.to_vec();
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let tag: [u8; TAG_LEN] = tag.try_into().ok()?;
        self.0
            .decrypt_inout_detached(
                &XNonce::from(nonce),
                aad,
                out.as_mut_slice().into(),
                &tag.into(),
            )
            .ok()?;
        Some(out)
    }
}

/// What a writer needs to seal to one role: the role's public key and PSK.
#[derive(Clone)]
pub struct SealingKey {
    public: PublicKey,
    psk: [u8; 32],
}

impl Drop for SealingKey {
    fn drop(&mut self) {
        self.psk.zeroize();
    }
}

/// One role's key: what a writer needs to seal, and, in a full key, the secret half that opens
/// (a put-only key has none).
#[derive(Clone)]
pub struct OpeningKey {
    secret: Option<StaticSecret>,
    sealing: SealingKey,
}

impl SealingKey {
    /// Starts a session: a fresh ephemeral key pair, returned as its public half (stored in the
    /// object) and the derived session key.
    pub fn new_session(&self) -> ([u8; 32], CipherKey) {
        let (ephemeral_public, mut key) = self.new_session_key();
        let cipher = CipherKey::new(&key);
        key.zeroize();
        (ephemeral_public, cipher)
    }

    /// [`SealingKey::new_session`] with the session key's bytes (for a put-only writer's send
    /// log, which must read its own frames back; the caller zeroes them).
    pub fn new_session_key(&self) -> ([u8; 32], [u8; 32]) {
        let ephemeral = StaticSecret::from(random_bytes::<32>());
        let ephemeral_public = PublicKey::from(&ephemeral);
        let shared = ephemeral.diffie_hellman(&self.public);
        let key = self.derive_bytes(ephemeral_public.as_bytes(), shared.as_bytes());
        (ephemeral_public.to_bytes(), key)
    }

    fn derive(&self, ephemeral_public: &[u8; 32], shared: &[u8; 32]) -> CipherKey {
        let mut key = self.derive_bytes(ephemeral_public, shared);
        let cipher = CipherKey::new(&key);
        key.zeroize();
        cipher
    }

    fn derive_bytes(&self, ephemeral_public: &[u8; 32], shared: &[u8; 32]) -> [u8; 32] {
        let mut material = [0u8; 128];
        material[..32].copy_from_slice(ephemeral_public);
        material[32..64].copy_from_slice(self.public.as_bytes());
        material[64..96].copy_from_slice(shared);
        material[96..].copy_from_slice(&self.psk);
        let key = blake3::derive_key(SESSION_KEY_CONTEXT, &material);
        material.zeroize();
        key
    }
}

impl OpeningKey {
    fn generate() -> OpeningKey {
        OpeningKey::from_parts(random_bytes(), random_bytes())
    }

    fn from_parts(secret: [u8; 32], psk: [u8; 32]) -> OpeningKey {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        OpeningKey {
            secret: Some(secret),
            sealing: SealingKey { public, psk },
        }
    }

    /// A key that can only seal (a put-only key's).
    fn sealing_only(public: [u8; 32], psk: [u8; 32]) -> OpeningKey {
        OpeningKey {
            secret: None,
            sealing: SealingKey {
                public: PublicKey::from(public),
                psk,
            },
        }
    }

    pub fn sealing(&self) -> &SealingKey {
        &self.sealing
    }

    /// The session key for a session whose ephemeral public key is `ephemeral_public`;
    /// `None` for a degenerate (low-order) ephemeral key, which no honest writer produces.
    /// A put-only key cannot open anything: [`Error::PutOnlyKey`].
    pub fn session(&self, ephemeral_public: &[u8; 32]) -> Result<Option<CipherKey>> {
        let Some(secret) = &self.secret else {
            return Err(Error::PutOnlyKey {
                refused: "read what the repository stores".to_string(),
            });
        };
        let shared = secret.diffie_hellman(&PublicKey::from(*ephemeral_public));
        if !shared.was_contributory() {
            return Ok(None);
        }
        Ok(Some(
            self.sealing.derive(ephemeral_public, shared.as_bytes()),
        ))
    }
}

/// What a key may do (docs/FORMAT.md §4): a full key everything; a put-only key back up, and
/// nothing that reads what the repository stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyRole {
    Full,
    PutOnly,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Full => "full",
            KeyRole::PutOnly => "put-only",
        })
    }
}

/// All of a repository's secrets, as unlocked from a key file.
pub struct MasterKey {
    pub repository_id: Id,
    pub data: OpeningKey,
    pub metadata: OpeningKey,
    pub chunk_id_key: [u8; 32],
    pub chunker_key: [u8; 32],
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.chunk_id_key.zeroize();
        self.chunker_key.zeroize();
    }
}

impl MasterKey {
    pub fn generate() -> MasterKey {
        MasterKey {
            repository_id: Id(random_bytes()),
            data: OpeningKey::generate(),
            metadata: OpeningKey::generate(),
            chunk_id_key: random_bytes(),
            chunker_key: random_bytes(),
        }
    }

    /// A master key derived from `seed` alone: for fuzzing, whose crashes must reproduce.
    pub(crate) fn from_seed(seed: u8) -> MasterKey {
        let part = |n: u8| *blake3::hash(&[seed, n]).as_bytes();
        MasterKey {
            repository_id: Id(part(0)),
            data: OpeningKey::from_parts(part(1), part(2)),
            metadata: OpeningKey::from_parts(part(3), part(4)),
            chunk_id_key: part(5),
            chunker_key: part(6),
        }
    }

    /// Full if it holds both secret halves; put-only if it holds neither.
    pub fn role(&self) -> KeyRole {
        match (&self.data.secret, &self.metadata.secret) {
            (Some(_), Some(_)) => KeyRole::Full,
            _ => KeyRole::PutOnly,
        }
    }

    /// The key of objects that every writer, a put-only one too, must read: obsolete lists
    /// (docs/FORMAT.md §10), derived from the chunk-id key, which every key holds.
    pub fn shared_key(&self) -> CipherKey {
        let mut key = blake3::derive_key("bkp v4 shared key", &self.chunk_id_key);
        let cipher = CipherKey::new(&key);
        key.zeroize();
        cipher
    }

    /// A chunk's id: BLAKE3 keyed with the chunk-id key, so the store cannot test guesses.
    pub fn chunk_id(&self, chunk: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.chunk_id_key, chunk).as_bytes())
    }
}

/// The two keys that decide how a stream is cut into chunks and what each chunk is called.
/// Repositories that share them (`bkp init --copy-chunker-params-from`) cut a stream into the
/// same chunks with the same ids, so that a copy between them reads only what the target lacks
/// (docs/FORMAT.md §12.2 says what sharing them gives away).
#[derive(Clone)]
pub struct ChunkingKeys {
    pub(crate) chunker_key: [u8; 32],
    pub(crate) chunk_id_key: [u8; 32],
}

impl ChunkingKeys {
    pub(crate) fn of(key: &MasterKey) -> ChunkingKeys {
        ChunkingKeys {
            chunker_key: key.chunker_key,
            chunk_id_key: key.chunk_id_key,
        }
    }
}

impl PartialEq for ChunkingKeys {
    fn eq(&self, other: &ChunkingKeys) -> bool {
        self.chunker_key == other.chunker_key && self.chunk_id_key == other.chunk_id_key
    }
}

impl std::fmt::Debug for ChunkingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkingKeys(..)")
    }
}

impl Drop for ChunkingKeys {
    fn drop(&mut self) {
        self.chunker_key.zeroize();
        self.chunk_id_key.zeroize();
    }
}

/// Argon2id cost parameters, stored in each key file so they can differ per key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// RFC 9106's second recommended option (64 MiB, t=3, 4 lanes): ~0.2 s here. The memory is
    /// freed (and zeroed) before a backup's pipeline starts.
    pub const DEFAULT: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 4,
    };
    /// Beyond these a key file's parameters are not obeyed but the key file is damaged: they
    /// are read before anything is authenticated, and a planted key file must not make every
    /// command allocate gigabytes or spin for hours. 4 GiB and 64 passes cost minutes at most.
    pub const MAX: KdfParams = KdfParams {
        memory_kib: 4 * 1024 * 1024,
        iterations: 64,
        parallelism: 64,
    };
    /// For tests only: offers no protection against password guessing.
    pub const INSECURE_FAST: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    /// Whether these parameters are within [`KdfParams::MAX`] (and what argon2 accepts).
    pub fn within_limits(&self) -> bool {
        let max = KdfParams::MAX;
        (1..=max.parallelism).contains(&self.parallelism)
            && (1..=max.iterations).contains(&self.iterations)
            && (8 * self.parallelism..=max.memory_kib).contains(&self.memory_kib)
    }

    fn derive(&self, password: &[u8], salt: &[u8]) -> Result<CipherKey> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::invalid("key derivation parameters", e.to_string()))?;
        let mut key = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password, salt, &mut key)
            .map_err(|e| Error::invalid("key derivation", e.to_string()))?;
        let cipher = CipherKey::new(&key);
        key.zeroize();
        Ok(cipher)
    }
}

/// The secrets as serialized inside a key file. A put-only key has no secret halves.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct KeyMaterial {
    #[zeroize(skip)]
    repository_id: Id,
    data_public: [u8; 32],
    data_secret: Option<[u8; 32]>,
    data_psk: [u8; 32],
    metadata_public: [u8; 32],
    metadata_secret: Option<[u8; 32]>,
    metadata_psk: [u8; 32],
    chunk_id_key: [u8; 32],
    chunker_key: [u8; 32],
}

/// A put-only key file's plaintext: its key material, and a copy of the repository's config,
/// which such a key cannot open where it is stored.
#[derive(Serialize, Deserialize)]
struct PutOnlyMaterial {
    material: KeyMaterial,
    config: Vec<u8>,
}

/// A password-wrapped copy of the master key (`keys/<id>`), in plaintext apart from `sealed`.
pub struct KeyFile {
    /// Stored in plaintext, so that `bkp key list` shows every key's, and authenticated with
    /// the sealed material: a changed role makes the key file fail to open.
    pub role: KeyRole,
    pub kdf: KdfParams,
    pub salt: [u8; 16],
    /// Unix seconds; for `bkp key list`.
    pub created: i64,
    sealed: Vec<u8>,
}

/// A full key's file (every full key ever written, so that bkp before format 4 still opens
/// repositories that have only full keys).
pub const KEY_FILE_MAGIC: &[u8; 8] = b"BKPKEY01";
/// A key file that names its role (format 4): put-only keys.
pub const ROLE_KEY_FILE_MAGIC: &[u8; 8] = b"BKPKEY02";

/// `BKPKEY01`'s body.
#[derive(Serialize, Deserialize)]
struct FullKeyFile {
    kdf: KdfParams,
    salt: [u8; 16],
    created: i64,
    sealed: Vec<u8>,
}

/// `BKPKEY02`'s body.
#[derive(Serialize, Deserialize)]
struct RoleKeyFile {
    role: KeyRole,
    kdf: KdfParams,
    salt: [u8; 16],
    created: i64,
    sealed: Vec<u8>,
}

/// A key as a password unlocked it.
pub struct UnlockedKey {
    pub key: MasterKey,
    /// A put-only key's copy of the config object's plaintext (docs/FORMAT.md §4).
    pub config: Option<Vec<u8>>,
}

impl KeyFile {
    /// A full key file for `master`.
    pub fn wrap(
        master: &MasterKey,
        password: &[u8],
        kdf: KdfParams,
        created: i64,
    ) -> Result<KeyFile> {
        let plain =
            postcard::to_allocvec(&KeyMaterial::of(master)).expect("key material serializes");
        KeyFile::seal(KeyRole::Full, plain, password, kdf, created)
    }

    /// A put-only key file for `master`'s repository: its public halves, PSKs, chunk-id and
    /// chunker keys, and `config` (the config object's plaintext), but no secret half.
    pub fn wrap_put_only(
        master: &MasterKey,
        config: Vec<u8>,
        password: &[u8],
        kdf: KdfParams,
        created: i64,
    ) -> Result<KeyFile> {
        let mut material = KeyMaterial::of(master);
        (material.data_secret, material.metadata_secret) = (None, None);
        let plain = postcard::to_allocvec(&PutOnlyMaterial { material, config })
            .expect("key material serializes");
        KeyFile::seal(KeyRole::PutOnly, plain, password, kdf, created)
    }

    fn seal(
        role: KeyRole,
        mut plain: Vec<u8>,
        password: &[u8],
        kdf: KdfParams,
        created: i64,
    ) -> Result<KeyFile> {
        let salt = random_bytes();
        let kek = kdf.derive(password, &salt)?;
        let sealed = kek.seal(&KeyFile::aad(role), &plain);
        plain.zeroize();
        Ok(KeyFile {
            role,
            kdf,
            salt,
            created,
            sealed,
        })
    }

    /// What the sealed material is authenticated with: the magic, and for a role key file
    /// its role's number.
    fn aad(role: KeyRole) -> Vec<u8> {
        match role {
            KeyRole::Full => KEY_FILE_MAGIC.to_vec(),
            KeyRole::PutOnly => {
                let mut aad = ROLE_KEY_FILE_MAGIC.to_vec();
                aad.extend(postcard::to_allocvec(&role).expect("a role serializes"));
                aad
            }
        }
    }

    /// `Ok(None)` when the password is not this key's.
    pub fn unwrap_with(&self, password: &[u8], object: &str) -> Result<Option<UnlockedKey>> {
        let kek = self.kdf.derive(password, &self.salt)?;
        let Some(mut plain) = kek.open(&KeyFile::aad(self.role), &self.sealed) else {
            return Ok(None);
        };
        let decoded = match self.role {
            KeyRole::Full => {
                postcard::from_bytes::<KeyMaterial>(&plain).map(|material| (material, None))
            }
            KeyRole::PutOnly => postcard::from_bytes::<PutOnlyMaterial>(&plain)
                .map(|PutOnlyMaterial { material, config }| (material, Some(config))),
        };
        plain.zeroize();
        let (material, config) =
            decoded.map_err(|e| Error::corrupt(object, format!("key material: {e}")))?;
        let key = material.unlock(object)?;
        if key.role() != self.role {
            return Err(Error::corrupt(
                object,
                format!("its material is not that of a {} key", self.role),
            ));
        }
        Ok(Some(UnlockedKey { key, config }))
    }

    pub fn encode(&self) -> Vec<u8> {
        let (magic, body) = match self.role {
            KeyRole::Full => (
                KEY_FILE_MAGIC,
                postcard::to_allocvec(&FullKeyFile {
                    kdf: self.kdf,
                    salt: self.salt,
                    created: self.created,
                    sealed: self.sealed.clone(),
                }),
            ),
            KeyRole::PutOnly => (
                ROLE_KEY_FILE_MAGIC,
                postcard::to_allocvec(&RoleKeyFile {
                    role: self.role,
                    kdf: self.kdf,
                    salt: self.salt,
                    created: self.created,
                    sealed: self.sealed.clone(),
                }),
            ),
        };
        let mut out = magic.to_vec();
        out.extend(body.expect("key file serializes"));
        out
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<KeyFile> {
        let corrupt = |e: postcard::Error| Error::corrupt(object, e.to_string());
        let file = if let Some(body) = bytes.strip_prefix(KEY_FILE_MAGIC.as_slice()) {
            let file: FullKeyFile = postcard::from_bytes(body).map_err(corrupt)?;
            KeyFile {
                role: KeyRole::Full,
                kdf: file.kdf,
                salt: file.salt,
                created: file.created,
                sealed: file.sealed,
            }
        } else if let Some(body) = bytes.strip_prefix(ROLE_KEY_FILE_MAGIC.as_slice()) {
            let file: RoleKeyFile = postcard::from_bytes(body).map_err(corrupt)?;
            if file.role == KeyRole::Full {
                // Full keys are written as BKPKEY01 only, which every bkp reads.
                return Err(Error::corrupt(object, "a full key in a role key file"));
            }
            KeyFile {
                role: file.role,
                kdf: file.kdf,
                salt: file.salt,
                created: file.created,
                sealed: file.sealed,
            }
        } else {
            // A newer key file kind is named as such; anything else is not a key file.
            let magic = bytes.get(..8).unwrap_or(bytes);
            crate::envelope::check_magic(ROLE_KEY_FILE_MAGIC, magic, object)?;
            return Err(Error::corrupt(object, "not a bkp key file (bad magic)"));
        };
        if !file.kdf.within_limits() {
            let KdfParams {
                memory_kib,
                iterations,
                parallelism,
            } = file.kdf;
            return Err(Error::corrupt(
                object,
                format!(
                    "its key derivation cost (argon2id m={memory_kib} KiB, t={iterations}, p={parallelism}) is beyond any bkp writes; not running it"
                ),
            ));
        }
        Ok(file)
    }
}

impl KeyMaterial {
    fn of(master: &MasterKey) -> KeyMaterial {
        KeyMaterial {
            repository_id: master.repository_id,
            data_public: *master.data.sealing.public.as_bytes(),
            data_secret: master.data.secret.as_ref().map(StaticSecret::to_bytes),
            data_psk: master.data.sealing.psk,
            metadata_public: *master.metadata.sealing.public.as_bytes(),
            metadata_secret: master.metadata.secret.as_ref().map(StaticSecret::to_bytes),
            metadata_psk: master.metadata.sealing.psk,
            chunk_id_key: master.chunk_id_key,
            chunker_key: master.chunker_key,
        }
    }

    /// The keys this material holds: both secret halves (a full key) or neither (put-only).
    fn unlock(&self, object: &str) -> Result<MasterKey> {
        let (data, metadata) = match (self.data_secret, self.metadata_secret) {
            (Some(data_secret), Some(metadata_secret)) => {
                let data = OpeningKey::from_parts(data_secret, self.data_psk);
                let metadata = OpeningKey::from_parts(metadata_secret, self.metadata_psk);
                if data.sealing.public.as_bytes() != &self.data_public
                    || metadata.sealing.public.as_bytes() != &self.metadata_public
                {
                    return Err(Error::corrupt(
                        object,
                        "public and secret keys do not match",
                    ));
                }
                (data, metadata)
            }
            (None, None) => (
                OpeningKey::sealing_only(self.data_public, self.data_psk),
                OpeningKey::sealing_only(self.metadata_public, self.metadata_psk),
            ),
            _ => return Err(Error::corrupt(object, "it holds one secret half of two")),
        };
        Ok(MasterKey {
            repository_id: self.repository_id,
            data,
            metadata,
            chunk_id_key: self.chunk_id_key,
            chunker_key: self.chunker_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = CipherKey::new(&[7; 32]);
        let sealed = key.seal(b"aad", b"hello");
        assert_eq!(key.open(b"aad", &sealed).unwrap(), b"hello");
        assert!(key.open(b"other", &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN] ^= 1;
        assert!(key.open(b"aad", &flipped).is_none());
        assert!(key.open(b"aad", &sealed[..10]).is_none());
    }

    #[test]
    fn session_keys_agree_between_writer_and_reader() {
        let master = MasterKey::generate();
        let (eph, writer) = master.data.sealing().new_session();
        let sealed = writer.seal(b"x", b"payload");
        let reader = master.data.session(&eph).unwrap().unwrap();
        assert_eq!(reader.open(b"x", &sealed).unwrap(), b"payload");
        // The metadata role cannot open data.
        let wrong = master.metadata.session(&eph).unwrap().unwrap();
        assert!(wrong.open(b"x", &sealed).is_none());
        // A low-order point is refused.
        assert!(master.data.session(&[0; 32]).unwrap().is_none());
    }

    #[test]
    fn key_file_opens_only_with_its_password() {
        let master = MasterKey::generate();
        let file = KeyFile::wrap(&master, b"pw", KdfParams::INSECURE_FAST, 0).unwrap();
        let decoded = KeyFile::decode(&file.encode(), "k").unwrap();
        assert!(decoded.unwrap_with(b"nope", "k").unwrap().is_none());
        let opened = decoded.unwrap_with(b"pw", "k").unwrap().unwrap().key;
        assert_eq!(opened.repository_id, master.repository_id);
        assert_eq!(opened.chunk_id(b"a"), master.chunk_id(b"a"));
        assert_ne!(opened.chunk_id(b"a"), Id(*blake3::hash(b"a").as_bytes()));
    }

    #[test]
    fn a_put_only_key_file_seals_for_the_full_key_and_opens_nothing() {
        let master = MasterKey::generate();
        let file = KeyFile::wrap_put_only(
            &master,
            b"config".to_vec(),
            b"pw",
            KdfParams::INSECURE_FAST,
            0,
        )
        .unwrap();
        let encoded = file.encode();
        assert_eq!(&encoded[..8], ROLE_KEY_FILE_MAGIC);
        let decoded = KeyFile::decode(&encoded, "k").unwrap();
        assert_eq!(decoded.role, KeyRole::PutOnly);
        assert!(decoded.unwrap_with(b"nope", "k").unwrap().is_none());
        let unlocked = decoded.unwrap_with(b"pw", "k").unwrap().unwrap();
        assert_eq!(unlocked.config.as_deref(), Some(&b"config"[..]));
        let put_only = unlocked.key;
        assert_eq!(put_only.role(), KeyRole::PutOnly);
        assert_eq!(master.role(), KeyRole::Full);
        assert_eq!(put_only.chunk_id(b"a"), master.chunk_id(b"a"));
        assert_eq!(put_only.chunker_key, master.chunker_key);
        // What it seals, the full key opens; it opens nothing, not even its own.
        for (writer, reader) in [
            (&put_only.data, &master.data),
            (&put_only.metadata, &master.metadata),
        ] {
            let (eph, session) = writer.sealing().new_session();
            let sealed = session.seal(b"x", b"payload");
            let opened = reader.session(&eph).unwrap().unwrap().open(b"x", &sealed);
            assert_eq!(opened.unwrap(), b"payload");
            assert!(matches!(
                writer.session(&eph),
                Err(Error::PutOnlyKey { .. })
            ));
        }
        // The role is authenticated: a put-only key file relabelled full is refused.
        let mut relabelled = encoded.clone();
        relabelled[8] = 0;
        assert!(KeyFile::decode(&relabelled, "k").is_err());
        // A full key file written as such opens as full.
        let full = KeyFile::wrap(&master, b"pw", KdfParams::INSECURE_FAST, 0).unwrap();
        assert_eq!(&full.encode()[..8], KEY_FILE_MAGIC);
        let unlocked = KeyFile::decode(&full.encode(), "k")
            .unwrap()
            .unwrap_with(b"pw", "k")
            .unwrap()
            .unwrap();
        assert_eq!(unlocked.key.role(), KeyRole::Full);
        assert!(unlocked.config.is_none());
    }

    #[test]
    fn absurd_key_derivation_costs_make_a_key_file_damaged_not_obeyed() {
        let master = MasterKey::generate();
        assert!(KdfParams::DEFAULT.within_limits());
        assert!(KdfParams::INSECURE_FAST.within_limits());
        for kdf in [
            KdfParams {
                memory_kib: u32::MAX,
                ..KdfParams::DEFAULT
            },
            KdfParams {
                iterations: 1 << 30,
                ..KdfParams::DEFAULT
            },
            KdfParams {
                parallelism: 0,
                ..KdfParams::DEFAULT
            },
            KdfParams {
                memory_kib: 1,
                ..KdfParams::DEFAULT
            },
        ] {
            let mut file = KeyFile::wrap(&master, b"pw", KdfParams::INSECURE_FAST, 0).unwrap();
            file.kdf = kdf;
            let err = KeyFile::decode(&file.encode(), "keys/k").err().unwrap();
            assert!(matches!(err, Error::Corrupt { .. }), "{kdf:?}: {err}");
        }
    }
}
