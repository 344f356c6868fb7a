"""Export to Hugging Face and moetrain.load, against the trained model and transformers.

A tiny MoE trains a few steps; moetrain.load gives exactly the logits of the model the
trainer holds (schedule values included), and each export target, loaded with
transformers' AutoModelForCausalLM, gives moetrain's logits within 1e-4 (float32, CPU).
Features no target can hold fail naming the field.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import moetrain
from moetrain.checkpoint.hf import HFConversionError, Target, choose_target, export_hf, export_model
from moetrain.checkpoint.load import CONFIG_FILE, CheckpointNotFoundError
from moetrain.config import ConfigError
from moetrain.models import Transformer
from tests.conftest import TINY, compose, oracle

T = oracle("transformers", module_level=True)

_TOOL = Path(__file__).resolve().parents[3] / "tools" / "export_hf.py"
TOKENS = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(3))


def _train_in_process(overrides: list[str]) -> torch.Tensor:
    """Train with the real Trainer in this process; return its model's eval logits."""
    from moetrain.config import validate
    from moetrain.parallel.mesh import destroy_distributed, init_distributed
    from moetrain.train.trainer import Trainer

    cfg = compose(overrides)
    layout = validate(cfg, 1)
    _, _, device = init_distributed()
    try:
        trainer = Trainer(cfg, layout, device)
        trainer.fit()
        trainer.model.eval()
        with torch.no_grad():
            return trainer.model(TOKENS)
    finally:
        destroy_distributed()


def _hf_logits(path) -> torch.Tensor:
    hf = T.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(TOKENS).logits


def _ours(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def _run(tmp_path, data_cache, *extra):
    return TINY + [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}",
                   "checkpoint.every=6", "eval.every=0", *extra]


def test_load_and_mixtral_export_match_the_trained_model(tmp_path, data_cache):
    # A temperature schedule mid-way (2.0 -> 0.5 over 12 steps; 1.25 at step 6): the loaded
    # routers must carry the schedule's value, and the export folds it into the gate.
    overrides = _run(tmp_path, data_cache, "schedule=temperature", "schedule.steps=12")
    trained = _train_in_process(overrides)
    model, cfg = moetrain.load(tmp_path / "run")  # a run dir: its latest checkpoint
    assert not model.training and cfg.model.dim == 32
    assert [r.router.temperature for r in model.moe_layers()] == [1.25, 1.25]
    assert (tmp_path / "run" / "checkpoints" / "step_0000006" / CONFIG_FILE).is_file()
    assert torch.equal(_ours(model), trained)

    out = tmp_path / "hf"
    assert export_hf(tmp_path / "run", out, "auto", progress=False) == Target.mixtral
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["MixtralForCausalLM"]
    assert (hf_cfg["num_local_experts"], hf_cfg["num_experts_per_tok"]) == (4, 2)
    assert (_hf_logits(out) - trained).abs().max() < 1e-4


def test_glm4_moe_export_sigmoid_bias_groups_shared(tmp_path, data_cache):
    # DeepSeek-V3 routing: sigmoid, route_scale 2.5, aux-free bias (moves every step),
    # group-limited (2 groups of 4, best 1), a shared expert and a first dense layer.
    overrides = _run(tmp_path, data_cache, "moe/router=deepseek_v3", "model.num_experts=8",
                     "moe.router.n_groups=2", "moe.router.topk_groups=1",
                     "moe.router.bias_update_rate=0.01", "model.n_shared_experts=1",
                     "model.n_layers=3", "model.first_dense_layers=1", "model.n_kv_heads=1",
                     "model.qkv_bias=true")
    trained = _train_in_process(overrides)
    model, _ = moetrain.load(tmp_path / "run" / "checkpoints" / "step_0000006")
    assert torch.equal(_ours(model), trained)
    bias = model.layers["1"].moe.router.expert_bias
    assert bias.abs().max() > 0  # the bias trained: exporting it matters (checked below)

    out = tmp_path / "hf"
    assert export_hf(tmp_path / "run", out, progress=False) == Target.glm4_moe
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Glm4MoeForCausalLM"]
    assert (hf_cfg["first_k_dense_replace"], hf_cfg["n_shared_experts"]) == (1, 1)
    assert (hf_cfg["routed_scaling_factor"], hf_cfg["n_group"]) == (2.5, 2)
    assert (_hf_logits(out) - trained).abs().max() < 1e-4

    # Without the bias the HF model routes differently: the bias is really carried over.
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.expert_bias.zero_()
    export_model(model, compose(overrides), tmp_path / "nobias", "glm4_moe", progress=False)
    assert (_hf_logits(tmp_path / "nobias") - trained).abs().max() > 1e-4


def _random_model(overrides: list[str], bias: bool = False):
    """An untrained model whose routers make sharp, varied choices (random expert bias
    with ``bias``), with non-trivial norms and q/k/v biases."""
    cfg = compose(TINY + ["run.dir=/unused"] + overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, 257).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.weight.mul_(20.0)
            if bias:
                layer.router.expert_bias.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    return model, cfg


@pytest.mark.parametrize("overrides,bias,target", [
    # top-1 softmax keeps the raw probability (no renormalisation), route_scale folded into
    # the experts, a dense layer in the middle, q/k/v biases: Qwen2-MoE
    (["model.top_k=1", "model.n_layers=3", "model.moe_every=2", "moe.router.route_scale=1.5",
      "model.qkv_bias=true"], False, "qwen2_moe"),
    # softmax + shared experts + expert bias + temperature, tied embeddings (DeepSeekMoE's
    # shape): ERNIE 4.5 MoE, whose interleaved RoPE gets permuted q/k rows
    (["model.n_shared_experts=2", "model.n_layers=3", "model.first_dense_layers=1",
      "moe.router.temperature=0.7", "model.tie_embeddings=true", "model.n_kv_heads=1"], True,
     "ernie4_5_moe"),
    # noisy top-k in eval: softmax over the kept logits (renormalised even for k = 1)
    (["moe/router=noisy_topk", "model.top_k=1"], True, "mixtral"),
    # a dense moetrain model
    (["model.first_dense_layers=2"], False, "llama"),
])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Qwen2-MoE, no shared
def test_export_targets_match_logits(tmp_path, overrides, bias, target):
    model, cfg = _random_model(overrides, bias)
    assert export_model(model, cfg, tmp_path / "hf", progress=False) == Target(target)
    assert (_hf_logits(tmp_path / "hf") - _ours(model)).abs().max() < 1e-4


# ----------------------------------------------------------------------------- refused
@pytest.mark.parametrize("overrides,target,needles", [
    (["moe/router=expert_choice"], "auto", ["moe.router.name=expert_choice", "whole batch"]),
    (["moe/router=threshold"], "auto", ["moe.router.name=threshold"]),
    (["model.n_shared_experts=1"], "mixtral",
     ["model.n_shared_experts=1", "use --target ernie4_5_moe"]),
    (["model.n_shared_experts=1"], "qwen2_moe", ["shared_expert_gate"]),
    (["moe/router=deepseek_v3"], "mixtral",
     ["moe.router.score_func=sigmoid", "use --target glm4_moe"]),
    (["moe/router=deepseek_v3"], "deepseek_v3", ["multi-head latent attention", "glm4_moe"]),
    (["moe/router=deepseek_v3", "model.n_layers=3", "model.moe_every=2"], "auto",
     ["no Hugging Face target", "model.moe_every=2"]),
    (["model.top_k=1"], "mixtral", ["renormalises", "use --target qwen2_moe"]),
])
def test_unexportable_features_are_named(overrides, target, needles):
    model, cfg = _random_model(overrides)
    with pytest.raises(HFConversionError) as e:
        choose_target(model, cfg, target)
    for needle in needles:
        assert needle in str(e.value)


def test_nonzero_bias_needs_a_target_with_one():
    model, cfg = _random_model([], bias=True)  # softmax top-k with a nonzero expert bias
    with pytest.raises(HFConversionError, match="expert_bias is nonzero"):
        choose_target(model, cfg, "mixtral")
    assert choose_target(model, cfg) == Target.ernie4_5_moe


def test_schedule_activation_is_refused():
    from moetrain.config.schema import GateActivation

    model, cfg = _random_model([])
    for layer in model.moe_layers():
        layer.router.score_activation = GateActivation.tanh
    with pytest.raises(HFConversionError, match="schedule.activation=tanh"):
        choose_target(model, cfg)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_cache) -> Path:
    """The checkpoints directory of a 2-step run (softmax top-k, every layer MoE)."""
    from tests.distributed._runs import train

    tmp = tmp_path_factory.mktemp("short")
    train(_run(tmp, data_cache, "train.steps=2", "checkpoint.every=2"))
    return tmp / "run" / "checkpoints"


def test_bad_checkpoints_and_outputs_are_named(tmp_path, short_run):
    ckpt = short_run / "step_0000002"
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        moetrain.load(tmp_path / "nowhere")
    half = tmp_path / "copy" / "step_0000002"
    shutil.copytree(ckpt, half)
    (half / "COMMITTED").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no COMMITTED marker"):
        export_hf(half, tmp_path / "out")
    (half / "COMMITTED").write_text("{}")
    (half / CONFIG_FILE).unlink()
    with pytest.raises(ConfigError, match="has no config.yaml"):
        export_hf(half, tmp_path / "out")
    # The wrong config for these weights: the first mismatching tensor is named.
    wrong = compose(TINY + ["run.dir=/unused", "model.expert_hidden=48"])
    with pytest.raises(ConfigError, match="w1_EFD' has shape"):
        moetrain.load(half, config=wrong)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(HFConversionError, match="exists and is not empty"):
        export_hf(ckpt, busy)


def test_cli_sharded_export(tmp_path, short_run, capsys):
    spec = importlib.util.spec_from_file_location("export_hf_tool", _TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    out = tmp_path / "hf"
    ckpt = str(short_run)
    assert tool.main([ckpt, "--out", str(out), "--max-shard-size", "40KB",
                      "--no-progress"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    model, _ = moetrain.load(ckpt)
    assert (_hf_logits(out) - _ours(model)).abs().max() < 1e-4

    assert tool.main([ckpt, "--out", str(tmp_path / "hf2"), "--target", "glm4_moe"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot export to glm4_moe: moe.router.score_func=softmax" in err


def test_export_refuses_outputs_that_overlap_the_checkpoint(tmp_path):
    """--overwrite deletes the old output: an output that is, holds or lies inside the
    checkpoint being exported is refused before anything is read or written."""
    from moetrain.checkpoint.hf import HFConversionError, _check_out_dir

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_0000006"
    ckpt.mkdir(parents=True)
    (ckpt / "data").write_text("weights")
    for out in (ckpt, run, tmp_path, ckpt / "hf"):
        with pytest.raises(HFConversionError, match="overlaps the checkpoint"):
            _check_out_dir(out, overwrite=True, source=ckpt)
    _check_out_dir(tmp_path / "hf", overwrite=False, source=ckpt)  # a sibling is fine
    assert (ckpt / "data").read_text() == "weights"
