//! Tests 1 and 2: the source's mode is fixed after an atomic rename and
//! after an in-place write; ancestors gain search bits, never lose any.
mod common;
use common::*;
use std::fs;
use std::time::Duration;

const PERMS: &str = "[watch.permissions]\nfile_mode = \"0644\"\ntraverse = true\n";

#[test]
fn atomic_rename_gets_0644_and_ancestors_gain_search_bits() {
    let env = Env::new();
    let home = env.path("home");
    let claude = env.path("home/.claude");
    fs::create_dir_all(&claude).unwrap();
    set_mode(&home, 0o700);
    set_mode(&claude, 0o750);
    let src = claude.join(".credentials.json");
    let agent = Agent::start(&env, &env.config(&standard_config(PERMS)));
    write_atomic(&src, &creds(1));
    // The file's mode is set first and the ancestors right after, so wait
    // for all three rather than assert on the walk mid-way.
    assert!(
        wait_until(Duration::from_secs(5), || mode(&src) == 0o644
            && mode(&home) == 0o711
            && mode(&claude) == 0o751),
        "modes: file {:o}, home {:o}, .claude {:o}",
        mode(&src),
        mode(&home),
        mode(&claude)
    );
    // Again: each rename brings a new 0600 inode.
    write_atomic(&src, &creds(2));
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    // Bits are only ever added.
    set_mode(&claude, 0o755);
    write_atomic(&src, &creds(3));
    assert!(wait_until(Duration::from_secs(5), || mode(&src) == 0o644));
    assert_eq!(mode(&claude), 0o755);
    let (status, _) = agent.stop();
    assert!(status.success());
    env.assert_state_clean();
}

#[test]
fn in_place_write_then_chmod_0600_is_fixed_again() {
    let env = Env::new();
    let src = source_path(&env);
    write_in_place(&src, &creds(1));
    let agent = Agent::start(&env, &env.config(&standard_config(PERMS)));
    assert_eq!(mode(&src), 0o644, "fixed at start");
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&src).unwrap());
    for i in 2..5 {
        write_in_place(&src, &creds(i));
        assert!(
            wait_until(Duration::from_secs(5), || mode(&src) == 0o644),
            "round {i}: mode {:o}",
            mode(&src)
        );
    }
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(&src).unwrap()),
        ino,
        "same inode throughout"
    );
    let (status, log) = agent.stop();
    assert!(status.success());
    assert!(log.contains("mode 0600 -> 0644"), "{log}");
}
