//! Word lists and patterns the composer's rules are made of. Kept apart from the rules so
//! they can be read (and extended) as data.

use std::sync::LazyLock;

use regex::Regex;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("composer pattern compiles (checked by tests)")
}

/// "4 GB", "8gigs", "512 mb", "1 TB", "0.5 gig".
pub static SIZE: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(\d+(?:\.\d+)?)\s*(tb|tib|terabytes?|gigabytes?|gigs?|gb|gib|g|megabytes?|megs?|mb|mib)\b")
});

/// "4 cores", "2 vcpus", "8-core", "6 threads".
pub static CPU_COUNT_FIRST: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(\d+)\s*-?\s*(?:v-?cpus?|cpus?|cores?|vcores?|processors?|procs?|threads?)\b")
});
/// "cpus: 4", "cores 8".
pub static CPU_COUNT_AFTER: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b(?:v?cpus?|cores?|processors?)\s*[:=]?\s*(\d+)\b"));
/// "dual-core", "quad core", "single core".
pub static CPU_WORD: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b(single|dual|quad|hexa|octa)[- ]?(?:core|cpu)\b"));

/// "1920x1080", "2560 x 1440".
pub static RESOLUTION: LazyLock<Regex> = LazyLock::new(|| re(r"\b(\d{2,6})\s*[x×]\s*(\d{2,6})\b"));
/// "1080p", "4k", "full hd", "qhd".
pub static RESOLUTION_NAME: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(480p|720p|1080p|1440p|2160p|4k|uhd|ultra hd|full ?hd|fhd|qhd|2k|hd ready|hd)\b")
});
/// "30 fps", "60hz", "60 frames per second".
pub static FPS: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(\d+)\s*(?:fps|hz|frames? (?:per|a) second|frames? per sec)\b|\bfps\s*[:=]?\s*(\d+)\b")
});

/// "2 hours", "30 minutes", "90min", "2h", "3 days".
pub static DURATION: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(\d+(?:\.\d+)?)\s*(seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|weeks?|wks?|months?)\b|\b(\d+(?:\.\d+)?)(h|m|d|s|w)\b")
});
/// No time limit at all.
pub static FOREVER: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(forever|indefinitely|no time limit|no timeout|no expiry|no expiration|never expires?|always on|24 7|long-running|long running|until i delete it)\b")
});

/// Words near a duration that make it an idle timeout.
pub const IDLE_WORDS: &[&str] =
    &["idle", "inactive", "inactivity", "unused", "untouched", "idling", "nobody", "inactivity", "afk"];

/// Network switched off.
pub static NET_NONE: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(?:(?:no|without|zero|disable|disabled|block|blocked|cut off from|never touch)(?: any)?(?: other)?(?: the)? (?:internet|network|networking|net|web|connectivity|outbound|online access|external access)(?: access| connection| connectivity)?|(?:don't|do not|doesn't|does not|won't|will not) need(?: any)?(?: the)? (?:internet|network|net)(?: access)?|no need for (?:the )?(?:internet|network)|offline|off-line|air-?gapped|airgap|disconnected|isolated|internet off|network off|not connected)\b")
});
/// Network explicitly wanted.
pub static NET_FULL: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(?:(?:full|normal|unrestricted|open|regular)(?: internet| network)(?: access)?|(?:with|needs?|has|have|wants?)(?: full)?(?: the)? (?:internet|network|networking|net)(?: access)?|internet access|network access|online|internet)\b")
});
/// Words that, near a host name, say the network is limited to it.
pub const ALLOW_WORDS: &[&str] = &[
    "only", "just", "except", "but", "allow", "allowed", "allowing", "allowlist", "whitelist",
    "whitelisted", "restricted", "restrict", "limited", "limit", "to", "reach", "access",
];
/// A host name: at least one dot and a letters-only top-level label.
pub static HOST: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?:\*\.)?\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b"));
/// Sites users name without their domain, accepted only in an allowlist phrase.
pub const BARE_SITES: &[(&str, &str)] = &[
    ("github", "github.com"),
    ("gitlab", "gitlab.com"),
    ("pypi", "pypi.org"),
    ("wikipedia", "wikipedia.org"),
    ("stackoverflow", "stackoverflow.com"),
    ("youtube", "youtube.com"),
    ("google", "google.com"),
];

/// Files thrown away on stop.
pub static EPHEMERAL: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(ephemeral|throwaway|throw-away|throw away|disposable|temporary|scratch|wipe it|wiped|don't keep|do not keep|no need to keep|don't need to keep|don't save|do not save|not persistent|non-persistent|nonpersistent|no persistence|fresh every time|clean slate|discard(?:ed)?|burner)\b")
});
/// Files kept across stops.
pub static PERSISTENT: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(persistent|persist|persists|persistence|keep (?:all )?(?:my |the |our |her |his |their )?(?:files|data|work|stuff|changes|documents|home|projects?|state|home directory|bookmarks|settings|mail|notebooks|drawings|photos|downloads)|save (?:my |the |our |her |his |their )?(?:files|work|data|changes|state|stuff|progress|notebooks|drawings)|(?:files|data|work|changes|stuff) (?:should |must |to |will |need to )?(?:persist|survive|stick around|be kept|be saved|stay)|(?:don't|do not|never) lose (?:my |any )?(?:files|work|data|stuff|changes)|keep (?:it|everything) between sessions|remember my (?:files|stuff|work)|keeps? my files)\b")
});

/// "call it dev-box", "named scratchpad".
pub static NAME: LazyLock<Regex> = LazyLock::new(|| {
    re(r"\b(?:call it|called|name it|named|name)\s*[:=]?\s*'?([a-z0-9][a-z0-9-]{0,62})\b")
});

/// Phrases asking for no desktop, beyond the catalog's own synonyms for "none".
pub const NO_DESKTOP_PHRASES: &[&str] = &[
    "no desktop", "without a desktop", "without desktop", "without any desktop", "no gui", "without a gui",
    "without gui", "no graphics", "no display", "text only", "command line only", "cli only", "terminal-only",
    "ssh only", "just a shell", "shell only", "just a terminal", "only a terminal", "only terminal",
    "no graphical", "non-graphical", "nongraphical", "no ui", "headless server", "text mode",
];
/// Phrases asking for some graphical desktop without naming one.
pub const GENERIC_DESKTOP_PHRASES: &[&str] = &[
    "desktop", "a desktop", "gui", "graphical", "graphical desktop", "desktop environment", "linux desktop",
    "a gui", "windowed", "with a screen", "desktop session",
];
/// Words naming a kind of app with more than one catalog entry: the composer asks which.
pub const CATEGORIES: &[(&str, &[&str])] = &[
    ("browser", &["firefox", "chromium"]),
    ("web browser", &["firefox", "chromium"]),
    ("a browser", &["firefox", "chromium"]),
    ("ide", &["vscode", "emacs", "vim"]),
    ("code editor", &["vscode", "vim", "emacs", "gedit"]),
    ("editor", &["vscode", "vim", "emacs", "gedit"]),
];
/// Operating systems the catalog does not have at all.
pub const OTHER_SYSTEMS: &[&str] = &[
    "arch", "arch linux", "archlinux", "centos", "rhel", "red hat", "redhat", "opensuse", "suse", "mint",
    "linux mint", "manjaro", "gentoo", "nixos", "windows", "windows 10", "windows 11", "macos", "mac os",
    "osx", "freebsd", "kali", "rocky", "rocky linux", "almalinux", "void linux", "slackware",
];

/// Words that say nothing the composer acts on. A leftover word not in this list, in a
/// place where an app name would go, is reported as an unknown app instead of ignored.
pub const FILLER: &[&str] = &[
    "a", "an", "the", "and", "or", "with", "without", "for", "of", "to", "in", "on", "at", "by", "from", "into",
    "i", "i'd", "i'm", "im", "me", "my", "mine", "we", "we'd", "our", "us", "you", "your", "it", "its", "it's",
    "this", "that", "these", "those", "there", "here", "some", "any", "all", "every", "each", "other", "another",
    "please", "pls", "plz", "thanks", "thank", "thx", "hi", "hello", "hey", "ok", "okay", "yes", "no", "not",
    "need", "needs", "needed", "want", "wants", "wanted", "would", "like", "could", "can", "can't", "cannot",
    "should", "will", "shall", "may", "might", "must", "let", "let's", "lets", "do", "does", "don't", "doesn't",
    "have", "has", "having", "had", "be", "is", "are", "was", "were", "been", "being", "am", "get", "got",
    "give", "gimme", "make", "made", "set", "setup", "up", "spin", "spun", "fire", "start", "started",
    "launch", "boot", "create", "build", "bring", "provision", "prepare", "open", "run", "runs", "running",
    "use", "using", "used", "install", "installed", "including", "include", "includes", "also", "plus",
    "too", "as", "well", "just", "only", "simple", "simply", "basic", "small", "tiny", "little", "big",
    "large", "huge", "beefy", "fast", "quick", "quickly", "new", "fresh", "clean", "nice", "good", "decent",
    "enough", "lots", "lot", "plenty", "more", "less", "much", "many", "few", "couple", "least", "most",
    "max", "maximum", "min", "minimum", "about", "around", "roughly", "approximately", "approx", "like",
    "machine", "vm", "vms", "virtual", "box", "environment", "env", "workspace", "workstation", "computer",
    "pc", "instance", "sandbox", "system", "setup", "session", "space", "place", "thing", "something",
    "one", "linux", "os", "distro", "distribution", "based", "image", "container", "microvm", "host",
    "ram", "memory", "mem", "disk", "storage", "ssd", "hdd", "drive", "hard", "root", "volume", "cpu",
    "cpus", "core", "cores", "vcpu", "vcpus", "processor", "processors", "threads", "screen", "display",
    "resolution", "monitor", "res", "fps", "framerate", "frame", "rate", "refresh", "at", "internet",
    "network", "access", "connection", "web", "net", "hours", "hour", "minutes", "minute", "days", "day",
    "week", "weeks", "time", "long", "after", "before", "then", "until", "till", "than", "when", "while",
    "if", "so", "because", "since", "but", "though", "also", "which", "what", "where", "who", "how", "why",
    "work", "working", "job", "jobs", "task", "tasks", "project", "projects", "stuff", "things", "files",
    "file", "data", "code", "coding", "program", "programming", "develop", "development", "dev", "developer",
    "write", "writing", "edit", "editing", "browse", "browsing", "surf", "surfing", "watch", "watching",
    "play", "playing", "test", "testing", "try", "trying", "check", "checking", "learn", "learning", "teach",
    "class", "student", "students", "kid", "kids", "demo", "presentation", "meeting", "research", "school",
    "homework", "personal", "private", "secure", "safe", "safely", "isolated", "locked", "down", "lock",
    "full", "screen", "mode", "only", "app", "apps", "application", "applications", "program", "programs",
    "tool", "tools", "software", "package", "packages", "stack", "version", "latest", "newest", "recent",
    "current", "stable", "lts", "default", "defaults", "standard", "usual", "normal", "regular", "whatever",
    "else", "everything", "nothing", "anything", "option", "options", "config", "configured", "ready",
    "able", "go", "gonna", "wanna", "gotta", "going", "see", "look", "looks", "keep", "kept", "stay",
    "stays", "last", "lasts", "shut", "shutdown", "stop", "stopped", "kill", "killed", "delete", "deleted",
    "destroy", "destroyed", "remove", "removed", "expire", "expires", "die", "dies", "off", "out", "over",
    "within", "inside", "across", "between", "per", "each", "every", "no", "nope", "limit", "limited",
    "reach", "allow", "allowed", "except", "besides", "beyond", "second", "seconds", "s", "total", "gigs",
    "gb", "per", "way", "quite", "really", "very", "pretty", "super", "extra", "bit", "kinda", "sort",
    "kind", "type", "sure", "maybe", "probably", "actually", "basically", "literally", "right", "now",
    "today", "tonight", "tomorrow", "morning", "afternoon", "evening", "asap", "soon", "later", "again",
    "team", "colleague", "friend", "user", "users", "someone", "client", "customer", "mum", "mom", "dad",
    "grandma", "video", "videos", "photo", "photos", "picture", "pictures", "music", "audio", "podcast",
    "document", "documents", "docs", "email", "emails", "mail", "slides", "spreadsheet", "notes",
    "web", "website", "websites", "site", "sites", "page", "pages", "app's", "plain", "minimal", "light",
    "lightweight", "heavy", "powerful", "strong", "cheap", "spare", "throw", "away", "handy", "useful",
    "called", "name", "named", "label", "browse", "shopping", "banking", "reading", "news", "social",
    "media", "gaming", "game", "games", "render", "rendering", "model", "modelling", "modeling",
    "design", "designing", "draw", "drawing", "paint", "painting", "art", "record", "recording", "mix",
    "mixing", "compose", "compile", "compiling", "debug", "debugging", "script", "scripts", "scripting",
    "data", "science", "analysis", "analytics", "ml", "machine", "learning", "notebook", "server's",
    "quickie", "real", "actual", "own", "separate", "dedicated", "single", "multiple", "few", "x",
    "i'll", "we'll", "you'll", "ill", "then", "first", "second", "around", "ish", "or", "so", "too",
    "btw", "also", "fyi", "asap", "cool", "great", "awesome", "fine", "hmm", "um", "uh", "yeah", "yep",
    "put", "throw", "add", "added", "stick", "load", "loaded", "preloaded", "pre-installed", "preinstalled",
    "come", "comes", "coming", "with", "having", "has", "both", "either", "neither", "nor", "via",
    "through", "thru", "against", "along", "alongside", "together", "same", "different", "otherwise",
    "exactly", "precisely", "at", "least", "most", "upto", "up", "down", "under", "above", "below",
    "worth", "size", "sized", "huge", "giant", "massive", "medium", "mid", "high", "low", "higher",
    "lower", "resolution", "hidpi", "retina", "wide", "widescreen", "ultrawide", "hz", "smooth",
    "connected", "connect", "connectivity", "outbound", "inbound", "traffic", "firewall", "firewalled",
    "sites", "domains", "domain", "hosts", "urls", "url", "list", "nothing", "else", "everything",
    "whole", "entire", "rest", "am", "pm", "o'clock", "am", "hrs", "mins", "preferably", "ideally",
    "perhaps", "possibly", "fine", "okay", "alright", "idle", "timeout", "inactivity", "inactive",
];

/// Catalog names too common in plain English to be matched on their own; their synonyms
/// ("golang") still match.
pub const NOT_ALONE: &[&str] = &["go", "none"];

/// Words asking for every app there is: the composer asks which ones instead.
pub const EVERYTHING: &[&str] = &["everything", "anything", "all"];

/// Words after which the next word is expected to be an app name.
pub const APP_SLOT: &[&str] = &[
    "with", "and", ",", "plus", "install", "installed", "need", "needs", "want", "run", "running", "use",
    "using", "also", "including", "include", "includes", "add", "have", "having", "preinstalled",
];
