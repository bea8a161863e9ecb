//! The registry the mirror tests pull from: Debian's `docker-registry` with images pushed by
//! `skopeo`, its access log read back, and the proxy that tampers with one blob.

mod common;

use common::registry::{
    build_image, mirror_registries_conf, read_layout, sha256_digest, skopeo_pull, Registry,
    TamperProxy,
};
use common::{http, wait_until};
use std::time::Duration;

#[test]
fn pushed_image_pulls_back_whole_and_the_access_log_counts_each_blob() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let image = build_image(&layout, &[300 << 10, 1 << 20, 2 << 20], 1);
    assert!(
        image.layers[2].size > 2 << 20,
        "random layers do not compress"
    );
    registry.push(&layout, "team/app/api", "v1");
    let tag = registry.manifest_digest("team/app/api", "v1");
    assert_eq!(tag.as_deref(), Some(image.manifest.digest.as_str()));

    // Through a proxy that changes nothing, set up as a skopeo mirror.
    let proxy = TamperProxy::start(registry.addr, "");
    let conf = mirror_registries_conf(dir.path(), &registry.host(), proxy.addr);
    let out = dir.path().join("pulled");
    let pulled = skopeo_pull(&conf, &format!("{}/team/app/api:v1", registry.host()), &out);
    assert!(
        pulled.status.success(),
        "{pulled:?}\n{}",
        registry.log_text()
    );
    assert_eq!(read_layout(&out), image);
    assert!(
        proxy.forwarded() > image.blobs().len() as u64,
        "skopeo used the mirror"
    );
    assert_eq!(proxy.tampered(), 0);
    // The registry logs a request just after answering it.
    let logged = wait_until(Duration::from_secs(10), || {
        image
            .blobs()
            .iter()
            .all(|b| registry.blob_served(&b.digest).gets > 0)
    });
    assert!(logged, "{:?}", registry.accesses());
    for blob in image.blobs() {
        let served = registry.blob_served(&blob.digest);
        assert_eq!(
            (served.gets, served.bytes),
            (1, blob.size),
            "{}",
            blob.digest
        );
    }
    assert!(registry.manifest_served("v1").gets >= 1);
    assert_eq!(registry.manifest_digest("team/app/api", "v2"), None);
}

#[test]
fn a_pushed_tag_moves_to_the_new_image() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let first = build_image(&dir.path().join("a"), &[64 << 10], 1);
    let second = build_image(&dir.path().join("b"), &[64 << 10], 2);
    assert_ne!(first.layers, second.layers);
    registry.push(&dir.path().join("a"), "app", "latest");
    registry.push(&dir.path().join("b"), "app", "latest");
    let tag = registry.manifest_digest("app", "latest");
    assert_eq!(tag.as_deref(), Some(second.manifest.digest.as_str()));
}

#[test]
fn the_tampering_proxy_flips_only_the_target_blob_ranges_included() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(dir.path(), &[256 << 10, 256 << 10], 3);
    registry.push(dir.path(), "app", "v1");
    let target = &image.layers[0];
    let proxy = TamperProxy::start(registry.addr, &target.digest);

    let bad = http(
        proxy.addr,
        "GET",
        &format!("/v2/app/blobs/{}", target.digest),
        &[],
    );
    assert_eq!((bad.status, bad.body.len() as u64), (200, target.size));
    assert_ne!(sha256_digest(&bad.body), target.digest);
    let range = [("Range", "bytes=0-99")];
    let path = format!("/v2/app/blobs/{}", target.digest);
    let direct = http(registry.addr, "GET", &path, &range);
    let proxied = http(proxy.addr, "GET", &path, &range);
    assert_eq!((direct.status, proxied.status), (206, 206));
    assert_eq!(direct.body[..99], proxied.body[..99]);
    assert_ne!(direct.body[99], proxied.body[99]);
    assert_eq!(proxy.tampered(), 2);

    let other = &image.layers[1];
    let good = http(
        proxy.addr,
        "GET",
        &format!("/v2/app/blobs/{}", other.digest),
        &[],
    );
    assert_eq!(sha256_digest(&good.body), other.digest);
    proxy.retarget("");
    let now = http(
        proxy.addr,
        "GET",
        &format!("/v2/app/blobs/{}", target.digest),
        &[],
    );
    assert_eq!(sha256_digest(&now.body), target.digest);
    assert_eq!(proxy.tampered(), 2);
}
