"""A hybrid Mamba/attention MoE model (Jamba's layout) gives the same numbers under the
parallel layouts: a multi-process CPU run (gloo, float32) logs the 1-process per-step loss,
gradient norm and aux loss within 1e-5 relative, resumes from a mid-run checkpoint on the
uninterrupted steps, and its checkpoint exports to transformers' JambaForCausalLM.

The model: 4 layers, Mamba at 0 and 2 and attention (no positions) at 1 and 3, MoE FFNs at
1 and 3 (4 experts, softmax top-2 not renormalised), Jamba's inner norms. Under pp=2 each
stage holds one Mamba and one attention layer: the Mamba state runs along the sequence
inside a layer, so nothing but the hidden states crosses the stage boundary.

- pp=2 x ep=2 (4 processes, dp=2 with FSDP): stages, the experts' all-to-all and FSDP's
  sharded Mamba weights at once.
- The 1-process step-3 checkpoint resumed under pp=2 with ``parallel.ac=full`` (every
  block, Mamba's scan included, recomputed in the backward): steps 4-6.
- ``tools/export_hf.py --target jamba`` on the 4-process step-6 checkpoint: Jamba's logits
  equal those of the model moetrain.load gives.

Tensor parallelism refuses Mamba layers (moetrain/config/validate.py::_validate_mixer),
tested in tests/unit/models/test_mamba_model.py. The measured differences are printed
(``pytest -s``).
"""

from __future__ import annotations

import pytest
import torch

import moetrain
from tests.conftest import TINY, load_tool, needs
from tests.distributed._runs import Runs, step_rows

RTOL = 1e-5
STEPS = 6
RESUME_AT = 3
KEYS = ("loss", "grad_norm", "aux_loss")

BASE = [o for o in TINY if not o.startswith(("model.n_layers", "model.n_heads",
                                             "model.ffn_hidden"))] + [
    # ffn_hidden = expert_hidden: Jamba's dense MLPs and experts share intermediate_size
    "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=32",
    "model.mixer=hybrid",
    "model.attention_period=2", "model.attention_offset=1", "model.first_dense_layers=1",
    "model.moe_every=2", "model.mamba_d_state=8", "model.mamba_inner_norms=true",
    "model.position_encoding=none", "moe.router.renormalize=false",
    "eval.every=0", "checkpoint.every=3", "checkpoint.keep=0",
]
PP_SPLIT = "parallel.pp_split=[0,2]"  # stage 0: layers 0-1, stage 1: layers 2-3

MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    yield Runs(tmp_path_factory.mktemp("runs"), str(tmp_path_factory.mktemp("data")))
    if MEASURED:
        print("\nmax |rel diff| to the 1-process run:")
        for name, diffs in MEASURED.items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / abs(a)


def _assert_matches(name: str, ref: list[dict], got: list[dict]) -> None:
    ref, got = step_rows(ref), step_rows(got)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    diffs = {k: max(_rel(a[k], b[k]) for a, b in zip(ref, got)) for k in KEYS}
    MEASURED[name] = diffs
    print(f"\n{name}: max |rel diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert all(v <= RTOL for v in diffs.values()), f"{name}: over rtol {RTOL}: {diffs}"


def _ref(runs: Runs) -> list[dict]:
    return runs.get("ref", BASE)


def test_hybrid_pp2_ep2_fsdp_matches_single_process(runs):
    ref = _ref(runs)
    got = runs.get("pp2_ep2", BASE + ["parallel.pp=2", "parallel.ep=2", PP_SPLIT], world=4)
    assert len(step_rows(got)) == STEPS
    assert all(r["a2a_bytes"] > 0 for r in step_rows(got))  # the experts really exchange
    _assert_matches("hybrid_pp2_ep2_dp2", ref, got)


def test_hybrid_resumes_mid_run_under_pp2_with_full_ac(runs):
    ref = _ref(runs)
    got = runs.get("resumed_pp2_ac", BASE + [
        "parallel.pp=2", PP_SPLIT, "parallel.ac=full",
        f"checkpoint.resume={runs.ckpt('ref', RESUME_AT)}"], world=2)
    assert [r["step"] for r in step_rows(got)] == list(range(RESUME_AT + 1, STEPS + 1))
    _assert_matches("hybrid_resumed_pp2_ac_full", step_rows(ref)[RESUME_AT:], got)


@needs("transformers")
def test_jamba_export_from_the_4_process_checkpoint(runs, tmp_path):
    runs.get("pp2_ep2", BASE + ["parallel.pp=2", "parallel.ep=2", PP_SPLIT], world=4)
    from transformers import AutoModelForCausalLM

    ckpt, out = runs.ckpt("pp2_ep2", STEPS), tmp_path / "hf"
    tool = load_tool("export_hf")
    assert tool.main([str(ckpt), "--out", str(out), "--target", "jamba",
                      "--no-progress"]) == 0
    model, _ = moetrain.load(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, model.vocab_size, (2, 32),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"\njamba export of the pp=2 x ep=2 checkpoint: max |logits diff| / max |logits| "
          f"= {rel:.2e}")
    assert rel <= 1e-4
