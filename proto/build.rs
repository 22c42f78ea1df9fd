//! Compiles the protos with protox (pure Rust, no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/shoal/coordinator.proto",
        "proto/shoal/raft.proto",
        "proto/shoal/node.proto",
        "proto/shoal/replica.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // The encoded descriptors, for the gRPC reflection service.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("shoal_descriptor.bin"), &encoded)?;
    // serde in proto3's JSON mapping for the public API's messages and the coordinators'
    // (the HTTP/JSON API and its admin routes, issue 23); the node-to-node and Raft
    // ones travel as protobuf only.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .build(&[".shoal.v1", ".shoal.coordinator.v1"])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        // An operation (with a re-embed's models, issue 21) is the largest change a
        // map event carries: boxed, so every other change stays small.
        .boxed(".shoal.coordinator.v1.MapChange.change.operation_put")
        .compile_fds(fds)?;
    Ok(())
}
