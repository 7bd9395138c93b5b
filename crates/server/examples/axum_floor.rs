//! The floor under clinflow's `GET /sites/{id}`: axum (the same version and
//! features) answering a fixed body from a `{id}` route, with no layers, no
//! authentication and no lookup. `bench/sites-read.sh` runs it beside the
//! peers to show how much of the gap to bare hyper is the framework's.
//!
//!   cargo run --release -p clinflow-server --example axum_floor -- 127.0.0.1:18082

use axum::extract::Path;
use axum::routing::get;
use axum::Router;

async fn site(Path(_id): Path<String>) -> ([(&'static str, &'static str); 1], &'static str) {
    (
        [("content-type", "application/json")],
        r#"{"id":"site-042","name":"General Hospital 42","country":"USA"}"#,
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18082".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = Router::new().route("/sites/{id}", get(site));
    axum::serve(listener, app).await
}
