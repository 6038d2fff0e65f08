"""ttt_core.loading: every accepted weight format, the official ttt-video-dit key layout, and each bad-file case.

Tiny configs on CPU; all weights random (never zeros). The official layout test spells the official
parameter names out literally (read from ttt-video-dit's module definitions) next to the module of our
model each must land in, independently of the mapping tables in loading.py, and checks with float64
re-implementations of the official modules that the mapped tensors compute what they computed there.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.dit import TTTDiT
from ttt_video.ttt_core.loading import (
    CheckpointFormatError,
    LoadingError,
    StateDictMismatchError,
    convert_torch_checkpoint,
    infer_config,
    load_ttt_dit,
    load_ttt_weights,
    official_to_ours_key,
    ours_to_official_key,
    read_safetensors,
    save_ttt_dit,
    save_ttt_weights,
)

CFG = preset("tiny")
TEXT_LEN = CFG.max_text_seq_length


def tiny_diffusers(seed: int):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**CFG.diffusers_kwargs())
    randomize(model, seed)
    return model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorm weights around 1, everything else small), so that a tensor that
    lands in the wrong place or is left at its init is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if re.search(r"norm.*\.weight$|ttt_norm_weight$", name):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def random_ttt_dit(seed: int, **overrides) -> TTTDiT:
    torch.manual_seed(seed)
    model = TTTDiT(preset("tiny", **overrides))
    randomize(model, seed)
    return model.eval()


def inputs(num_segments: int = 1, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    frames = 13 + 12 * (num_segments - 1)
    latents = torch.randn(1, frames, CFG.in_channels, CFG.sample_height, CFG.sample_width, generator=gen)
    text = torch.randn(1, num_segments, TEXT_LEN, CFG.text_embed_dim, generator=gen)
    return latents.to(dtype), text.to(dtype), torch.tensor([417])


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor], keys=None) -> None:
    state = model.state_dict()
    keys = list(expected) if keys is None else keys
    for key in keys:
        assert torch.equal(state[key].to(expected[key].dtype), expected[key]), key


def no_ttt_warning():
    return pytest.warns(UserWarning, match=r"no TTT parameters.*initialised freshly \(seed 0")


# --------------------------------------------------------------------------------------------------
# (a) diffusers folders
# --------------------------------------------------------------------------------------------------
def test_diffusers_folder_root_and_transformer_subfolder(tmp_path):
    backbone = tiny_diffusers(1)
    backbone.save_pretrained(tmp_path / "CogVideoX-tiny" / "transformer")
    expected = backbone.state_dict()

    with no_ttt_warning():
        from_root = load_ttt_dit(tmp_path / "CogVideoX-tiny", config=CFG)
    with no_ttt_warning():
        from_sub = load_ttt_dit(tmp_path / "CogVideoX-tiny" / "transformer", config=CFG)
    assert isinstance(from_root, TTTDiT) and not from_root.training
    assert_same_state(from_root, expected)
    # the fresh TTT parameters: deterministic (seed) and initialised as the paper says
    ttt_state = {k: v for k, v in from_root.state_dict().items() if ".ttt" in k}
    assert_same_state(from_sub, ttt_state)
    assert len(ttt_state) == 2 * 22
    gates = from_root.transformer_blocks[1].ttt_gates
    assert torch.equal(gates.backward_video, torch.full((CFG.width,), CFG.gate_init))
    layer = from_root.transformer_blocks[1].ttt
    assert torch.equal(layer.ttt_norm_weight, torch.ones(CFG.num_attention_heads, CFG.attention_head_dim))
    assert abs(layer.W1.std().item() - 0.02) < 0.004
    assert not torch.equal(layer.W1, from_root.transformer_blocks[0].ttt.W1)


def test_diffusers_folder_weight_variant_and_inspect_cli(tmp_path, capsys):
    from ttt_video.ttt_core.loading import _main

    backbone = tiny_diffusers(30)
    backbone.save_pretrained(tmp_path / "transformer", variant="fp16")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors").exists()
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path, config=CFG)
    assert_same_state(model, backbone.state_dict())
    assert _main(["inspect", str(tmp_path)]) == 0
    assert f"{len(backbone.state_dict())} tensors, kind diffusers-folder, TTT: False" in capsys.readouterr().out


def test_diffusers_folder_config_json_gives_the_backbone(tmp_path):
    """Without config=, the backbone comes from transformer/config.json (TTT settings: defaults)."""
    tiny_diffusers(2).save_pretrained(tmp_path / "m" / "transformer")
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path / "m", global_layer="ttt_linear")
    cfg = model.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.text_embed_dim) == (2, 2, 16, 32)
    assert cfg.global_layer == "ttt_linear" and model.transformer_blocks[0].ttt.W1.shape == (2, 16, 16)


def test_sharded_diffusers_folder_with_index(tmp_path):
    backbone = tiny_diffusers(3)
    backbone.save_pretrained(tmp_path / "transformer", max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path, config=CFG, dtype=torch.bfloat16)
    assert model.proj_out.weight.dtype == torch.bfloat16
    expected = {k: v.to(torch.bfloat16) for k, v in backbone.state_dict().items()}
    assert_same_state(model, expected)


def test_folder_missing_pieces_are_named(tmp_path):
    backbone = tiny_diffusers(4)
    folder = tmp_path / "transformer"
    backbone.save_pretrained(folder, max_shard_size="60KB")
    victim = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointFormatError, match=re.escape(victim.name)):
        load_ttt_dit(tmp_path, config=CFG)

    (tmp_path / "no_config" / "transformer").mkdir(parents=True)
    backbone.save_pretrained(tmp_path / "no_config" / "transformer")
    (tmp_path / "no_config" / "transformer" / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match=r"transformer/config\.json is missing"):
        load_ttt_dit(tmp_path / "no_config")

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match=r"config\.json is missing and so are diffusion_pytorch_model"):
        load_ttt_dit(tmp_path / "empty")

    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text(json.dumps(backbone.config))
    (only_bin / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointFormatError, match=r"only pickled weights \(diffusion_pytorch_model\.bin\)"):
        load_ttt_dit(only_bin)

    dcp = tmp_path / "step-1000"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"\x80\x04junk")
    (dcp / "__0_0.distcp").write_bytes(b"junk")
    with pytest.raises(CheckpointFormatError, match=r"torch distributed \(DCP\) checkpoint"):
        load_ttt_dit(dcp)


# --------------------------------------------------------------------------------------------------
# (b) single files (ComfyUI models/diffusion_models), with and without prefix, config inference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_with_explicit_config(tmp_path, prefix):
    backbone = tiny_diffusers(5)
    state = backbone.state_dict()
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(tmp_path / "cogvideox_tiny.safetensors"))
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path / "cogvideox_tiny.safetensors", config=CFG)
    assert_same_state(model, state)
    if prefix:
        assert any("stripped the key prefix 'model.diffusion_model.'" in n for n in model.load_notes)


def test_single_file_in_fp8_is_upcast_to_bf16(tmp_path):
    state = tiny_diffusers(31).state_dict()
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    save_file(fp8, str(tmp_path / "cogvideox_fp8_e4m3fn.safetensors"))
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path / "cogvideox_fp8_e4m3fn.safetensors", config=CFG)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_state(model, {k: v.to(torch.bfloat16) for k, v in fp8.items()})
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_ttt_dit(tmp_path / "cogvideox_fp8_e4m3fn.safetensors", config=CFG, dtype="half-ish")


def test_single_file_config_inferred_from_shapes(tmp_path):
    backbone = tiny_diffusers(6)
    save_file({"diffusion_model." + k: v for k, v in backbone.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_ttt_dit(tmp_path / "w.safetensors")
    text = "\n".join(str(w.message) for w in caught)
    assert "inferred from tensor shapes: num_attention_heads=2, attention_head_dim=16, num_layers=2" in text
    assert "taken from preset 'cogvideox-5b'" in text and "no TTT parameters" in text
    cfg = model.config
    for name in ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
                 "patch_size", "text_embed_dim", "time_embed_dim"):  # fmt: skip
        assert getattr(cfg, name) == getattr(CFG, name), name
    assert_same_state(model, backbone.state_dict())


def test_infer_config_reads_the_ttt_kind():
    for layer, expansion in (("ttt_mlp", 4), ("ttt_linear", None)):
        state = TTTDiT(preset("tiny", global_layer=layer)).state_dict()
        cfg, notes = infer_config(state)
        assert cfg.global_layer == layer and cfg.num_layers == 2
        if expansion:
            assert cfg.mlp_expansion == expansion


# --------------------------------------------------------------------------------------------------
# (c) combined file round trip, dtypes, separate TTT weights
# --------------------------------------------------------------------------------------------------
def test_combined_round_trip_gives_equal_outputs(tmp_path):
    model = random_ttt_dit(7)
    path = save_ttt_dit(model, tmp_path / "ttt_dit_tiny.safetensors")
    loaded = load_ttt_dit(path)  # config from the metadata; no warning
    assert loaded.config == model.config
    assert_same_state(loaded, model.state_dict())
    latents, text, t = inputs(2)
    with torch.no_grad():
        out, out_loaded = model(latents, text, t), loaded(latents, text, t)
    assert out.abs().mean() > 0
    assert torch.equal(out, out_loaded)

    half = load_ttt_dit(path, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert_same_state(half, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    with torch.no_grad():
        out_half = half(*(x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs(2)))
    rel = (out_half.float() - out).norm() / out.norm()
    assert rel < 0.1, rel  # bf16 weights and activations: same model, coarse agreement


def test_round_trip_keeps_file_dtype_and_handles_shared_tensors(tmp_path):
    model = random_ttt_dit(8).to(torch.bfloat16)
    # a tied parameter: both names are written (safetensors refuses shared storage as such)
    model.transformer_blocks[1].ttt.wq.weight = model.transformer_blocks[0].ttt.wq.weight
    path = save_ttt_dit(model, tmp_path / "tied.safetensors")
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["transformer_blocks.1.ttt.wq.weight"], tensors["transformer_blocks.0.ttt.wq.weight"])
    assert json.loads(metadata["ttt_video.config"])["num_layers"] == 2
    loaded = load_ttt_dit(path)  # dtype=None: the file's
    assert loaded.proj_out.weight.dtype == torch.bfloat16
    assert_same_state(loaded, model.state_dict())


def test_separate_ttt_weights_file_on_top_of_cogvideox(tmp_path):
    backbone = tiny_diffusers(9)
    backbone.save_pretrained(tmp_path / "CogVideoX" / "transformer")
    # "fine-tuned" model: CogVideoX weights, trained TTT layers and attention q/k/v/o (the later stages)
    with no_ttt_warning():
        trained = load_ttt_dit(tmp_path / "CogVideoX", config=CFG)
    randomize(trained, 10)
    for key, value in backbone.state_dict().items():  # keep the untouched backbone equal to the file
        if ".attn1.to_" not in key:
            trained.state_dict()[key].copy_(value)
    path = save_ttt_weights(trained, tmp_path / "ttt.safetensors", names=["transformer_blocks.*.attn1.to_*"])
    tensors, _ = read_safetensors(path)
    assert len(tensors) == 2 * 22 + 2 * 8
    assert all(".ttt" in k or ".attn1.to_" in k for k in tensors)

    loaded = load_ttt_dit(tmp_path / "CogVideoX", ttt_weights=path, config=CFG)
    assert_same_state(loaded, trained.state_dict())
    latents, text, t = inputs(1, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(latents, text, t), trained(latents, text, t))

    # the TTT settings travel in the TTT file's metadata: no config needed with a diffusers folder
    linear = random_ttt_dit(11, global_layer="ttt_linear", mini_batch_size=8)
    save_ttt_weights(linear, tmp_path / "linear.safetensors")
    loaded = load_ttt_dit(tmp_path / "CogVideoX", ttt_weights=tmp_path / "linear.safetensors")
    assert loaded.config.global_layer == "ttt_linear" and loaded.config.mini_batch_size == 8
    ttt_only = {k: v for k, v in linear.state_dict().items() if ".ttt" in k}
    assert_same_state(loaded, ttt_only)

    # loading into an existing model, and a TTT file given as the main weights
    fresh = random_ttt_dit(12)
    load_ttt_weights(fresh, path)
    assert_same_state(fresh, {k: v for k, v in trained.state_dict().items() if k in tensors})
    with pytest.raises(LoadingError, match="pass the CogVideoX weights first"):
        load_ttt_dit(path)
    with pytest.raises(KeyError, match="matches no parameter"):
        save_ttt_weights(trained, tmp_path / "x.safetensors", names=["transformer_blocks.*.nothing"])


def test_save_only_trainable_or_ttt(tmp_path):
    model = random_ttt_dit(13)
    for name, p in model.named_parameters():
        p.requires_grad_(".attn1.to_q." in name)
    path = save_ttt_dit(model, tmp_path / "partial.safetensors", only_trainable_or_ttt=True)
    tensors, metadata = read_safetensors(path)
    assert metadata["ttt_video.kind"] == "ttt_weights"
    assert set(tensors) == {k for k in model.state_dict() if ".ttt" in k or ".attn1.to_q." in k}


def test_overwrite_is_refused_unless_asked(tmp_path):
    first, second = random_ttt_dit(14), random_ttt_dit(15)
    path = tmp_path / "model.safetensors"
    save_ttt_dit(first, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_ttt_dit(second, path)
    with pytest.raises(FileExistsError):
        save_ttt_weights(second, path)
    assert path.read_bytes() == before
    save_ttt_dit(second, path, overwrite=True)
    assert_same_state(load_ttt_dit(path), second.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left


# --------------------------------------------------------------------------------------------------
# official ttt-video-dit key layout
# --------------------------------------------------------------------------------------------------
W, T_DIM, H, D = CFG.width, CFG.time_embed_dim, CFG.num_attention_heads, CFG.attention_head_dim
P, C_IN, C_OUT, TXT = CFG.patch_size, CFG.in_channels, CFG.out_channels, CFG.text_embed_dim

# Official names (ttt/models/cogvideo/dit.py, ttt/models/ssm/ttt_layer.py), their shapes as the official
# modules create them, and where each must land in our model. Written out by hand for block 0.
OFFICIAL_TOP = [
    ("time_embed.0.weight", (T_DIM, W), lambda m: m.time_embedding.linear_1.weight),
    ("time_embed.0.bias", (T_DIM,), lambda m: m.time_embedding.linear_1.bias),
    ("time_embed.2.weight", (T_DIM, T_DIM), lambda m: m.time_embedding.linear_2.weight),
    ("time_embed.2.bias", (T_DIM,), lambda m: m.time_embedding.linear_2.bias),
    ("patch_embedding.vid_proj.weight", (W, C_IN, P, P), lambda m: m.patch_embed.proj.weight),
    ("patch_embedding.vid_proj.bias", (W,), lambda m: m.patch_embed.proj.bias),
    ("patch_embedding.text_proj.weight", (W, TXT), lambda m: m.patch_embed.text_proj.weight),
    ("patch_embedding.text_proj.bias", (W,), lambda m: m.patch_embed.text_proj.bias),
    ("transformer_norm.weight", (W,), lambda m: m.norm_final.weight),
    ("transformer_norm.bias", (W,), lambda m: m.norm_final.bias),
    ("final_layer.adaLN_modulation.1.weight", (2 * W, T_DIM), lambda m: m.norm_out.linear.weight),
    ("final_layer.adaLN_modulation.1.bias", (2 * W,), lambda m: m.norm_out.linear.bias),
    ("final_layer.norm.weight", (W,), lambda m: m.norm_out.norm.weight),
    ("final_layer.norm.bias", (W,), lambda m: m.norm_out.norm.bias),
    ("final_layer.linear.weight", (P * P * C_OUT, W), lambda m: m.proj_out.weight),
    ("final_layer.linear.bias", (P * P * C_OUT,), lambda m: m.proj_out.bias),
]
_B = lambda m: m.transformer_blocks[0]  # noqa: E731
OFFICIAL_BLOCK0 = [
    ("layers.0.pre_seq_layernorm.weight", (W,), lambda m: _B(m).norm1.norm.weight),
    ("layers.0.pre_seq_layernorm.bias", (W,), lambda m: _B(m).norm1.norm.bias),
    ("layers.0.pre_seq_adaLN_modulation.1.weight", (6 * W, T_DIM), lambda m: _B(m).norm1.linear.weight),
    ("layers.0.pre_seq_adaLN_modulation.1.bias", (6 * W,), lambda m: _B(m).norm1.linear.bias),
    ("layers.0.seq_modeling_block.q_norm.weight", (D,), lambda m: _B(m).attn1.norm_q.weight),
    ("layers.0.seq_modeling_block.q_norm.bias", (D,), lambda m: _B(m).attn1.norm_q.bias),
    ("layers.0.seq_modeling_block.k_norm.weight", (D,), lambda m: _B(m).attn1.norm_k.weight),
    ("layers.0.seq_modeling_block.k_norm.bias", (D,), lambda m: _B(m).attn1.norm_k.bias),
    ("layers.0.seq_modeling_block.q.weight", (W, W), lambda m: _B(m).attn1.to_q.weight),
    ("layers.0.seq_modeling_block.q.bias", (W,), lambda m: _B(m).attn1.to_q.bias),
    ("layers.0.seq_modeling_block.k.weight", (W, W), lambda m: _B(m).attn1.to_k.weight),
    ("layers.0.seq_modeling_block.k.bias", (W,), lambda m: _B(m).attn1.to_k.bias),
    ("layers.0.seq_modeling_block.v.weight", (W, W), lambda m: _B(m).attn1.to_v.weight),
    ("layers.0.seq_modeling_block.v.bias", (W,), lambda m: _B(m).attn1.to_v.bias),
    ("layers.0.seq_modeling_block.o.weight", (W, W), lambda m: _B(m).attn1.to_out[0].weight),
    ("layers.0.seq_modeling_block.o.bias", (W,), lambda m: _B(m).attn1.to_out[0].bias),
    ("layers.0.seq_modeling_block.ssm.ttt.wq.weight", (W, W), lambda m: _B(m).ttt.wq.weight),
    ("layers.0.seq_modeling_block.ssm.ttt.wq.bias", (W,), lambda m: _B(m).ttt.wq.bias),
    ("layers.0.seq_modeling_block.ssm.ttt.wk.weight", (W, W), lambda m: _B(m).ttt.wk.weight),
    ("layers.0.seq_modeling_block.ssm.ttt.wk.bias", (W,), lambda m: _B(m).ttt.wk.bias),
    ("layers.0.seq_modeling_block.ssm.ttt.wv.weight", (W, W), lambda m: _B(m).ttt.wv.weight),
    ("layers.0.seq_modeling_block.ssm.ttt.wv.bias", (W,), lambda m: _B(m).ttt.wv.bias),
    ("layers.0.seq_modeling_block.ssm.ttt.wo.weight", (W, W), lambda m: _B(m).ttt.wo.weight),
    ("layers.0.seq_modeling_block.ssm.ttt.wo.bias", (W,), lambda m: _B(m).ttt.wo.bias),
    ("layers.0.seq_modeling_block.ssm.ttt.post_norm.weight", (W,), lambda m: _B(m).ttt.post_norm.weight),
    ("layers.0.seq_modeling_block.ssm.ttt.post_norm.bias", (W,), lambda m: _B(m).ttt.post_norm.bias),
    ("layers.0.seq_modeling_block.ssm.ttt.ttt_norm_weight", (H, D), lambda m: _B(m).ttt.ttt_norm_weight),
    ("layers.0.seq_modeling_block.ssm.ttt.ttt_norm_bias", (H, D), lambda m: _B(m).ttt.ttt_norm_bias),
    ("layers.0.seq_modeling_block.ssm.ttt.learnable_ttt_lr_weight", (H, 1, W), lambda m: _B(m).ttt.learnable_ttt_lr_weight),
    ("layers.0.seq_modeling_block.ssm.ttt.learnable_ttt_lr_bias", (H, 1), lambda m: _B(m).ttt.learnable_ttt_lr_bias),
    ("layers.0.seq_modeling_block.ssm.ttt.W1", (H, D, 4 * D), lambda m: _B(m).ttt.W1),
    ("layers.0.seq_modeling_block.ssm.ttt.b1", (H, 1, 4 * D), lambda m: _B(m).ttt.b1),
    ("layers.0.seq_modeling_block.ssm.ttt.W2", (H, 4 * D, D), lambda m: _B(m).ttt.W2),
    ("layers.0.seq_modeling_block.ssm.ttt.b2", (H, 1, D), lambda m: _B(m).ttt.b2),
    ("layers.0.seq_modeling_block.forward_ssm_gating_text.gating_alpha", (W,), lambda m: _B(m).ttt_gates.forward_text),
    ("layers.0.seq_modeling_block.forward_ssm_gating_video.gating_alpha", (W,), lambda m: _B(m).ttt_gates.forward_video),
    ("layers.0.seq_modeling_block.backward_ssm_gating_text.gating_alpha", (W,), lambda m: _B(m).ttt_gates.backward_text),
    ("layers.0.seq_modeling_block.backward_ssm_gating_video.gating_alpha", (W,), lambda m: _B(m).ttt_gates.backward_video),
    ("layers.0.pre_mlp_layernorm.weight", (W,), lambda m: _B(m).norm2.norm.weight),
    ("layers.0.pre_mlp_layernorm.bias", (W,), lambda m: _B(m).norm2.norm.bias),
    ("layers.0.pre_mlp_adaLN_modulation.1.weight", (6 * W, T_DIM), lambda m: _B(m).norm2.linear.weight),
    ("layers.0.pre_mlp_adaLN_modulation.1.bias", (6 * W,), lambda m: _B(m).norm2.linear.bias),
    ("layers.0.mlp.layer1.weight", (4 * W, W), lambda m: _B(m).ff.net[0].proj.weight),
    ("layers.0.mlp.layer1.bias", (4 * W,), lambda m: _B(m).ff.net[0].proj.bias),
    ("layers.0.mlp.layer2.weight", (W, 4 * W), lambda m: _B(m).ff.net[2].weight),
    ("layers.0.mlp.layer2.bias", (W,), lambda m: _B(m).ff.net[2].bias),
]


def official_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random state dict laid out as the official DiffusionTransformer's, for the tiny config."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    entries = OFFICIAL_TOP + [
        (name.replace("layers.0.", f"layers.{i}.", 1), shape, None)
        for i in range(CFG.num_layers)
        for name, shape, _ in OFFICIAL_BLOCK0
    ]
    for name, shape, _ in entries:
        noise = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        state[name] = (1.0 + noise if re.search(r"norm\.weight$", name) else noise).float()
    return state


def test_official_key_names_land_where_the_official_modules_were(tmp_path):
    state = official_state_dict(16)
    assert len(state) == 16 + CFG.num_layers * 46
    save_file(state, str(tmp_path / "official.safetensors"))
    model = load_ttt_dit(tmp_path / "official.safetensors", config=CFG)  # strict: every key accounted for
    for name, _, where in OFFICIAL_TOP + OFFICIAL_BLOCK0:
        assert torch.equal(where(model), state[name]), name
    assert torch.equal(model.transformer_blocks[1].ttt.W2, state["layers.1.seq_modeling_block.ssm.ttt.W2"])
    for name in state:  # the tables in loading.py are a bijection on these names
        assert ours_to_official_key(official_to_ours_key(name)) == name


def test_official_modules_compute_the_same_with_mapped_weights(tmp_path):
    """Float64 re-implementations of the official modules (their forward code, paraphrased) with the
    official tensors agree with our modules after the mapping: no tensor needs permuting."""
    state = {k: v.double() for k, v in official_state_dict(17).items()}
    save_file({k: v.float() for k, v in state.items()}, str(tmp_path / "official.safetensors"))
    model = load_ttt_dit(tmp_path / "official.safetensors", config=CFG, dtype=torch.float64)
    gen = torch.Generator().manual_seed(18)
    t = torch.tensor([3.0, 911.0], dtype=torch.float64)
    lin = lambda x, name: F.linear(x, state[name + ".weight"], state[name + ".bias"])  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, (W,), state[name + ".weight"], state[name + ".bias"], CFG.norm_eps)  # noqa: E731

    # timestep_embedding(t, model_dim): [cos, sin] with freqs exp(-ln(1e4) i / half), computed in float32
    # by both codes (in a different operation order, hence the float32-level tolerance on the sinusoid)
    half = W // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    sinusoid = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    ours_sinusoid = model.time_proj(t).double()
    torch.testing.assert_close(ours_sinusoid, sinusoid, rtol=0, atol=1e-5)
    t_emb = lin(F.silu(lin(sinusoid, "time_embed.0")), "time_embed.2")
    torch.testing.assert_close(model.time_embedding(sinusoid), t_emb, rtol=1e-12, atol=1e-12)

    # PatchEmbedding: Conv2d per frame, "(b t) c h w -> b (t h w) c"; text_proj
    video = torch.randn(2, 3, C_IN, 4, 6, generator=gen, dtype=torch.float64)
    text = torch.randn(2, 5, TXT, generator=gen, dtype=torch.float64)
    conv = F.conv2d(video.flatten(0, 1), state["patch_embedding.vid_proj.weight"], state["patch_embedding.vid_proj.bias"], stride=P)
    vid_tokens = conv.reshape(2, 3, W, 2, 3).permute(0, 1, 3, 4, 2).reshape(2, 3 * 2 * 3, W)
    ours_tokens = model.patch_embed(text, video)
    torch.testing.assert_close(ours_tokens, torch.cat([lin(text, "patch_embedding.text_proj"), vid_tokens], 1))

    # TransformerLayer adaLN: chunk(6) = shift, scale, gate, text_shift, text_scale, text_gate
    x_vid = torch.randn(2, 7, W, generator=gen, dtype=torch.float64)
    x_txt = torch.randn(2, 5, W, generator=gen, dtype=torch.float64)
    for official, ours in (("layers.0.pre_seq", model.transformer_blocks[0].norm1),
                           ("layers.0.pre_mlp", model.transformer_blocks[0].norm2)):  # fmt: skip
        shift, scale, gate, tshift, tscale, tgate = lin(F.silu(t_emb), f"{official}_adaLN_modulation.1").chunk(6, dim=1)
        vid_in = ln(x_vid, f"{official}_layernorm") * (1 + scale[:, None]) + shift[:, None]
        txt_in = ln(x_txt, f"{official}_layernorm") * (1 + tscale[:, None]) + tshift[:, None]
        o_vid, o_txt, o_gate, o_tgate = ours(x_vid, x_txt, t_emb)
        for a, b in ((o_vid, vid_in), (o_txt, txt_in), (o_gate, gate[:, None]), (o_tgate, tgate[:, None])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # MLP: layer2(gelu_tanh(layer1(x)))
    mlp = lin(F.gelu(lin(x_vid, "layers.0.mlp.layer1"), approximate="tanh"), "layers.0.mlp.layer2")
    torch.testing.assert_close(model.transformer_blocks[0].ff(x_vid), mlp, rtol=1e-12, atol=1e-12)

    # FinalLayer: shift, scale = chunk(2); linear(LN(x) * (1 + scale) + shift)   (after transformer_norm)
    shift, scale = lin(F.silu(t_emb), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    final = lin(ln(ln(x_vid, "transformer_norm"), "final_layer.norm") * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    ours_final = model.proj_out(model.norm_out(model.norm_final(x_vid), temb=t_emb))
    torch.testing.assert_close(ours_final, final, rtol=1e-12, atol=1e-12)

    # SSMGating: tanh(gating_alpha) * x
    gate_in = torch.randn(2, 5, W, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        model.transformer_blocks[1].ttt_gates("backward_text", gate_in),
        torch.tanh(state["layers.1.seq_modeling_block.backward_ssm_gating_text.gating_alpha"]) * gate_in,
    )


def test_official_training_checkpoint_layouts(tmp_path):
    """The model part of an official full checkpoint ({"model": ..., "optimizer": ...}), flat with a
    "model." prefix (safetensors), or nested in a torch.save file converted with weights_only=True."""
    state = official_state_dict(19)
    flat = {f"model.{k}": v for k, v in state.items()}
    flat["optimizer.state.layers.0.mlp.layer1.weight.exp_avg"] = torch.randn(4 * W, W)
    flat["lr_scheduler.last_epoch"] = torch.tensor(5.0)
    save_file(flat, str(tmp_path / "flat.safetensors"))
    model = load_ttt_dit(tmp_path / "flat.safetensors", config=CFG)
    assert torch.equal(model.transformer_blocks[1].attn1.to_out[0].weight, state["layers.1.seq_modeling_block.o.weight"])
    assert any("ignored 2 non-model entries" in n for n in model.load_notes)

    nested = {
        "model": state,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}},
                      "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.95), "params": [0]}]},  # fmt: skip
        "lr_scheduler": {"last_epoch": 5},
        "metadata": {"wandb_id": "abc"},
    }
    torch.save(nested, tmp_path / "official.pt")
    converted = convert_torch_checkpoint(tmp_path / "official.pt", tmp_path / "official.safetensors")
    tensors, _ = read_safetensors(converted)
    assert set(tensors) == set(state)
    model = load_ttt_dit(converted, config=CFG)
    assert torch.equal(model.patch_embed.proj.weight, state["patch_embedding.vid_proj.weight"])


def test_official_cogvideox_only_weights_get_fresh_ttt(tmp_path):
    state = {k: v for k, v in official_state_dict(20).items() if ".ssm." not in k and "gating" not in k}
    save_file(state, str(tmp_path / "converted_from_hf.safetensors"))
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path / "converted_from_hf.safetensors", config=CFG)
    assert torch.equal(model.transformer_blocks[0].norm2.linear.weight, state["layers.0.pre_mlp_adaLN_modulation.1.weight"])


# --------------------------------------------------------------------------------------------------
# key mismatches: one error listing everything
# --------------------------------------------------------------------------------------------------
def write_combined(tmp_path, state, name="m.safetensors", cfg=CFG):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"ttt_video.kind": "ttt_dit", "ttt_video.config": cfg.to_json()})  # fmt: skip
    return path


def test_missing_keys_are_listed_first_ten_and_count(tmp_path):
    state = random_ttt_dit(21).state_dict()
    dropped = [k for k in state if ".norm" in k and ".ttt" not in k][:15]
    assert len(dropped) == 15
    path = write_combined(tmp_path, {k: v for k, v in state.items() if k not in dropped})
    with pytest.raises(StateDictMismatchError) as info:
        load_ttt_dit(path)
    err = info.value
    assert isinstance(err, ValueError) and sorted(err.missing) == sorted(dropped)
    assert not err.unexpected and not err.mismatched
    msg = str(err)
    assert "15 missing key(s)" in msg and "... and 5 more" in msg and str(path) in msg
    assert sum(k in msg for k in dropped) == 10


def test_unexpected_and_wrong_shaped_keys_in_one_error(tmp_path):
    state = random_ttt_dit(22).state_dict()
    state["transformer_blocks.0.attn1.extra.weight"] = torch.randn(3)
    state["lora_unet_something"] = torch.randn(2)
    state["transformer_blocks.1.ttt.W1"] = torch.randn(2, 16, 32)
    del state["transformer_blocks.1.ff.net.2.bias"]
    with pytest.raises(StateDictMismatchError) as info:
        load_ttt_dit(write_combined(tmp_path, state))
    err = info.value
    assert err.missing == ["transformer_blocks.1.ff.net.2.bias"]
    assert sorted(err.unexpected) == ["lora_unet_something", "transformer_blocks.0.attn1.extra.weight"]
    assert err.mismatched == [("transformer_blocks.1.ttt.W1", (2, 16, 32), (2, 16, 64))]
    msg = str(err)
    assert "1 missing key(s)" in msg and "2 unexpected key(s)" in msg
    assert "transformer_blocks.1.ttt.W1: file [2, 16, 32] vs model [2, 16, 64]" in msg

    # strict=False: keeps going with a warning; the mismatched / missing parameters keep a fresh init
    with pytest.warns(UserWarning, match="strict=False"):
        model = load_ttt_dit(write_combined(tmp_path, state, "m2.safetensors"), strict=False)
    assert torch.equal(model.transformer_blocks[0].attn1.to_q.weight, state["transformer_blocks.0.attn1.to_q.weight"])


def test_config_mismatch_is_reported_as_shapes_and_layer_kind(tmp_path):
    path = save_ttt_dit(random_ttt_dit(23), tmp_path / "mlp.safetensors")
    with pytest.raises(StateDictMismatchError, match="wrong shape"):
        load_ttt_dit(path, config=preset("tiny", attention_head_dim=32, num_attention_heads=1, text_embed_dim=16))
    with pytest.raises(StateDictMismatchError, match=r"unexpected key.*\n(.*\n)*hint: the weights have TTT layers but the model was built with global_layer='none'"):
        load_ttt_dit(path, global_layer="none")
    with pytest.raises(StateDictMismatchError, match="wrong shape"):
        load_ttt_dit(path, global_layer="ttt_linear")


# --------------------------------------------------------------------------------------------------
# bad files: never unpickled, clear errors
# --------------------------------------------------------------------------------------------------
class _Exploit:
    marker: str = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's restricted unpickler
def test_pickle_files_are_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    backbone = tmp_path / "CogVideoX"
    tiny_diffusers(27).save_pretrained(backbone / "transformer")
    for name, writer in (
        ("model.ckpt", lambda p: p.write_bytes(pickle.dumps({"state_dict": _Exploit()}, protocol=4))),
        ("model.pt", lambda p: torch.save({"state_dict": _Exploit()}, p)),  # zip container with a pickle inside
        ("model.safetensors", lambda p: p.write_bytes(pickle.dumps(_Exploit(), protocol=2))),  # lying name
    ):
        path = tmp_path / name
        writer(path)
        with pytest.raises(CheckpointFormatError, match="not a safetensors file") as info:
            load_ttt_dit(path, config=CFG)
        assert "pickle" in str(info.value) or "zip" in str(info.value)
        with pytest.raises(CheckpointFormatError, match="not a safetensors file"):
            load_ttt_dit(backbone, ttt_weights=path)
        # the explicit converter uses torch's restricted unpickler only, which refuses the payload
        with pytest.raises(CheckpointFormatError, match="weights_only=True"):
            convert_torch_checkpoint(path, tmp_path / f"{name}.safetensors")
    assert not marker.exists()


def test_valid_file_whose_header_length_starts_like_a_pickle(tmp_path):
    """A header of 640 = 0x0280 bytes makes a valid safetensors file start with b"\\x80\\x02" (a pickle's
    protocol-2 opcode): the structure decides, not the first bytes."""
    path = tmp_path / "lookalike.safetensors"
    tensor = torch.randn(3, 2)
    for pad in range(700):
        save_file({"x": tensor}, str(path), metadata={"pad": "a" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no padding gave a 640-byte header")
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["x"], tensor) and len(metadata["pad"]) == pad


def test_random_bytes_and_empty_file(tmp_path):
    gen = torch.Generator().manual_seed(24)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointFormatError, match="not a safetensors file"):
        load_ttt_dit(junk, config=CFG)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="0 bytes"):
        load_ttt_dit(empty, config=CFG)
    with pytest.raises(CheckpointFormatError, match="not found"):
        load_ttt_dit(tmp_path / "absent.safetensors")


def test_truncated_files(tmp_path):
    path = save_ttt_dit(random_ttt_dit(25), tmp_path / "full.safetensors")
    data = path.read_bytes()
    cut_data = tmp_path / "cut_data.safetensors"
    cut_data.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointFormatError, match=rf"truncated: .* describes {len(data)} bytes .* has {len(data) - 1000}"):
        load_ttt_dit(cut_data)
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(data[:200])
    with pytest.raises(CheckpointFormatError, match="truncated: its safetensors header needs"):
        load_ttt_dit(cut_header)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(data + b"\0" * 10)
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        load_ttt_dit(longer)


def test_missing_config_cannot_be_guessed(tmp_path):
    """A single file without metadata whose shapes do not reveal the model: a clear error asking for config."""
    state = {k: v for k, v in tiny_diffusers(26).state_dict().items() if not k.startswith("patch_embed.")}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LoadingError, match=r"cannot infer the model configuration .*patch_embed\.proj\.weight.*config=preset"):
        load_ttt_dit(tmp_path / "partial.safetensors")
    bad = tmp_path / "bad_meta.safetensors"
    save_file({"proj_out.weight": torch.randn(2, 2)}, str(bad), metadata={"ttt_video.config": "{not json"})
    with pytest.raises(CheckpointFormatError, match="corrupt config in the safetensors metadata"):
        load_ttt_dit(bad)


# --------------------------------------------------------------------------------------------------
# ComfyUI-native CogVideoX names (comfy/ldm/cogvideo/model.py), e.g. a model saved from a ComfyUI graph
# --------------------------------------------------------------------------------------------------
COMFY_TO_DIFFUSERS_BLOCK0 = {
    "blocks.0.norm1.linear": "transformer_blocks.0.norm1.linear",
    "blocks.0.norm1.norm": "transformer_blocks.0.norm1.norm",
    "blocks.0.q": "transformer_blocks.0.attn1.to_q",
    "blocks.0.k": "transformer_blocks.0.attn1.to_k",
    "blocks.0.v": "transformer_blocks.0.attn1.to_v",
    "blocks.0.norm_q": "transformer_blocks.0.attn1.norm_q",
    "blocks.0.norm_k": "transformer_blocks.0.attn1.norm_k",
    "blocks.0.attn_out": "transformer_blocks.0.attn1.to_out.0",
    "blocks.0.norm2.linear": "transformer_blocks.0.norm2.linear",
    "blocks.0.norm2.norm": "transformer_blocks.0.norm2.norm",
    "blocks.0.ff_proj": "transformer_blocks.0.ff.net.0.proj",
    "blocks.0.ff_out": "transformer_blocks.0.ff.net.2",
}
COMFY_TO_DIFFUSERS_TOP = {
    "time_embedding_linear_1": "time_embedding.linear_1",
    "time_embedding_linear_2": "time_embedding.linear_2",
    "patch_embed.proj": "patch_embed.proj",
    "patch_embed.text_proj": "patch_embed.text_proj",
    "norm_final": "norm_final",
    "norm_out.linear": "norm_out.linear",
    "norm_out.norm": "norm_out.norm",
    "proj_out": "proj_out",
}


def test_comfyui_native_key_names(tmp_path):
    backbone = tiny_diffusers(28)
    state = backbone.state_dict()
    table = dict(COMFY_TO_DIFFUSERS_TOP)
    for i in range(CFG.num_layers):
        table.update({c.replace("blocks.0.", f"blocks.{i}."): d.replace("blocks.0.", f"blocks.{i}.")
                      for c, d in COMFY_TO_DIFFUSERS_BLOCK0.items()})  # fmt: skip
    comfy = {f"model.diffusion_model.{c}.{p}": state[f"{d}.{p}"] for c, d in table.items() for p in ("weight", "bias")}
    assert len(comfy) == len(state)
    save_file(comfy, str(tmp_path / "cogvideox_comfy.safetensors"))
    with no_ttt_warning():
        model = load_ttt_dit(tmp_path / "cogvideox_comfy.safetensors", config=CFG)
    assert_same_state(model, state)
    assert any("ComfyUI-native" in n for n in model.load_notes)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_official_dcp_checkpoint_through_the_documented_conversion(tmp_path):
    """docs/loading.md: an official torch DCP checkpoint is refused with a hint; the two documented steps
    (dcp_to_torch_save, then our weights_only converter) give a loadable safetensors file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = official_state_dict(29)
    optimizer = {"state": {"layers.0.mlp.layer1.weight": {"exp_avg": torch.randn(3), "step": torch.tensor(2.0)}},
                 "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.95), "params": ["layers.0.mlp.layer1.weight"]}]}  # fmt: skip
    dcp.save({"model": state, "optimizer": optimizer, "lr_scheduler": {"last_epoch": 3}}, checkpoint_id=tmp_path / "step-5000")
    with pytest.raises(CheckpointFormatError, match=r"torch distributed \(DCP\) checkpoint.*docs/loading\.md"):
        load_ttt_dit(tmp_path / "step-5000", config=CFG)
    dcp_to_torch_save(tmp_path / "step-5000", tmp_path / "official.pt")  # the user's step (trusted file)
    converted = convert_torch_checkpoint(tmp_path / "official.pt", tmp_path / "official.safetensors")
    model = load_ttt_dit(converted, config=CFG)
    assert torch.equal(model.transformer_blocks[1].ttt.W1, state["layers.1.seq_modeling_block.ssm.ttt.W1"])
    assert torch.equal(model.norm_out.linear.weight, state["final_layer.adaLN_modulation.1.weight"])
