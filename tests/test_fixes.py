"""The exact behaviour of each fix in vla_exp/fixes.py (init, loss handling, lr schedule, gradient clipping)."""
import math

import pytest
import torch
from torch import nn

from vla_exp.fixes import (ConstantLR, CosineLR, GradNormClip, NoClip, NoInit, ReportedXavierInit,
                           ReportedXavierMoreInit, ScaleDown,
                           SkipNonFinite, TorchDefaultInit, XavierAllInit)
from vla_exp.policy.head import ConditionalUnet1D

ACTION_DIM = 2
HEAD_KW = dict(action_dim=ACTION_DIM, state_dim=2, global_cond_dim=32, down_dims=(64, 128, 256), step_embed_dim=32)
MIN_SAMPLES = 1000  # std estimates use at least this many values (relative error of the estimate ~2% or less)
STD_RTOL = 0.15
GAIN, A = 0.5, 0.1


def make_head(seed=0):
    torch.manual_seed(seed)
    return ConditionalUnet1D(**HEAD_KW)


def perturb(head, seed=123):
    """Fill every parameter with values no init produces (mean 5, std 3), so "untouched", "reset to 1/0" and
    "zeroed" checks cannot pass by accident because the constructor already left those values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3 + 5)
    return head


def snapshot(head):
    return {n: p.detach().clone() for n, p in head.named_parameters()}


def modules_of(head, kind):
    """(name, module) of exactly this type (type(), not isinstance: ConvTranspose1d is no Conv1d anyway)."""
    return [(n, m) for n, m in head.named_modules() if type(m) is kind]


def fans(weight):
    return nn.init._calculate_fan_in_and_fan_out(weight)


def xavier_bound(weight, gain=GAIN):
    fan_in, fan_out = fans(weight)
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def pooled_weights(fix, kinds, seed=0):
    """Apply `fix` to a perturbed head several times (fresh RNG state each time) and collect, for each module of
    `kinds`, enough weight values for a stable std estimate: a tensor with fewer than MIN_SAMPLES elements (e.g. the
    final 1x1 conv, 64*2 = 128 values) is pooled over ceil(MIN_SAMPLES / numel) re-initialisations instead of skipped.
    Returns (head after the last application, {name: 1-D tensor of samples})."""
    head = perturb(make_head(seed))
    sizes = {n: m.weight.numel() for kind in kinds for n, m in modules_of(head, kind)}
    repeats = max(math.ceil(MIN_SAMPLES / s) for s in sizes.values())
    samples = {n: [] for n in sizes}
    for r in range(repeats):
        torch.manual_seed(1000 + r)
        fix(head)
        mods = dict(head.named_modules())
        for n, size in sizes.items():
            if len(samples[n]) * size < MIN_SAMPLES:
                samples[n].append(mods[n].weight.detach().flatten().clone())
    return head, {n: torch.cat(s) for n, s in samples.items()}


# ---------------------------------------------------------------------------------------------------------------
# init


def test_head_has_every_module_kind_the_inits_distinguish():
    head = make_head()
    assert len(modules_of(head, nn.Linear)) > 0 and len(modules_of(head, nn.Conv1d)) > 0
    assert len(modules_of(head, nn.ConvTranspose1d)) == 2
    assert len(modules_of(head, nn.GroupNorm)) > 0 and len(modules_of(head, nn.LayerNorm)) == 1
    assert not issubclass(nn.ConvTranspose1d, nn.Conv1d)  # why ReportedXavierInit misses the transposed convs
    final = head.final_conv[1]
    assert type(final) is nn.Conv1d and final.out_channels == ACTION_DIM and final.kernel_size == (1,)


def test_no_init_leaves_every_parameter_bit_identical():
    head = perturb(make_head())
    before = snapshot(head)
    assert NoInit()(head) is None
    after = snapshot(head)
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n


@pytest.fixture(scope="module")
def reported_xavier():
    """(head after one ReportedXavierInit call, its parameters before, pooled weight samples of Linear and Conv1d)."""
    head = perturb(make_head())
    before = snapshot(head)
    torch.manual_seed(0)
    ReportedXavierInit(gain=GAIN, a=A)(head)
    _, samples = pooled_weights(ReportedXavierInit(gain=GAIN, a=A), (nn.Linear, nn.Conv1d))
    return head, before, samples


class TestReportedXavierInit:
    @pytest.fixture
    def result(self, reported_xavier):
        return reported_xavier

    def test_linear_weights_are_xavier_uniform_with_gain(self, result):
        head, _, samples = result
        for n, m in modules_of(head, nn.Linear):
            bound = xavier_bound(m.weight)
            assert m.weight.abs().max().item() <= bound, n
            assert samples[n].numel() >= MIN_SAMPLES
            assert samples[n].std().item() == pytest.approx(bound / math.sqrt(3), rel=STD_RTOL), n
            # uniform over the whole interval, not a narrower one: the extremes come close to the bound
            assert samples[n].abs().max().item() > 0.9 * bound, n

    def test_conv1d_weights_are_kaiming_normal_fan_out_relu(self, result):
        head, _, samples = result
        for n, m in modules_of(head, nn.Conv1d):
            fan_out = m.out_channels * m.kernel_size[0]
            assert fans(m.weight)[1] == fan_out
            assert samples[n].numel() >= MIN_SAMPLES
            assert samples[n].std().item() == pytest.approx(math.sqrt(2) / math.sqrt(fan_out), rel=STD_RTOL), n

    def test_conv1d_gain_is_relu_so_a_is_ignored(self, result):
        """All conv weights of one call, each divided by sqrt(2 / fan_out), pooled (~2.5M values): the std is 1 to
        0.2%. leaky_relu with a=0.1 would give sqrt(1 / 1.01) = 0.995 (11 standard errors away); fan_in would be far."""
        head, _, _ = result
        z = torch.cat([m.weight.detach().flatten() / math.sqrt(2 / (m.out_channels * m.kernel_size[0]))
                       for _, m in modules_of(head, nn.Conv1d)])
        assert z.numel() > 1_000_000
        assert z.std().item() == pytest.approx(1.0, abs=0.002)
        assert z.mean().item() == pytest.approx(0.0, abs=0.003)

    def test_final_1x1_conv_gets_a_large_std(self, result):
        head, _, samples = result
        std = samples["final_conv.1"].std().item()
        assert std == pytest.approx(math.sqrt(2 / ACTION_DIM), rel=STD_RTOL)  # ~1.0: a large output
        assert std > 0.8

    def test_linear_and_conv1d_biases_are_zero(self, result):
        head, _, _ = result
        for n, m in modules_of(head, nn.Linear) + modules_of(head, nn.Conv1d):
            assert m.bias is not None and torch.count_nonzero(m.bias).item() == 0, n

    def test_conv_transpose_group_norm_and_layer_norm_are_untouched(self, result):
        head, before, _ = result
        untouched = modules_of(head, nn.ConvTranspose1d) + modules_of(head, nn.GroupNorm) + \
            modules_of(head, nn.LayerNorm)
        assert len(untouched) > 0
        for n, m in untouched:
            for pn, p in m.named_parameters():
                assert torch.equal(p, before[f"{n}.{pn}"]), f"{n}.{pn}"


@pytest.fixture(scope="module")
def xavier_all():
    return pooled_weights(XavierAllInit(gain=GAIN), (nn.Linear, nn.Conv1d, nn.ConvTranspose1d))


class TestXavierAllInit:
    @pytest.fixture
    def result(self, xavier_all):
        return xavier_all

    def test_linear_conv_and_transposed_conv_weights_are_xavier_uniform(self, result):
        head, samples = result
        kinds = modules_of(head, nn.Linear) + modules_of(head, nn.Conv1d) + modules_of(head, nn.ConvTranspose1d)
        assert len(modules_of(head, nn.ConvTranspose1d)) == 2
        for n, m in kinds:
            bound = xavier_bound(m.weight)
            assert m.weight.abs().max().item() <= bound, n
            assert samples[n].numel() >= MIN_SAMPLES
            assert samples[n].std().item() == pytest.approx(bound / math.sqrt(3), rel=STD_RTOL), n

    def test_biases_are_zero_and_norms_are_one_zero(self, result):
        head, _ = result
        for n, m in modules_of(head, nn.Linear) + modules_of(head, nn.Conv1d) + modules_of(head, nn.ConvTranspose1d):
            assert torch.count_nonzero(m.bias).item() == 0, n
        for n, m in modules_of(head, nn.GroupNorm) + modules_of(head, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), n
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), n

    def test_final_1x1_conv_std_far_below_reported_xavier(self, result):
        _, samples = result
        std = samples["final_conv.1"].std().item()
        expected = GAIN * math.sqrt(6 / (64 + ACTION_DIM)) / math.sqrt(3)  # fan_in 64, fan_out 2: ~0.087
        assert std == pytest.approx(expected, rel=STD_RTOL)
        assert std < 0.15 * math.sqrt(2 / ACTION_DIM)  # ReportedXavierInit gives ~1.0 here


def test_xavier_more_is_the_reported_init_plus_norms_and_embeddings():
    """The same draws as the reported init on Linear and Conv1d, norms reset to 1/0, embeddings normal(0, 0.02),
    transposed convs untouched."""
    torch.manual_seed(5)
    reported = ReportedXavierInit(gain=GAIN, a=A)
    head = perturb(make_head())
    head.embedding = nn.Embedding(4096, 16)  # the head has none: one added, as a head of another design may
    before = snapshot(head)
    twin = perturb(make_head())
    torch.manual_seed(11)
    reported(twin)
    torch.manual_seed(11)
    ReportedXavierMoreInit(gain=GAIN, a=A, embedding_std=0.02)(head)
    for n, m in modules_of(head, nn.Linear) + modules_of(head, nn.Conv1d):
        assert torch.equal(m.weight, dict(twin.named_modules())[n].weight), n
    for n, m in modules_of(head, nn.GroupNorm) + modules_of(head, nn.LayerNorm):
        assert not torch.equal(before[f"{n}.weight"], torch.ones_like(m.weight))  # perturb moved them
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias)), n
    assert head.embedding.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert head.embedding.weight.mean().abs().item() < 0.001
    for n, m in modules_of(head, nn.ConvTranspose1d):
        assert torch.equal(m.weight, before[f"{n}.weight"]), n


class TestTorchDefaultInit:
    def test_equals_a_freshly_built_head_with_the_same_rng_state(self):
        """reset_parameters in module order draws exactly what construction draws: bit-identical to a new head."""
        head = perturb(make_head(seed=1))
        torch.manual_seed(7)
        TorchDefaultInit()(head)
        fresh = make_head(seed=7)
        for (n, p), (fn, fp) in zip(head.named_parameters(), fresh.named_parameters(), strict=True):
            assert n == fn and torch.equal(p, fp), n

    def test_distribution_is_pytorchs_default(self):
        head, samples = pooled_weights(TorchDefaultInit(), (nn.Linear, nn.Conv1d, nn.ConvTranspose1d))
        layers = modules_of(head, nn.Linear) + modules_of(head, nn.Conv1d) + modules_of(head, nn.ConvTranspose1d)
        for n, m in layers:
            fan_in, _ = fans(m.weight)  # ConvTranspose1d weight is (in, out, k): torch's fan_in is out * k
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias both use 1/sqrt(fan_in)
            assert m.weight.abs().max().item() <= bound, n
            assert samples[n].std().item() == pytest.approx(bound / math.sqrt(3), rel=STD_RTOL), n
            assert m.bias.abs().max().item() <= bound and torch.count_nonzero(m.bias).item() > 0, n
        for n, m in modules_of(head, nn.GroupNorm) + modules_of(head, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), n
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), n


# ---------------------------------------------------------------------------------------------------------------
# loss handling


@pytest.mark.parametrize("value", [999.0, 1000.0, -5e6, 0.0])
def test_scale_down_passes_losses_up_to_threshold_unchanged(value):
    loss = torch.tensor(value, requires_grad=True)
    out, scaled = ScaleDown(threshold=1000, factor=0.1)(loss)
    assert out is loss and scaled is False


def test_scale_down_scales_a_loss_above_threshold_and_its_gradient():
    x = torch.tensor(2.0, requires_grad=True)
    loss = x * 500.25  # 1000.5
    out, scaled = ScaleDown(threshold=1000, factor=0.1)(loss)
    assert scaled is True
    assert out.item() == pytest.approx(100.05, rel=1e-6)
    out.backward()
    assert x.grad.item() == pytest.approx(0.1 * 500.25, rel=1e-6)


def test_scale_down_back_propagates_nan_as_it_is():
    x = torch.tensor(1.0, requires_grad=True)
    loss = x * float("nan")
    out, scaled = ScaleDown(threshold=1000, factor=0.1)(loss)
    assert out is loss and scaled is False  # NaN > 1000 is False: neither scaled nor skipped
    assert math.isnan(out.item())
    out.backward()
    assert math.isnan(x.grad.item())


def test_scale_down_scales_inf_which_stays_inf():
    out, scaled = ScaleDown(threshold=1000, factor=0.1)(torch.tensor(float("inf")))
    assert scaled is True and out.item() == float("inf")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_skip_nonfinite_skips(value):
    assert SkipNonFinite()(torch.tensor(value, requires_grad=True)) == (None, False)


@pytest.mark.parametrize("value", [1e6, 1000.5, -3.0, 0.0])
def test_skip_nonfinite_passes_finite_losses_unchanged(value):
    loss = torch.tensor(value, requires_grad=True)
    out, scaled = SkipNonFinite()(loss)
    assert out is loss and scaled is False  # never scaled


# ---------------------------------------------------------------------------------------------------------------
# learning rate


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 7, 10, 50])
@pytest.mark.parametrize("lr", [1e-4, 1e-3])
def test_cosine_lr_matches_torch_cosine_annealing_stepped_per_epoch(lr, epochs):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.1 * lr)
    fix = CosineLR(eta_min_ratio=0.1)
    for epoch in range(epochs):
        expected = opt.param_groups[0]["lr"]
        assert fix(lr, epoch, epochs) == pytest.approx(expected, rel=1e-12, abs=0), epoch
        opt.step()
        sched.step()
    assert fix(lr, 0, epochs) == lr
    if epochs > 1:
        assert 0.1 * lr < fix(lr, epochs - 1, epochs) < lr


@pytest.mark.parametrize("epochs", [1, 4, 10])
def test_constant_lr(epochs):
    assert [ConstantLR()(1e-3, e, epochs) for e in range(epochs)] == [1e-3] * epochs


# ---------------------------------------------------------------------------------------------------------------
# clipping


def model_with_large_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    loss = (model(torch.randn(64, 16)) * 1e3).pow(2).sum()
    loss.backward()
    return model


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def total_norm(gs):
    return torch.nn.utils.get_total_norm(gs).item()


def test_grad_norm_clip_returns_pre_clip_norm_and_clips():
    model = model_with_large_gradients()
    before = grads(model)
    pre = total_norm(before)
    assert pre > 100
    returned = GradNormClip(1.0)(model.parameters(), logged=True)
    assert isinstance(returned, float)
    assert returned == pytest.approx(pre, rel=1e-6)
    after = grads(model)
    assert total_norm(after) <= 1.0 + 1e-6
    assert total_norm(after) == pytest.approx(1.0, rel=1e-4)
    for b, a in zip(before, after):  # one common factor: the direction is kept
        torch.testing.assert_close(a, b / pre, rtol=1e-4, atol=1e-9)


def test_grad_norm_clip_leaves_small_gradients_untouched():
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    before = grads(model)
    returned = GradNormClip(1.0)(list(model.parameters()), logged=True)
    assert returned == pytest.approx(total_norm(before), rel=1e-6)
    for b, a in zip(before, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_no_clip_returns_the_norm_and_leaves_gradients_bit_identical():
    model = model_with_large_gradients()
    before = grads(model)
    pre = total_norm(before)
    returned = NoClip(every_step=True)(model.parameters(), logged=True)  # a generator, as the training loop may pass
    assert isinstance(returned, float)
    assert returned == pytest.approx(pre, rel=1e-6)
    for b, a in zip(before, grads(model)):
        assert torch.equal(a, b)


def test_no_clip_ignores_parameters_without_gradient():
    model = model_with_large_gradients()
    extra = nn.Parameter(torch.ones(3))  # grad None
    pre = total_norm(grads(model))
    assert NoClip(every_step=True)([*model.parameters(), extra], logged=True) == pytest.approx(pre, rel=1e-6)


def test_no_clip_can_measure_on_logged_steps_only():
    model = model_with_large_gradients()
    pre = total_norm(grads(model))
    assert NoClip(every_step=False)(list(model.parameters()), logged=False) is None
    assert NoClip(every_step=False)(list(model.parameters()), logged=True) == pytest.approx(pre, rel=1e-6)
    assert NoClip(every_step=True)(list(model.parameters()), logged=False) == pytest.approx(pre, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the config groups build these fixes with these parameters


@pytest.mark.parametrize("override, group, cls, attrs", [
    ("init=none", "init", NoInit, {}),
    ("init=xavier", "init", ReportedXavierInit, {"gain": 0.5, "a": 0.1}),
    ("init=xavier_all", "init", XavierAllInit, {"gain": 0.5}),
    ("init=torch_default", "init", TorchDefaultInit, {}),
    ("loss_handling=scale_down", "loss_handling", ScaleDown, {"threshold": 1000.0, "factor": 0.1}),
    ("loss_handling=skip_nonfinite", "loss_handling", SkipNonFinite, {}),
    ("clipping=grad_norm", "clipping", GradNormClip, {"max_norm": 1.0}),
    ("clipping=none", "clipping", NoClip, {"every_step": True}),
])
def test_config_groups_build_the_fixes(make_cfg, override, group, cls, attrs):
    from vla_exp.training.loop import build
    fix = build(make_cfg(override)[group])
    assert type(fix) is cls
    assert {k: getattr(fix, k) for k in attrs} == attrs


@pytest.mark.parametrize("optim, cls", [("fixed", CosineLR), ("original", ConstantLR)])
def test_optim_groups_build_the_schedule(make_cfg, optim, cls):
    from hydra.utils import instantiate
    schedule = instantiate(make_cfg(f"optim={optim}").optim.schedule)
    assert type(schedule) is cls
    if cls is CosineLR:
        assert schedule.eta_min_ratio == 0.1
