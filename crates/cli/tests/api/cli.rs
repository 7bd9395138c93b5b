//! The `clinflow` binary on the same database as a running server.

use serde_json::json;

use crate::helpers::{cli, drop_schema, fresh_database, open_store, subjects, TestApp};

engine_tests!(
    token_create_prints_only_the_token_and_it_works,
    trial_load_while_the_server_runs,
    migrate_and_token_create_create_a_fresh_database,
);

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "clinflow failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

async fn token_create_prints_only_the_token_and_it_works(app: TestApp) {
    let name = crate::helpers::unique("cli-monitor");
    let out = stdout(&app.cli(&["token", "create", "--role", "monitor", "--name", &name]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {out:?}");
    assert!(out.ends_with('\n'));
    let token = lines[0];
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{token:?}"
    );
    // The server on the same database accepts it, with the monitor's rights.
    app.get("/fhir/Patient", token).await.expect(200);
    app.fhir_post("/fhir/Patient", token, &json!({"resourceType": "Patient"}))
        .await
        .outcome(403);
    // Each call makes a new token; a site user needs its site.
    let again = stdout(&app.cli(&["token", "create", "--role", "monitor", "--name", &name]));
    assert_ne!(again.trim(), token);
    let out = app.cli(&["token", "create", "--role", "site-user"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let site = &subjects()[0].site;
    let t = stdout(&app.cli(&["token", "create", "--role", "site-user", "--site", site]));
    app.get("/fhir/Observation", t.trim()).await.expect(200);
    // The list shows names and roles, never secrets.
    let list = stdout(&app.cli(&["token", "list"]));
    assert!(list.contains(&name));
    assert!(!list.contains(token));
}

async fn trial_load_while_the_server_runs(app: TestApp) {
    // The server is up and serving while the CLI writes to its database.
    app.get("/fhir/Patient", &app.admin).await.expect(200);
    let out = stdout(&app.cli(&[
        "trial",
        "load",
        "reference-trial/protocol.yaml",
        "--subjects",
        "reference-trial/subjects.csv",
    ]));
    let rows = subjects();
    assert!(out.contains(&crate::helpers::trial_id()), "{out}");
    assert_eq!(app.count(&app.admin, "Patient").await, rows.len() as u64);
    assert_eq!(
        app.count(&app.admin, "ResearchSubject").await,
        rows.len() as u64
    );
    for s in &rows {
        app.get(&format!("/fhir/Patient/{}", s.id), &app.admin)
            .await
            .expect(200);
    }
    let t = app
        .get(
            &format!("/trials/{}", crate::helpers::trial_id()),
            &app.admin,
        )
        .await;
    t.expect(200);
    // Loading again changes nothing.
    let out = stdout(&app.cli(&[
        "trial",
        "load",
        "reference-trial/protocol.yaml",
        "--subjects",
        "reference-trial/subjects.csv",
    ]));
    assert!(out.contains("0 created, 0 updated"), "{out}");
    // The server's own writes and the CLI's share one intact audit trail.
    app.create(&app.admin, &json!({"resourceType": "Patient"}))
        .await;
    let out = stdout(&app.cli(&["audit", "verify"]));
    assert!(out.contains("intact"), "{out}");
    // A bad file is an error on stderr, with a non-zero exit.
    let out = app.cli(&["trial", "load", "reference-trial/no-such-file.yaml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-file.yaml"));
}

async fn migrate_and_token_create_create_a_fresh_database(app: TestApp) {
    for command in [
        &["migrate"][..],
        &["token", "create", "--role", "admin"][..],
    ] {
        let (url, dir, schema) = fresh_database(app.engine);
        // SQLite: a file in a directory that does not exist yet.
        let url = match &dir {
            Some(d) => format!(
                "sqlite://{}",
                d.path().join("new/dir/clinflow.db").display()
            ),
            None => url,
        };
        let out = cli(&url, command);
        let printed = stdout(&out);
        if let Some(d) = &dir {
            assert!(d.path().join("new/dir/clinflow.db").is_file());
        }
        // The database is at the current schema: a store opens it and it
        // works (a token made by the CLI is found in it).
        let store = open_store(&url).await;
        assert!(store.verify_audit().await.expect("readable").is_ok());
        if command[0] == "token" {
            let hash = clinflow_server::auth::hash_secret(printed.trim());
            assert!(store
                .token_by_hash(&hash)
                .await
                .expect("readable")
                .is_some());
        }
        // Running it again is harmless.
        stdout(&cli(&url, &["migrate"]));
        if let Some((base, schema)) = schema {
            drop(store);
            drop_schema(&base, &schema).await;
        }
    }
}

/// `--config FILE.toml`: settings under the flags' names; the environment
/// wins over the file, a flag over both; a misspelt key is an error.
#[test]
fn a_config_file_fills_in_what_flags_and_environment_leave_unset() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let run = |args: &[&str], env: Option<(&str, String)>| {
        let mut c = std::process::Command::new(crate::helpers::clinflow_bin());
        c.args(args)
            .current_dir(dir.path())
            .env_remove("CLINFLOW_DATABASE")
            .env_remove("CLINFLOW_CONFIG");
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        c.output().expect("clinflow runs")
    };
    let db = |name: &str| dir.path().join(name).join("clinflow.db");
    let config = dir.path().join("clinflow.toml");
    std::fs::write(
        &config,
        format!(
            "# settings\ndatabase = \"sqlite://{}\"\n",
            db("from-file").display()
        ),
    )
    .expect("written");
    let config = config.to_str().expect("UTF-8");

    let out = run(&["--config", config, "migrate"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db("from-file").is_file());

    let env = format!("sqlite://{}", db("from-env").display());
    let out = run(
        &["migrate", "--config", config],
        Some(("CLINFLOW_DATABASE", env)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        db("from-env").is_file(),
        "the environment wins over the file"
    );

    let flag = format!("sqlite://{}", db("from-flag").display());
    let out = run(&["--config", config, "migrate", "--database", &flag], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db("from-flag").is_file(), "a flag wins over the file");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "email-rate = 10\nsmtp-ulr = \"smtp://x\"\n").expect("written");
    let out = run(&["--config", bad.to_str().expect("UTF-8"), "migrate"], None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("smtp-ulr"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing done");
}
