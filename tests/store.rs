//! The store layer's conformance suite on the local and in-memory backends (tests/s3.rs runs
//! the same suite against a real S3 server).

mod common;

use bkp::Store;

#[test]
fn the_in_memory_store_conforms() {
    common::store_conformance(&Store::memory());
}

#[test]
fn the_local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("repo").to_str().unwrap()).unwrap();
    common::store_conformance(&store);
}
