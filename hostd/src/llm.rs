//! Optional LLM composer backend: asks an OpenAI-compatible chat-completions endpoint for a
//! spec. Its answer is only a proposal: it must parse as a spec (or a question), pass
//! `Spec::validate` and `Catalog::check_spec`; otherwise the rule-based composer's result
//! is used. Off by default; plain `http://` endpoints only (a local model server).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use proto::spec::{Catalog, Spec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::composer::Clarify;

/// `[llm]` in hostd.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    pub enabled: bool,
    /// `http://HOST:PORT/v1/chat/completions`.
    pub endpoint: String,
    pub model: String,
    /// Name of an environment variable holding a bearer token (empty: none).
    pub api_key_env: String,
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("endpoint {0:?} is not an http:// URL with host and port")]
    Endpoint(String),
    #[error("cannot reach {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("HTTP exchange failed")]
    Http(#[from] hyper::Error),
    #[error("request could not be built: {0}")]
    Request(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("endpoint answered status {0}")]
    Status(u16),
    #[error("answer is not a chat completion with JSON content: {0}")]
    Shape(String),
    #[error("proposed spec is invalid: {0}")]
    Invalid(String),
}

/// What the model proposed, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proposal {
    Spec(Box<Spec>),
    Clarify(Clarify),
}

/// The instructions sent with every request: the JSON shape, the catalog names, the rules.
pub fn system_prompt(catalog: &Catalog) -> String {
    let names = |it: Vec<&String>| {
        it.into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "You turn a request for a Linux environment into JSON. Answer with one JSON object only: \
         either {{\"spec\": SPEC}} or {{\"clarify\": {{\"question\": STRING, \"options\": [STRING]}}}} when the \
         request is ambiguous, contradictory, names an unknown app or asks for the impossible. SPEC follows \
         this JSON Schema: {schema}. Bases: {bases} (buildable: {buildable}). Desktops: {desktops}. Apps: {apps}. \
         GB and gigs mean GiB. GUI apps without a named desktop get xfce; kiosk shows one app; headless means \
         desktop none. List in assumptions every default you fill in.",
        schema = Spec::json_schema(),
        bases = names(catalog.bases.keys().collect()),
        buildable = names(catalog.bases.iter().filter(|(_, b)| b.buildable()).map(|(n, _)| n).collect()),
        desktops = names(catalog.desktops.keys().collect()),
        apps = names(catalog.apps.keys().collect()),
    )
}

/// Asks the endpoint and validates its proposal.
pub async fn propose(cfg: &LlmConfig, catalog: &Catalog, text: &str) -> Result<Proposal, LlmError> {
    let body = json!({
        "model": cfg.model,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": system_prompt(catalog)},
            {"role": "user", "content": text},
        ],
    });
    let answer =
        match tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), post(cfg, &body)).await {
            Ok(r) => r?,
            Err(_) => return Err(LlmError::Timeout(cfg.timeout_ms)),
        };
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(|| LlmError::Shape("no choices[0].message.content".into()))?;
    parse_proposal(content, catalog)
}

/// Validates a model's JSON answer: `{"spec":...}`, `{"clarify":...}` or a bare spec.
pub fn parse_proposal(content: &str, catalog: &Catalog) -> Result<Proposal, LlmError> {
    let v: Value =
        serde_json::from_str(content.trim()).map_err(|e| LlmError::Shape(e.to_string()))?;
    if let Some(c) = v.get("clarify") {
        let q: Clarify =
            serde_json::from_value(c.clone()).map_err(|e| LlmError::Shape(e.to_string()))?;
        if q.question.trim().is_empty() {
            return Err(LlmError::Shape("empty question".into()));
        }
        return Ok(Proposal::Clarify(q));
    }
    let spec_json = v.get("spec").unwrap_or(&v);
    let spec =
        Spec::from_json(&spec_json.to_string()).map_err(|e| LlmError::Invalid(e.to_string()))?;
    catalog
        .check_spec(&spec)
        .map_err(|e| LlmError::Invalid(e.to_string()))?;
    Ok(Proposal::Spec(Box::new(spec)))
}

async fn post(cfg: &LlmConfig, body: &Value) -> Result<Value, LlmError> {
    let uri: hyper::Uri = cfg
        .endpoint
        .parse()
        .map_err(|_| LlmError::Endpoint(cfg.endpoint.clone()))?;
    if uri.scheme_str() != Some("http") {
        return Err(LlmError::Endpoint(cfg.endpoint.clone()));
    }
    let host = uri
        .host()
        .ok_or_else(|| LlmError::Endpoint(cfg.endpoint.clone()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| LlmError::Connect(cfg.endpoint.clone(), e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = serde_json::to_vec(body).expect("json");
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/json")
        .header("content-length", bytes.len());
    if !cfg.api_key_env.is_empty() {
        if let Ok(key) = std::env::var(&cfg.api_key_env) {
            req = req.header("authorization", format!("Bearer {key}"));
        }
    }
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| LlmError::Request(e.to_string()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    if !(200..300).contains(&status) {
        return Err(LlmError::Status(status));
    }
    serde_json::from_slice(&body).map_err(|e| LlmError::Shape(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_spec() -> Value {
        json!({"version":1,"name":"gimp","base":"debian-12","desktop":"xfce","apps":["gimp"],"vcpus":2,
               "memory_mib":4096,"disk_gib":16,"display":{"width":1920,"height":1080,"fps":30},
               "network":{"mode":"nat","allow":[]},"lifetime":{"ttl_s":null,"idle_s":3600},
               "persistence":"ephemeral","assumptions":[]})
    }

    #[test]
    fn valid_proposal_is_accepted_wrapped_or_bare() {
        let cat = Catalog::embedded();
        let wrapped = json!({"spec": valid_spec()}).to_string();
        assert!(matches!(
            parse_proposal(&wrapped, &cat),
            Ok(Proposal::Spec(_))
        ));
        assert!(matches!(
            parse_proposal(&valid_spec().to_string(), &cat),
            Ok(Proposal::Spec(_))
        ));
    }

    #[test]
    fn proposal_with_unknown_app_or_bad_range_is_rejected() {
        let cat = Catalog::embedded();
        let mut s = valid_spec();
        s["apps"] = json!(["photoshop"]);
        assert!(matches!(
            parse_proposal(&s.to_string(), &cat),
            Err(LlmError::Invalid(_))
        ));
        let mut s = valid_spec();
        s["vcpus"] = json!(1000);
        assert!(matches!(
            parse_proposal(&s.to_string(), &cat),
            Err(LlmError::Invalid(_))
        ));
        assert!(matches!(
            parse_proposal("Sure! Here is your spec", &cat),
            Err(LlmError::Shape(_))
        ));
    }

    #[test]
    fn clarify_proposal_is_passed_through() {
        let cat = Catalog::embedded();
        let p = parse_proposal(
            r#"{"clarify":{"question":"Which browser?","options":["firefox"]}}"#,
            &cat,
        )
        .unwrap();
        assert_eq!(
            p,
            Proposal::Clarify(Clarify {
                question: "Which browser?".into(),
                options: vec!["firefox".into()]
            })
        );
    }
}
