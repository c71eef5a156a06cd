//! Generates the messages, clients and service traits of
//! `proto/vmprovisioner/v1/vmprovisioner.proto` (the hosts' contract) and
//! `proto/gateway/v1/gateway.proto` (the gateway's admin contract) with a
//! vendored protoc, so building needs nothing installed.

fn main() {
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let protos = [proto_root.join("vmprovisioner/v1/vmprovisioner.proto"), proto_root.join("gateway/v1/gateway.proto")];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let protoc = match protoc_bin_vendored::protoc_bin_path() {
        Ok(path) => path,
        Err(error) => panic!("no vendored protoc for this platform: {error}"),
    };
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    if let Err(error) = connectrpc_build::Config::new().files(&protos).includes(&[&proto_root]).include_file("_connectrpc.rs").compile() {
        panic!("cannot generate code from {}: {error}", proto_root.display());
    }
}
