//! Bake the prebuilt libduckdb's folder into this crate's test binaries'
//! rpath (its unit tests and its integration tests), as runner/build.rs
//! does for `idem`, so they run without LD_LIBRARY_PATH. With `--features
//! bundled` there is no shared library.
fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_BUNDLED").is_some() {
        return;
    }
    if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
