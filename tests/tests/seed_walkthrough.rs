//! The seed's walkthrough as a test: every promise must hold, on the IPAM path alone and, as
//! root, with real macvlan interfaces in network namespaces.

use tether_e2e::{netns, walkthrough};

fn assert_all_held(real: bool) {
    let rows = walkthrough::run(real, &mut |_| {}).expect("walkthrough runs");
    let broken: Vec<String> = rows
        .iter()
        .filter(|r| !r.held)
        .map(|r| format!("{} ({}): {}", r.step, r.pod, r.promise))
        .collect();
    assert!(broken.is_empty(), "promises broken: {broken:#?}");
    assert!(rows.len() >= 11, "the walkthrough has all its steps");
}

#[test]
fn seed_walkthrough_ipam_path() {
    assert_all_held(false);
}

#[test]
fn seed_walkthrough_real_macvlan() {
    if !netns::require_real_setup("seed_walkthrough_real_macvlan") {
        return;
    }
    let rows = walkthrough::run(true, &mut |_| {}).expect("walkthrough runs");
    assert!(
        rows.iter().any(|r| r.step.contains("pings") && r.held),
        "the VM pinged the other pod"
    );
    assert!(rows.iter().all(|r| r.held), "{rows:#?}");
}
