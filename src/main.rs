//! The `bkp` binary: parse, run, print the error, map it to a documented exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_allocator_growth();
    // Everything bkp creates (repository directories and files, restored files, temporary
    // files) is its user's alone, whatever the umask of the cron job or shell.
    // SAFETY: umask(2) only sets this process's file mode mask.
    unsafe { libc::umask(0o077) };
    match cli::run() {
        Ok(code) => code,
        Err(err) => {
            if let Some(code) = cli::quiet_exit(&err) {
                return code;
            }
            eprintln!("bkp: error: {err:#}");
            cli::exit_code(&err)
        }
    }
}

/// glibc raises its mmap threshold each time a large block is freed, after which the pipeline's
/// 1 MiB buffers come from per-thread arenas and fragment them: peak RSS grew by ~40 MiB. A
/// fixed threshold keeps large buffers in mmap, returned to the system when freed.
fn limit_allocator_growth() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
