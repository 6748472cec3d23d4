//! `genos token` against a running `genos-hostd` with a tiny guest: minting prints the
//! token's id, `genos token revoke` revokes by token or id, and refuses what this host did
//! not sign.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use daemon::{json, stderr, stdout, Hostd};

#[test]
fn genos_token_revoke_revokes_by_token_or_id_and_refuses_foreign_tokens() {
    let Some(h) = Hostd::with_tiny_guest() else {
        return;
    };
    let o = h.genos(&["create", "--text", "headless python, 1 core, 128 MB ram"]);
    assert!(o.status.success(), "{}", stderr(&o));
    h.wait_state("python", "ready", 60);

    let minted = h.genos(&["token", "python"]);
    let first = json(&h.genos(&["--json", "token", "python"]));
    let second = json(&h.genos(&["--json", "token", "python"]));
    let (token, id) = (
        first["token"].as_str().unwrap(),
        second["token_id"].as_str().unwrap(),
    );
    let by_token = h.genos(&["token", "revoke", token]);
    let by_id = h.genos(&["token", "revoke", id]);
    let again = h.genos(&["token", "revoke", id]);
    let foreign = h.genos(&["token", "revoke", "AgAAAA.AAAA"]);
    let usage = h.genos(&["token"]);

    assert!(
        stdout(&minted).contains("to revoke it: genos token revoke "),
        "{}",
        stdout(&minted)
    );
    assert!(by_token.status.success(), "{}", stderr(&by_token));
    assert_eq!(
        stdout(&by_token).trim(),
        format!("revoked token {}", first["token_id"].as_str().unwrap())
    );
    assert_eq!(stdout(&by_id).trim(), format!("revoked token {id}"));
    assert_eq!(
        stdout(&again).trim(),
        format!("token {id} was already revoked")
    );
    assert_eq!(foreign.status.code(), Some(1));
    assert!(
        stderr(&foreign).contains("cannot revoke the token"),
        "{}",
        stderr(&foreign)
    );
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    let audit = h.genos(&["--json", "audit", "list"]);
    let revokes = json(&audit)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "revoke-token")
        .count();
    assert_eq!(revokes, 3);
    assert!(h.genos(&["destroy", "python"]).status.success());
}
