//! `pipeline-stats`: what a Vulkan driver reports about the compiled kernels of one NSA plan
//! (registers per invocation, code size, workgroup memory), through
//! `VK_KHR_pipeline_executable_properties`. wgpu does not expose these, so this tool
//! translates each kernel to SPIR-V with naga as the crate compiles it (specialised, no
//! bounds checks, no loop bounding, no workgroup-memory zeroing) and builds the pipeline on
//! a Vulkan device of its own. Registers decide how many workgroups share a multiprocessor,
//! which timings alone do not show.
//!
//! ```text
//! cargo run --release -p pipeline-stats -- --t 16384 --hq 64 --hkv 4 --dk 128 --dv 128
//! cargo run --release -p pipeline-stats -- --t 16384 --precision f16 --tensor-cores
//! ```

use ash::vk;
use clap::{Parser, ValueEnum};
use nsa_wgpu::kernels::{KernelId, Specialization};
use nsa_wgpu::shaders::{Kept, Variant};
use nsa_wgpu::{DeviceLimits, NsaConfig, Plan, Precision, Shape};
use std::ffi::CStr;

/// The shape whose plan's kernels are compiled (the paper's config).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Sequence length (keys); the plan is a prefill unless --tq says otherwise.
    #[arg(long, default_value_t = 16384)]
    t: usize,
    /// Queries per sequence (1 for a decode step); defaults to --t.
    #[arg(long)]
    tq: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 64)]
    hq: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    hkv: usize,
    /// Query/key head size.
    #[arg(long, default_value_t = 128)]
    dk: usize,
    /// Value head size.
    #[arg(long, default_value_t = 128)]
    dv: usize,
    /// Compile the workgroup-memory row reductions instead of the subgroup ones.
    #[arg(long)]
    no_subgroups: bool,
    /// How the inputs are stored (f16 needs shaderFloat16 and 16-bit storage buffers).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Storage,
    /// The attention kernels on tensor cores, as the crate compiles them for f16 inputs on
    /// devices with cooperative matrices (needs `--precision f16`, subgroup reductions and
    /// VK_KHR_cooperative_matrix).
    #[arg(long)]
    tensor_cores: bool,
    /// The subgroup size the tensor-core kernels take as a constant, as the crate compiles
    /// them where the adapter has only one (32: NVIDIA's, the one driver this tool reads);
    /// 0 reads it at run time, as on adapters whose subgroups vary.
    #[arg(long, default_value_t = 32)]
    subgroup_size: u32,
}

/// `--precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Storage {
    F32,
    F16,
}

/// How the kernels are compiled: the inputs' storage, subgroup reductions, tensor cores,
/// and the subgroup size the tensor-core kernels take (0: read at run time).
#[derive(Debug, Clone, Copy)]
struct Build {
    precision: Precision,
    subgroups: bool,
    tensor_cores: bool,
    subgroup_size: u32,
}

impl Build {
    fn of(args: &Args) -> Result<Build, String> {
        let precision = match args.precision {
            Storage::F32 => Precision::F32,
            Storage::F16 => Precision::F16,
        };
        if args.tensor_cores && (precision != Precision::F16 || args.no_subgroups) {
            return Err("--tensor-cores needs --precision f16 and subgroup reductions".into());
        }
        Ok(Build {
            precision,
            subgroups: !args.no_subgroups,
            tensor_cores: args.tensor_cores,
            subgroup_size: args.subgroup_size,
        })
    }
}

/// One pipeline the plan needs: a kernel, its rows per workgroup, and what it keeps for the
/// selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kernel {
    id: KernelId,
    rows: u32,
    kept: Kept,
}

/// The distinct pipelines of `plan`'s steps, in the order they first run.
fn kernels_of(plan: &Plan) -> Vec<Kernel> {
    let mut out: Vec<Kernel> = Vec::new();
    for step in &plan.steps {
        let k = Kernel {
            id: step.kernel,
            rows: step.rows,
            kept: Kept::of(&step.params),
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// The specialization `k` compiles with in `plan` as `build` asks (the pipeline's choice),
/// and whether it runs on tensor cores.
fn specialization(
    plan: &Plan,
    k: Kernel,
    build: Build,
    workgroup_storage: u32,
) -> (Specialization, bool) {
    plan.kernel_specialization(k.id, k.rows, build.tensor_cores, workgroup_storage)
}

/// SPIR-V of `k` specialised for `plan`, as the crate compiles it.
fn spirv(plan: &Plan, k: Kernel, build: Build, workgroup_storage: u32) -> Result<Vec<u32>, String> {
    let (spec, tensor_cores) = specialization(plan, k, build, workgroup_storage);
    let variant = Variant {
        precision: build.precision,
        subgroups: build.subgroups,
        tensor_cores,
        kept: k.kept,
    };
    let src = nsa_wgpu::shaders::source_variant(k.id.name(), &variant)
        .ok_or_else(|| format!("no shader for {}", k.id.name()))?;
    let module = naga::front::wgsl::parse_str(&src).map_err(|e| e.emit_to_string(&src))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| format!("{e:?}"))?;
    let constants: naga::back::PipelineConstants = spec
        .constants_for(k.id)
        .into_iter()
        .chain(nsa_wgpu::kernels::variant_constants(
            k.id,
            &variant,
            build.subgroup_size,
        ))
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((naga::ShaderStage::Compute, "main")),
        &constants,
    )
    .map_err(|e| format!("{e:?}"))?;
    let unchecked = naga::proc::BoundsCheckPolicy::Unchecked;
    let mut options = naga::back::spv::Options {
        lang_version: (1, 3),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: unchecked,
            buffer: unchecked,
            image_load: unchecked,
            binding_array: unchecked,
        },
        zero_initialize_workgroup_memory: naga::back::spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: false,
        ..Default::default()
    };
    options.flags.remove(naga::back::spv::WriterFlags::DEBUG);
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
    };
    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline)).map_err(|e| e.to_string())
}

/// A Vulkan device with pipeline executable properties enabled, and what a [`Build`] needs:
/// f16 arithmetic and 16-bit storage for f16 inputs, cooperative matrices and the Vulkan
/// memory model (which naga's cooperative-matrix SPIR-V declares) for tensor cores.
struct Gpu {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    stats: ash::khr::pipeline_executable_properties::Device,
    name: String,
    limits: vk::PhysicalDeviceLimits,
}

impl Gpu {
    fn new(build: Build) -> Result<Gpu, String> {
        // SAFETY: plain Vulkan calls on objects created here, in order, destroyed in Drop.
        unsafe {
            let entry = ash::Entry::load().map_err(|e| format!("no Vulkan loader: {e}"))?;
            let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
            let instance = entry
                .create_instance(
                    &vk::InstanceCreateInfo::default().application_info(&app),
                    None,
                )
                .map_err(|e| format!("vkCreateInstance: {e}"))?;
            let ext = ash::khr::pipeline_executable_properties::NAME;
            let devices = instance
                .enumerate_physical_devices()
                .map_err(|e| e.to_string())?;
            let Some(&pd) = devices.iter().find(|&&pd| {
                instance
                    .enumerate_device_extension_properties(pd)
                    .unwrap_or_default()
                    .iter()
                    .any(|p| p.extension_name_as_c_str() == Ok(ext))
            }) else {
                instance.destroy_instance(None);
                return Err(format!(
                    "none of {} Vulkan devices has {}",
                    devices.len(),
                    ext.to_string_lossy()
                ));
            };
            let props = instance.get_physical_device_properties(pd);
            let name = CStr::from_ptr(props.device_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            let mut has11 = vk::PhysicalDeviceVulkan11Features::default();
            let mut has12 = vk::PhysicalDeviceVulkan12Features::default();
            let mut has = vk::PhysicalDeviceFeatures2::default()
                .push_next(&mut has11)
                .push_next(&mut has12);
            instance.get_physical_device_features2(pd, &mut has);
            let coop = ash::khr::cooperative_matrix::NAME;
            let has_coop = instance
                .enumerate_device_extension_properties(pd)
                .unwrap_or_default()
                .iter()
                .any(|p| p.extension_name_as_c_str() == Ok(coop));
            let f16 = build.precision == Precision::F16;
            let lacks = if f16 && has12.shader_float16 == vk::FALSE {
                Some("shaderFloat16 (--precision f16)")
            } else if build.tensor_cores && !has_coop {
                Some("VK_KHR_cooperative_matrix (--tensor-cores)")
            } else if build.tensor_cores && has12.vulkan_memory_model == vk::FALSE {
                Some("vulkanMemoryModel (--tensor-cores)")
            } else {
                None
            };
            if let Some(what) = lacks {
                instance.destroy_instance(None);
                return Err(format!("{name} lacks {what}"));
            }
            let queue = vk::DeviceQueueCreateInfo::default()
                .queue_family_index(0)
                .queue_priorities(&[1.0]);
            let mut feature = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default()
                .pipeline_executable_info(true);
            // What the device has of what f16 and tensor-core kernels use (as wgpu enables
            // for SHADER_F16 and EXPERIMENTAL_COOPERATIVE_MATRIX).
            let mut on11 = vk::PhysicalDeviceVulkan11Features::default()
                .storage_buffer16_bit_access(f16 && has11.storage_buffer16_bit_access != 0)
                .uniform_and_storage_buffer16_bit_access(
                    f16 && has11.uniform_and_storage_buffer16_bit_access != 0,
                );
            let mut on12 = vk::PhysicalDeviceVulkan12Features::default()
                .shader_float16(f16)
                .vulkan_memory_model(build.tensor_cores)
                .vulkan_memory_model_device_scope(
                    build.tensor_cores && has12.vulkan_memory_model_device_scope != 0,
                );
            let mut on_coop =
                vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default().cooperative_matrix(true);
            let mut exts = vec![ext.as_ptr()];
            let mut info = vk::DeviceCreateInfo::default()
                .queue_create_infos(std::slice::from_ref(&queue))
                .push_next(&mut feature)
                .push_next(&mut on11)
                .push_next(&mut on12);
            if build.tensor_cores {
                exts.push(coop.as_ptr());
                info = info.push_next(&mut on_coop);
            }
            let device = instance
                .create_device(pd, &info.enabled_extension_names(&exts), None)
                .map_err(|e| format!("vkCreateDevice on {name}: {e}"))?;
            let stats = ash::khr::pipeline_executable_properties::Device::new(&instance, &device);
            Ok(Gpu {
                _entry: entry,
                instance,
                device,
                stats,
                name,
                limits: props.limits,
            })
        }
    }

    /// The plan limits this device's compute limits give.
    fn plan_limits(&self) -> DeviceLimits {
        DeviceLimits {
            workgroup_storage: self.limits.max_compute_shared_memory_size,
            max_invocations: self
                .limits
                .max_compute_work_group_invocations
                .min(self.limits.max_compute_work_group_size[0]),
            max_storage_binding: self.limits.max_storage_buffer_range as u64,
            // Vulkan 1.0's limits name no largest buffer; the binding range bounds what a
            // plan binds.
            max_buffer: u64::MAX,
            max_workgroups_per_dim: self.limits.max_compute_work_group_count[0],
            ..DeviceLimits::default()
        }
    }

    /// `(name, value)` of every statistic the driver reports for a compute pipeline of
    /// `spirv` whose group 0 has uniform buffers at `uniforms` and storage buffers at
    /// `storage`.
    fn statistics(
        &self,
        spirv: &[u32],
        uniforms: &[u32],
        storage: &[u32],
    ) -> Result<Vec<(String, String)>, String> {
        let binding = |b: u32, ty| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b)
                .descriptor_type(ty)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
        };
        let bindings: Vec<_> = uniforms
            .iter()
            .map(|&b| binding(b, vk::DescriptorType::UNIFORM_BUFFER))
            .chain(
                storage
                    .iter()
                    .map(|&b| binding(b, vk::DescriptorType::STORAGE_BUFFER)),
            )
            .collect();
        // SAFETY: the objects are created from valid create infos and destroyed before
        // returning; the pipeline is never bound or dispatched.
        unsafe {
            let d = &self.device;
            let module = d
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(spirv), None)
                .map_err(|e| e.to_string())?;
            let set = d
                .create_descriptor_set_layout(
                    &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                    None,
                )
                .map_err(|e| e.to_string())?;
            let layout = d
                .create_pipeline_layout(
                    &vk::PipelineLayoutCreateInfo::default().set_layouts(&[set]),
                    None,
                )
                .map_err(|e| e.to_string())?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main");
            let info = vk::ComputePipelineCreateInfo::default()
                .stage(stage)
                .layout(layout)
                .flags(vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR);
            let pipeline = d
                .create_compute_pipelines(vk::PipelineCache::null(), &[info], None)
                .map_err(|(_, e)| format!("vkCreateComputePipelines: {e}"))?[0];
            let mut out = Vec::new();
            let executables = self
                .stats
                .get_pipeline_executable_properties(
                    &vk::PipelineInfoKHR::default().pipeline(pipeline),
                )
                .map_err(|e| e.to_string())?;
            for i in 0..executables.len() as u32 {
                let which = vk::PipelineExecutableInfoKHR::default()
                    .pipeline(pipeline)
                    .executable_index(i);
                for s in self
                    .stats
                    .get_pipeline_executable_statistics(&which)
                    .map_err(|e| e.to_string())?
                {
                    let name = CStr::from_ptr(s.name.as_ptr())
                        .to_string_lossy()
                        .into_owned();
                    let value = match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => {
                            (s.value.b32 != 0).to_string()
                        }
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => s.value.u64.to_string(),
                        _ => s.value.f64.to_string(),
                    };
                    out.push((name, value));
                }
            }
            d.destroy_pipeline(pipeline, None);
            d.destroy_pipeline_layout(layout, None);
            d.destroy_descriptor_set_layout(set, None);
            d.destroy_shader_module(module, None);
            Ok(out)
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: nothing created from the device outlives `statistics`.
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// The uniform and storage bindings of kernel `id` (group 0).
fn bindings(id: KernelId) -> (Vec<u32>, Vec<u32>) {
    let mut uniforms = Vec::new();
    let mut storage = Vec::new();
    for (b, access) in id.bindings().iter().enumerate() {
        match access {
            nsa_wgpu::kernels::Access::Uniform => uniforms.push(b as u32),
            _ => storage.push(b as u32),
        }
    }
    (uniforms, storage)
}

fn run(args: &Args) -> Result<(), String> {
    let build = Build::of(args)?;
    let gpu = Gpu::new(build)?;
    let shape = Shape {
        tq: args.tq.unwrap_or(args.t),
        ..Shape::prefill(args.batch, args.t, args.hq, args.hkv, args.dk, args.dv)
    };
    // As the pipeline plans: wide steps of large heads where tensor cores run them.
    let limits = DeviceLimits {
        tensor_cores: build.tensor_cores,
        ..gpu.plan_limits()
    };
    let plan = Plan::with_precision(&NsaConfig::default(), &shape, &limits, build.precision)
        .map_err(|e| e.to_string())?;
    println!("{}: {:?}, {:?}", gpu.name, shape, build);
    println!(
        "| kernel | rows | kept for the selection | tensor cores | keys per tile | statistics |"
    );
    println!("|---|---|---|---|---|---|");
    for k in kernels_of(&plan) {
        let (uniforms, storage) = bindings(k.id);
        let (spec, tensor_cores) = specialization(&plan, k, build, limits.workgroup_storage);
        let words = spirv(&plan, k, build, limits.workgroup_storage)?;
        let stats = gpu.statistics(&words, &uniforms, &storage)?;
        let text: Vec<String> = stats.iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!(
            "| {} | {} | {:?} | {} | {} | {} |",
            k.id.name(),
            k.rows,
            k.kept,
            tensor_cores,
            spec.kv_tile,
            text.join(", ")
        );
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("pipeline-stats: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An H200's workgroup memory (48 KiB), no binding or buffer limit in the way.
    fn limits() -> DeviceLimits {
        DeviceLimits {
            workgroup_storage: 48 << 10,
            max_storage_binding: 4 << 30,
            max_buffer: u64::MAX,
            ..DeviceLimits::default()
        }
    }

    fn plan(tq: usize, t: usize) -> Plan {
        let shape = Shape {
            tq,
            ..Shape::prefill(1, t, 64, 4, 128, 128)
        };
        Plan::new(&NsaConfig::default(), &shape, &limits()).unwrap()
    }

    #[test]
    fn a_long_prefill_lists_its_wide_and_narrow_kernels_once_each() {
        let ks = kernels_of(&plan(2048, 2048));
        // The paper's config keeps block sums.
        let has = |id, rows, kept| ks.contains(&Kernel { id, rows, kept });
        assert!(has(KernelId::CmpAttn, 32, Kept::BlockSums), "{ks:?}");
        assert!(has(KernelId::SlcAttn, 16, Kept::Nothing), "{ks:?}");
        assert!(has(KernelId::WinAttn, 32, Kept::Nothing), "{ks:?}");
        assert!(has(KernelId::Select, 16, Kept::BlockSums), "{ks:?}");
        assert_eq!(ks.iter().filter(|k| k.id == KernelId::SlcAttn).count(), 1);
        for (i, a) in ks.iter().enumerate() {
            assert!(!ks[i + 1..].contains(a), "{a:?} twice");
        }
    }

    #[test]
    fn every_listed_kernel_translates_to_spirv() {
        let decode = plan(1, 4096);
        let ks = kernels_of(&decode);
        assert!(
            ks.iter().all(|k| k.rows == 16),
            "a decode step runs no wide kernel: {ks:?}"
        );
        for p in [decode, plan(2048, 2048)] {
            for k in kernels_of(&p) {
                for subgroups in [false, true] {
                    let build = Build {
                        precision: Precision::F32,
                        subgroups,
                        tensor_cores: false,
                        subgroup_size: 32,
                    };
                    let words = spirv(&p, k, build, 48 << 10).unwrap();
                    assert_eq!(words[0], 0x0723_0203, "{k:?}: not SPIR-V");
                }
            }
        }
    }

    #[test]
    fn tensor_core_builds_compile_the_attention_kernels_on_tensor_cores() {
        let shape = Shape::prefill(1, 2048, 64, 4, 128, 128);
        let p =
            Plan::with_precision(&NsaConfig::default(), &shape, &limits(), Precision::F16).unwrap();
        // The subgroup size as a constant (NVIDIA's) and read at run time.
        for subgroup_size in [32, 0] {
            let build = Build {
                precision: Precision::F16,
                subgroups: true,
                tensor_cores: true,
                subgroup_size,
            };
            for k in kernels_of(&p) {
                let (spec, on) = specialization(&p, k, build, 48 << 10);
                // Tensor cores for every attention kernel (tests/plan.rs holds their tile
                // sizes).
                assert_eq!(on, k.id.attention_core(), "{k:?}: {spec:?}");
                let words = spirv(&p, k, build, 48 << 10).unwrap();
                assert_eq!(words[0], 0x0723_0203, "{k:?}: not SPIR-V");
            }
        }
    }

    #[test]
    fn tensor_cores_need_f16_and_subgroups() {
        let args = |extra: &[&str]| {
            Args::parse_from(["pipeline-stats"].iter().chain(extra.iter()).copied())
        };
        assert!(Build::of(&args(&["--tensor-cores"])).is_err());
        assert!(Build::of(&args(&[
            "--tensor-cores",
            "--precision",
            "f16",
            "--no-subgroups"
        ]))
        .is_err());
        let b = Build::of(&args(&["--tensor-cores", "--precision", "f16"])).unwrap();
        assert!(b.tensor_cores && b.subgroups && b.precision == Precision::F16);
    }
}
