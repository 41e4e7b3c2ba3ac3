//! Copies are watched like the source: a copy changed by someone else is
//! noticed at once (no SIGUSR1, no resync), restored, and its readers
//! restarted; the agent's own writes do not bring the watch back.
mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[test]
fn a_changed_copy_is_restored_at_once_and_its_readers_restarted() {
    let env = Env::new();
    let src = source_path(&env);
    let source = creds(1);
    write_atomic(&src, &source);
    let agent = Agent::start(
        &env,
        &env.config(&standard_config(
            "[[watch.copy]]\ndest = \"{ROOT}/shared/.credentials.json\"\n\n[watch.restart]\nunits = [\"bridge.service\"]\nmin_interval = \"0s\"\n",
        )),
    );
    let dest = env.path("shared/.credentials.json");
    let want = copied(&source);
    // Someone writes the copy (in place, as an editor would).
    fs::write(&dest, "{}").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || read_json(&dest).as_ref()
            == Some(&want)),
        "{}",
        agent.stderr()
    );
    // Said once the copy is back (the log line follows the rename).
    assert!(
        agent.wait_log("was modified by another writer", Duration::from_secs(5)),
        "{}",
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(5), || env.restarts().len() == 1),
        "readers restarted once: {:?}\n{}",
        env.restarts(),
        agent.stderr()
    );
    // A mode change alone is put back too.
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || mode(&dest) == 0o640));
    // The agent's own writes (a new source) cost no second pass: one
    // "applied" line and the copy, nothing re-read for the copy's event.
    let before = agent.count("in sync");
    write_atomic(&src, &creds(2));
    assert!(wait_until(Duration::from_secs(5), || read_json(&dest)
        == Some(copied(&creds_text(&src)))));
    round_trip(&env, &agent);
    assert!(agent.count("in sync") <= before + 1, "{}", agent.stderr());
    let (status, _) = agent.stop();
    assert!(status.success());
}

fn creds_text(p: &std::path::Path) -> String {
    fs::read_to_string(p).unwrap()
}
