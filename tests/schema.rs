//! The config's JSON Schema (`docs/fulcrum.schema.json`, for editors) against the code and the
//! example configs: the checked-in file is the one the `Raw*` config types make now (so a key added
//! to the code and not to the file fails here), every example config of `deploy/` and every whole
//! config of README and `docs/` matches it, and it refuses what fulcrum refuses for its shape (an
//! unknown key). Every config a test starts fulcrum with is held against it too, by the starters
//! in `tests/common` (`common::schema`).
//!
//! `FULCRUM_BLESS=1 cargo test --test schema` rewrites `docs/fulcrum.schema.json` from the code
//! instead of failing on a difference.

mod common;

use std::fs;
use std::path::PathBuf;

use common::schema;

const SCHEMA_FILE: &str = "docs/fulcrum.schema.json";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The schema as the checked-in file holds it: pretty JSON and a final newline.
fn schema_text() -> String {
    let schema = fulcrum::config::config_schema();
    format!(
        "{}\n",
        serde_json::to_string_pretty(&schema).expect("the schema as JSON")
    )
}

#[test]
fn the_checked_in_schema_is_the_one_the_config_types_make() {
    let made = schema_text();
    let checked_in = fs::read_to_string(root().join(SCHEMA_FILE)).unwrap_or_default();
    if checked_in == made {
        return;
    }
    if std::env::var_os("FULCRUM_BLESS").is_some() {
        // Written aside and renamed, so that no reader ever sees half a file.
        let aside = root().join("docs/.fulcrum.schema.json.blessed");
        fs::write(&aside, &made).expect("write the schema");
        fs::rename(&aside, root().join(SCHEMA_FILE)).expect("replace the schema");
        return;
    }
    let first = checked_in
        .lines()
        .zip(made.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| checked_in.lines().count().min(made.lines().count()));
    panic!(
        "{SCHEMA_FILE} is not the schema the config types make (first difference at line {}: \
         {:?} in the file, {:?} made); run `FULCRUM_BLESS=1 cargo test --test schema` to \
         regenerate it",
        first + 1,
        checked_in.lines().nth(first),
        made.lines().nth(first),
    );
}

/// Fails, naming `what`, unless the schema accepts `toml`.
fn assert_matches(what: &str, toml: &str) {
    let errors = schema::errors(toml);
    assert!(
        errors.is_empty(),
        "{what} does not match the schema:\n{}",
        errors.join("\n")
    );
}

#[test]
fn the_deploy_configs_match_the_schema() {
    let mut files: Vec<String> = vec!["deploy/fulcrum.toml".into()];
    let cluster = fs::read_dir(root().join("deploy/cluster")).expect("deploy/cluster");
    let mut cluster: Vec<String> = cluster
        .map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".toml"))
        .map(|name| format!("deploy/cluster/{name}"))
        .collect();
    assert!(!cluster.is_empty(), "no deploy/cluster/*.toml");
    cluster.sort();
    files.extend(cluster);
    for file in &files {
        assert_matches(file, &read(file));
    }
    let configmap = "deploy/kubernetes/configmap.yaml";
    assert_matches(configmap, &yaml_block(&read(configmap), "fulcrum.toml: |"));
}

/// The literal block scalar that follows the line ending in `key` (`fulcrum.toml: |`), its
/// indentation removed.
fn yaml_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|line| !line.trim_end().ends_with(key));
    let header = lines.next().unwrap_or_else(|| panic!("no {key:?} in the YAML"));
    let outer = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|line| line.trim().is_empty() || line.len() - line.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.len() - line.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|line| line.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The ```toml blocks of a Markdown page: (first line number, text).
fn toml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match (&mut open, line.trim_end()) {
            (None, "```toml") => open = Some((i + 2, String::new())),
            (Some(_), "```") => blocks.extend(open.take()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// Whether a ```toml block is a whole config file rather than a fragment of one: it has a
/// `[[listener]]` (a config has at least one). Such a block may name files that are not here, so
/// fulcrum itself need not accept it; a fragment (`[upstream.health_check]` alone) is not checked.
fn is_whole_config(block: &str) -> bool {
    toml::from_str::<toml::Table>(block).is_ok_and(|t| t.get("listener").is_some_and(toml::Value::is_array))
}

#[test]
fn every_whole_config_in_readme_and_docs_matches_the_schema() {
    let mut pages = vec!["README.md".to_string()];
    let docs = fs::read_dir(root().join("docs")).expect("docs/");
    pages.extend(
        docs.map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}")),
    );
    pages.sort();
    let mut checked = Vec::new();
    for page in &pages {
        for (line, block) in toml_blocks(&read(page))
            .into_iter()
            .filter(|(_, b)| is_whole_config(b))
        {
            let what = format!("{page}:{line}");
            assert_matches(&what, &block);
            checked.push(what);
        }
    }
    // The front door's example and the reference's complete one, at least.
    for page in ["README.md", "docs/configuration.md"] {
        assert!(
            checked.iter().any(|what| what.starts_with(&format!("{page}:"))),
            "no whole config found in {page}; checked {checked:?}"
        );
    }
}

#[test]
fn a_config_with_an_unknown_key_is_refused_by_the_schema() {
    let config = |key: &str| {
        format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\
             [listener.tls]\n{key} = \"server.pem\"\nkey = \"server.key\"\n\n\
             [[upstream]]\nname = \"web\"\nbackends = [\"127.0.0.1:80\"]\n"
        )
    };
    assert_eq!(schema::errors(&config("cert")), Vec::<String>::new());
    let errors = schema::errors(&config("cerf"));
    assert!(
        errors.len() == 1 && errors[0].contains("/listener/0/tls") && errors[0].contains("cerf"),
        "{errors:?}"
    );
}

/// A whole config around an `[authorization]` table (`table`, the lines after the header).
fn with_authorization(table: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"web\"\n\n\
         [[upstream]]\nname = \"web\"\nbackends = [\"127.0.0.1:80\"]\n\n\
         [[upstream]]\nname = \"db\"\nbackends = [\"127.0.0.1:81\"]\n\n\
         [authorization]\n{table}"
    )
}

#[test]
fn every_shape_of_authorization_table_fulcrum_reads_matches_the_schema() {
    let config = with_authorization(
        "alice = [\"web\"]\n\
         bob = [\"web\", { upstream = \"db\", from = [\"10.1.0.0/16\", \"::1\"] }]\n\
         \"spiffe://example.org/ns/jobs/**\" = [\"db\"]\n\
         nobody = []\n\
         deny = [\"spiffe://example.org/ns/jobs/sa/legacy\"]\n\
         [authorization.shadow]\n\
         carol = [\"db\"]\n\
         [authorization.shadow.deny]\n\
         \"spiffe://example.org/ns/jobs/**\" = \"being retired\"\n",
    );
    fulcrum::Config::from_toml(&config, "test").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(schema::errors(&config), Vec::<String>::new());
}

#[test]
fn an_authorization_table_fulcrum_refuses_for_its_shape_is_refused_by_the_schema() {
    for table in [
        "bob = [{ upstream = \"db\", form = [\"10.1.0.0/16\"] }]\n",
        "bob = [{ upstream = \"db\", from = [] }]\n",
        "bob = \"web\"\n",
        "[authorization.shadow]\n[authorization.shadow.shadow]\n",
    ] {
        let config = with_authorization(table);
        assert!(
            fulcrum::Config::from_toml(&config, "test").is_err(),
            "fulcrum accepts {table}"
        );
        assert!(!schema::errors(&config).is_empty(), "the schema accepts {table}");
    }
}
