//! Config parsing and validation: every bad value names its key and a fix.
use super::*;

fn base() -> Config {
    let toml = r#"
        data_dir = "/tmp/x"
        [network]
        listen = "127.0.0.1:7400"
        peers = ["127.0.0.1:7401"]
    "#;
    Figment::new().merge(Toml::string(toml)).extract().unwrap()
}

#[test]
fn defaults_are_valid_and_match_what_core_expects() {
    let config = base();
    let resolved = config.validate().unwrap();
    assert_eq!(resolved.grpc_listen, "127.0.0.1:50056".parse().unwrap());
    assert_eq!(config.network.heartbeat_ms, 100);
    assert_eq!(config.network.heartbeat_misses, 3);
    assert!(resolved.n_shards >= 1);
}

#[test]
fn a_bad_value_names_its_key_and_a_fix() {
    let mut config = base();
    config.network.heartbeat_ms = 1;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("network.heartbeat_ms"), "{error}");
    assert!(error.contains("fix:"), "{error}");

    let mut config = base();
    config.network.peers = vec!["nonsense".into()];
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("network.peers")
    );

    let mut config = base();
    config.runtime.shards = ShardCount::Named("many".into());
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("runtime.shards")
    );
}

#[test]
fn a_traffic_class_routes_by_its_own_coefficients_with_defaults_filled_in() {
    let toml =
        "data_dir = \"/tmp/x\"\n[routing]\nalpha = 2.0\n[routing.classes.client]\ndelta = 500.0\n";
    let config: Config = Figment::new().merge(Toml::string(toml)).extract().unwrap();
    config.validate().unwrap();
    assert_eq!(
        config.routing.class_weights(),
        vec![(TrafficClass::Client, [2.0, 0.5, 2.0, 500.0, 0.1])]
    );

    let mut bad = base();
    bad.routing
        .classes
        .insert("bulk".into(), ClassWeights::default());
    let error = bad.validate().unwrap_err().to_string();
    assert!(
        error.contains("routing.classes") && error.contains("bulk"),
        "{error}"
    );
    let mut bad = base();
    bad.routing.classes.insert(
        "system".into(),
        ClassWeights {
            epsilon: Some(0.0),
            ..ClassWeights::default()
        },
    );
    assert!(bad.validate().unwrap_err().to_string().contains("epsilon"));
}

#[test]
fn an_unknown_key_is_an_error_not_silence() {
    let toml = "data_dir = \"/tmp/x\"\n[network]\nlisten_addr = \"127.0.0.1:1\"\n";
    let error = Figment::new()
        .merge(Toml::string(toml))
        .extract::<Config>()
        .unwrap_err()
        .to_string();
    assert!(error.contains("listen_addr"), "{error}");
}

#[test]
fn shards_accept_auto_a_number_or_a_numeric_string() {
    let mut runtime = RuntimeConfig::default();
    assert!(runtime.shard_count().unwrap() >= 1);
    runtime.shards = ShardCount::Count(2);
    assert_eq!(runtime.shard_count().unwrap(), 2);
    runtime.shards = ShardCount::Named("3".into());
    assert_eq!(runtime.shard_count().unwrap(), 3);
    runtime.shards = ShardCount::Count(0);
    assert!(runtime.shard_count().is_err());
}

#[test]
fn a_mesh_secret_is_64_hex_digits_from_one_place_and_never_echoed() {
    let mut config = base();
    config.mesh_secret = Some(SecretText("ab".repeat(32)));
    assert_eq!(config.validate().unwrap().mesh_secret, Some([0xab; 32]));

    config.mesh_secret = Some(SecretText("not-a-secret-but-long-enough".into()));
    assert_eq!(format!("{:?}", config.mesh_secret), "Some(<redacted>)");
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("mesh_secret") && error.contains("fix:"),
        "{error}"
    );
    assert!(
        !error.contains("not-a-secret"),
        "the text is never echoed: {error}"
    );

    config.mesh_secret = Some(SecretText(String::new()));
    assert_eq!(
        config.validate().unwrap().mesh_secret,
        None,
        "empty means none"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.secret");
    std::fs::write(&file, format!("{}\n", "cd".repeat(32))).unwrap();
    let mut config = base();
    config.mesh_secret_file = Some(file.clone());
    // Written with the umask (0644 here): every user could read the secret.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("readable by every user") && error.contains("chmod 600"),
        "{error}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(config.validate().unwrap().mesh_secret, Some([0xcd; 32]));
    config.mesh_secret = Some(SecretText("ab".repeat(32)));
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("mesh_secret_file"), "{error}");
    let mut config = base();
    config.mesh_secret_file = Some(dir.path().join("missing"));
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("mesh_secret_file") && error.contains("fix:"),
        "{error}"
    );
}
