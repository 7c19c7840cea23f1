// The copy kernel of `profile::copy_bandwidth` (not a stage of NSA): copies the first WORDS
// 16-byte words of `src` into `dst`, each invocation taking every (workgroups x WG)-th word
// from its own, so that any number of words fits a grid within the adapter's dispatch
// limit. The bytes a kernel can move per second, as a CUDA copy kernel's (torch's `copy_`).

override WG: u32 = 256u;
override WORDS: u32;

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let stride = groups.x * WG;
    for (var i = gid.x; i < WORDS; i += stride) {
        dst[i] = src[i];
    }
}
