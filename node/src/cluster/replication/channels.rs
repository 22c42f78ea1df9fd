//! gRPC channels to other nodes' internal ports, one per address, shared by the
//! gateway and the replicators.

use std::collections::HashMap;

use parking_lot::Mutex;
use shoal_proto::replica::replica_client::ReplicaClient;
use tonic::transport::Channel;
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
                let c = shoal_proto::channel(addr, None)
                    .map_err(|e| Status::internal(format!("bad node address {addr:?}: {e}")))?;
                ch.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(ReplicaClient::new(c)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }
}
