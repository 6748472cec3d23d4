//! `genos-vmm` command-line front end.

fn main() {
    eprintln!("genos-vmm: not yet wired");
    std::process::exit(2);
}
