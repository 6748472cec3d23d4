//! `genos-jailer`: see the crate documentation of `jailer`.

use jailer::cgroup::Mounts;
use jailer::{cli, plan, run};

fn main() {
    let opts = match cli::parse(std::env::args()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("genos-jailer: {e}");
            std::process::exit(2);
        }
    };
    let plan = match Mounts::of_this_host()
        .map_err(plan::PlanError::from)
        .and_then(|mounts| plan::plan(&opts, &mounts))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("genos-jailer: {e}");
            std::process::exit(2);
        }
    };
    match run::run(&opts, &plan) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("genos-jailer: {e}");
            std::process::exit(run::EXIT_SETUP_FAILED);
        }
    }
}
