//! Viewer tokens through the orchestrator, against a real genos-vmm running tiny guests:
//! tokens are bound to one environment (not its name), `revoke_token` is durable, and
//! destroying an environment revokes its tokens.

mod common;

use std::path::Path;

use hostd::orchestrator::OrchError;
use hostd::store::Store;
use hostd::stream::{EnvRef, TokenError, TokenKey};

fn key(dir: &Path) -> TokenKey {
    TokenKey::load_or_create(&dir.join("stream/token.key")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_minted_for_a_destroyed_environment_does_not_open_its_namesake() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = common::tiny_guest_orchestrator(dir.path(), "ready", 4, |toml| toml).await else {
        return;
    };
    let first = common::create_ready(&o, "dev", false).await;
    let old = o.mint_token("dev", "test", 3600, "view").unwrap();
    o.destroy("dev", "test").await.unwrap();

    let second = common::create_ready(&o, "dev", false).await;
    let fresh = o.mint_token("dev", "test", 3600, "view").unwrap();
    let now = EnvRef::new("dev", second.id as u64);
    let key = key(dir.path());

    assert_ne!(first.id, second.id);
    assert_eq!(
        key.verify(old["token"].as_str().unwrap(), &now),
        Err(TokenError::StaleEnvironment("dev".into()))
    );
    assert!(key.verify(fresh["token"].as_str().unwrap(), &now).is_ok());
    let store = Store::open(dir.path()).unwrap();
    assert!(
        store.destroyed_env_ids().unwrap().contains(&first.id),
        "the destroyed environment's tokens count as revoked"
    );
    o.destroy("dev", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_recorded_and_audited_and_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = common::tiny_guest_orchestrator(dir.path(), "ready", 4, |toml| toml).await else {
        return;
    };
    common::create_ready(&o, "work", false).await;
    let whole = o.mint_token("work", "test", 3600, "view").unwrap();
    let by_id = o.mint_token("work", "test", 3600, "view").unwrap();

    let a = o
        .revoke_token(whole["token"].as_str().unwrap(), "uid:0")
        .unwrap();
    let b = o
        .revoke_token(by_id["token_id"].as_str().unwrap(), "uid:0")
        .unwrap();
    let again = o
        .revoke_token(whole["token"].as_str().unwrap(), "uid:0")
        .unwrap();
    let garbage = o.revoke_token("not a token", "uid:0");

    assert_eq!(a["token_id"], whole["token_id"]);
    assert_eq!(b["token_id"], by_id["token_id"]);
    assert_eq!(again["already_revoked"], true);
    assert!(matches!(garbage, Err(OrchError::Revoke(_))), "{garbage:?}");
    let mut store = Store::open(dir.path()).unwrap();
    let listed: Vec<String> = store
        .token_revocations(hostd::store::now_s())
        .unwrap()
        .into_iter()
        .map(|r| r.token_id)
        .collect();
    assert!(listed.contains(&a["token_id"].as_str().unwrap().to_string()));
    assert!(listed.contains(&b["token_id"].as_str().unwrap().to_string()));
    let audited = common::audit_actions(&o, 100)
        .iter()
        .filter(|a| *a == "revoke-token")
        .count();
    assert_eq!(audited, 3);
    o.destroy("work", "test").await.unwrap();
}
