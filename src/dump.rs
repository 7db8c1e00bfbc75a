//! What kind of dump a stream is, whether it is complete, and whether it is compressed.
//!
//! Works on a stream, with no second pass: the kind comes from the first block, completeness
//! from a small window of the stream's tail. Only kinds whose header promises a trailer are ever
//! judged incomplete (a `mysqldump --skip-comments` dump has neither, and is "unknown").

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DumpKind {
    /// pg_dump plain SQL.
    PostgresPlain,
    /// pg_dump -Fc.
    PostgresCustom,
    /// pg_dump -Ft.
    PostgresTar,
    /// mysqldump or mariadb-dump.
    MySql,
    /// Compressed by a general-purpose compressor: gzip, zstd, xz, bzip2.
    Compressed(Compressor),
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compressor {
    Gzip,
    Zstd,
    Xz,
    Bzip2,
}

impl DumpKind {
    pub fn name(&self) -> &'static str {
        match self {
            DumpKind::PostgresPlain => "postgres-plain",
            DumpKind::PostgresCustom => "postgres-custom",
            DumpKind::PostgresTar => "postgres-tar",
            DumpKind::MySql => "mysql",
            DumpKind::Compressed(Compressor::Gzip) => "gzip",
            DumpKind::Compressed(Compressor::Zstd) => "zstd",
            DumpKind::Compressed(Compressor::Xz) => "xz",
            DumpKind::Compressed(Compressor::Bzip2) => "bzip2",
            DumpKind::Unknown => "unknown",
        }
    }
}

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpInfo {
    pub kind: DumpKind,
    pub server_version: Option<String>,
    pub database: Option<String>,
    /// Set when deduplication will not work on this stream, with how to fix it.
    pub compression_warning: Option<String>,
}

/// The verdict at the end of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpReport {
    pub info: DumpInfo,
    /// `Some(false)`: the header promised a trailer that is missing (a truncated dump).
    pub complete: Option<bool>,
}

const PG_PLAIN_HEADER: &str = "--\n-- PostgreSQL database dump\n--\n";
const PG_PLAIN_TRAILER: &str = "\n-- PostgreSQL database dump complete\n";
const MYSQL_TRAILER: &str = "\n-- Dump completed";

/// Recognises a dump from its first bytes (a few hundred are enough).
pub fn detect(head: &[u8]) -> DumpInfo {
    let info = |kind| DumpInfo {
        kind,
        server_version: None,
        database: None,
        compression_warning: None,
    };
    let compressed = |c: Compressor, fix: &str| DumpInfo {
        compression_warning: Some(format!(
            "the input is {}-compressed, so it cannot be deduplicated: every backup stores a full copy; {fix}",
            DumpKind::Compressed(c).name()
        )),
        ..info(DumpKind::Compressed(c))
    };
    const PIPE_FIX: &str =
        "pipe the uncompressed dump into bkp instead (bkp compresses what it stores)";
    if head.starts_with(&[0x1f, 0x8b]) {
        return compressed(Compressor::Gzip, PIPE_FIX);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return compressed(Compressor::Zstd, PIPE_FIX);
    }
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return compressed(Compressor::Xz, PIPE_FIX);
    }
    if head.starts_with(b"BZh") {
        return compressed(Compressor::Bzip2, PIPE_FIX);
    }
    if head.starts_with(b"PGDMP") {
        return postgres_custom(head);
    }
    if head.len() >= 262 && head.starts_with(b"toc.dat\0") && &head[257..262] == b"ustar" {
        return info(DumpKind::PostgresTar);
    }
    let text = String::from_utf8_lossy(&head[..head.len().min(4096)]);
    if text.starts_with(PG_PLAIN_HEADER) {
        // Only a dump made with -C (--create) names its database: in the comment before its
        // CREATE DATABASE, `-- Name: shop; Type: DATABASE; Schema: -; Owner: postgres`.
        let database = text.lines().find_map(|line| {
            let rest = line.strip_prefix("-- Name: ")?;
            let (name, kind) = rest.split_once("; Type: ")?;
            kind.starts_with("DATABASE;").then(|| name.to_string())
        });
        return DumpInfo {
            server_version: comment_value(&text, "-- Dumped from database version "),
            database,
            ..info(DumpKind::PostgresPlain)
        };
    }
    // MariaDB 10.11+ puts a sandbox-mode line before the comment header.
    let body = match text.strip_prefix("/*M!999999\\- enable the sandbox mode */") {
        Some(rest) => rest.trim_start_matches([' ', '\n']),
        None => &text[..],
    };
    if body.starts_with("-- MySQL dump ") || body.starts_with("-- MariaDB dump ") {
        let database = body
            .lines()
            .find_map(|l| l.strip_prefix("-- Host: "))
            .and_then(|l| l.split("Database: ").nth(1))
            .map(|d| d.trim().to_string());
        return DumpInfo {
            server_version: comment_value(body, "-- Server version\t"),
            database,
            ..info(DumpKind::MySql)
        };
    }
    info(DumpKind::Unknown)
}

fn comment_value(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// pg_dump's archive header (pg_backup_archiver.c, ReadHead): "PGDMP", version (3 bytes),
/// int size, offset size, format; then the compression (a byte from archive version 1.15, an
/// int before), seven ints of creation time, the database name and the server version.
fn postgres_custom(head: &[u8]) -> DumpInfo {
    let mut info = DumpInfo {
        kind: DumpKind::PostgresCustom,
        server_version: None,
        database: None,
        compression_warning: None,
    };
    let Some(&[_major, minor, _rev, int_size, _off_size, _format]) = head.get(5..11) else {
        return info;
    };
    let mut at = 11;
    // pg_dump writes 4-byte ints; anything wider than i64 is not a pg_dump header.
    if !(1..=8).contains(&int_size) {
        return info;
    }
    let read_int = |at: &mut usize| -> Option<i64> {
        let sign = *head.get(*at)?;
        let bytes = head.get(*at + 1..*at + 1 + int_size as usize)?;
        *at += 1 + int_size as usize;
        let magnitude = bytes.iter().rev().fold(0i64, |v, &b| (v << 8) | b as i64);
        // (A crafted header's magnitude can be i64::MIN, whose negation overflows: found by
        // fuzzing, fuzz/fuzz_targets/dump_header.rs.)
        Some(if sign == 0 {
            magnitude
        } else {
            magnitude.checked_neg()?
        })
    };
    let compressed = if minor >= 15 {
        let algorithm = head.get(at).copied();
        at += 1;
        algorithm.map(|a| a != 0)
    } else {
        read_int(&mut at).map(|level| level != 0)
    };
    if compressed == Some(true) {
        info.compression_warning = Some(
            "the pg_dump archive is compressed, so it cannot be deduplicated: every backup stores a full copy; \
             use `pg_dump -Fc -Z0` (or --compress=0), or the plain format"
                .to_string(),
        );
    }
    let read_str = |at: &mut usize| -> Option<String> {
        let len = read_int(at)?;
        let bytes = head.get(*at..*at + usize::try_from(len).ok()?)?;
        *at += bytes.len();
        Some(String::from_utf8_lossy(bytes).into_owned())
    };
    for _ in 0..7 {
        if read_int(&mut at).is_none() {
            return info;
        }
    }
    info.database = read_str(&mut at);
    info.server_version = read_str(&mut at);
    info
}

/// Whether a stream that ends with `tail` carries the trailer its kind promises.
pub fn complete(kind: DumpKind, tail: &[u8]) -> Option<bool> {
    let tail = String::from_utf8_lossy(tail);
    match kind {
        // Since 15.14/16.10/17.6, pg_dump writes `\unrestrict <key>` after the trailer.
        DumpKind::PostgresPlain => Some(tail.rfind(PG_PLAIN_TRAILER).is_some_and(|at| {
            tail[at + PG_PLAIN_TRAILER.len()..]
                .lines()
                .all(|l| l.is_empty() || l == "--" || l.starts_with("\\unrestrict "))
        })),
        DumpKind::MySql => Some(tail.rfind(MYSQL_TRAILER).is_some_and(|at| {
            let rest = &tail[at + 1..];
            rest.lines().skip(1).all(|l| l.trim().is_empty())
        })),
        _ => None,
    }
}

/// Watches a stream go by: the header from the first block, and the last bytes.
#[derive(Default)]
pub struct DumpInspector {
    info: Option<DumpInfo>,
    tail: Vec<u8>,
}

const TAIL_LEN: usize = 4096;

impl DumpInspector {
    /// Returns the header's verdict the first time it is known.
    pub fn observe(&mut self, block: &[u8]) -> Option<&DumpInfo> {
        if block.len() >= TAIL_LEN {
            self.tail.clear();
            self.tail
                .extend_from_slice(&block[block.len() - TAIL_LEN..]);
        } else {
            self.tail.extend_from_slice(block);
            let excess = self.tail.len().saturating_sub(TAIL_LEN);
            self.tail.drain(..excess);
        }
        if self.info.is_none() && !block.is_empty() {
            self.info = Some(detect(block));
            return self.info.as_ref();
        }
        None
    }

    pub fn finish(self) -> DumpReport {
        let info = self.info.unwrap_or_else(|| detect(&[]));
        let complete = complete(info.kind, &self.tail);
        DumpReport { info, complete }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: &str = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc\n\n-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)\n-- Dumped by pg_dump version 15.18\n\nSET x;\n";
    #[test]
    fn a_plain_pg_dump_names_its_database_only_when_made_with_create() {
        assert_eq!(detect(PG.as_bytes()).database, None);
        let created = format!(
            "{PG}\n--\n-- Name: \"Shop Äb\"; Type: DATABASE; Schema: -; Owner: postgres\n--\n\nCREATE DATABASE \"Shop Äb\" WITH TEMPLATE = template0;\n"
        );
        let info = detect(created.as_bytes());
        assert_eq!(info.kind, DumpKind::PostgresPlain);
        assert_eq!(info.database.as_deref(), Some("\"Shop Äb\""));
        // A table's entry is not the database's.
        let table =
            format!("{PG}\n--\n-- Name: t; Type: TABLE; Schema: public; Owner: postgres\n--\n");
        assert_eq!(detect(table.as_bytes()).database, None);
    }

    const PG_END: &str = "\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n\n";
    const MARIA: &str = "/*M!999999\\- enable the sandbox mode */ \n-- MariaDB dump 10.19  Distrib 10.11.14-MariaDB, for debian-linux-gnu (x86_64)\n--\n-- Host: localhost    Database: shop\n-- ------------------------------------------------------\n-- Server version\t10.11.14-MariaDB-0+deb12u2\n\n";
    const MARIA_END: &str =
        "/*!40111 SET SQL_NOTES=@OLD_SQL_NOTES */;\n\n-- Dump completed on 2026-11-22  4:44:45\n";

    #[test]
    fn recognises_plain_postgres_and_its_trailer() {
        let info = detect(PG.as_bytes());
        assert_eq!(info.kind, DumpKind::PostgresPlain);
        assert_eq!(
            info.server_version.as_deref(),
            Some("15.18 (Debian 15.18-0+deb12u1)")
        );
        assert_eq!(
            complete(info.kind, format!("{PG}{PG_END}").as_bytes()),
            Some(true)
        );
        assert_eq!(complete(info.kind, PG.as_bytes()), Some(false));
        // Older pg_dump: nothing after the trailer.
        assert_eq!(
            complete(
                info.kind,
                b"x;\n\n--\n-- PostgreSQL database dump complete\n--\n\n"
            ),
            Some(true)
        );
    }

    #[test]
    fn recognises_mariadb_and_its_trailer() {
        let info = detect(MARIA.as_bytes());
        assert_eq!(info.kind, DumpKind::MySql);
        assert_eq!(info.database.as_deref(), Some("shop"));
        assert_eq!(
            info.server_version.as_deref(),
            Some("10.11.14-MariaDB-0+deb12u2")
        );
        assert_eq!(complete(info.kind, MARIA_END.as_bytes()), Some(true));
        assert_eq!(
            complete(info.kind, b"-- Dump completed\n"),
            Some(false),
            "needs a preceding line"
        );
        assert_eq!(
            complete(info.kind, b"INSERT INTO t VALUES (1,"),
            Some(false)
        );
        let mysql = detect(b"-- MySQL dump 10.13  Distrib 8.0.36, for Linux (x86_64)\n--\n-- Host: db    Database: crm\n");
        assert_eq!(
            (mysql.kind, mysql.database.as_deref()),
            (DumpKind::MySql, Some("crm"))
        );
    }

    #[test]
    fn recognises_postgres_archives_and_their_compression() {
        // Captured from pg_dump 15.18 -Fc (compression -1 = default) of database "shop".
        let mut custom = b"PGDMP\x01\x0e\x00\x04\x08\x01\x01\x01\x00\x00\x00".to_vec();
        for _ in 0..7 {
            custom.extend_from_slice(&[0, 1, 0, 0, 0]);
        }
        custom.extend_from_slice(&[0, 4, 0, 0, 0]);
        custom.extend_from_slice(b"shop");
        custom.extend_from_slice(&[0, 5, 0, 0, 0]);
        custom.extend_from_slice(b"15.18");
        let info = detect(&custom);
        assert_eq!(info.kind, DumpKind::PostgresCustom);
        assert_eq!(info.database.as_deref(), Some("shop"));
        assert_eq!(info.server_version.as_deref(), Some("15.18"));
        assert!(info.compression_warning.unwrap().contains("-Z0"));
        custom[11..16].copy_from_slice(&[0, 0, 0, 0, 0]);
        assert_eq!(detect(&custom).compression_warning, None);
        assert_eq!(complete(DumpKind::PostgresCustom, b""), None);

        let mut tar = vec![0u8; 512];
        tar[..8].copy_from_slice(b"toc.dat\0");
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(detect(&tar).kind, DumpKind::PostgresTar);
    }

    #[test]
    fn compressed_input_warns_and_unknown_is_never_incomplete() {
        for (magic, kind) in [
            (&[0x1f, 0x8b, 8][..], "gzip"),
            (&[0x28, 0xb5, 0x2f, 0xfd][..], "zstd"),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0][..], "xz"),
            (&b"BZh9"[..], "bzip2"),
        ] {
            let info = detect(magic);
            assert_eq!(info.kind.name(), kind);
            assert!(info.compression_warning.is_some());
        }
        let unknown = detect(b"INSERT INTO t VALUES (1);\n");
        assert_eq!(unknown.kind, DumpKind::Unknown);
        assert_eq!(complete(unknown.kind, b"truncated"), None);
    }

    #[test]
    fn inspector_keeps_the_tail_across_small_blocks() {
        let dump = format!("{PG}{}{PG_END}", "INSERT;\n".repeat(2000));
        let mut inspector = DumpInspector::default();
        let mut first = None;
        for block in dump.as_bytes().chunks(1000) {
            if let Some(info) = inspector.observe(block) {
                first = Some(info.kind);
            }
        }
        assert_eq!(first, Some(DumpKind::PostgresPlain));
        assert_eq!(inspector.finish().complete, Some(true));
    }
}
