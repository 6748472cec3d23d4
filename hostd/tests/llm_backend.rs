//! The optional LLM composer backend against a local OpenAI-compatible stand-in server:
//! a valid proposal is used, an invalid one or an unreachable endpoint falls back to the rules.

use std::sync::{Arc, Mutex};

use axum::{routing::post, Json, Router};
use hostd::composer::{Composition, Outcome};
use hostd::config::Config;
use hostd::orchestrator::Orchestrator;
use proto::spec::Spec;
use serde_json::{json, Value};

/// Serves chat completions whose content is `content`; records the requests it got.
async fn fake_endpoint(content: String) -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(req): Json<Value>| {
            let content = content.clone();
            let s = s.clone();
            async move {
                s.lock().unwrap().push(req);
                Json(json!({"choices": [{"message": {"role": "assistant", "content": content}}]}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1/chat/completions"), seen)
}

/// What an orchestrator whose LLM backend is `endpoint` composes from `text`.
async fn compose_with(endpoint: &str, text: &str) -> Composition {
    let cfg = Config::from_toml(&format!(
        "[llm]\nenabled = true\nendpoint = \"{endpoint}\"\nmodel = \"stand-in\"\ntimeout_ms = 2000\n"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    Orchestrator::new(cfg, dir.path())
        .unwrap()
        .compose_text(text)
        .await
}

/// The spec a composition proposes; fails the test if it asks a question instead.
fn spec_of(c: &Composition) -> &Spec {
    match &c.outcome {
        Outcome::Spec(s) => s,
        other => panic!("{other:?}"),
    }
}

fn llm_spec() -> Value {
    json!({"version":1,"name":"studio","base":"debian-12","desktop":"kde","apps":["krita","gimp"],"vcpus":3,
           "memory_mib":6144,"disk_gib":20,"display":{"width":1920,"height":1080,"fps":30},
           "network":{"mode":"nat","allow":[]},"lifetime":{"ttl_s":null,"idle_s":3600},
           "persistence":"persistent","assumptions":["model guessed kde"]})
}

#[tokio::test]
async fn valid_llm_proposal_is_used() {
    let (endpoint, seen) = fake_endpoint(json!({"spec": llm_spec()}).to_string()).await;
    let c = compose_with(&endpoint, "an art studio").await;
    let s = spec_of(&c);
    assert_eq!(
        (s.desktop.as_str(), s.vcpus, s.memory_mib),
        ("kde", 3, 6144)
    );
    assert!(c.explain[0].starts_with("proposed by the LLM backend (stand-in)"));
    let req = seen.lock().unwrap()[0].clone();
    assert_eq!(req["model"], "stand-in");
    assert_eq!(req["messages"][1]["content"], "an art studio");
    assert!(req["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("memory_mib"));
}

#[tokio::test]
async fn invalid_llm_proposal_falls_back_to_the_rules() {
    let mut bad = llm_spec();
    bad["apps"] = json!(["photoshop"]);
    let (endpoint, _) = fake_endpoint(bad.to_string()).await;
    let c = compose_with(&endpoint, "gimp with 8 gigs").await;
    let s = spec_of(&c);
    assert_eq!(
        (s.apps.clone(), s.memory_mib),
        (vec!["gimp".to_string()], 8192)
    );
    assert!(
        c.explain[0].starts_with(
            "LLM backend not used (proposed spec is invalid: unknown app \"photoshop\""
        ),
        "{:?}",
        c.explain
    );
}

#[tokio::test]
async fn unreachable_llm_endpoint_falls_back_to_the_rules() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let c = compose_with(&endpoint, "vlc").await;
    assert_eq!(spec_of(&c).apps, ["vlc"]);
    assert!(
        c.explain[0].starts_with("LLM backend not used (cannot reach"),
        "{:?}",
        c.explain
    );
}
