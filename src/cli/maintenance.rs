//! The repository-maintenance commands: check, forget, prune, stats and key.

use super::*;

pub(super) fn key_command(location: &str, quiet: bool, command: KeyCommand) -> Result<()> {
    let repo = open_repository(location, Access::FullKeyTo("manage keys"))?;
    let mut out = io::stdout().lock();
    match command {
        KeyCommand::List { json } => {
            let keys = bkp::list_keys(&repo)?;
            if json {
                let array: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        json!({
                            "id": k.id.to_hex(),
                            "created": humantime::format_rfc3339_seconds(
                                std::time::UNIX_EPOCH + Duration::from_secs(k.created.max(0) as u64)
                            ).to_string(),
                            "kdf": { "algorithm": "argon2id", "memory_kib": k.kdf.memory_kib,
                                     "iterations": k.kdf.iterations, "parallelism": k.kdf.parallelism },
                            "role": k.role.to_string(),
                            "current": k.current,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
            } else {
                writeln!(
                    out,
                    "{:<2}{:<10}{:<10}{:<22}kdf",
                    "", "id", "role", "created"
                )?;
                for k in &keys {
                    let created =
                        std::time::UNIX_EPOCH + Duration::from_secs(k.created.max(0) as u64);
                    writeln!(
                        out,
                        "{:<2}{:<10}{:<10}{:<22}argon2id m={} t={} p={}",
                        if k.current { "*" } else { "" },
                        k.id.short(),
                        k.role.to_string(),
                        humantime::format_rfc3339_seconds(created).to_string(),
                        // (64 KiB, the test KDF's, is not "0 MiB")
                        if k.kdf.memory_kib % 1024 == 0 {
                            format!("{} MiB", k.kdf.memory_kib / 1024)
                        } else {
                            format!("{} KiB", k.kdf.memory_kib)
                        },
                        k.kdf.iterations,
                        k.kdf.parallelism
                    )?;
                }
                writeln!(out, "{} key(s); * marks the one in use", keys.len())?;
            }
        }
        KeyCommand::Add { put_only } => {
            let role = if put_only {
                bkp::KeyRole::PutOnly
            } else {
                bkp::KeyRole::Full
            };
            let password = read_secret("BKP_NEW_PASSWORD", "New password", true)?;
            let id = bkp::add_key(&repo, password.as_bytes(), kdf_params(), role)?;
            if !quiet {
                writeln!(out, "added key {} ({role})", id.short())?;
            }
        }
        KeyCommand::Remove { id } => {
            let key = bkp::find_key(&repo, &id)?;
            bkp::remove_key(&repo, &key.id, false)?;
            if !quiet {
                writeln!(out, "removed key {}", key.id.short())?;
            }
        }
        KeyCommand::Passwd => {
            let password = read_secret("BKP_NEW_PASSWORD", "New password", true)?;
            let id = bkp::change_password(&repo, password.as_bytes(), kdf_params())?;
            if !quiet {
                writeln!(
                    out,
                    "password changed: key {} replaces {}",
                    id.short(),
                    repo.key_id().short()
                )?;
            }
        }
    }
    Ok(())
}

pub(super) fn forget(location: &str, quiet: bool, args: ForgetArgs) -> Result<()> {
    let (prune_after, dry_run) = (args.prune, args.dry_run);
    // Opened once for both (one password prompt).
    let repo = open_repository(location, Access::FullKeyTo("forget snapshots"))?;
    forget_snapshots(&repo, quiet, args)?;
    if prune_after && !dry_run {
        let prune_args = PruneArgs {
            grace: bkp::prune::DEFAULT_GRACE,
            repack_threshold: bkp::prune::DEFAULT_REPACK_THRESHOLD,
            dry_run: false,
            json: false,
        };
        prune_open(&repo, quiet, prune_args)?;
    }
    Ok(())
}

fn forget_snapshots(repo: &Repository, quiet: bool, args: ForgetArgs) -> Result<()> {
    let mut out = io::stdout().lock();
    let time =
        |entry: &SnapshotEntry| humantime::format_rfc3339_seconds(entry.snapshot.time).to_string();
    if !args.snapshots.is_empty() {
        // (id, what is shown: its time, or that it is damaged)
        let mut chosen = Vec::new();
        for query in &args.snapshots {
            if query == "latest" {
                let entry = repo.find_snapshot(query, &args.tags)?;
                chosen.push((entry.id, time(&entry)));
                continue;
            }
            let id = repo.find_snapshot_id(query, &args.tags)?;
            match repo.read_snapshot(id) {
                Ok(entry) if entry.has_tags(&args.tags) => chosen.push((id, time(&entry))),
                Ok(_) => {
                    return Err(Error::SnapshotNotFound {
                        query: format!("{query} with tags {}", args.tags.join(",")),
                    }
                    .into());
                }
                // A damaged snapshot object can still be removed by its id.
                Err(e @ (Error::Corrupt { .. } | Error::Missing { .. })) => {
                    if !args.tags.is_empty() {
                        bail!("{e}; its tags cannot be checked: forget it by id without --tag");
                    }
                    chosen.push((id, "(damaged)".to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !args.dry_run {
            let ids: Vec<_> = chosen.iter().map(|(id, _)| *id).collect();
            bkp::forget::remove(repo, &ids)?;
        }
        if !quiet {
            for (id, shown) in &chosen {
                writeln!(out, "forget  {}  {shown}", id.short())?;
            }
            done_line(&mut out, chosen.len(), args.dry_run)?;
        }
        return Ok(());
    }
    let policy = bkp::retention::Policy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        within: args.keep_within,
    };
    let group_by: bkp::forget::GroupBy = args.group_by.parse()?;
    let tz = jiff::tz::TimeZone::system();
    let groups = bkp::forget::plan(
        repo,
        &args.tags,
        &policy,
        group_by,
        std::time::SystemTime::now(),
        &tz,
    )?;
    for (entry, _) in groups
        .iter()
        .flat_map(|g| &g.snapshots)
        .filter(|(_, d)| d.reasons.contains(&bkp::forget::FUTURE_DATED))
    {
        eprintln!(
            "bkp: warning: snapshot {} is dated {}, in the future (the clock of {} is wrong?): kept, and not counted by the --keep rules; `bkp forget {}` removes it",
            entry.id.short(),
            time(entry),
            entry.snapshot.hostname,
            entry.id.short()
        );
    }
    let forgotten: Vec<&SnapshotEntry> = groups
        .iter()
        .flat_map(|g| &g.snapshots)
        .filter(|(_, decision)| !decision.keep)
        .map(|(entry, _)| entry)
        .collect();
    if !args.dry_run {
        let ids: Vec<_> = forgotten.iter().map(|e| e.id).collect();
        bkp::forget::remove(repo, &ids)?;
    }
    if args.json {
        let groups: Vec<_> = groups
            .iter()
            .map(|g| {
                let snapshots: Vec<_> = g
                    .snapshots
                    .iter()
                    .map(|(e, d)| {
                        json!({"id": e.id.to_hex(), "time": time(e), "keep": d.keep, "reasons": d.reasons})
                    })
                    .collect();
                json!({"host": g.host, "tags": g.tags, "snapshots": snapshots})
            })
            .collect();
        let report =
            json!({"dry_run": args.dry_run, "forgotten": forgotten.len(), "groups": groups});
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&with_damage(repo, report)?)?
        )?;
        return Ok(());
    }
    if quiet {
        return Ok(());
    }
    for group in &groups {
        let mut name = Vec::new();
        if let Some(host) = &group.host {
            name.push(format!("host {host}"));
        }
        if let Some(tags) = &group.tags {
            name.push(format!(
                "tags {}",
                if tags.is_empty() {
                    "(none)".to_string()
                } else {
                    tags.join(",")
                }
            ));
        }
        let kept = group.snapshots.iter().filter(|(_, d)| d.keep).count();
        writeln!(
            out,
            "{}: keep {kept} of {}",
            if name.is_empty() {
                "all snapshots".to_string()
            } else {
                name.join(", ")
            },
            group.snapshots.len()
        )?;
        for (entry, decision) in &group.snapshots {
            writeln!(
                out,
                "  {:<7} {}  {}  {}",
                if decision.keep { "keep" } else { "forget" },
                entry.id.short(),
                time(entry),
                decision.reasons.join(", ")
            )?;
        }
    }
    done_line(&mut out, forgotten.len(), args.dry_run)
}

pub(super) fn prune(location: &str, quiet: bool, args: PruneArgs) -> Result<()> {
    prune_open(
        &*open_repository(location, Access::FullKeyTo("prune"))?,
        quiet,
        args,
    )
}

fn prune_open(repo: &Repository, quiet: bool, args: PruneArgs) -> Result<()> {
    let options = bkp::prune::PruneOptions {
        dry_run: args.dry_run,
        repack_threshold: args.repack_threshold,
        ..bkp::prune::PruneOptions::new(args.grace, std::time::SystemTime::now())
    };
    let report = bkp::prune::prune(repo, &options)?;
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&with_damage(repo, &report)?)?
        )?;
    } else if !quiet {
        let (delete, repack) = if args.dry_run {
            ("would delete", "would repack")
        } else {
            ("deleted", "repacked")
        };
        writeln!(
            out,
            "{} snapshot(s) need {} of {} pack(s); {delete} {} pack(s) ({}), {} left by interrupted backups; \
             {repack} {} pack(s) ({} copied); marked {} for deletion after {}; {} still in their grace period; {} needed again",
            report.snapshots,
            report.needed_packs,
            report.packs,
            report.deleted_packs,
            HumanBytes(report.deleted_bytes),
            report.deleted_unindexed,
            report.repacked_packs,
            HumanBytes(report.repack_bytes_written),
            report.newly_marked,
            humantime::format_duration(args.grace),
            report.pending,
            report.needed_again
        )?;
    }
    Ok(())
}

pub(super) fn stats(location: &str, args: SnapshotsArgs) -> Result<()> {
    let repo = open_repository(location, Access::FullKeyTo("show statistics"))?;
    let stats = bkp::stats(&repo, &args.tags)?;
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&with_damage(&repo, &stats)?)?
        )?;
        return Ok(());
    }
    let bytes = |n: u64| HumanBytes(n).to_string();
    writeln!(out, "snapshots           {}", stats.snapshots)?;
    writeln!(out, "logical size        {}", bytes(stats.logical_bytes))?;
    writeln!(
        out,
        "distinct data       {} (dedup {:.1}x)",
        bytes(stats.unique_bytes),
        stats.dedup_ratio
    )?;
    writeln!(
        out,
        "stored              {} in {} pack(s), {} index file(s) of {} (compression {:.1}x)",
        bytes(stats.stored_bytes),
        stats.packs,
        stats.index_files,
        bytes(stats.index_bytes),
        stats.compression_ratio
    )?;
    writeln!(out, "\n{:<8}  {:>12}  {:>14}", "id", "size", "only it uses")?;
    for s in &stats.per_snapshot {
        writeln!(
            out,
            "{:<8}  {:>12}  {:>14}",
            &s.id[..8],
            bytes(s.size),
            bytes(s.alone_bytes)
        )?;
    }
    Ok(())
}

fn done_line(out: &mut impl Write, count: usize, dry_run: bool) -> Result<()> {
    if dry_run {
        writeln!(
            out,
            "would forget {count} snapshot(s) (dry run: nothing changed)"
        )?;
    } else {
        writeln!(
            out,
            "forgot {count} snapshot(s); `bkp prune` reclaims the data only they used"
        )?;
    }
    Ok(())
}

pub(super) fn check(location: &str, quiet: bool, args: CheckArgs) -> Result<ExitCode> {
    let mut repo = open_repository(location, Access::FullKeyTo("check the repository"))?;
    repo.warn_damage = false;
    let read_data = match (args.read_data, args.read_data_subset) {
        (true, _) => ReadData::All,
        (false, Some(fraction)) => ReadData::Fraction(fraction),
        (false, None) => ReadData::None,
    };
    let show_progress = !quiet && !args.json && io::stderr().is_terminal();
    let report = bkp::check(&repo, read_data, &mut |step| {
        if show_progress {
            eprintln!("checking {step}");
        }
    })?;
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        for problem in &report.problems {
            write!(out, "problem: {}: {}", problem.object, problem.problem)?;
            if !problem.snapshots.is_empty() {
                let short: Vec<&str> = problem.snapshots.iter().map(|s| &s[..8]).collect();
                write!(out, " (affects snapshot(s) {})", short.join(", "))?;
            }
            writeln!(out)?;
        }
        if !quiet || !report.is_ok() {
            write!(
                out,
                "checked {} snapshot(s), {} index file(s), {} pack(s)",
                report.snapshots, report.index_files, report.packs
            )?;
            if read_data != ReadData::None {
                write!(out, ", read {} frame(s)", report.frames_read)?;
            }
            match report.problems.len() {
                0 => write!(out, ": no problems")?,
                n => write!(
                    out,
                    ": {n} PROBLEM(S); restore what you can, and back up anew"
                )?,
            }
            if report.unreferenced_packs > 0 {
                write!(
                    out,
                    "; {} unreferenced pack(s) from interrupted backups (harmless)",
                    report.unreferenced_packs
                )?;
            }
            writeln!(out)?;
        }
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DAMAGED)
    })
}
