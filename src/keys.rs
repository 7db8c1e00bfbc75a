//! Key management: several passwords open one repository, each through its own key file
//! (docs/FORMAT.md §4) wrapping the same master key, with its own argon2id parameters. Adding a
//! key or changing a password re-wraps the master key; no data is re-encrypted. A put-only key
//! (§4) wraps the public halves only: a host with it can back up and read nothing back.

use std::time::SystemTime;

use crate::crypto::{KdfParams, KeyFile, KeyRole};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::repo::{Repository, get_named, id_of, key_name, unix_seconds};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: Id,
    /// Unix seconds.
    pub created: i64,
    pub kdf: KdfParams,
    pub role: KeyRole,
    /// Whether this key opened the repository in this session.
    pub current: bool,
}

/// Every key file, oldest first.
pub fn list_keys(repo: &Repository) -> Result<Vec<KeyInfo>> {
    repo.require_full_key("manage keys")?;
    let store = repo.store();
    let mut keys = Vec::new();
    for object in store.list("keys")? {
        // A damaged key file is skipped (and reported), as when opening.
        let read =
            get_named(store, &object.name).and_then(|bytes| KeyFile::decode(&bytes, &object.name));
        let Some(file) = repo.skip_damaged(read)? else {
            continue;
        };
        let id = id_of(&object.name).expect("get_named checked the name");
        keys.push(KeyInfo {
            id,
            created: file.created,
            kdf: file.kdf,
            role: file.role,
            current: id == repo.key_id(),
        });
    }
    keys.sort_by_key(|k| (k.created, k.id));
    Ok(keys)
}

/// Adds a key file for `password` with `role`; returns its id.
pub fn add_key(repo: &Repository, password: &[u8], kdf: KdfParams, role: KeyRole) -> Result<Id> {
    repo.require_full_key("manage keys")?;
    if password.is_empty() {
        return Err(Error::invalid("new password", "it is empty"));
    }
    let created = unix_seconds(SystemTime::now());
    let file = match role {
        KeyRole::Full => KeyFile::wrap(repo.key(), password, kdf, created)?,
        KeyRole::PutOnly => {
            let version = repo.config().format_version;
            if version < PUT_ONLY_FORMAT {
                return Err(Error::invalid(
                    "key",
                    format!(
                        "put-only keys need repository format {PUT_ONLY_FORMAT} and this one is format {version}: run `bkp upgrade` first (bkp before 0.3 cannot open the repository after that)"
                    ),
                ));
            }
            let config = postcard::to_allocvec(repo.config()).expect("a config serializes");
            KeyFile::wrap_put_only(repo.key(), config, password, kdf, created)?
        }
    };
    let bytes = file.encode();
    let id = Id::of_object(&bytes);
    repo.commit_key_file(&id, bytes)?;
    Ok(id)
}

/// The first repository format whose readers know put-only key files.
const PUT_ONLY_FORMAT: u32 = 4;

/// The key whose id starts with `prefix`.
pub fn find_key(repo: &Repository, prefix: &str) -> Result<KeyInfo> {
    let prefix = prefix.to_ascii_lowercase();
    let mut matches: Vec<KeyInfo> = list_keys(repo)?
        .into_iter()
        .filter(|k| !prefix.is_empty() && k.id.to_hex().starts_with(&prefix))
        .collect();
    match matches.len() {
        1 => Ok(matches.pop().expect("one")),
        0 => Err(Error::invalid(
            "key",
            format!("no key id starts with {prefix:?}; `bkp key list` shows them"),
        )),
        n => Err(Error::invalid(
            "key",
            format!("{n} key ids start with {prefix:?}; give more characters"),
        )),
    }
}

/// Removes a key file. Refuses the last key (nothing could open the repository any more) and
/// the key in use, unless `allow_current` (what `passwd` does after adding the new key).
pub fn remove_key(repo: &Repository, id: &Id, allow_current: bool) -> Result<()> {
    let keys = list_keys(repo)?;
    let Some(removed) = keys.iter().find(|k| k.id == *id) else {
        return Err(Error::invalid(
            "key",
            format!("there is no key {}", id.short()),
        ));
    };
    if removed.role == KeyRole::Full && keys.iter().filter(|k| k.role == KeyRole::Full).count() == 1
    {
        return Err(Error::invalid(
            "key",
            format!(
                "{} is the repository's only full key; without it nothing can be restored (add another first)",
                id.short()
            ),
        ));
    }
    if *id == repo.key_id() && !allow_current {
        return Err(Error::invalid(
            "key",
            format!(
                "{} is the key you opened the repository with; to replace its password use `bkp key passwd`, or open with another key to remove it",
                id.short()
            ),
        ));
    }
    repo.delete_objects(&[key_name(id)])
}

/// Changes the password of the key in use: adds a key for `new_password`, then removes the old
/// one. Returns the new key's id.
pub fn change_password(repo: &Repository, new_password: &[u8], kdf: KdfParams) -> Result<Id> {
    let new = add_key(repo, new_password, kdf, repo.role())?;
    remove_key(repo, &repo.key_id(), true)?;
    Ok(new)
}
