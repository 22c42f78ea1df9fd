//! gRPC channels to other nodes' internal ports, one per address, shared by the
//! gateway and the replicators.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use shoal_proto::replica::replica_client::ReplicaClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// gRPC channels to other nodes' internal ports, shared by the gateway and replicators.
#[derive(Default)]
pub struct Channels(Mutex<HashMap<String, Channel>>);

impl Channels {
    pub fn client(&self, addr: &str) -> Result<ReplicaClient<Channel>, Status> {
        let mut ch = self.0.lock();
        let c = match ch.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| Status::internal(format!("bad node address {addr:?}: {e}")))?
                    .connect_timeout(Duration::from_millis(500))
                    .tcp_nodelay(true)
                    .connect_lazy();
                ch.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(ReplicaClient::new(c)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }
}
