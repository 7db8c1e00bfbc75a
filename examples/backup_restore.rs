//! Using bkp as a library: back up a reader into a local repository, restore it to a writer.
//!
//! `cargo run --example backup_restore`

use std::io::Cursor;

use bkp::{BackupOptions, InitOptions, Repository, Store};

fn main() -> Result<(), bkp::Error> {
    let dir = std::env::temp_dir().join(format!("bkp-example-{}", std::process::id()));
    let password = b"example password";

    let repo = Repository::init(
        Store::create(dir.to_str().unwrap())?,
        password,
        &InitOptions::default(),
    )?;
    let dump = b"INSERT INTO shop.orders VALUES (1, 'widget', 9.99);\n".repeat(50_000);

    let options = BackupOptions {
        tags: vec!["shop".into()],
        ..BackupOptions::default()
    };
    let first = bkp::backup(
        &repo,
        bkp::Source::spawn(Cursor::new(dump.clone())),
        &options,
        &mut |_| {},
    )?;
    let second = bkp::backup(
        &repo,
        bkp::Source::spawn(Cursor::new(dump.clone())),
        &options,
        &mut |_| {},
    )?;
    println!(
        "backed up {} bytes twice: the first stored {} bytes, the second {}",
        dump.len(),
        first.bytes_stored,
        second.bytes_stored
    );

    // Reopen as a restore would, find the newest snapshot tagged "shop", and restore it.
    let repo = Repository::open(Store::open(dir.to_str().unwrap())?, password)?;
    let latest = repo.find_snapshot("latest", &["shop".to_string()])?;
    let mut restored = Vec::new();
    bkp::restore(&repo, &latest, &mut restored, &mut |_| {})?;
    assert_eq!(restored, dump);
    println!("restored snapshot {} byte for byte", latest.id.short());

    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
