//! Rebuild when a migration is added (`embed_migrations!` reads the directory at compile time).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
