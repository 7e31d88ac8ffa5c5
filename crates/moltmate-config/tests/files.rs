//! Files on disk: home resolution, loading from a home, the starter config and its permissions.

use moltmate_config::{
    resolve_home_with, write_starter_config, Config, ConfigError, CONFIG_FILE_NAME, STARTER_CONFIG,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn no_env(_: &str) -> Option<String> {
    None
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn home_resolution_order() {
    let env = |name: &str| match name {
        "MOLTMATE_HOME" => Some("/srv/molt".to_string()),
        "HOME" => Some("/home/anna".to_string()),
        _ => None,
    };
    let cli = PathBuf::from("/opt/cli-home");
    assert_eq!(resolve_home_with(Some(&cli), &env).unwrap(), cli);
    assert_eq!(
        resolve_home_with(None, &env).unwrap(),
        PathBuf::from("/srv/molt")
    );
    let home_only = |name: &str| (name == "HOME").then(|| "/home/anna".to_string());
    assert_eq!(
        resolve_home_with(None, &home_only).unwrap(),
        PathBuf::from("/home/anna/.moltmate")
    );
    let empty_override = |name: &str| match name {
        "MOLTMATE_HOME" => Some(String::new()),
        "HOME" => Some("/home/anna".to_string()),
        _ => None,
    };
    assert_eq!(
        resolve_home_with(None, &empty_override).unwrap(),
        PathBuf::from("/home/anna/.moltmate")
    );
    assert!(matches!(
        resolve_home_with(None, &no_env),
        Err(ConfigError::NoHome)
    ));
}

#[test]
fn missing_file_means_defaults_but_env_keys_apply() {
    let dir = tempfile::tempdir().unwrap();
    let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-openai".to_string());
    let config = Config::load(dir.path(), &env).unwrap();
    assert_eq!(config.gateway.port, 18790);
    let openai = config.resolved_provider("openai").unwrap();
    assert_eq!(
        openai.api_key.as_ref().map(|k| k.expose()),
        Some("sk-openai")
    );
}

#[test]
fn load_reads_the_file_and_errors_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONFIG_FILE_NAME);
    std::fs::write(&path, "{ gateway: { port: 9000 } }").unwrap();
    assert_eq!(
        Config::load(dir.path(), &no_env).unwrap().gateway.port,
        9000
    );

    std::fs::write(&path, "{ gateway: { prot: 9000 } }").unwrap();
    let err = Config::load(dir.path(), &no_env).map(|_| ()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "{}: gateway.prot: unknown key; did you mean \"port\"?",
            path.display()
        )),
        "{message}"
    );
}

#[test]
fn unreadable_config_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(CONFIG_FILE_NAME)).unwrap();
    let err = Config::load(dir.path(), &no_env).map(|_| ()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(!err.is_fixable_in_file());
}

#[test]
fn starter_config_loads_without_any_environment() {
    let config = Config::from_json5_str(STARTER_CONFIG, "starter", &no_env).unwrap();
    let defaults = Config::default();
    assert_eq!(
        config.digest_of_sandbox_section(),
        defaults.digest_of_sandbox_section()
    );
    assert_eq!(config.tools.enabled(), defaults.tools.enabled());
    assert_eq!(config.tools.exec.safe_bins, defaults.tools.exec.safe_bins);
    assert_eq!(
        config.tools.exec.blocked_bins,
        defaults.tools.exec.blocked_bins
    );
    assert!(!config.channels.telegram.is_enabled());
}

#[test]
fn starter_config_covers_every_section() {
    for section in [
        "gateway:",
        "model:",
        "providers:",
        "channels:",
        "telegram:",
        "web:",
        "local:",
        "sandbox:",
        "limits:",
        "prune:",
        "tools:",
        "exec:",
        "fetch:",
        "logging:",
        "onboarding:",
        "session:",
        "families:",
        "users:",
    ] {
        assert!(
            STARTER_CONFIG.contains(section),
            "starter config lacks {section}"
        );
    }
    // Secrets only ever as ${VAR} references.
    assert!(STARTER_CONFIG.contains("${ANTHROPIC_API_KEY}"));
    assert!(!STARTER_CONFIG.contains("sk-"));
}

#[test]
fn starter_config_with_its_comments_uncommented_still_loads() {
    // Uncommenting the documented optional keys must give a valid file when the variables exist.
    let text = STARTER_CONFIG
        .replace("// token: ", "token: ")
        .replace("// apiKey: ", "apiKey: ")
        .replace("// botToken: ", "botToken: ");
    let env = |name: &str| match name {
        "MOLTMATE_GATEWAY_TOKEN" => Some("0123456789abcdef0123".to_string()),
        "ANTHROPIC_API_KEY" => Some("sk-ant".to_string()),
        "TELEGRAM_BOT_TOKEN" => Some("1:abc".to_string()),
        "BRAVE_API_KEY" => Some("brave-key".to_string()),
        _ => None,
    };
    let config = Config::from_json5_str(&text, "starter", &env).unwrap();
    assert!(config.channels.telegram.is_enabled());
    assert!(config.gateway.auth.token.is_some());
}

#[test]
fn write_starter_config_creates_private_home_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("nested").join(".moltmate");
    let path = write_starter_config(&home).unwrap();
    assert_eq!(path, home.join(CONFIG_FILE_NAME));
    assert_eq!(mode(&home), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), STARTER_CONFIG);
    // No staging files left behind.
    let entries: Vec<_> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from(CONFIG_FILE_NAME)]);
    // And it loads.
    Config::load(&home, &no_env).unwrap();
}

#[test]
fn write_starter_config_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONFIG_FILE_NAME);
    std::fs::write(&path, "{ mine: true }").unwrap();
    let err = write_starter_config(dir.path()).map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, ConfigError::AlreadyExists { path: p } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ mine: true }");
    let entries = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(entries, 1);
}

#[test]
fn world_writable_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONFIG_FILE_NAME);
    std::fs::write(&path, "{}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = Config::load(dir.path(), &no_env).map(|_| ()).unwrap_err();
    assert!(
        matches!(err, ConfigError::InsecurePermissions { mode: 0o666, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Config::load(dir.path(), &no_env).unwrap();
}
