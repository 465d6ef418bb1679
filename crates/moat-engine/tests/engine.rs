//! The engine on a real (demo) model that went through the real pull and
//! verification: the DeepSeek-R1 reasoning split, stop strings, limits and
//! the bounded queue.

// Fixture helpers below are not #[test] functions; a failed setup must
// abort loudly, so the no-unwrap/no-panic lints are relaxed for this file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use moat_artifact::Store;
use moat_artifact::name::ModelName;
use moat_artifact::pull::{PullRequest, pull};
use moat_artifact::verify::load_verified;
use moat_engine::demo::{DemoOptions, write_demo_model};
use moat_engine::generate::EngineOptions;
use moat_engine::{ChatMessage, ChatRequest, Engine, EngineError, Event, FinishReason};

/// Generate the tiny demo model, let `edit` change its tokenizer_config.json,
/// pull it into a fresh store and start an engine on the verified bytes.
fn engine(edit: impl FnOnce(&mut serde_json::Value), opts: EngineOptions) -> (tempfile::TempDir, Engine) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_demo_model(&src, &DemoOptions::default()).unwrap();
    let cfg_path = src.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let req = PullRequest {
        source: format!("file://{}", src.display()),
        name: "m".into(),
        ..PullRequest::default()
    };
    pull(&store, &req).unwrap();
    let model = load_verified(&store.model_dir(&ModelName::parse("m").unwrap()).unwrap()).unwrap();
    let engine = Engine::start(model, opts).unwrap();
    (t, engine)
}

fn request(max_tokens: u64) -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Why is the sky blue?".into(),
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..ChatRequest::default()
    }
}

/// Run a request to the end: (content, reasoning, finish, completion tokens).
fn collect(engine: &Engine, req: ChatRequest) -> (String, String, FinishReason, usize) {
    let mut rx = engine.submit(engine.validate(req).unwrap()).unwrap();
    let (mut content, mut reasoning) = (String::new(), String::new());
    loop {
        match rx.blocking_recv().unwrap() {
            Event::Delta {
                content: c,
                reasoning: r,
                ..
            } => {
                content += &c;
                reasoning += &r;
            }
            Event::Done { finish_reason, usage } => {
                return (content, reasoning, finish_reason, usage.completion_tokens);
            }
            Event::Started { .. } | Event::ChoiceEnd { .. } => {}
            Event::Error(e) => panic!("{e}"),
        }
    }
}

#[test]
fn r1_forced_thinking_goes_to_reasoning_content() {
    // DeepSeek's current R1 template ends the generation prompt with
    // `<think>\n`: the answer starts inside the reasoning block.
    let (_t, engine) = engine(
        |cfg| {
            let t = cfg["chat_template"].as_str().unwrap().to_owned();
            let forced = t.replace(
                "{{ '<｜Assistant｜>' }}{% endif %}",
                "{{ '<｜Assistant｜><think>\\n' }}{% endif %}",
            );
            assert_ne!(t, forced, "demo template changed; update this test");
            cfg["chat_template"] = forced.into();
        },
        EngineOptions::default(),
    );
    let (content, reasoning, _, tokens) = collect(&engine, request(24));
    assert_eq!(tokens, 24);
    assert!(!reasoning.is_empty(), "no reasoning_content");
    assert!(!reasoning.contains("<think>") && !reasoning.contains("</think>"));
    // The random model does not close the block within 24 tokens (if it
    // did, the remainder would be content); either way nothing leaks.
    assert!(!content.contains("</think>"));
}

#[test]
fn plain_template_answers_in_content_and_stops_on_strings() {
    let (_t, engine) = engine(|_| {}, EngineOptions::default());
    let (content, reasoning, finish, tokens) = collect(&engine, request(32));
    assert!(reasoning.is_empty());
    assert_eq!((finish, tokens), (FinishReason::Length, 32));
    // Stop at a string taken from the middle of the greedy answer.
    let chars: Vec<char> = content.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &content[..content.find(&stop).unwrap()];
    let mut req = request(32);
    req.stop = vec![stop.clone()];
    let (stopped, _, finish, _) = collect(&engine, req);
    assert_eq!(finish, FinishReason::Stop, "stop {stop:?}");
    assert_eq!(stopped, expected);
}

#[test]
fn limits_are_checked_before_queueing() {
    let (_t, engine) = engine(
        |_| {},
        EngineOptions {
            max_context: 64,
            ..EngineOptions::default()
        },
    );
    let too_long = engine.validate(request(1000)).unwrap_err();
    assert!(
        matches!(&too_long, EngineError::InvalidRequest { param: Some(p), .. } if p == "max_tokens"),
        "{too_long}"
    );
    let mut bad = request(4);
    bad.temperature = Some(3.0);
    assert!(engine.validate(bad).is_err());
    let mut bad = request(4);
    bad.messages[0].role = "wizard".into();
    assert!(
        engine
            .validate(bad)
            .unwrap_err()
            .to_string()
            .contains("messages[0].role")
    );
}

#[test]
fn a_full_queue_is_refused_at_once() {
    let (_t, engine) = engine(
        |_| {},
        EngineOptions {
            queue_capacity: 1,
            max_batch: 1,
            ..EngineOptions::default()
        },
    );
    // One running (long) and one queued fill the engine; the next is refused.
    let mut held = Vec::new();
    let mut refused = false;
    for _ in 0..4 {
        match engine.submit(engine.validate(request(2000)).unwrap()) {
            Ok(rx) => held.push(rx),
            Err(EngineError::Overloaded { .. }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "queue of 1 accepted {} requests", held.len());
    // The refused request was not counted: one waits, one runs.
    assert_eq!(engine.queue_depth(), 1);
    assert_eq!(engine.queue_capacity(), 1);
    // Dropping the receivers cancels the work.
    drop(held);
}

#[test]
fn queue_depth_and_wait_are_reported() {
    // One sequence at a time: the second request waits for a batch slot.
    let (_t, engine) = engine(
        |_| {},
        EngineOptions {
            max_batch: 1,
            ..EngineOptions::default()
        },
    );
    assert_eq!(engine.queue_depth(), 0);
    // The first request occupies the batch; the second waits behind it.
    let mut first = engine.submit(engine.validate(request(40)).unwrap()).unwrap();
    let mut second = engine.submit(engine.validate(request(1)).unwrap()).unwrap();
    let Some(Event::Started { queue_wait: w1 }) = first.blocking_recv() else {
        panic!("the first event is Started");
    };
    // Drain the first to its end, then the second starts.
    let mut first_took = std::time::Duration::ZERO;
    let t0 = std::time::Instant::now();
    while let Some(ev) = first.blocking_recv() {
        if matches!(ev, Event::Done { .. }) {
            first_took = t0.elapsed();
            break;
        }
    }
    let Some(Event::Started { queue_wait: w2 }) = second.blocking_recv() else {
        panic!("the first event is Started");
    };
    // The second waited at least as long as the first ran after we started
    // timing it (minus scheduling noise), and much longer than the first.
    assert!(w2 >= first_took / 2, "w2 {w2:?} first ran {first_took:?}");
    assert!(w2 > w1, "w1 {w1:?} w2 {w2:?}");
    assert_eq!(engine.queue_depth(), 0);
}

#[test]
fn kv_cache_use_is_reported_while_generating_and_freed_after() {
    let (t, engine) = engine(|_| {}, EngineOptions::default());
    // The expected size from config.json, independently of the engine:
    // keys and values, every layer and KV head, f32.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("src/config.json")).unwrap()).unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let per_token = 2
        * n("num_hidden_layers")
        * n("num_key_value_heads")
        * (n("hidden_size") / n("num_attention_heads"))
        * 4;
    let idle = engine.kv_cache();
    assert_eq!(idle.tokens, 0);
    assert_eq!(idle.bytes_per_token, per_token);
    // The capacity is the KV budget every admitted request reserves from.
    let budget = EngineOptions::default().kv_budget_bytes;
    assert_eq!(idle.capacity_tokens, budget / per_token);
    let valid = engine.validate(request(40)).unwrap();
    let prompt = valid.prompt_tokens();
    let mut rx = engine.submit(valid).unwrap();
    let mut seen = 0;
    loop {
        match rx.blocking_recv().unwrap() {
            Event::Delta { .. } if seen == 0 => {
                // The prompt is in the cache once the first token exists
                // (the gauge is written at the end of each step).
                let t = std::time::Instant::now();
                while engine.kv_cache().tokens == 0 {
                    assert!(t.elapsed() < std::time::Duration::from_secs(5));
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                seen = engine.kv_cache().tokens;
                assert!(
                    (prompt..=prompt + 40).contains(&seen),
                    "{seen} vs prompt {prompt}"
                );
                assert_eq!(engine.kv_cache().bytes(), engine.kv_cache().tokens * per_token);
            }
            Event::Done { .. } => break,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    assert!(seen > 0);
    // The scheduler drops the cache once the request is over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while engine.kv_cache().tokens != 0 {
        assert!(std::time::Instant::now() < deadline, "the cache was not freed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Run a request to the end and return every choice's content, by index.
fn choices(engine: &Engine, req: ChatRequest) -> (Vec<String>, moat_engine::Usage) {
    let n = req.n.unwrap_or(1) as usize;
    let mut rx = engine.submit(engine.validate(req).unwrap()).unwrap();
    let mut out = vec![String::new(); n];
    loop {
        match rx.blocking_recv().unwrap() {
            Event::Delta { index, content, .. } => out[index as usize] += &content,
            Event::Done { usage, .. } => return (out, usage),
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
}

#[test]
fn batched_requests_give_what_each_gives_alone() {
    // The batched forward must not mix sequences: greedy answers to
    // different prompts, run together, equal the answers run one by one.
    let (_t, engine) = engine(|_| {}, EngineOptions::default());
    let prompts = [
        "Why is the sky blue?",
        "Tell me about ships.",
        "Count to ten please",
    ];
    let req = |p: &str, max: u64| ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: p.into(),
        }],
        max_tokens: Some(max),
        temperature: Some(0.0),
        ..ChatRequest::default()
    };
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| choices(&engine, req(p, 24)).0.remove(0))
        .collect();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(engine.validate(req(p, 24)).unwrap()).unwrap())
        .collect();
    let steps_before = engine.scheduler().steps_total();
    let together: Vec<String> = rxs
        .into_iter()
        .map(|mut rx| {
            let mut s = String::new();
            loop {
                match rx.blocking_recv().unwrap() {
                    Event::Delta { content, .. } => s += &content,
                    Event::Done { .. } => return s,
                    Event::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
        })
        .collect();
    assert_eq!(together, alone);
    // Fewer steps than three requests one after the other (3 × 24 + 3
    // prompts), because decodes shared forward calls.
    let steps = engine.scheduler().steps_total() - steps_before;
    assert!(steps < 60, "{steps} steps");
}

#[test]
fn n_choices_logprobs_and_completions_on_the_real_model() {
    let (_t, engine) = engine(|_| {}, EngineOptions::default());
    let mut req = request(16);
    req.temperature = Some(1.0);
    req.seed = Some(9);
    req.n = Some(2);
    let (two, usage) = choices(&engine, req.clone());
    assert_ne!(two[0], two[1]);
    req.n = None;
    assert_eq!(choices(&engine, req).0[0], two[0]);
    assert!(usage.completion_tokens > 16);
    // Log-probabilities: the greedy token is the most likely one.
    let mut req = request(4);
    req.logprobs = Some(2);
    let mut rx = engine.submit(engine.validate(req).unwrap()).unwrap();
    let mut lps = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Delta { logprobs, .. } => lps.extend(logprobs),
            Event::Done { .. } => break,
            _ => {}
        }
    }
    assert_eq!(lps.len(), 4);
    assert!(
        lps.iter()
            .all(|t| t.top.len() == 2 && t.top[0].logprob == t.logprob)
    );
    // A completion from token ids; ids outside the vocabulary are refused.
    let comp = ChatRequest {
        prompt: Some(moat_engine::Prompt::Tokens(vec![5, 6, 7])),
        max_tokens: Some(5),
        temperature: Some(0.0),
        ..ChatRequest::default()
    };
    let (text, usage) = choices(&engine, comp);
    assert_eq!(usage.prompt_tokens, 3);
    assert!(!text[0].is_empty());
    let bad = ChatRequest {
        prompt: Some(moat_engine::Prompt::Tokens(vec![u32::MAX])),
        ..ChatRequest::default()
    };
    let e = engine.validate(bad).unwrap_err();
    assert!(
        matches!(&e, EngineError::InvalidRequest { param: Some(p), .. } if p == "prompt"),
        "{e}"
    );
    let mut too_many = request(4);
    too_many.n = Some(99);
    let e = engine.validate(too_many).unwrap_err();
    assert!(
        matches!(&e, EngineError::InvalidRequest { param: Some(p), .. } if p == "n"),
        "{e}"
    );
}
