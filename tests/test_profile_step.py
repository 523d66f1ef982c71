"""experiments.profile_step: per-op sums of a profiler trace, matched to the compiled HLO (hand-made inputs)."""

from experiments import profile_step as ps

HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.0 = f32[8,2]{1,0} dot(f32[8,4]{1,0} %p0, f32[4,2]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (p0: f32[8,2]) -> f32[8,2] {
  %p0 = f32[8,2]{1,0} parameter(0)
  ROOT %tanh.0 = f32[8,2]{1,0} tanh(f32[8,2]{1,0} %p0)
}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[8,2] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %ynn_fusion.3 = f32[8,2]{1,0} fusion(f32[8,4]{1,0} %a, f32[4,2]{1,0} %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/ViT/block_0/MultiHeadDotProductAttention_0/query/dot_general"}
  %copy.7 = f32[8,2]{0,1} copy(f32[8,2]{1,0} %ynn_fusion.3), metadata={op_name="jit(step)/adam/update"}
  ROOT %tanh_fusion = f32[8,2]{1,0} fusion(f32[8,2]{0,1} %copy.7), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(step)/ViT/block_0/MlpBlock_0/gelu"}
}
"""


def _ev(name, dur_us, ph="X"):
    return {"ph": ph, "name": name, "dur": dur_us, "pid": 1, "tid": 2}


def test_ops_are_summed_per_step_and_labelled_from_the_hlo():
    index = ps.hlo_index(HLO)
    bodies = ps._fusion_body_ops(HLO)
    assert index["ynn_fusion.3"]["calls"] == "fused_computation.1"
    assert bodies["fused_computation.1"]["dot"] == 1 and bodies["fused_computation.2"]["tanh"] == 1
    # 2 steps: the dot fusion 3 ms + 5 ms, the copy 1 ms twice, the tanh fusion 2 ms twice; bookkeeping skipped.
    events = [_ev("ynn_fusion.3", 3000), _ev("ynn_fusion.3", 5000), _ev("copy.7", 1000), _ev("copy.7", 1000),
              _ev("tanh_fusion", 2000), _ev("tanh_fusion", 2000), _ev("ThreadpoolListener::Record", 9000),
              _ev("PjitFunction(step)", 50000), _ev("ynn_fusion.3", 7000, ph="M")]
    s = ps.summarise(events, index, bodies, steps=2, step_seconds=0.020, top=10)
    assert s["step_ms"] == 10.0
    assert s["op_ms"] == 7.0  # (8 + 2 + 4) ms over 2 steps
    assert s["matched_fraction"] == 1.0
    assert s["by_kind"] == {"fusion(dot)": 4.0, "fusion(elementwise)": 2.0, "copy": 1.0}
    assert s["by_scope"] == {"attention": 4.0, "mlp": 2.0, "optimizer": 1.0}
    assert [r["op"] for r in s["top"]] == ["ynn_fusion.3", "tanh_fusion", "copy.7"]


def test_an_op_missing_from_the_hlo_is_kept_and_counted_unmatched():
    s = ps.summarise([_ev("fusion.99", 4000), _ev("copy.7", 4000)], ps.hlo_index(HLO), {}, steps=1,
                     step_seconds=0.01, top=5)
    assert s["matched_fraction"] == 0.5
    assert s["by_kind"]["fusion"] == 4.0 and s["by_scope"]["other"] == 4.0
