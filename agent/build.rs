//! Generates the protobuf messages and ttrpc bindings from proto/*.proto (pure Rust,
//! no protoc).

fn main() {
    let protos = ["proto/agent.proto", "proto/health.proto", "proto/oci.proto", "proto/storage.proto", "proto/types.proto"];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .inputs(protos)
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize { async_all: false, gen_mod: false, ..Default::default() })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false).lite_runtime(true))
        .run()
        .expect("generating the agent protocol from proto/*.proto failed");

    // The generated files are `include!`d into modules of src/proto.rs, where inner
    // attributes and inner doc comments are not allowed: drop them (proto.rs carries
    // the lint allowances instead).
    for name in ["agent", "agent_ttrpc", "health", "health_ttrpc", "oci", "storage", "storage_ttrpc", "types"] {
        let path = std::path::Path::new(&out_dir).join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&path).expect("generated file is readable");
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !line.starts_with("#![") && !line.starts_with("//!")
            })
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("generated file is writable");
    }
}
