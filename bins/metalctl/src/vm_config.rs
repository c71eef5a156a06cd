//! The VmConfig `create` sends: a `--config` file in proto JSON (field
//! names in lowerCamelCase or as in the .proto), with the flags laid over
//! it. A field the API does not have is refused, naming its path, rather
//! than silently dropped: a typo must not create a VM unlike the one asked
//! for. What neither gives takes metalctl's defaults (1 vCPU, 128 MiB);
//! a kernel it cannot guess, so one missing is said before any call.
//! Whether the result is a VM the host accepts is the host's call.

use std::io::Read;
use std::path::Path;

use metald_api::proto::vmprovisioner::v1::{NetworkInterface, RestartPolicy, VmConfig};
use serde_json::Value;

use crate::cli::CreateArgs;
use crate::exit::CliError;
use crate::parse::storage_from_disks;

/// The configuration `args` describe: the file's, then the flags.
pub fn build(args: &CreateArgs) -> Result<VmConfig, CliError> {
    let mut config = match &args.config {
        Some(path) => read_config_file(path)?,
        None => VmConfig::default(),
    };
    apply_flags(&mut config, args)?;
    apply_defaults(&mut config)?;
    Ok(config)
}

pub const DEFAULT_VCPUS: i32 = 1;
pub const DEFAULT_MEMORY_BYTES: i64 = 128 << 20;

fn apply_defaults(config: &mut VmConfig) -> Result<(), CliError> {
    let cpu = config.cpu.get_or_insert_default();
    if cpu.vcpu_count == 0 {
        cpu.vcpu_count = DEFAULT_VCPUS;
    }
    let memory = config.memory.get_or_insert_default();
    if memory.size_bytes == 0 {
        memory.size_bytes = DEFAULT_MEMORY_BYTES;
    }
    if config.boot.as_option().is_none_or(|boot| boot.kernel_path.is_empty()) {
        return Err(CliError::Usage(
            "a kernel is needed: --kernel PATH (in the host's image root), or boot.kernelPath in the --config file".to_owned(),
        ));
    }
    Ok(())
}

fn read_config_file(path: &Path) -> Result<VmConfig, CliError> {
    let shown = path.display().to_string();
    let read = |source| CliError::Io { what: format!("cannot read --config {shown}"), source };
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(read)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CliError::Usage(format!("--config {shown}: no such file")),
            _ => read(source),
        })?
    };
    parse_config(&text).map_err(|problem| CliError::Usage(format!("--config {shown}: {problem}")))
}

/// A VmConfig from proto JSON, refusing fields the API does not have.
pub fn parse_config(text: &str) -> Result<VmConfig, String> {
    let config: VmConfig = serde_json::from_str(text).map_err(|error| error.to_string())?;
    let given: Value = serde_json::from_str(text).map_err(|error| error.to_string())?;
    let understood = serde_json::to_value(&config).map_err(|error| error.to_string())?;
    let mut unknown = Vec::new();
    find_unknown_fields(&given, &understood, "", &mut unknown);
    if unknown.is_empty() {
        Ok(config)
    } else {
        Err(format!("VmConfig has no field {} (its fields: docs/api/reference.md, \"VmConfig\")", unknown.join(", ")))
    }
}

/// Paths of the fields in `given` that parsing did not keep. The generated
/// messages ignore unknown fields, so what was given is compared with what
/// was understood: a field missing from the latter was either unknown or
/// held its default value (which proto JSON leaves out).
fn find_unknown_fields(given: &Value, understood: &Value, path: &str, unknown: &mut Vec<String>) {
    match (given, understood) {
        (Value::Object(given), Value::Object(understood)) => {
            for (key, value) in given {
                let field_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match understood.get(key).or_else(|| understood.get(&lower_camel_case(key))) {
                    Some(kept) => find_unknown_fields(value, kept, &field_path, unknown),
                    None if holds_default(value) => {}
                    None => unknown.push(field_path),
                }
            }
        }
        (Value::Array(given), Value::Array(understood)) => {
            for (index, (value, kept)) in given.iter().zip(understood).enumerate() {
                find_unknown_fields(value, kept, &format!("{path}[{index}]"), unknown);
            }
        }
        _ => {}
    }
}

/// Whether proto JSON would leave this value out as a field's default.
fn holds_default(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(flag) => !flag,
        Value::Number(number) => number.as_f64() == Some(0.0),
        Value::String(text) => text.is_empty() || text == "0" || text.ends_with("_UNSPECIFIED"),
        Value::Array(items) => items.is_empty(),
        // An empty map; an empty message is kept, so it is found, not judged here.
        Value::Object(fields) => fields.is_empty(),
    }
}

fn lower_camel_case(snake: &str) -> String {
    let mut camel = String::with_capacity(snake.len());
    let mut upper_next = false;
    for character in snake.chars() {
        if character == '_' {
            upper_next = true;
        } else if upper_next {
            camel.extend(character.to_uppercase());
            upper_next = false;
        } else {
            camel.push(character);
        }
    }
    camel
}

/// The flags, over whatever the file gave: each flag given replaces its
/// field; `--disk` replaces the whole storage list; `--metadata` adds or
/// replaces labels one by one; `--network` replaces the interface list.
fn apply_flags(config: &mut VmConfig, args: &CreateArgs) -> Result<(), CliError> {
    if let Some(vcpus) = args.vcpus {
        config.cpu.get_or_insert_default().vcpu_count = vcpus;
    }
    if let Some(memory) = args.memory {
        config.memory.get_or_insert_default().size_bytes = memory;
    }
    if let Some(kernel) = &args.kernel {
        config.boot.get_or_insert_default().kernel_path = kernel.clone();
    }
    if let Some(initrd) = &args.initrd {
        config.boot.get_or_insert_default().initrd_path = initrd.clone();
    }
    if let Some(cmdline) = &args.cmdline {
        config.boot.get_or_insert_default().kernel_args = cmdline.clone();
    }
    if !args.disks.is_empty() {
        config.storage = storage_from_disks(&args.disks).map_err(CliError::Usage)?;
    }
    if !args.networks.is_empty() {
        config.network = args
            .networks
            .iter()
            .enumerate()
            .map(|(index, mode)| NetworkInterface { id: format!("eth{index}"), mode: mode.to_wire().into(), ..Default::default() })
            .collect();
    }
    for (key, value) in &args.metadata {
        config.metadata.insert(key.clone(), value.clone());
    }
    if let Some(restart) = args.restart {
        config.restart_policy = buffa::MessageField::some(RestartPolicy {
            on_failure: restart.on_failure,
            max_restarts: restart.max_restarts,
            ..Default::default()
        });
    }
    if let Some(vmm) = &args.vmm {
        config.vmm.clone_from(vmm);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn create_args(args: &[&str]) -> CreateArgs {
        let mut argv = vec!["metalctl", "create"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Create(create) => create,
            other => panic!("not create: {other:?}"),
        }
    }

    const FILE: &str = r#"{
        "cpu": {"vcpuCount": 2},
        "memory": {"size_bytes": "536870912"},
        "boot": {"kernelPath": "vmlinux", "kernelArgs": "console=ttyS0"},
        "storage": [{"id": "rootfs", "path": "rootfs.ext4", "isRootDevice": true, "readOnly": false}],
        "network": [{"id": "eth0", "mode": "NETWORK_MODE_IPV4_ONLY"}],
        "console": {"enabled": true},
        "metadata": {"team": "infra"}
    }"#;

    #[test]
    fn a_config_file_reads_as_proto_json_in_either_naming() {
        let config = parse_config(FILE).unwrap();
        assert_eq!(config.cpu.vcpu_count, 2);
        assert_eq!(config.memory.size_bytes, 512 << 20);
        assert_eq!(config.boot.kernel_path, "vmlinux");
        assert!(config.storage[0].is_root_device);
        assert!(config.console.enabled);
        assert_eq!(config.metadata["team"], "infra");
    }

    #[test]
    fn a_misspelt_field_is_refused_by_its_path() {
        let error =
            parse_config(r#"{"cpu": {"vcpus": 2}, "storage": [{"path": "a"}, {"pth": "b"}], "memroy": {"sizeBytes": "1"}}"#).unwrap_err();
        assert!(error.contains("cpu.vcpus"), "{error}");
        assert!(error.contains("storage[1].pth"), "{error}");
        assert!(error.contains("memroy"), "{error}");
        assert!(!error.contains("storage[0]"), "{error}");
    }

    #[test]
    fn default_values_are_not_mistaken_for_unknown_fields() {
        let config = r#"{"cpu": {"vcpuCount": 1, "maxVcpuCount": 0, "features": {}},
                         "memory": {"sizeBytes": "0", "hotplugEnabled": false},
                         "network": [{"id": "eth0", "mode": "NETWORK_MODE_UNSPECIFIED", "macAddress": ""}]}"#;
        assert_eq!(parse_config(config).err(), None);
    }

    #[test]
    fn malformed_json_is_refused_with_its_position() {
        let error = parse_config("{\"cpu\": {\"vcpuCount\": \"two\"}}").unwrap_err();
        assert!(error.contains("column"), "{error}");
        assert!(parse_config("{").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let mut config = parse_config(FILE).unwrap();
        let args = create_args(&[
            "--vcpus",
            "4",
            "--memory",
            "1GiB",
            "--cmdline",
            "quiet",
            "--disk",
            "other.ext4,root,ro",
            "--metadata",
            "team=web",
            "--metadata",
            "tier=1",
        ]);
        apply_flags(&mut config, &args).unwrap();
        assert_eq!(config.cpu.vcpu_count, 4);
        assert_eq!(config.memory.size_bytes, 1 << 30);
        assert_eq!(config.boot.kernel_path, "vmlinux");
        assert_eq!(config.boot.kernel_args, "quiet");
        assert_eq!(config.storage.len(), 1);
        assert_eq!(config.storage[0].path, "other.ext4");
        assert!(config.storage[0].read_only);
        assert_eq!(config.metadata["team"], "web");
        assert_eq!(config.metadata["tier"], "1");
        assert_eq!(config.network.len(), 1);
    }

    #[test]
    fn network_flags_replace_the_files_interfaces_and_are_named_in_order() {
        use metald_api::proto::vmprovisioner::v1::NetworkMode;
        let mut config = parse_config(FILE).unwrap();
        apply_flags(&mut config, &create_args(&["--network", "ipv6", "--network", "dual"])).unwrap();
        let interfaces: Vec<_> = config.network.iter().map(|interface| (interface.id.as_str(), interface.mode)).collect();
        assert_eq!(
            interfaces,
            [("eth0", NetworkMode::NETWORK_MODE_IPV6_ONLY.into()), ("eth1", NetworkMode::NETWORK_MODE_DUAL_STACK.into())]
        );
        assert!(Cli::try_parse_from(["metalctl", "create", "--network", "ipv5"]).is_err());
    }

    #[test]
    fn the_vmm_flag_names_the_vmm_and_without_it_the_file_or_the_host_decides() {
        let mut config = parse_config(FILE).unwrap();
        apply_flags(&mut config, &create_args(&[])).unwrap();
        assert_eq!(config.vmm, "", "the host's default");
        let mut config = parse_config(r#"{"vmm": "firecracker"}"#).unwrap();
        apply_flags(&mut config, &create_args(&["--vmm", "cloud-hypervisor"])).unwrap();
        assert_eq!(config.vmm, "cloud-hypervisor");
    }

    #[test]
    fn flags_alone_make_a_config() {
        let config =
            build(&create_args(&["--vcpus", "1", "--memory", "128MiB", "--kernel", "vmlinux", "--disk", "rootfs.ext4,root"])).unwrap();
        assert_eq!(config.cpu.vcpu_count, 1);
        assert_eq!(config.memory.size_bytes, 128 << 20);
        assert_eq!(config.storage[0].id, "disk0");
        assert!(config.console.as_option().is_none());
    }

    #[test]
    fn a_missing_config_file_is_a_usage_error() {
        let error = build(&create_args(&["--config", "/nonexistent/metalctl/vm.json"])).unwrap_err();
        assert!(matches!(error, CliError::Usage(message) if message.contains("no such file")));
    }
}
