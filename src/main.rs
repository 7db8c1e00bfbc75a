//! The `bkp` binary: parse, run, print the error, map it to a documented exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
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
