// `sqlx::migrate!` embeds the files of `migrations/` at compile time; without this, adding a
// migration does not rebuild the crate and the binary runs the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
