//! Scraping `apiserver_request_total`.

use cnimig_kube::metrics;

#[tokio::test]
async fn scrape_request_totals() {
    let env = crate::env_or_skip!();
    let text = metrics::scrape(&env.admin).await.unwrap();
    let samples = metrics::request_totals(&text);
    assert!(!samples.is_empty(), "apiserver_request_total has samples");
    let by = metrics::by_verb_resource(&samples);
    assert!(
        by.keys()
            .any(|k| k.starts_with("GET ") || k.starts_with("LIST ")),
        "{by:?}"
    );
}
