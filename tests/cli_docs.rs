//! What the command line says about itself, generated from its definition: the man pages checked
//! in under `docs/man/` are the ones the binary writes now (one per subcommand, the hidden `man`
//! left out), and `fulcrum completions SHELL` writes a script naming every subcommand.
//!
//! `FULCRUM_BLESS=1 cargo test --test cli_docs` rewrites `docs/man/` from the binary instead of
//! failing on a difference (as `scripts/man` does).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::help::subcommands;
use common::process::output as fulcrum;
use common::TempDir;

fn man_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/man")
}

/// The `*.1` pages in `dir`, by file name.
fn pages(dir: &Path) -> BTreeMap<String, String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "1"))
        .map(|path| {
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name, text)
        })
        .collect()
}

/// The pages `fulcrum man --out DIR` writes now.
async fn generated_pages() -> BTreeMap<String, String> {
    let dir = TempDir::new("man");
    let out = dir.path().to_str().expect("a UTF-8 temp path");
    let output = fulcrum(&["man", "--out", out]).await;
    assert!(
        output.status.success(),
        "fulcrum man failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    pages(dir.path())
}

/// `fulcrum completions SHELL`'s script, after checking it succeeded.
async fn completions(shell: &str) -> String {
    let output = fulcrum(&["completions", shell]).await;
    assert!(
        output.status.success(),
        "fulcrum completions {shell} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the script is UTF-8")
}

#[tokio::test]
async fn the_checked_in_man_pages_are_the_ones_the_binary_generates() {
    let generated = generated_pages().await;
    let checked_in = pages(&man_dir());
    if generated == checked_in {
        return;
    }
    if std::env::var_os("FULCRUM_BLESS").is_some() {
        fs::create_dir_all(man_dir()).expect("create docs/man");
        for name in checked_in.keys().filter(|name| !generated.contains_key(*name)) {
            fs::remove_file(man_dir().join(name)).expect("remove a stale page");
        }
        for (name, text) in &generated {
            fs::write(man_dir().join(name), text).expect("write a page");
        }
        return;
    }
    let stale: Vec<&String> = checked_in
        .keys()
        .filter(|n| !generated.contains_key(*n))
        .collect();
    let missing: Vec<&String> = generated
        .keys()
        .filter(|n| !checked_in.contains_key(*n))
        .collect();
    let differ: Vec<&String> = generated
        .iter()
        .filter(|(name, text)| checked_in.get(*name).is_some_and(|t| t != *text))
        .map(|(name, _)| name)
        .collect();
    panic!(
        "docs/man/ differs from what `fulcrum man` generates; run scripts/man (or \
         `FULCRUM_BLESS=1 cargo test --test cli_docs`).\n\
         pages to go: {stale:?}\npages to come: {missing:?}\npages that changed: {differ:?}"
    );
}

#[tokio::test]
async fn there_is_a_man_page_for_every_subcommand_and_every_ctl_command_but_none_for_man() {
    let generated = generated_pages().await;
    let mut wanted = vec!["fulcrum.1".to_string()];
    wanted.extend(subcommands(&[]).iter().map(|c| format!("fulcrum-{c}.1")));
    wanted.extend(subcommands(&["ctl"]).iter().map(|c| format!("fulcrum-ctl-{c}.1")));
    let missing: Vec<&String> = wanted.iter().filter(|p| !generated.contains_key(*p)).collect();
    assert!(
        missing.is_empty(),
        "no page {missing:?} among {:?}",
        generated.keys()
    );
    assert!(
        !generated.contains_key("fulcrum-man.1"),
        "the hidden man command has a page"
    );
    let top = &generated["fulcrum.1"];
    assert!(
        top.contains("completions") && !top.contains("fulcrum\\-man"),
        "{top}"
    );
}

#[tokio::test]
async fn bash_completions_name_every_subcommand_and_every_ctl_command_but_not_man() {
    let script = completions("bash").await;
    let mut missing = Vec::new();
    for command in subcommands(&[]) {
        if !script.contains(&format!("fulcrum,{command})")) {
            missing.push(command);
        }
    }
    for command in subcommands(&["ctl"]) {
        if !script.contains(&format!("fulcrum__subcmd__ctl,{command})")) {
            missing.push(format!("ctl {command}"));
        }
    }
    assert!(
        missing.is_empty(),
        "the bash script does not complete {missing:?}"
    );
    assert!(
        !script.contains("fulcrum,man)"),
        "the hidden man command is completed"
    );
}

#[tokio::test]
async fn zsh_and_fish_completions_are_scripts_for_fulcrum() {
    let zsh = completions("zsh").await;
    assert!(zsh.starts_with("#compdef fulcrum"), "{zsh}");
    let fish = completions("fish").await;
    assert!(fish.contains("complete -c fulcrum"), "{fish}");
    for script in [&zsh, &fish] {
        assert!(script.contains("quarantine"), "{script}");
    }
}

#[tokio::test]
async fn completions_for_an_unknown_shell_is_a_usage_error() {
    let output = fulcrum(&["completions", "tcsh"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tcsh") && stderr.contains("bash"), "{stderr}");
}
