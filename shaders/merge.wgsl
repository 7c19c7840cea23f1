// Combines the partial results of split attention (workgroups that each attended one part of a
// row group's keys; see part_index in shared/attention.wgsl) into whole rows:
// o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s over splits that saw a
// key. params.branch 0 (dense): one part, into out. 1 (NSA): the compressed, selected and
// window parts (each in its own buffer, at off_k, off_pslc, off_pwin), their gated sum into
// out: the one pass after a decode step's attention; 2: and the parts into o_cmp, o_slc,
// o_win (the branch outputs, where the plan asks for them). One workgroup per [B, Tq, Hq]
// row of the chunk.

#import params
#import partials

// Each [rows, splits, Dv + 2]; the dense merge reads `part` only.
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read> part_slc: array<f32>;
@group(0) @binding(3) var<storage, read> part_win: array<f32>;
@group(0) @binding(4) var<storage, read> gates: array<f32>;       // [B, Tq, Hq, 3]
@group(0) @binding(5) var<storage, read_write> o_cmp: array<f32>; // [B, Tq, Hq, Dv]
@group(0) @binding(6) var<storage, read_write> o_slc: array<f32>; // [B, Tq, Hq, Dv]
@group(0) @binding(7) var<storage, read_write> o_win: array<f32>; // [B, Tq, Hq, Dv]
@group(0) @binding(8) var<storage, read_write> out: array<f32>;   // [B, Tq, Hq, Dv]

// 64 invocations, each taking every 64th dim with all of its splits: on an H200 (f16,
// fifty-seventh session) 256, whose slices shared each dim's splits (two rounds of loads
// instead of eight at Dv = 128), made 16 sequences' merge 4-5 µs slower and chunked
// prefill's merges 28% slower.
const WG: u32 = 64u;
const SPLITS_MAX: u32 = 64u;  // at most WG: one invocation loads each split's statistics
const BATCH: u32 = 8u;        // splits of each part whose partials combine loads at once

// [part, split]: each split's running max and sum (no_keys() for a split that saw none), as
// loaded once by share; then its weight in the merged row.
var<workgroup> split_m: array<f32, 3 * SPLITS_MAX>;
var<workgroup> split_l: array<f32, 3 * SPLITS_MAX>;
var<workgroup> weight: array<f32, 3 * SPLITS_MAX>;
var<workgroup> stat_m: array<f32, 3 * WG>;          // [part, invocation]: reduced in place
var<workgroup> stat_l: array<f32, 3 * WG>;

// Element i of part `slot`'s buffer.
fn part_in(slot: u32, i: u32) -> f32 {
    switch slot {
        case 1u: {
            return part_slc[i];
        }
        case 2u: {
            return part_win[i];
        }
        default: {
            return part[i];
        }
    }
}

// A part of one row: its first split's offset, and how many splits it has.
struct Part {
    base: u32,
    splits: u32,
}

// Loads split lid's statistics of part `slot` (none past its splits) into split_m, split_l
// and this invocation's share of the reduction. The load does not depend on the split count,
// so the three parts' loads are in flight together.
fn share(lid: u32, slot: u32, p: Part) {
    let at = p.base + min(lid, p.splits - 1u) * (params.dv + 2u) + params.dv;
    let m = part_in(slot, at);
    let l = part_in(slot, at + 1u);
    var st = no_keys();
    if lid < p.splits && l > 0.0 {
        st = SplitStats(m, l);
    }
    stat_m[slot * WG + lid] = st.m;
    stat_l[slot * WG + lid] = st.l;
    split_m[slot * SPLITS_MAX + lid] = st.m;
    split_l[slot * SPLITS_MAX + lid] = st.l;
}

// Merges the shares of the first `parts` parts into their first entries, by halves.
fn reduce_shares(lid: u32, parts: u32) {
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if lid < half {
            for (var slot = 0u; slot < parts; slot++) {
                let a = slot * WG + lid;
                let st = merge_stats(
                    SplitStats(stat_m[a], stat_l[a]),
                    SplitStats(stat_m[a + half], stat_l[a + half]),
                );
                stat_m[a] = st.m;
                stat_l[a] = st.l;
            }
        }
        workgroupBarrier();
    }
}

// Stores split lid's weight in part `slot`'s merged row (after reduce_shares):
// e^(m_s - M) / L, 0 for a split that saw no key.
fn weigh(lid: u32, slot: u32) {
    let i = slot * SPLITS_MAX + lid;
    let w = exp(split_m[i] - stat_m[slot * WG]) / stat_l[slot * WG];
    weight[i] = select(0.0, w, split_l[i] > 0.0);
}

// Element e of the parts' merged rows (the dense merge's parts past the first have no
// splits), BATCH splits of each part per round trip: a batch's loads, of every part, are
// issued before any is used (indices past a part's splits repeat its last), so that the
// parts cost one round trip together rather than one each. On an H200 (f16, forty-eighth
// session) the window and the merge of a one-sequence decode step at 64k took 0.029 ms
// together instead of 0.032 with a part at a time, of 16 sequences 0.041 instead of 0.044.
fn combine(p: array<Part, 3>, e: u32) -> vec3<f32> {
    let w = params.dv + 2u;
    let n = max(p[0].splits, max(p[1].splits, p[2].splits));
    var o = vec3<f32>(0.0);
    for (var s0 = 0u; s0 < n; s0 += BATCH) {
        var v: array<vec3<f32>, BATCH>;
        for (var c = 0u; c < BATCH; c++) {
            v[c].x = part[split_at(p[0], s0 + c, w) + e];
            if p[1].splits > 0u {
                v[c].y = part_slc[split_at(p[1], s0 + c, w) + e];
            }
            if p[2].splits > 0u {
                v[c].z = part_win[split_at(p[2], s0 + c, w) + e];
            }
        }
        for (var c = 0u; c < BATCH; c++) {
            let s = min(s0 + c, SPLITS_MAX - 1u);
            let ws = vec3<f32>(
                select(0.0, weight[s], s0 + c < p[0].splits),
                select(0.0, weight[SPLITS_MAX + s], s0 + c < p[1].splits),
                select(0.0, weight[2u * SPLITS_MAX + s], s0 + c < p[2].splits),
            );
            o += select(vec3<f32>(0.0), ws * v[c], ws > vec3<f32>(0.0));
        }
    }
    return o;
}

// The offset of split s of part p (its last split's past them; none where it has none).
fn split_at(p: Part, s: u32, w: u32) -> u32 {
    return p.base + min(s, max(p.splits, 1u) - 1u) * w;
}

@compute @workgroup_size(64)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = linear_workgroup(wg, nwg);
    if row >= params.total_wg {
        return;
    }
    let dv = params.dv;
    let w = dv + 2u;
    let nsa = params.branch != 0u;
    let pc = Part(params.off_k + row * params.splits * w, params.splits);
    // The dense merge has one part.
    let ps = Part(params.off_pslc + row * params.slc_splits * w, select(0u, params.slc_splits, nsa));
    let pw = Part(params.off_pwin + row * params.win_splits * w, select(0u, params.win_splits, nsa));
    share(lid, 0u, pc);
    if nsa {
        share(lid, 1u, ps);
        share(lid, 2u, pw);
    }
    workgroupBarrier();
    reduce_shares(lid, select(1u, 3u, nsa));
    weigh(lid, 0u);
    if nsa {
        weigh(lid, 1u);
        weigh(lid, 2u);
    }
    workgroupBarrier();
    for (var e = lid; e < dv; e += WG) {
        let flat = row * dv + e;
        let o = combine(array<Part, 3>(pc, ps, pw), e);
        if !nsa {
            out[params.off_out + flat] = o.x;
            continue;
        }
        if params.branch == 2u {
            o_cmp[params.off_ocmp + flat] = o.x;
            o_slc[params.off_oslc + flat] = o.y;
            o_win[params.off_owin + flat] = o.z;
        }
        let gb = params.off_gates + row * 3u;
        out[params.off_out + flat] = gates[gb] * o.x + gates[gb + 1u] * o.y + gates[gb + 2u] * o.z;
    }
}
