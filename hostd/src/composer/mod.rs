//! Composer: turns a request in plain words into a validated [`Spec`], or into one question
//! when the request is ambiguous, contradictory, names something unknown or impossible.
//!
//! Offline, deterministic and sans-IO: a fixed sequence of rules reads the normalised text,
//! each consuming the phrase it understood, so nothing is read twice and every leftover word
//! is either known filler or reported. Every default filled in is written to
//! `Spec::assumptions`; `Composition::explain` records which rule decided what.

mod lexicon;
mod text;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;

use proto::spec::{
    limits, Catalog, Display, Lifetime, Network, NetworkMode, Persistence, Spec, SpecError,
    SPEC_VERSION,
};
use serde::{Deserialize, Serialize};

use self::lexicon as lx;
use self::text::Work;

/// A question for the user, with the answers the composer can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clarify {
    pub question: String,
    pub options: Vec<String>,
}

/// What the composer made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Spec(Box<Spec>),
    Clarify(Clarify),
}

/// An outcome plus the reasoning behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composition {
    pub outcome: Outcome,
    pub explain: Vec<String>,
}

/// The JSON printed by `genos compose` and returned by the admin API:
/// `{"spec":{...}}` or `{"clarify":{...}}`, plus `"explain"` when asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComposeOutput {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spec: Option<Spec>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clarify: Option<Clarify>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub explain: Option<Vec<String>>,
}

impl Composition {
    pub fn to_output(&self, explain: bool) -> ComposeOutput {
        let (spec, clarify) = match &self.outcome {
            Outcome::Spec(s) => (Some((**s).clone()), None),
            Outcome::Clarify(c) => (None, Some(c.clone())),
        };
        ComposeOutput {
            spec,
            clarify,
            explain: explain.then(|| self.explain.clone()),
        }
    }
}

/// Values used when a request does not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    pub base: String,
    pub vcpus: u32,
    pub memory_mib_desktop: u32,
    pub memory_mib_headless: u32,
    pub disk_gib: u32,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub ttl_s: Option<u64>,
    pub idle_s: Option<u64>,
    /// Desktop given to GUI apps when none is named.
    pub desktop: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            base: "debian-12".into(),
            vcpus: 2,
            memory_mib_desktop: 4096,
            memory_mib_headless: 2048,
            disk_gib: 16,
            width: 1920,
            height: 1080,
            fps: 30,
            ttl_s: None,
            idle_s: Some(3600),
            desktop: "xfce".into(),
        }
    }
}

/// What a catalog phrase refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    App(String),
    Desktop(String),
    Base(String),
    /// "ubuntu": the newest base of a family.
    Family(String),
    GenericDesktop,
    Category(&'static [&'static str]),
    OtherSystem,
}

/// The rule-based composer. Build once (it indexes the catalog), call [`Composer::compose`]
/// per request.
pub struct Composer {
    catalog: Catalog,
    defaults: Defaults,
    phrases: HashMap<String, Target>,
    /// Single-word phrases of at least four letters, for typo matching.
    fuzzy: Vec<(String, Target)>,
    /// App names too common to match alone ("go"), matched only as list items.
    list_only: Vec<(String, Target)>,
    longest_phrase: usize,
}

impl Composer {
    pub fn new(catalog: Catalog, defaults: Defaults) -> Composer {
        let mut phrases: HashMap<String, Target> = HashMap::new();
        for s in lx::GENERIC_DESKTOP_PHRASES {
            phrases.insert((*s).into(), Target::GenericDesktop);
        }
        for (s, opts) in lx::CATEGORIES {
            phrases.insert((*s).into(), Target::Category(opts));
        }
        for s in lx::OTHER_SYSTEMS {
            phrases.insert((*s).into(), Target::OtherSystem);
        }
        for (name, b) in &catalog.bases {
            if b.newest {
                phrases.insert(b.family.clone(), Target::Family(b.family.clone()));
            }
            for s in std::iter::once(name).chain(&b.synonyms) {
                phrases.insert(s.to_lowercase(), Target::Base(name.clone()));
            }
        }
        for (name, a) in &catalog.apps {
            for s in std::iter::once(name).chain(&a.synonyms) {
                phrases.insert(s.to_lowercase(), Target::App(name.clone()));
            }
        }
        for (name, d) in &catalog.desktops {
            for s in std::iter::once(name).chain(&d.synonyms) {
                phrases.insert(s.to_lowercase(), Target::Desktop(name.clone()));
            }
        }
        if catalog.desktops.contains_key("none") {
            for s in lx::NO_DESKTOP_PHRASES {
                phrases.insert((*s).into(), Target::Desktop("none".into()));
            }
        }
        let mut list_only = Vec::new();
        for w in lx::NOT_ALONE {
            if let Some(t @ Target::App(_)) = phrases.remove(*w) {
                list_only.push(((*w).to_string(), t));
            }
        }
        let longest_phrase = phrases
            .keys()
            .map(|p| p.split(' ').count())
            .max()
            .unwrap_or(1);
        let mut fuzzy: Vec<(String, Target)> = phrases
            .iter()
            .filter(|(p, t)| {
                p.len() >= 4
                    && p.chars().all(|c| c.is_ascii_alphabetic())
                    && matches!(
                        t,
                        Target::App(_) | Target::Desktop(_) | Target::Family(_) | Target::Base(_)
                    )
                    && !lx::FILLER.contains(&p.as_str())
            })
            .map(|(p, t)| (p.clone(), t.clone()))
            .collect();
        fuzzy.sort_by(|a, b| a.0.cmp(&b.0));
        Composer {
            catalog,
            defaults,
            phrases,
            fuzzy,
            list_only,
            longest_phrase,
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Composes one request.
    pub fn compose(&self, request: &str) -> Composition {
        let mut st = State::new(request);
        let outcome = match self.run(&mut st) {
            Ok(spec) => Outcome::Spec(Box::new(spec)),
            Err(q) => {
                st.explain.push(format!("asked: {}", q.question));
                Outcome::Clarify(q)
            }
        };
        Composition {
            outcome,
            explain: st.explain,
        }
    }

    fn run(&self, st: &mut State) -> Result<Spec, Clarify> {
        if st.work.text.trim().is_empty() {
            return Err(clarify(
                "What should the environment have? Name the apps or the kind of machine you want.",
                &[
                    "a desktop with firefox",
                    "a headless machine with python",
                    "a kiosk showing chromium",
                ],
            ));
        }
        self.read_name(st);
        self.read_impossible_amounts(st)?;
        self.read_sizes(st)?;
        self.read_display(st)?;
        self.read_cpus(st)?;
        self.read_durations(st)?;
        self.read_network(st)?;
        self.read_persistence(st)?;
        self.read_catalog_phrases(st)?;
        self.read_list_words(st)?;
        self.read_typos(st)?;
        self.check_leftovers(st)?;
        self.assemble(st)
    }

    fn read_name(&self, st: &mut State) {
        let Some(c) = lx::NAME.captures(&st.work.remaining) else {
            return;
        };
        let (m, name) = (c.get(0).expect("match"), c.get(1).expect("group"));
        let candidate = name.as_str().trim_end_matches('-').to_string();
        if self.phrases.contains_key(&candidate) || !proto::spec::is_valid_name(&candidate) {
            return;
        }
        st.explain
            .push(format!("name {candidate:?} from {:?}", m.as_str()));
        st.name = Some(candidate);
        let range = m.range();
        st.work.consume(range);
    }

    fn read_sizes(&self, st: &mut State) -> Result<(), Clarify> {
        let found: Vec<(Range<usize>, f64, String)> = lx::SIZE
            .captures_iter(&st.work.remaining)
            .map(|c| {
                let m = c.get(0).expect("match");
                let v: f64 = c[1].parse().unwrap_or(0.0);
                (m.range(), v, c[2].to_string())
            })
            .collect();
        let mut unlabelled = Vec::new();
        for (range, value, unit) in found {
            let phrase = st.work.text[range.clone()].to_string();
            let mib = match unit.chars().next() {
                Some('t') => value * 1024.0 * 1024.0,
                Some('g') => value * 1024.0,
                _ => value,
            };
            let kind = self.size_kind(&st.work, &range);
            st.work.consume(range);
            match kind {
                Some(SizeKind::Memory) => st.set_memory(mib, &phrase)?,
                Some(SizeKind::Disk) => st.set_disk(mib, &phrase)?,
                None => unlabelled.push((mib, phrase)),
            }
        }
        for (mib, phrase) in unlabelled {
            if st.memory_mib.is_none() && mib <= 64.0 * 1024.0 {
                st.assumptions.push(format!("read \"{phrase}\" as memory"));
                st.set_memory(mib, &phrase)?;
            } else if st.disk_gib.is_none() {
                st.assumptions
                    .push(format!("read \"{phrase}\" as disk size"));
                st.set_disk(mib, &phrase)?;
            } else {
                return Err(clarify(
                    &format!("Is \"{phrase}\" meant as memory or as disk size?"),
                    &[&format!("{phrase} of memory"), &format!("{phrase} disk")],
                ));
            }
        }
        Ok(())
    }

    /// Negative quantities ("-4 GB", "minus 2 cores") and amounts without a number ("a few
    /// gigs", "several cores") get a question: no default is a fair guess for them.
    fn read_impossible_amounts(&self, st: &mut State) -> Result<(), Clarify> {
        if let Some(c) = lx::NEGATIVE.captures(&st.work.remaining) {
            let phrase = c.get(0).expect("match").as_str().trim().to_string();
            let range = c.get(0).expect("match").range();
            let (question, options): (String, &[&str]) = if c.get(2).is_some() {
                let what = match self.size_kind(&st.work, &range) {
                    Some(SizeKind::Disk) => "disk",
                    _ => "memory",
                };
                (
                    format!(
                        "\"{phrase}\" is not possible: a size cannot be negative. How much {what}?"
                    ),
                    if what == "disk" {
                        &["16 GiB disk", "32 GiB disk", "64 GiB disk"]
                    } else {
                        &["2 GiB", "4 GiB", "8 GiB"]
                    },
                )
            } else if c.get(3).is_some() {
                (
                    format!("\"{phrase}\" is not possible: the number of vCPUs cannot be negative. How many?"),
                    &["2 vCPUs", "4 vCPUs", "8 vCPUs"],
                )
            } else if c.get(4).is_some() {
                (
                    format!("\"{phrase}\" is not possible: a lifetime cannot be negative. How long should it last?"),
                    &["1 hour", "8 hours", "no time limit"],
                )
            } else {
                (
                    format!(
                        "\"{phrase}\": negative numbers are not possible here. What did you mean?"
                    ),
                    &[],
                )
            };
            return Err(clarify(&question, options));
        }
        if let Some(c) = lx::VAGUE_AMOUNT.captures(&st.work.remaining) {
            let phrase = c.get(0).expect("match").as_str().to_string();
            let range = c.get(0).expect("match").range();
            if c.get(2).is_some() {
                return Err(clarify(
                    &format!("How many vCPUs do you mean by \"{phrase}\"?"),
                    &["2 vCPUs", "4 vCPUs", "8 vCPUs"],
                ));
            }
            return Err(match self.size_kind(&st.work, &range) {
                Some(SizeKind::Disk) => clarify(
                    &format!("How much disk do you mean by \"{phrase}\"?"),
                    &["16 GiB disk", "32 GiB disk", "64 GiB disk"],
                ),
                _ => clarify(
                    &format!("How much memory do you mean by \"{phrase}\"?"),
                    &["2 GiB", "4 GiB", "8 GiB"],
                ),
            });
        }
        Ok(())
    }

    fn size_kind(&self, work: &Work, range: &Range<usize>) -> Option<SizeKind> {
        const MEM: &[&str] = &["ram", "memory", "mem"];
        const DISK: &[&str] = &[
            "disk",
            "storage",
            "ssd",
            "hdd",
            "drive",
            "space",
            "root",
            "volume",
            "hard",
            "nvme",
            "rootfs",
            "filesystem",
            "disks",
            "home",
        ];
        const SKIP: &[&str] = &[
            "of", "for", "the", "a", "on", "in", "as", "worth", "total", "system", "main",
        ];
        let classify = |w: &str| {
            let w = w.trim_end_matches(':');
            if MEM.contains(&w) {
                Some(SizeKind::Memory)
            } else if DISK.contains(&w) {
                Some(SizeKind::Disk)
            } else {
                None
            }
        };
        for w in work.words_after(range.end, 3) {
            if let Some(k) = classify(w) {
                return Some(k);
            }
            if !SKIP.contains(&w) {
                break;
            }
        }
        for w in work.words_before(range.start, 3) {
            if let Some(k) = classify(w) {
                return Some(k);
            }
            if !SKIP.contains(&w) && !matches!(w, "with" | "and" | "," | "of" | "=" | "is") {
                break;
            }
        }
        None
    }

    fn read_display(&self, st: &mut State) -> Result<(), Clarify> {
        let mut found: Vec<(u32, u32, String, Range<usize>)> = Vec::new();
        for c in lx::RESOLUTION.captures_iter(&st.work.remaining) {
            let m = c.get(0).expect("match");
            let (w, h) = (c[1].parse().unwrap_or(0), c[2].parse().unwrap_or(0));
            found.push((w, h, m.as_str().into(), m.range()));
        }
        for (_, _, _, r) in &found {
            st.work.consume(r.clone());
        }
        let named: Vec<_> = lx::RESOLUTION_NAME
            .captures_iter(&st.work.remaining)
            .map(|c| (c.get(0).expect("match").range(), c[1].to_string()))
            .collect();
        for (r, name) in named {
            let (w, h) = match name.as_str() {
                "480p" => (854, 480),
                "720p" | "hd" | "hd ready" => (1280, 720),
                "1080p" | "full hd" | "fullhd" | "fhd" => (1920, 1080),
                "1440p" | "qhd" | "2k" => (2560, 1440),
                _ => (3840, 2160),
            };
            st.work.consume(r.clone());
            found.push((w, h, name, r));
        }
        let distinct: BTreeSet<(u32, u32)> = found.iter().map(|f| (f.0, f.1)).collect();
        ask_if_several(&distinct, "Which screen size do you want?", |(w, h)| {
            format!("{w}x{h}")
        })?;
        if let Some((w, h, phrase, _)) = found.into_iter().next() {
            let side = limits::DISPLAY_SIDE;
            if !side.contains(&w) || !side.contains(&h) {
                return Err(clarify(
                    &format!(
                        "A screen of {w}x{h} is not possible: each side must be between {} and {} pixels. Which size?",
                        side.start(),
                        side.end()
                    ),
                    &["1280x720", "1920x1080", "2560x1440"],
                ));
            }
            st.explain.push(format!("display {w}x{h} from {phrase:?}"));
            st.resolution = Some((w, h));
        }
        let fps: Vec<(Range<usize>, u32)> = lx::FPS
            .captures_iter(&st.work.remaining)
            .map(|c| {
                let v = c
                    .get(1)
                    .or(c.get(2))
                    .map(|g| g.as_str().parse().unwrap_or(0))
                    .unwrap_or(0);
                (c.get(0).expect("match").range(), v)
            })
            .collect();
        let distinct: BTreeSet<u32> = fps.iter().map(|f| f.1).collect();
        ask_if_several(&distinct, "Which frame rate do you want?", |f| {
            format!("{f} fps")
        })?;
        for (r, v) in fps {
            if !limits::FPS.contains(&v) {
                return Err(clarify(
                    &format!(
                        "{v} fps is not possible: the stream runs at 1 to {} fps. Which rate?",
                        limits::FPS.end()
                    ),
                    &["30 fps", "60 fps"],
                ));
            }
            st.explain.push(format!("frame rate {v} fps"));
            st.fps = Some(v);
            st.work.consume(r);
        }
        Ok(())
    }

    fn read_cpus(&self, st: &mut State) -> Result<(), Clarify> {
        let mut found: Vec<(Range<usize>, u32)> = Vec::new();
        for c in lx::CPU_COUNT_FIRST.captures_iter(&st.work.remaining) {
            found.push((
                c.get(0).expect("match").range(),
                c[1].parse().unwrap_or(u32::MAX),
            ));
        }
        for c in lx::CPU_WORD.captures_iter(&st.work.remaining) {
            let n = match &c[1] {
                "single" => 1,
                "dual" => 2,
                "quad" => 4,
                "hexa" => 6,
                _ => 8,
            };
            found.push((c.get(0).expect("match").range(), n));
        }
        for (r, _) in &found {
            st.work.consume(r.clone());
        }
        for c in lx::CPU_COUNT_AFTER.captures_iter(&st.work.remaining.clone()) {
            let r = c.get(0).expect("match").range();
            st.work.consume(r.clone());
            found.push((r, c[1].parse().unwrap_or(u32::MAX)));
        }
        let distinct: BTreeSet<u32> = found.iter().map(|f| f.1).collect();
        let question = "You gave more than one CPU count. How many vCPUs?";
        ask_if_several(&distinct, question, |n| format!("{n} vCPUs"))?;
        if let Some(n) = distinct.into_iter().next() {
            if !limits::VCPUS.contains(&n) {
                return Err(clarify(
                    &format!(
                        "{n} vCPUs is not possible: an environment has 1 to {} vCPUs. How many?",
                        limits::VCPUS.end()
                    ),
                    &["2 vCPUs", "4 vCPUs", "8 vCPUs"],
                ));
            }
            st.explain.push(format!("{n} vCPUs"));
            st.vcpus = Some(n);
        }
        Ok(())
    }

    fn read_durations(&self, st: &mut State) -> Result<(), Clarify> {
        let found: Vec<(Range<usize>, f64, String)> = lx::DURATION
            .captures_iter(&st.work.remaining)
            .map(|c| {
                let m = c.get(0).expect("match");
                let num = c.get(1).or(c.get(3)).map(|g| g.as_str()).unwrap_or("0");
                let unit = c.get(2).or(c.get(4)).map(|g| g.as_str()).unwrap_or("");
                (m.range(), num.parse().unwrap_or(0.0), unit.to_string())
            })
            .collect();
        for (range, value, unit) in found {
            // "3d modelling" is not three days.
            if unit == "d" {
                let after = st.work.words_after(range.end, 1);
                if after.first().is_some_and(|w| {
                    [
                        "model",
                        "modelling",
                        "modeling",
                        "printing",
                        "graphics",
                        "art",
                        "rendering",
                        "design",
                        "games",
                    ]
                    .contains(w)
                }) {
                    continue;
                }
            }
            let per_unit: f64 = match unit.as_bytes().first() {
                Some(b's') => 1.0,
                Some(b'h') => 3600.0,
                Some(b'd') => 86_400.0,
                Some(b'w') => 604_800.0,
                Some(b'm') if unit.starts_with("mo") => 30.0 * 86_400.0,
                _ => 60.0,
            };
            let secs = (value * per_unit).round() as u64;
            let phrase = st.work.text[range.clone()].to_string();
            let before = st.work.clause_before(range.start, 6);
            let after = st.work.clause_after(range.end, 3);
            let idle = before
                .iter()
                .chain(after.iter())
                .any(|w| lx::IDLE_WORDS.contains(w))
                || st.work.text[..range.start].ends_with("no one uses it for ")
                || after.windows(2).any(|p| p == ["without", "use"]);
            st.work.consume(range);
            let r = limits::LIFETIME_S;
            if !r.contains(&secs) {
                return Err(clarify(
                    &format!(
                        "\"{phrase}\" is not possible: a lifetime is between 1 minute and 30 days. How long should it last?"
                    ),
                    &["1 hour", "8 hours", "no time limit"],
                ));
            }
            let slot = if idle { &mut st.idle_s } else { &mut st.ttl_s };
            match slot {
                Some(Some(prev)) if *prev != secs => {
                    let what = if idle { "idle timeout" } else { "lifetime" };
                    return Err(clarify_owned(
                        format!("You gave two different values for the {what}. Which one?"),
                        vec![human_duration(*prev), human_duration(secs)],
                    ));
                }
                _ => *slot = Some(Some(secs)),
            }
            st.explain.push(format!(
                "{} {} from {phrase:?}",
                if idle { "idle timeout" } else { "lifetime" },
                human_duration(secs)
            ));
        }
        if let Some(m) = lx::FOREVER.find(&st.work.remaining) {
            if matches!(st.ttl_s, Some(Some(_))) {
                return Err(clarify(
                    "You asked for both a time limit and no time limit. Which one?",
                    &["keep the time limit", "no time limit"],
                ));
            }
            st.explain
                .push(format!("no time limit from {:?}", m.as_str()));
            st.ttl_s = Some(None);
            if st.idle_s.is_none() {
                st.idle_s = Some(None);
            }
            let r = m.range();
            st.work.consume(r);
        }
        Ok(())
    }

    fn read_network(&self, st: &mut State) -> Result<(), Clarify> {
        let none = st.work.consume_all(&lx::NET_NONE);
        // Hosts, minus catalog phrases that look like host names ("node.js", "docker.io").
        let mut hosts: Vec<(Range<usize>, String)> = lx::HOST
            .find_iter(&st.work.remaining)
            .filter(|m| !self.phrases.contains_key(m.as_str()))
            .map(|m| (m.range(), m.as_str().to_string()))
            .collect();
        let allow_context = |work: &Work, r: &Range<usize>| {
            work.words_before(r.start, 4)
                .iter()
                .any(|w| lx::ALLOW_WORDS.contains(w))
                || work.words_after(r.end, 1).first() == Some(&"only")
        };
        let mut in_allow_phrase = hosts.iter().any(|(r, _)| allow_context(&st.work, r));
        for (r, w) in st.work.words() {
            if let Some((_, host)) = lx::BARE_SITES.iter().find(|(s, _)| *s == w) {
                let near_allow = allow_context(&st.work, &r)
                    || hosts.iter().any(|(hr, _)| {
                        hr.start.abs_diff(r.end) < 12 || r.start.abs_diff(hr.end) < 12
                    });
                if near_allow {
                    in_allow_phrase |= allow_context(&st.work, &r);
                    hosts.push((r, (*host).to_string()));
                }
            }
        }
        for (r, _) in &hosts {
            st.work.consume(r.clone());
        }
        let full = st.work.consume_all(&lx::NET_FULL);
        if !hosts.is_empty() {
            let mut allow: Vec<String> = hosts.into_iter().map(|(_, h)| h).collect();
            allow.sort();
            allow.dedup();
            if !in_allow_phrase && none.is_empty() {
                let list = allow.join(" and ");
                return Err(clarify_owned(
                    format!("Should network access be limited to {list}?"),
                    vec![format!("only {list}"), "full internet access".into()],
                ));
            }
            st.explain
                .push(format!("network limited to {}", allow.join(", ")));
            st.network = Some(Network {
                mode: NetworkMode::Allowlist,
                allow,
            });
        } else if !none.is_empty() {
            if !full.is_empty() {
                return Err(clarify(
                    "You asked for both no network and network access. Which one?",
                    &["no network", "full internet access"],
                ));
            }
            st.explain.push("no network (asked for offline)".into());
            st.network = Some(Network {
                mode: NetworkMode::None,
                allow: vec![],
            });
        } else if !full.is_empty() {
            st.explain.push("full internet access (asked for)".into());
            st.network = Some(Network {
                mode: NetworkMode::Nat,
                allow: vec![],
            });
        }
        Ok(())
    }

    fn read_persistence(&self, st: &mut State) -> Result<(), Clarify> {
        let eph = st.work.consume_all(&lx::EPHEMERAL);
        let pers = st.work.consume_all(&lx::PERSISTENT);
        match (eph.is_empty(), pers.is_empty()) {
            (false, false) => Err(clarify(
                "Should your files be kept after the environment stops, or thrown away?",
                &["keep my files", "throw everything away"],
            )),
            (false, true) => {
                st.explain.push("ephemeral (asked for)".into());
                st.persistence = Some(Persistence::Ephemeral);
                Ok(())
            }
            (true, false) => {
                st.explain.push("persistent (asked to keep files)".into());
                st.persistence = Some(Persistence::Persistent);
                Ok(())
            }
            (true, true) => Ok(()),
        }
    }

    fn read_catalog_phrases(&self, st: &mut State) -> Result<(), Clarify> {
        let words = st.work.words();
        let mut i = 0;
        let mut hits: Vec<(Range<usize>, String, Target)> = Vec::new();
        while i < words.len() {
            let mut matched = false;
            for n in (1..=self.longest_phrase.min(words.len() - i)).rev() {
                let span = &words[i..i + n];
                // Only adjacent words form a phrase.
                if span.windows(2).any(|p| p[1].0.start != p[0].0.end + 1) {
                    continue;
                }
                let phrase = span.iter().map(|(_, w)| *w).collect::<Vec<_>>().join(" ");
                if let Some(t) = self.phrases.get(&phrase) {
                    hits.push((span[0].0.start..span[n - 1].0.end, phrase, t.clone()));
                    i += n;
                    matched = true;
                    break;
                }
            }
            if !matched {
                i += 1;
            }
        }
        for (r, phrase, target) in hits {
            let version_after = st
                .work
                .words_after(r.end, 1)
                .first()
                .is_some_and(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()));
            self.apply_target(st, r, target, &phrase, version_after)?;
        }
        Ok(())
    }

    /// "rust and go", "rust, go and java", "a box with go": an app name too common to match
    /// alone ("go") is the app when it stands as an item of a list.
    fn read_list_words(&self, st: &mut State) -> Result<(), Clarify> {
        let words = st.work.owned_words();
        for (r, w) in words {
            let Some((phrase, target)) = self.list_only.iter().find(|(p, _)| *p == w) else {
                continue;
            };
            let prev = st.work.words_before(r.start, 1).first().copied();
            let next = st.work.words_after(r.end, 1).first().copied();
            let listed = match prev {
                None => next.is_some_and(|n| matches!(n, "," | "and" | "plus")),
                Some(p) => {
                    lx::LIST_JOINERS.contains(&p)
                        && next.is_none_or(|n| lx::LIST_ENDERS.contains(&n))
                }
            };
            if listed {
                st.explain.push(format!("{phrase:?} as an item of a list"));
                self.apply_target(st, r, target.clone(), phrase, false)?;
            }
        }
        Ok(())
    }

    /// Takes the words at `at` (`phrase`) as `target`: they are consumed, and `target` is
    /// added to the spec being built.
    fn apply_target(
        &self,
        st: &mut State,
        at: Range<usize>,
        target: Target,
        phrase: &str,
        version_after: bool,
    ) -> Result<(), Clarify> {
        st.pos = at.start;
        st.work.consume(at);
        match target {
            // "ubuntu xfce without chromium" (an answer this composer offers): left out.
            Target::App(a) if st.work.words_before(st.pos, 1).first() == Some(&"without") => {
                st.explain
                    .push(format!("left out {a} (\"without {phrase}\")"));
                st.assumptions.push(format!("without {a}, as asked"));
            }
            Target::App(a) => st.add_app(a, phrase),
            Target::Desktop(d) => {
                st.explain.push(format!("desktop {d} from {phrase:?}"));
                st.desktops.insert(d);
            }
            Target::Base(b) => {
                st.explain.push(format!("base {b} from {phrase:?}"));
                st.bases.insert(b);
            }
            Target::Family(f) => {
                if version_after {
                    let known: Vec<String> = self
                        .catalog
                        .bases
                        .iter()
                        .filter(|(_, b)| b.family == f)
                        .map(|(n, _)| n.clone())
                        .collect();
                    return Err(clarify_owned(
                        format!("That {f} version is not in the catalog. Which base do you want?"),
                        known,
                    ));
                }
                let newest = self
                    .catalog
                    .bases
                    .iter()
                    .find(|(_, b)| b.family == f && b.newest)
                    .map(|(n, _)| n.clone())
                    .expect("family phrases come from newest bases");
                st.explain.push(format!(
                    "base {newest}: {phrase:?} means its newest version"
                ));
                st.bases.insert(newest);
            }
            Target::GenericDesktop => {
                st.explain
                    .push(format!("a graphical desktop from {phrase:?}"));
                st.wants_desktop = true;
            }
            Target::Category(options) => {
                let picked: Vec<&&str> = options
                    .iter()
                    .filter(|o| st.apps.iter().any(|a| a == *o))
                    .collect();
                if picked.is_empty() {
                    st.categories.push((phrase.to_string(), options));
                }
            }
            Target::OtherSystem => {
                return Err(clarify_owned(
                    format!(
                        "\"{phrase}\" is not available: GenOS builds Linux environments from its catalog ({}). Which base do you want?",
                        self.buildable_bases().join(", ")
                    ),
                    self.buildable_bases(),
                ));
            }
        }
        Ok(())
    }

    fn buildable_bases(&self) -> Vec<String> {
        self.catalog
            .bases
            .iter()
            .filter(|(_, b)| b.buildable())
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn read_typos(&self, st: &mut State) -> Result<(), Clarify> {
        self.read_two_word_typos(st)?;
        let words = st.work.owned_words();
        for (r, w) in words {
            if w.len() < 4
                || !w.chars().all(|c| c.is_ascii_alphabetic())
                || lx::FILLER.contains(&w.as_str())
            {
                continue;
            }
            let max = if w.len() >= 7 { 2 } else { 1 };
            let mut best: BTreeMap<usize, Vec<(&str, &Target)>> = BTreeMap::new();
            for (p, t) in &self.fuzzy {
                if p.len().abs_diff(w.len()) > max {
                    continue;
                }
                let d = strsim::damerau_levenshtein(&w, p);
                if d <= max {
                    best.entry(d).or_default().push((p.as_str(), t));
                }
            }
            let Some((_, cands)) = best.into_iter().next() else {
                continue;
            };
            let mut targets: Vec<&Target> = Vec::new();
            for (_, t) in &cands {
                if !targets.contains(t) {
                    targets.push(t);
                }
            }
            if targets.len() > 1 {
                let opts = cands.iter().map(|(p, _)| p.to_string()).collect();
                return Err(clarify_owned(
                    format!("Did you mean one of these by \"{w}\"?"),
                    opts,
                ));
            }
            let (p, t) = cands[0];
            st.assumptions
                .push(format!("read \"{w}\" as {}", target_name(t)));
            self.apply_target(st, r, t.clone(), p, false)?;
        }
        Ok(())
    }

    /// "libre offfice": two adjacent unknown words close to a two-word catalog phrase.
    fn read_two_word_typos(&self, st: &mut State) -> Result<(), Clarify> {
        let words = st.work.owned_words();
        let mut i = 0;
        while i + 1 < words.len() {
            let (a, b) = (&words[i], &words[i + 1]);
            let unknown =
                |w: &str| !lx::FILLER.contains(&w) && w.chars().all(|c| c.is_ascii_alphabetic());
            if b.0.start != a.0.end + 1 || !(unknown(&a.1) || unknown(&b.1)) {
                i += 1;
                continue;
            }
            let pair = format!("{} {}", a.1, b.1);
            let hit = self
                .phrases
                .iter()
                .filter(|(p, t)| {
                    p.split(' ').count() == 2
                        && p.len() >= 8
                        && matches!(t, Target::App(_) | Target::Desktop(_))
                })
                .map(|(p, t)| (strsim::damerau_levenshtein(&pair, p), p, t))
                .filter(|(d, _, _)| *d == 1)
                .min_by(|x, y| x.1.cmp(y.1));
            if let Some((_, p, t)) = hit {
                st.assumptions
                    .push(format!("read \"{pair}\" as {}", target_name(t)));
                self.apply_target(st, a.0.start..b.0.end, t.clone(), p, false)?;
                i += 2;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn check_leftovers(&self, st: &mut State) -> Result<(), Clarify> {
        for (r, w) in st.work.words() {
            let in_slot = |st: &State| {
                st.work
                    .words_before(r.start, 3)
                    .into_iter()
                    .find(|p| !matches!(*p, "a" | "an" | "the" | "some" | "also"))
                    .is_some_and(|p| lx::APP_SLOT.contains(&p))
            };
            if lx::EVERYTHING.contains(&w) && in_slot(st) && st.apps.is_empty() {
                return Err(clarify(
                    "Which apps should it have? Name them (for example firefox, libreoffice, vlc).",
                    &["firefox", "libreoffice", "vlc", "gimp"],
                ));
            }
            if lx::FILLER.contains(&w)
                || w.len() < 3
                || !w.chars().next().is_some_and(|c| c.is_alphabetic())
            {
                continue;
            }
            if in_slot(st) {
                let mut scored: Vec<(f64, &String)> = self
                    .catalog
                    .apps
                    .keys()
                    .map(|a| (strsim::jaro_winkler(w, a), a))
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
                // Only names that look alike are worth offering.
                let mut options: Vec<String> = scored
                    .iter()
                    .filter(|(s, _)| *s >= 0.8)
                    .take(3)
                    .map(|(_, a)| (*a).clone())
                    .collect();
                options.push(format!("leave out {w}"));
                return Err(clarify_owned(
                    if options.len() > 1 {
                        format!("\"{w}\" is not in the app catalog. Did you mean one of these, or should it be left out?")
                    } else {
                        format!("\"{w}\" is not in the app catalog. Should it be left out, or which catalog app do you want instead?")
                    },
                    options,
                ));
            }
            st.explain.push(format!("ignored the word {w:?}"));
        }
        Ok(())
    }

    fn assemble(&self, st: &mut State) -> Result<Spec, Clarify> {
        // Base.
        let base = match st.bases.len() {
            0 => {
                st.assumptions
                    .push(format!("base {} (default)", self.defaults.base));
                self.defaults.base.clone()
            }
            1 => st.bases.iter().next().expect("one").clone(),
            _ => {
                return Err(clarify_owned(
                    "You named more than one operating system. Which base do you want?".into(),
                    st.bases.iter().cloned().collect(),
                ))
            }
        };
        if let Some(entry) = self.catalog.bases.get(&base) {
            // Only a base this genos-image has no builder for is refused here; whether its
            // archive is reachable is found out where and when the build runs.
            if !entry.buildable() {
                return Err(clarify_owned(
                    format!(
                        "{base} cannot be built: genos-image has no {} builder. Use one of these instead?",
                        entry.builder
                    ),
                    self.buildable_bases(),
                ));
            }
        }

        // Categories ("a browser") not settled by a named app.
        if let Some((phrase, options)) = st.categories.first() {
            if !options.iter().any(|o| st.apps.iter().any(|a| a == o)) {
                return Err(clarify_owned(
                    format!("Which one do you mean by \"{phrase}\"?"),
                    options.iter().map(|s| s.to_string()).collect(),
                ));
            }
        }

        // Desktop.
        let none_provides: Vec<String> = self
            .catalog
            .desktops
            .get("none")
            .map(|d| d.provides.clone())
            .unwrap_or_default();
        let gui_apps: Vec<String> = st
            .apps
            .iter()
            .filter(|a| {
                self.catalog.apps.get(*a).is_some_and(|e| e.gui) && !none_provides.contains(a)
            })
            .cloned()
            .collect();
        if st.desktops.len() > 1 {
            return Err(clarify_owned(
                "You named more than one desktop. Which one?".into(),
                st.desktops.iter().cloned().collect(),
            ));
        }
        let desktop = match st.desktops.iter().next().map(String::as_str) {
            Some("none") => {
                if let Some(app) = gui_apps.first() {
                    return Err(clarify_owned(
                        format!("{app} needs a graphical desktop, but you asked for none. Which do you want?"),
                        vec![format!("{app} on {}", self.defaults.desktop), format!("headless without {app}")],
                    ));
                }
                if st.wants_desktop {
                    return Err(clarify(
                        "You asked for both a desktop and no desktop. Which one?",
                        &["xfce", "none"],
                    ));
                }
                "none".to_string()
            }
            Some("kiosk") => {
                let shown: Vec<&String> = st.apps.iter().filter(|a| self.is_gui(a)).collect();
                match shown.len() {
                    1 => "kiosk".to_string(),
                    0 => {
                        return Err(clarify(
                            "A kiosk shows one app full screen. Which app?",
                            &["firefox", "chromium"],
                        ))
                    }
                    _ => {
                        return Err(clarify_owned(
                            "A kiosk shows only one app full screen. Which one?".into(),
                            shown.into_iter().cloned().collect(),
                        ))
                    }
                }
            }
            Some(d) => d.to_string(),
            None => {
                if let Some(app) = gui_apps.first() {
                    st.assumptions.push(format!(
                        "desktop {}, because {app} needs a desktop",
                        self.defaults.desktop
                    ));
                    self.defaults.desktop.clone()
                } else if st.wants_desktop {
                    st.assumptions.push(format!(
                        "desktop {} (default desktop)",
                        self.defaults.desktop
                    ));
                    self.defaults.desktop.clone()
                } else if st.apps.is_empty() {
                    return Err(clarify(
                        "Should the environment have a graphical desktop, and which apps?",
                        &["xfce desktop", "headless (no desktop)"],
                    ));
                } else {
                    st.assumptions
                        .push("no desktop, since nothing asked for needs one".into());
                    "none".to_string()
                }
            }
        };
        let provides = self
            .catalog
            .desktops
            .get(&desktop)
            .map(|d| d.provides.clone())
            .unwrap_or_default();
        let mut apps = Vec::new();
        for a in &st.apps {
            if provides.contains(a) {
                st.assumptions
                    .push(format!("{a} comes with the {desktop} desktop"));
            } else if let Some(why) = self.packaged_nowhere(&base, a) {
                st.assumptions
                    .push(format!("without {a}, which {base} cannot install: {why}"));
            } else {
                apps.push(a.clone());
            }
        }

        let graphical = self
            .catalog
            .desktops
            .get(&desktop)
            .is_some_and(|d| d.graphical);
        let vcpus = st.vcpus.unwrap_or_else(|| {
            st.assumptions
                .push(format!("{} vCPUs (default)", self.defaults.vcpus));
            self.defaults.vcpus
        });
        let memory_mib = st.memory_mib.unwrap_or_else(|| {
            let m = if graphical {
                self.defaults.memory_mib_desktop
            } else {
                self.defaults.memory_mib_headless
            };
            st.assumptions.push(format!(
                "{} memory (default {})",
                human_mib(m),
                if graphical {
                    "for a desktop"
                } else {
                    "without a desktop"
                }
            ));
            m
        });
        let disk_gib = st.disk_gib.unwrap_or_else(|| {
            st.assumptions
                .push(format!("{} GiB disk (default)", self.defaults.disk_gib));
            self.defaults.disk_gib
        });
        let (width, height) = st.resolution.unwrap_or_else(|| {
            if graphical {
                st.assumptions.push(format!(
                    "{}x{} screen (default)",
                    self.defaults.width, self.defaults.height
                ));
            }
            (self.defaults.width, self.defaults.height)
        });
        let fps = st.fps.unwrap_or_else(|| {
            if graphical {
                st.assumptions
                    .push(format!("{} fps (default)", self.defaults.fps));
            }
            self.defaults.fps
        });
        let network = st.network.clone().unwrap_or_else(|| {
            st.assumptions
                .push("full internet access through NAT (default)".into());
            Network {
                mode: NetworkMode::Nat,
                allow: vec![],
            }
        });
        let ttl_s = st.ttl_s.unwrap_or_else(|| {
            st.assumptions.push(match self.defaults.ttl_s {
                None => "no time limit (default)".into(),
                Some(s) => format!("deleted after {} (default)", human_duration(s)),
            });
            self.defaults.ttl_s
        });
        let idle_s = st.idle_s.unwrap_or_else(|| {
            if let Some(s) = self.defaults.idle_s {
                st.assumptions.push(format!(
                    "stopped after {} without a viewer (default)",
                    human_duration(s)
                ));
            }
            self.defaults.idle_s
        });
        let persistence = st.persistence.unwrap_or_else(|| {
            st.assumptions
                .push("files are not kept after it stops (default)".into());
            Persistence::Ephemeral
        });
        let name = st.name.clone().unwrap_or_else(|| {
            let n = apps.first().cloned().unwrap_or_else(|| {
                if graphical {
                    desktop.clone()
                } else {
                    "headless".into()
                }
            });
            st.assumptions.push(format!("named \"{n}\""));
            n
        });
        let spec = Spec {
            version: SPEC_VERSION,
            name,
            base,
            desktop,
            apps,
            vcpus,
            memory_mib,
            disk_gib,
            display: Display { width, height, fps },
            network,
            lifetime: Lifetime { ttl_s, idle_s },
            persistence,
            assumptions: std::mem::take(&mut st.assumptions),
        };
        // The rules above only produce valid specs; a failure here is a composer bug, but it
        // still becomes a question rather than an invalid spec.
        if let Err(e) = spec
            .validate()
            .and_then(|()| self.catalog.check_spec(&spec))
        {
            if let SpecError::NotOnBase { name, base, .. } = &e {
                return Err(self.not_on_base(&spec, name, base, &e));
            }
            return Err(clarify_owned(
                format!("That request gives an invalid environment ({e}). Can you rephrase it?"),
                vec![],
            ));
        }
        Ok(spec)
    }

    /// Why `app` installs nothing on `base`, when no distribution packages it (the catalog's
    /// empty default with a note, e.g. VS Code): the catalog accepts it on every base, so
    /// it is left out here and said so. An app the base's own entry refuses (chromium on
    /// Ubuntu) is not this: that becomes a question offering the bases that have it.
    fn packaged_nowhere(&self, base: &str, app: &str) -> Option<String> {
        let entry = self.catalog.apps.get(app)?;
        let family = &self.catalog.bases.get(base)?.family;
        let own = entry.on.contains_key(base) || entry.on.contains_key(family);
        (!own && entry.packages.is_empty()).then(|| {
            entry
                .note
                .clone()
                .unwrap_or_else(|| "the catalog has no package for it".into())
        })
    }

    /// "chromium on ubuntu": the app (or desktop) is not packaged for the base; offer the
    /// bases that have it, and leaving it out.
    fn not_on_base(&self, spec: &Spec, name: &str, base: &str, e: &SpecError) -> Clarify {
        let mut options: Vec<String> = self
            .buildable_bases()
            .into_iter()
            .filter(|b| {
                let mut other = spec.clone();
                other.base = b.clone();
                self.catalog.check_spec(&other).is_ok()
            })
            .map(|b| format!("{name} on {b}"))
            .collect();
        if spec.apps.iter().any(|a| a == name) {
            let desktop = if spec.desktop == "none" {
                "headless"
            } else {
                spec.desktop.as_str()
            };
            let others: Vec<&str> = spec
                .apps
                .iter()
                .filter(|a| *a != name)
                .map(String::as_str)
                .collect();
            let with = if others.is_empty() {
                String::new()
            } else {
                format!(" with {}", others.join(" and "))
            };
            options.push(format!("{base} {desktop}{with} without {name}"));
        }
        clarify_owned(format!("{e}. Which do you want?"), options)
    }

    fn is_gui(&self, app: &str) -> bool {
        self.catalog.apps.get(app).is_some_and(|e| e.gui)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeKind {
    Memory,
    Disk,
}

/// Everything read so far. `Option<Option<_>>` fields distinguish "not said" from "said: none".
struct State {
    work: Work,
    explain: Vec<String>,
    assumptions: Vec<String>,
    name: Option<String>,
    memory_mib: Option<u32>,
    disk_gib: Option<u32>,
    vcpus: Option<u32>,
    resolution: Option<(u32, u32)>,
    fps: Option<u32>,
    ttl_s: Option<Option<u64>>,
    idle_s: Option<Option<u64>>,
    network: Option<Network>,
    persistence: Option<Persistence>,
    apps: Vec<String>,
    desktops: BTreeSet<String>,
    bases: BTreeSet<String>,
    wants_desktop: bool,
    categories: Vec<(String, &'static [&'static str])>,
    /// Byte offset of the phrase being applied.
    pos: usize,
    /// Offsets of `apps`, parallel to it.
    app_pos: Vec<usize>,
}

impl State {
    fn new(request: &str) -> State {
        State {
            work: Work::new(request),
            explain: Vec::new(),
            assumptions: Vec::new(),
            name: None,
            memory_mib: None,
            disk_gib: None,
            vcpus: None,
            resolution: None,
            fps: None,
            ttl_s: None,
            idle_s: None,
            network: None,
            persistence: None,
            apps: Vec::new(),
            desktops: BTreeSet::new(),
            bases: BTreeSet::new(),
            wants_desktop: false,
            categories: Vec::new(),
            pos: 0,
            app_pos: Vec::new(),
        }
    }

    /// Adds `app`, keeping `apps` in the order the request names them (typo matching runs
    /// after exact matching, so arrival order is not text order).
    fn add_app(&mut self, app: String, phrase: &str) {
        if !self.apps.contains(&app) {
            self.explain.push(format!("app {app} from {phrase:?}"));
            let at = self.app_pos.partition_point(|p| *p <= self.pos);
            self.apps.insert(at, app);
            self.app_pos.insert(at, self.pos);
        }
    }

    fn set_memory(&mut self, mib: f64, phrase: &str) -> Result<(), Clarify> {
        let r = limits::MEMORY_MIB;
        let v = mib.round();
        if v < f64::from(*r.start()) || v > f64::from(*r.end()) {
            return Err(clarify_owned(
                format!(
                    "{phrase} of memory is not possible: an environment has {} to {}. How much memory?",
                    human_mib(*r.start()),
                    human_mib(*r.end())
                ),
                vec!["2 GiB".into(), "4 GiB".into(), "8 GiB".into()],
            ));
        }
        let v = v as u32;
        if let Some(prev) = self.memory_mib.filter(|p| *p != v) {
            return Err(clarify_owned(
                "You gave two memory sizes. Which one?".into(),
                vec![human_mib(prev), human_mib(v)],
            ));
        }
        self.explain
            .push(format!("memory {} from {phrase:?}", human_mib(v)));
        self.memory_mib = Some(v);
        Ok(())
    }

    fn set_disk(&mut self, mib: f64, phrase: &str) -> Result<(), Clarify> {
        let gib = (mib / 1024.0).ceil();
        let r = limits::DISK_GIB;
        if mib <= 0.0 || gib > f64::from(*r.end()) {
            return Err(clarify_owned(
                format!(
                    "A {phrase} disk is not possible: disks are 1 to {} GiB. How big?",
                    r.end()
                ),
                vec!["16 GiB".into(), "50 GiB".into(), "100 GiB".into()],
            ));
        }
        let gib = gib as u32;
        if mib < 1024.0 {
            self.assumptions
                .push(format!("disk rounded up to {gib} GiB"));
        }
        if let Some(prev) = self.disk_gib.filter(|p| *p != gib) {
            return Err(clarify_owned(
                "You gave two disk sizes. Which one?".into(),
                vec![format!("{prev} GiB"), format!("{gib} GiB")],
            ));
        }
        self.explain.push(format!("disk {gib} GiB from {phrase:?}"));
        self.disk_gib = Some(gib);
        Ok(())
    }
}

fn target_name(t: &Target) -> String {
    match t {
        Target::App(a) => a.clone(),
        Target::Desktop(d) => format!("the {d} desktop"),
        Target::Base(b) => b.clone(),
        Target::Family(f) => f.clone(),
        _ => "a known name".into(),
    }
}

fn clarify(question: &str, options: &[&str]) -> Clarify {
    Clarify {
        question: question.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

fn clarify_owned(question: String, options: Vec<String>) -> Clarify {
    Clarify { question, options }
}

/// Asks `question`, one option per value, when the text gave more than one distinct value.
fn ask_if_several<T>(
    distinct: &BTreeSet<T>,
    question: &str,
    option: impl Fn(&T) -> String,
) -> Result<(), Clarify> {
    if distinct.len() > 1 {
        let options = distinct.iter().map(option).collect();
        return Err(clarify_owned(question.into(), options));
    }
    Ok(())
}

/// "4 GiB", "512 MiB", "1.5 GiB".
pub fn human_mib(mib: u32) -> String {
    if mib >= 1024 && mib % 512 == 0 {
        let g = f64::from(mib) / 1024.0;
        if g.fract() == 0.0 {
            format!("{g:.0} GiB")
        } else {
            format!("{g:.1} GiB")
        }
    } else {
        format!("{mib} MiB")
    }
}

/// "2 hours", "30 minutes", "1 day".
pub fn human_duration(secs: u64) -> String {
    let (n, unit) = if secs % 86_400 == 0 {
        (secs / 86_400, "day")
    } else if secs % 3600 == 0 {
        (secs / 3600, "hour")
    } else if secs % 60 == 0 {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn composer() -> Composer {
        Composer::new(Catalog::embedded(), Defaults::default())
    }

    fn spec(text: &str) -> Spec {
        match composer().compose(text).outcome {
            Outcome::Spec(s) => *s,
            Outcome::Clarify(c) => panic!("{text:?} asked {c:?}"),
        }
    }

    fn question(text: &str) -> Clarify {
        match composer().compose(text).outcome {
            Outcome::Clarify(c) => c,
            Outcome::Spec(s) => panic!("{text:?} gave {s:?}"),
        }
    }

    #[test]
    fn gui_app_without_desktop_gets_xfce_and_says_so() {
        let s = spec("firefox");
        assert_eq!(s.desktop, "xfce");
        assert_eq!(s.apps, ["firefox"]);
        assert!(s
            .assumptions
            .iter()
            .any(|a| a.contains("xfce, because firefox")));
    }

    #[test]
    fn units_and_words_are_read() {
        let s = spec("xfce, two cores, 4 gigs of ram and a 50 GB disk, 1080p at 60 fps");
        assert_eq!((s.vcpus, s.memory_mib, s.disk_gib), (2, 4096, 50));
        assert_eq!(
            (s.display.width, s.display.height, s.display.fps),
            (1920, 1080, 60)
        );
        assert_eq!(spec("half a gig of memory, headless").memory_mib, 512);
        assert_eq!(spec("quad-core python box").vcpus, 4);
    }

    #[test]
    fn negation_and_allowlist() {
        assert_eq!(spec("python, no internet").network.mode, NetworkMode::None);
        let s = spec("python with internet only to github.com and pypi.org");
        assert_eq!(s.network.mode, NetworkMode::Allowlist);
        assert_eq!(s.network.allow, ["github.com", "pypi.org"]);
    }

    #[test]
    fn durations_and_persistence() {
        let s = spec("gimp for two hours, keep my files");
        assert_eq!(s.lifetime.ttl_s, Some(7200));
        assert_eq!(s.persistence, Persistence::Persistent);
        assert_eq!(
            spec("headless, stop after 30 minutes idle").lifetime.idle_s,
            Some(1800)
        );
    }

    #[test]
    fn typo_is_fuzzy_matched_and_noted() {
        let s = spec("fierfox please");
        assert_eq!(s.apps, ["firefox"]);
        assert!(s
            .assumptions
            .iter()
            .any(|a| a == "read \"fierfox\" as firefox"));
    }

    #[test]
    fn kiosk_and_headless_rules() {
        assert_eq!(spec("just firefox full screen").desktop, "kiosk");
        assert_eq!(spec("headless server with docker").desktop, "none");
        let q = question("headless with gimp");
        assert!(q.question.contains("gimp needs a graphical desktop"));
    }

    #[test]
    fn unknown_app_gets_a_question() {
        let q = question("xfce with photoshop");
        assert!(q.question.contains("photoshop"), "{q:?}");
    }

    #[test]
    fn impossible_size_gets_a_question() {
        let q = question("firefox with 2 TB of ram");
        assert!(q.question.contains("not possible"), "{q:?}");
    }

    #[test]
    fn every_catalog_family_gets_a_spec_on_its_newest_base() {
        for (text, base) in [
            ("ubuntu desktop with firefox", "ubuntu-24.04"),
            ("ubuntu 22.04 server", "ubuntu-22.04"),
            ("fedora with gnome and firefox", "fedora-40"),
            ("alpine linux headless with git", "alpine-3.20"),
        ] {
            assert_eq!(spec(text).base, base, "{text}");
        }
    }

    #[test]
    fn a_base_without_a_builder_gets_a_question_naming_the_builder() {
        let mut catalog = Catalog::embedded();
        catalog.bases.get_mut("fedora-40").unwrap().builder = "pacman".into();
        let c = Composer::new(catalog, Defaults::default());
        let Outcome::Clarify(q) = c.compose("fedora with firefox").outcome else {
            panic!("expected a question");
        };
        assert!(
            q.question
                .starts_with("fedora-40 cannot be built: genos-image has no pacman builder"),
            "{q:?}"
        );
        assert!(!q.options.contains(&"fedora-40".to_string()), "{q:?}");
    }

    #[test]
    fn an_app_the_base_does_not_package_gets_a_question_with_the_bases_that_do() {
        let q = question("ubuntu with chromium");
        assert!(
            q.question.contains("not available on ubuntu-24.04"),
            "{q:?}"
        );
        assert!(
            q.options.contains(&"chromium on debian-12".to_string()),
            "{q:?}"
        );
        assert!(
            q.options
                .contains(&"ubuntu-24.04 xfce without chromium".to_string()),
            "{q:?}"
        );
    }

    #[test]
    fn an_app_no_base_can_install_is_left_out_and_said_so() {
        let s = spec("xfce with firefox and vscode");

        assert_eq!(s.apps, ["firefox"]);
        let said: Vec<&String> = s
            .assumptions
            .iter()
            .filter(|a| a.starts_with("without vscode, which debian-12 cannot install"))
            .collect();
        assert_eq!(said.len(), 1, "{:?}", s.assumptions);
        assert!(
            said[0].contains("Debian does not package VS Code"),
            "{said:?}"
        );
    }

    #[test]
    fn an_app_another_base_has_is_still_a_question() {
        let q = question("ubuntu xfce with firefox and chromium");

        assert!(q.question.contains("chromium"), "{q:?}");
        assert!(
            q.options.iter().any(|o| o.contains("chromium on ")),
            "{q:?}"
        );
    }

    #[test]
    fn every_option_of_the_not_on_base_question_composes_to_a_spec() {
        for request in [
            "ubuntu with chromium",
            "ubuntu with git and chromium, headless",
        ] {
            let q = question(request);
            for option in &q.options {
                let s = spec(option);
                assert!(
                    s.base != "ubuntu-24.04" || !s.apps.contains(&"chromium".to_string()),
                    "{option}: {s:?}"
                );
            }
        }
    }

    #[test]
    fn toolchains_listed_together_are_all_installed() {
        assert_eq!(spec("rust and go").apps, ["rust", "go"]);
        assert_eq!(
            spec("python, node and java").apps,
            ["python", "nodejs", "java"]
        );
        assert_eq!(
            spec("a box with rust, go and gcc").apps,
            ["rust", "go", "gcc"]
        );
        assert_eq!(spec("go and python").apps, ["go", "python"]);
    }

    #[test]
    fn go_as_a_verb_is_not_the_toolchain() {
        assert_eq!(
            spec("firefox, and it should go away after 1 hour").apps,
            ["firefox"]
        );
    }

    #[test]
    fn negative_quantities_get_a_question_not_a_default() {
        for (text, options) in [
            ("firefox with -4 GB of ram", ["2 GiB", "4 GiB", "8 GiB"]),
            (
                "python with minus 2 cores",
                ["2 vCPUs", "4 vCPUs", "8 vCPUs"],
            ),
            (
                "git with -10 gb disk",
                ["16 GiB disk", "32 GiB disk", "64 GiB disk"],
            ),
            (
                "git for negative 3 hours",
                ["1 hour", "8 hours", "no time limit"],
            ),
        ] {
            let q = question(text);
            assert!(q.question.contains("cannot be negative"), "{text}: {q:?}");
            assert_eq!(q.options, options, "{text}");
        }
    }

    #[test]
    fn a_couple_of_cores_is_two_and_a_few_gigs_is_a_question() {
        assert_eq!(spec("gimp with a couple of cores").vcpus, 2);
        let q = question("python with a few gigs");
        assert_eq!(q.question, "How much memory do you mean by \"a few gigs\"?");
        let q = question("git with several cores");
        assert_eq!(q.options, ["2 vCPUs", "4 vCPUs", "8 vCPUs"]);
    }

    #[test]
    fn apps_keep_the_order_of_the_request_even_when_misspelled() {
        assert_eq!(
            spec("inkscpe, gimp and vlc").apps,
            ["inkscape", "gimp", "vlc"]
        );
    }

    #[test]
    fn desktop_provided_apps_are_not_repeated() {
        let s = spec("xfce with a terminal and firefox");
        assert_eq!(s.apps, ["firefox"]);
    }

    #[test]
    fn compose_is_deterministic() {
        let c = composer();
        let a = c.compose("kde, blender, 16gb, 8 cores, 100gb disk, for a day");
        let b = c.compose("kde, blender, 16gb, 8 cores, 100gb disk, for a day");
        assert_eq!(a, b);
    }

    #[test]
    fn arbitrary_text_never_panics_and_specs_are_valid() {
        // Deterministic pseudo-random requests built from pieces that stress the rules:
        // multi-byte characters next to units, hosts, numbers and catalog words.
        let pieces = [
            "é",
            "ü ",
            "4",
            "gb",
            " ",
            "ram",
            "ßß",
            "firefox",
            ",",
            ".",
            "*.",
            "github.com",
            "for",
            "2",
            "hours",
            "idle",
            "no",
            "internet",
            "kiosk",
            "x",
            "1080",
            "p",
            "ñandú",
            "日本語",
            "—",
            "'",
            "half",
            "a",
            "gig",
            "headless",
            "gimp",
            "3d",
            "only",
            "keep my files",
            "🦀",
            "0",
            "99999999999",
        ];
        let c = composer();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1000 {
            let mut s = String::new();
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push_str(pieces[(seed % pieces.len() as u64) as usize]);
                if seed % 3 == 0 {
                    s.push(' ');
                }
            }
            seed = seed.wrapping_add(1);
            if let Outcome::Spec(spec) = c.compose(&s).outcome {
                spec.validate().unwrap_or_else(|e| panic!("{s:?}: {e}"));
                c.catalog()
                    .check_spec(&spec)
                    .unwrap_or_else(|e| panic!("{s:?}: {e}"));
            }
        }
    }

    #[test]
    fn empty_request_gets_a_question() {
        let q = question("   ");
        assert!(!q.options.is_empty());
    }
}
