"""The TinyVLA policy and the loader modes of vla_exp/policy/model.py (model.head_loading), on the tiny config."""
import os
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from vla_exp import UsageError
from vla_exp.policy.head import ConditionalUnet1D
from vla_exp.policy.load import backbone_path, load_policy
from vla_exp.policy.model import TinyVLAForCausalLM, TinyVLAPolicy

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
B = 2
RAW = (nn.Conv1d, nn.ConvTranspose1d, nn.GroupNorm)  # the modules transformers < 4.54 left as raw memory
INITIALISED = (nn.Linear, nn.LayerNorm)  # the ones GPTNeoX's _init_weights knew


def tiny_cfg(**changes):
    # the model's dims follow the data's: the node keeps its parent so that they resolve
    cfg = OmegaConf.create({"model": OmegaConf.load(CONF / "tiny.yaml"),
                            "data": OmegaConf.load(CONF.parent / "data" / "tint.yaml")}).model
    for k, v in changes.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def cache(cache_dir):
    return os.environ["VLA_EXP_CACHE"]


@pytest.fixture(scope="module")
def loaded(cache):
    """Five loads of the tiny policy, shared by the module's tests, all with the network switched off (a connection
    attempt raises), so nothing, tokenizer included, may be downloaded."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "getaddrinfo", no_network)
        for mode, seed in [("current", 0), ("legacy_zeros", 0), ("legacy_stale", 0), ("legacy_stale", 1)]:
            out[mode, seed] = load_policy(tiny_cfg(head_loading=mode), cache, seed)
        out["legacy_stale", "again"] = load_policy(tiny_cfg(head_loading="legacy_stale"), cache, 0)
    for policy, _, _ in out.values():
        policy.eval()
    return out


@pytest.fixture(scope="module")
def checkpoint(cache, loaded):
    return TinyVLAForCausalLM.from_pretrained(backbone_path(tiny_cfg(), cache))


def head_params(policy, kinds):
    return [(f"{n}.{pn}", p) for n, m in policy.embed_out.named_modules() if isinstance(m, kinds)
            for pn, p in m.named_parameters(recurse=False)]


def backbone_params(policy):
    return {n: p for n, p in policy.named_parameters() if not n.startswith("embed_out.")}


def inputs(tokenizer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tok = tokenizer(["go left", "go right"], padding=True, return_tensors="pt")
    return dict(images=torch.randn(B, 3, 64, 64, generator=gen), input_ids=tok.input_ids,
                attention_mask=tok.attention_mask, state=torch.randn(B, 2, generator=gen),
                noisy_actions=torch.randn(B, 16, 2, generator=gen), timesteps=torch.randint(0, 100, (B,), generator=gen))


def bits(t):
    """Raw float32 bit patterns: compares NaN-holding tensors bit for bit."""
    return t.detach().contiguous().view(torch.int32)


def check_linear_and_layer_norm_like_gpt_neox(policy):
    std = policy.config.text_config.initializer_range
    assert std == 0.02
    linears = [m for m in policy.embed_out.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert weights.std().item() == pytest.approx(std, rel=0.05)
    assert weights.mean().item() == pytest.approx(0.0, abs=1e-3)
    for m in linears:
        if m.weight.numel() >= 1000:
            assert m.weight.std().item() == pytest.approx(std, rel=0.15)
        assert torch.count_nonzero(m.bias).item() == 0
    norms = [m for m in policy.embed_out.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 1
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


# ---------------------------------------------------------------------------------------------------------------
# the head


def test_unet_output_shape_equals_sample_shape_and_two_transposed_convs():
    c = tiny_cfg().config
    torch.manual_seed(0)
    head = ConditionalUnet1D(c.action_dim, c.state_dim, c.text_config.hidden_size, c.down_dims, c.step_embed_dim,
                             c.kernel_size, c.n_groups).eval()
    assert sum(isinstance(m, nn.ConvTranspose1d) for m in head.modules()) == 2
    for batch, horizon in [(3, c.horizon), (1, 8)]:
        sample = torch.randn(batch, horizon, c.action_dim)
        with torch.no_grad():
            out = head(sample, torch.arange(batch), torch.randn(batch, c.text_config.hidden_size),
                       torch.randn(batch, c.state_dim))
        assert out.shape == sample.shape == (batch, horizon, 2)
        assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_head_keys_are_tinyvlas_and_old_keys_still_load():
    """TinyVLA's ConditionalUnet1D nests each Conv1dBlock's layers in `block` and each resampling conv in `conv`."""
    head = ConditionalUnet1D(2, 2, 32, (16, 32), 16, 5, 8)
    keys = set(head.state_dict())
    assert {"down_modules.0.0.blocks.0.block.0.weight", "down_modules.0.0.blocks.1.block.1.bias",
            "down_modules.0.2.conv.weight", "up_modules.0.2.conv.bias", "mid_modules.1.cond_encoder.1.weight",
            "final_conv.0.block.0.weight", "final_conv.1.weight", "norm_after_pool.weight", "combine.weight",
            "diffusion_step_encoder.1.weight"} <= keys
    assert not [k for k in keys if ".blocks." in k and ".block." not in k]
    old = {k.replace(".block.", ".").replace(".conv.", "."): v + 1 for k, v in head.state_dict().items()}
    renamed = {k for k in keys if ".block." in k or ".conv." in k}  # as a head of an earlier vla-exp saved them
    assert len(old) == len(keys) and len(renamed) > 40 and len(set(old) - keys) == len(renamed)
    fresh = ConditionalUnet1D(2, 2, 32, (16, 32), 16, 5, 8)
    fresh.load_state_dict(old)  # strict
    assert all(torch.equal(v, head.state_dict()[k] + 1) for k, v in fresh.state_dict().items())


def test_policy_head_is_the_unet(loaded):
    policy = loaded["current", 0][0]
    assert isinstance(policy, TinyVLAPolicy) and isinstance(policy.embed_out, ConditionalUnet1D)
    assert sum(isinstance(m, nn.ConvTranspose1d) for m in policy.embed_out.modules()) == 2


# ---------------------------------------------------------------------------------------------------------------
# head_loading=current (transformers 5 initialises what the checkpoint lacks)


def test_current_missing_names_are_exactly_the_head_parameters(loaded, checkpoint):
    policy, _, missing = loaded["current", 0]
    head_names = sorted(n for n, _ in policy.named_parameters() if n.startswith("embed_out."))
    assert len(head_names) > 100
    assert missing == head_names
    # the checkpoint's own `embed_out` is the vocabulary head: none of the UNet's names are in it
    assert not set(missing) & set(checkpoint.state_dict())


def test_current_backbone_equals_the_checkpoint(loaded, checkpoint):
    policy = loaded["current", 0][0]
    ours, saved = backbone_params(policy), backbone_params(checkpoint)
    assert ours.keys() == saved.keys() and len(ours) > 10
    for n in ours:
        assert torch.equal(ours[n], saved[n]), n


def test_current_head_is_initialised_like_transformers_5(loaded):
    policy = loaded["current", 0][0]
    convs = [m for m in policy.embed_out.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    pooled = torch.cat([m.weight.detach().flatten() for m in convs])
    assert pooled.std().item() == pytest.approx(0.02, rel=0.02)  # normal(0, initializer_range)
    for m in convs:
        # per tensor where it has enough values for a stable estimate; the small ones (e.g. the 64x2x1 final conv,
        # 128 values) are covered by the pooled check above
        if m.weight.numel() >= 1000:
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert torch.count_nonzero(m.bias).item() == 0
    for m in policy.embed_out.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    check_linear_and_layer_norm_like_gpt_neox(policy)


def test_current_forward_is_finite_and_alive(loaded):
    policy, tokenizer, _ = loaded["current", 0]
    with torch.no_grad():
        out = policy(**inputs(tokenizer))
    assert out.shape == (B, 16, 2)
    assert torch.isfinite(out).all() and out.abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# head_loading=legacy_zeros


def test_legacy_zeros_raw_modules_are_exactly_zero(loaded):
    policy = loaded["legacy_zeros", 0][0]
    params = head_params(policy, RAW)
    assert len(params) > 50
    for n, p in params:
        assert torch.count_nonzero(p).item() == 0, n


def test_legacy_zeros_linear_and_layer_norm(loaded):
    check_linear_and_layer_norm_like_gpt_neox(loaded["legacy_zeros", 0][0])


def test_legacy_zeros_head_outputs_exactly_zero(loaded):
    policy, tokenizer, missing = loaded["legacy_zeros", 0]
    assert missing == loaded["current", 0][2]
    with torch.no_grad():
        out = policy(**inputs(tokenizer))
    assert out.shape == (B, 16, 2)
    assert torch.count_nonzero(out).item() == 0


def test_legacy_zeros_backbone_equals_current(loaded):
    ours, ref = backbone_params(loaded["legacy_zeros", 0][0]), backbone_params(loaded["current", 0][0])
    assert ours.keys() == ref.keys()
    for n in ours:
        assert torch.equal(ours[n], ref[n]), n


# ---------------------------------------------------------------------------------------------------------------
# head_loading=legacy_stale


def test_legacy_stale_is_reproducible_for_a_seed(loaded):
    a, b = dict(loaded["legacy_stale", 0][0].embed_out.named_parameters()), \
        dict(loaded["legacy_stale", "again"][0].embed_out.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(bits(a[n]), bits(b[n])), n


def test_legacy_stale_differs_between_seeds(loaded):
    a = head_params(loaded["legacy_stale", 0][0], RAW)
    b = head_params(loaded["legacy_stale", 1][0], RAW)
    differing = [n for (n, p), (_, q) in zip(a, b) if not torch.equal(bits(p), bits(q))]
    big = [n for n, p in a if p.numel() >= 1000]
    assert set(big) <= set(differing)  # every large tensor differs (small ones may both be all zero by chance)


def test_legacy_stale_holds_garbage_of_the_configured_density(loaded):
    policy = loaded["legacy_stale", 0][0]
    fraction = tiny_cfg().stale_fraction
    values = torch.cat([p.detach().flatten() for _, p in head_params(policy, RAW)])
    stale = values[bits(values) != 0]
    assert not torch.isfinite(values).all()
    finite = stale[torch.isfinite(stale)]
    assert (finite.abs() > 1e30).any()
    assert finite.abs().max().item() > 1e37  # magnitudes up to ~3e38
    assert stale.numel() / values.numel() == pytest.approx(fraction, rel=0.1)
    # about 1 in 256 random bit patterns have an all-ones exponent (inf or NaN)
    assert (~torch.isfinite(stale)).float().mean().item() == pytest.approx(1 / 256, rel=0.3)


def test_legacy_stale_linear_and_layer_norm_as_in_legacy_zeros(loaded):
    stale, zeros = loaded["legacy_stale", 0][0], loaded["legacy_zeros", 0][0]
    check_linear_and_layer_norm_like_gpt_neox(stale)
    a, b = head_params(stale, INITIALISED), head_params(zeros, INITIALISED)
    assert [n for n, _ in a] == [n for n, _ in b] and len(a) > 10
    for (n, p), (_, q) in zip(a, b):  # same seed: the same normal(0, 0.02) draws
        assert torch.equal(p, q), n


def test_legacy_stale_backbone_equals_current(loaded):
    ours, ref = backbone_params(loaded["legacy_stale", 0][0]), backbone_params(loaded["current", 0][0])
    assert ours.keys() == ref.keys()
    for n in ours:
        assert torch.equal(ours[n], ref[n]), n


# ---------------------------------------------------------------------------------------------------------------
# model.path (its bad values: tests/test_errors.py)


def test_explicit_path_to_a_checkpoint_loads_it(loaded, cache):
    """model.path pointing at a save_pretrained folder loads it: same seed, same policy as the embedded one."""
    path = backbone_path(tiny_cfg(), cache)
    assert backbone_path(tiny_cfg(path=str(path)), cache) == path
    policy, _, missing = load_policy(tiny_cfg(path=str(path)), cache, 0)
    ref, _, ref_missing = loaded["current", 0]
    assert missing == ref_missing
    ours, theirs = dict(policy.named_parameters()), dict(ref.named_parameters())
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n


def test_head_shape_follows_our_config_not_the_checkpoints(cache):
    path = backbone_path(tiny_cfg(), cache)
    cfg = tiny_cfg(path=str(path))
    cfg.config.action_dim, cfg.config.state_dim = 7, 5
    policy, _, _ = load_policy(cfg, cache, 0)
    assert policy.embed_out.final_conv[1].out_channels == 7
    assert policy.embed_out.combine.in_features == policy.config.text_config.hidden_size + 5


def test_llava_pythia_400m_composed_by_hydra_keeps_path_mandatory(make_cfg, cache):
    cfg = make_cfg("model=llava_pythia_400m").model
    assert cfg.name == "llava_pythia_400m" and cfg.config.action_dim == 10 and cfg.config.state_dim == 7
    assert cfg.head_loading == "current"
    assert OmegaConf.is_missing(cfg, "path")
    with pytest.raises(UsageError, match="model=llava_pythia_400m .* set model.path="):
        load_policy(cfg, cache, 0)
    assert not list((Path(cache) / "backbones").glob("llava_pythia_400m*"))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_comes_from_the_cache_folder(loaded, cache):
    _, tokenizer, _ = loaded["current", 0]
    path = backbone_path(tiny_cfg(), cache)
    assert Path(cache) in path.parents
    assert Path(tokenizer.name_or_path) == path
    assert (path / "tokenizer_config.json").is_file()


def test_tokenizer_tells_the_instructions_apart(loaded):
    policy, tokenizer, _ = loaded["current", 0]
    left, right = tokenizer("go left").input_ids, tokenizer("go right").input_ids
    assert left != right
    assert tokenizer.decode(left, skip_special_tokens=True) == "go left"
    assert tokenizer.decode(right, skip_special_tokens=True) == "go right"
    batch = tokenizer(["go left", "go right"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2 and not torch.equal(batch.input_ids[0], batch.input_ids[1])
    assert batch.attention_mask[:, 0].all()  # right padding: `encode` pools the last real token
    assert batch.input_ids.max().item() < policy.config.text_config.vocab_size
