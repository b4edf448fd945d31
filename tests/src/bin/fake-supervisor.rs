//! A small fake reDB supervisor, as a process of its own: serves `SupervisorService` on the
//! address given as its only argument and prints one line per call it hears, for the test
//! that started it to read:
//!
//! - `register <service_id> <node_id> <name> <grpc_address>`
//! - `heartbeat <service_id> <status> <component>=<status>,… <metric keys,…>`
//! - `unregister <service_id>`
//!
//! `tests/tests/supervisor.rs` starts it, after the node, to check the exchange.

use std::{
    io::Write,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use meshd_proto::supervisor::{
    RegisterServiceRequest, RegisterServiceResponse, SendHeartbeatRequest, SendHeartbeatResponse,
    UnregisterServiceRequest, UnregisterServiceResponse,
    supervisor_service_server::{SupervisorService, SupervisorServiceServer},
};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct FakeSupervisor {
    registrations: AtomicU64,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A field printed as one word (the lines are split on spaces).
fn word(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.replace(char::is_whitespace, "_")
    }
}

#[tonic::async_trait]
impl SupervisorService for FakeSupervisor {
    async fn register_service(
        &self,
        request: Request<RegisterServiceRequest>,
    ) -> Result<Response<RegisterServiceResponse>, Status> {
        let service = request
            .into_inner()
            .service
            .ok_or_else(|| Status::invalid_argument("no service info"))?;
        let id = format!(
            "mesh-{}",
            self.registrations.fetch_add(1, Ordering::Relaxed) + 1
        );
        say(&format!(
            "register {id} {} {} {}",
            service.node_id,
            word(&service.name),
            word(&service.grpc_address)
        ));
        Ok(Response::new(RegisterServiceResponse {
            success: true,
            service_id: id,
            message: String::new(),
        }))
    }

    async fn send_heartbeat(
        &self,
        request: Request<SendHeartbeatRequest>,
    ) -> Result<Response<SendHeartbeatResponse>, Status> {
        let beat = request.into_inner();
        let components: Vec<String> = beat
            .components
            .iter()
            .map(|c| format!("{}={}", word(&c.name), c.status))
            .collect();
        let mut metrics: Vec<&str> = beat.metrics.keys().map(String::as_str).collect();
        metrics.sort_unstable();
        say(&format!(
            "heartbeat {} {} {} {}",
            word(&beat.service_id),
            beat.status,
            word(&components.join(",")),
            word(&metrics.join(","))
        ));
        Ok(Response::new(SendHeartbeatResponse { acknowledged: true }))
    }

    async fn unregister_service(
        &self,
        request: Request<UnregisterServiceRequest>,
    ) -> Result<Response<UnregisterServiceResponse>, Status> {
        say(&format!(
            "unregister {}",
            word(&request.into_inner().service_id)
        ));
        Ok(Response::new(UnregisterServiceResponse { success: true }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let address: SocketAddr = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: fake-supervisor IP:PORT"))?
        .parse()?;
    tonic::transport::Server::builder()
        .add_service(SupervisorServiceServer::new(FakeSupervisor::default()))
        .serve(address)
        .await?;
    Ok(())
}
