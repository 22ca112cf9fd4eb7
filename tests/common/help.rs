//! What `fulcrum --help` lists: the subcommands of clap's "Commands:" section. Shared by the
//! README's commands table check (tests/docs.rs, which includes this file alone) and the man page
//! and completion checks (tests/cli_docs.rs).

use std::process::Command;

/// The subcommands `fulcrum ARGS --help` lists, without `help`.
pub fn subcommands(args: &[&str]) -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run fulcrum --help");
    assert!(output.status.success(), "fulcrum {args:?} --help failed");
    let help = String::from_utf8(output.stdout).expect("help is UTF-8");
    let commands: Vec<String> = help
        .lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    assert!(!commands.is_empty(), "no commands in:\n{help}");
    commands
}
