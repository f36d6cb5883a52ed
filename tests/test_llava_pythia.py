"""TinyVLA's LLaVA-Pythia checkpoints as they lie on disk: written here with transformers' own classes and TinyVLA's
key names (vla_exp.policy.llava_pythia.write_random_folder), loaded through from_pretrained, trained with LoRA through
peft, and refused in one line where they cannot be used."""
import itertools
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vla_exp import UsageError
from vla_exp.training import ddp
from vla_exp.config import compose
from vla_exp.policy.llava_pythia import LlavaPythiaPolicy, write_random_folder
from vla_exp.policy.load import load_policy
from vla_exp.training.loop import build_parts, optimisation_step, LoopState

TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=16)
SMOKE = ("debug=smoke", "logger=none", "progress=false", "model=llava_pythia", "model.config.vision_config.image_size=32",
         "model.config.down_dims=[32,64]", "model.config.step_embed_dim=32")


@pytest.fixture(scope="module", params=[("linear", "patch", "clip"), ("mlp2x_gelu", "cls_patch", "clip"),
                                        ("mlp2x_gelu", "patch", "siglip")], ids=["linear", "mlp2x", "siglip"])
def folder(request, tmp_path_factory):
    projector, feature, tower = request.param
    return write_random_folder(tmp_path_factory.mktemp("llava") / "base", TEXT, VISION, projector, feature,
                               tower=tower)


def cfg_for(path, *overrides):
    return compose(*SMOKE, f"model.path={path}", *overrides)


def load(path, *overrides):
    cfg = cfg_for(path, *overrides)
    return load_policy(cfg.model, cfg.paths.cache_dir, 0)


def test_every_backbone_tensor_is_the_files_and_the_head_is_missing(folder):
    policy, tokenizer, missing = load(folder)
    assert isinstance(policy, LlavaPythiaPolicy)
    weights, state = load_file(folder / "model.safetensors"), policy.state_dict()
    backbone = {k for k in weights if not k.startswith("embed_out.")}
    assert backbone <= state.keys() and all(torch.equal(state[k], weights[k]) for k in backbone)
    assert "embed_out.weight" in weights  # the base VLM's vocabulary head: replaced, never an error
    assert missing == sorted(k for k in state if k.startswith("embed_out.")) and len(missing) > 50
    mean = json.loads((folder / "preprocessor_config.json").read_text())["image_mean"]
    assert policy.pixel_mean.flatten().tolist() == pytest.approx(mean)  # CLIP's, from the folder
    assert tokenizer.pad_token == tokenizer.eos_token and len(set(tokenizer(["push left", "pick up"]).input_ids[0])) > 1
    # GPT-NeoX's byte-level pre-tokenizer adds no space before the first word: "push" and " push" differ
    assert tokenizer("push").input_ids != tokenizer(" push").input_ids


def edited(folder, tmp_path, **tower):
    """A copy of `folder` whose vision tower config says `tower`."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["vision_tower"].update(tower)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def encoded(path):
    policy = load(path)[0].eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        return policy.encode(images, ids, mask)


def test_the_select_layer_and_feature_decide_the_image_features(folder, tmp_path):
    base = encoded(folder)
    assert base.shape == (2, TEXT["hidden_size"]) and torch.isfinite(base).all()
    assert not torch.allclose(encoded(edited(folder, tmp_path / "a", mm_vision_select_layer=-1)), base)
    tower = json.loads((folder / "config.json").read_text())["vision_config"]["vision_tower"]
    other = encoded(edited(folder, tmp_path / "b", mm_vision_select_feature="cls_patch" if
                           tower["mm_vision_select_feature"] == "patch" else "patch"))
    if "siglip" in tower["vision_model_name_or_path"]:
        assert torch.equal(other, base)  # SigLIP has no CLS token: both take every patch
    else:
        assert not torch.allclose(other, base)


def test_the_projector_reads_the_select_layers_patches_as_tinyvla_does(folder):
    """TinyVLA's encode_images: the tower's hidden_states[mm_vision_select_layer] (-2 by default), without CLIP's CLS
    token for the "patch" feature, into mm_projector. The projector's input is caught with a forward hook and compared
    with the tower's own hidden states."""
    policy = load(folder)[0].eval()
    tower = policy.tower
    seen = []
    policy.gpt_neox.mm_projector.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        policy.encode(images, torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.long))
        states = policy.gpt_neox.vision_tower.vision_model(pixel_values=policy.pixels(images),
                                                           output_hidden_states=True).hidden_states
    expected = states[tower.get("mm_vision_select_layer", -2)]
    if "clip" in tower["vision_model_name_or_path"] and tower["mm_vision_select_feature"] == "patch":
        expected = expected[:, 1:]
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert expected.shape[1] in (patches, patches + 1) and torch.equal(seen[0], expected)


def test_the_config_checks_accept_the_edges_of_what_is_allowed(linear, tmp_path):
    """The lowest select layer (-(layers + 1): the embeddings) and the smallest sizes build a model."""
    def edit(config):
        config["vision_config"]["vision_tower"]["mm_vision_select_layer"] = -(VISION["num_hidden_layers"] + 1)
        config["vision_config"]["mm_projector"].update(mm_projector_type="mlp2x_gelu", mm_hidden_size=1)
    path = with_config(linear, tmp_path, edit)
    from vla_exp.policy.llava_pythia import check_config
    check_config(path, json.loads((path / "config.json").read_text()))  # raises UsageError where refused
    for heads in (1, 64):  # 1 head, and as many heads as the width
        check_config(path, {**json.loads((path / "config.json").read_text()), "num_attention_heads": heads})


def test_lora_trains_the_adapters_projector_and_head_and_leaves_the_base_bit_identical(folder, tmp_path):
    cfg = cfg_for(folder, "recipe=fixed", "model.lora.r=4", "model.lora.alpha=16")
    one = ddp.OneProcess()
    p = build_parts(cfg, one, torch.device("cpu"), False, tmp_path)
    p.gen, state = torch.Generator().manual_seed(0), LoopState()
    model = p.policy.get_base_model()  # under LoRA the policy is peft's PeftModel around it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(iter(torch.utils.data.DataLoader(p.train_set, 4)))
    optimisation_step(p, batch, state, one, 1)
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n
               and n.startswith(("gpt_neox.layers.", "gpt_neox.vision_tower."))]
    # A and B on every Linear of the LM's layers (4 each) and the tower (6 a layer; SigLIP's pooling head has more)
    assert len(lora) == 2 * len(linears) and len(linears) >= 2 * 4 + 3 * 6
    assert trainable - lora == {n for n, _ in model.named_parameters()
                                if n.startswith(("embed_out.", "gpt_neox.mm_projector."))}
    # the tower's last layer and SigLIP's pooling head feed nothing (features are hidden_states[-2]): no gradient
    got = {n for n, q in model.named_parameters() if q.grad is not None}
    assert got <= trainable and {n for n in trainable - got if not re.search(r"encoder\.layers\.2\.|\.head\.", n)} == set()
    after = model.state_dict()
    base = [k for k in before if "lora_" not in k and not k.startswith(("embed_out.", "gpt_neox.mm_projector."))]
    assert len(base) > 40 and all(torch.equal(before[k], after[k]) for k in base)
    assert not all(torch.equal(before[k], after[k]) for k in after if k.startswith("embed_out."))
    assert [g["lr"] for g in p.optimizer.param_groups] == [cfg.optim.lr, 2e-4]  # the adapters' own rate


def test_head_mode_trains_the_head_alone(folder, tmp_path):
    p = build_parts(cfg_for(folder, "model.train=head"), ddp.OneProcess(), torch.device("cpu"), False, tmp_path)
    assert {n for n, q in p.policy.named_parameters() if q.requires_grad} == \
        {n for n, _ in p.policy.named_parameters() if n.startswith("embed_out.")}


# ------------------------------------------------------------------------------------------------ bad input
def refused(path, *overrides):
    with pytest.raises(UsageError) as e:
        load(path, *overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_tower_neither_clip_nor_siglip_is_refused(folder, tmp_path):
    path = edited(folder, tmp_path, vision_model_name_or_path="facebook/dinov2-small")
    assert refused(path) == (f"model.path={path}: vision_model_name_or_path='facebook/dinov2-small' names neither a "
                             "CLIP nor a SigLIP vision tower (the name must contain 'clip' or 'siglip')")


def test_an_unknown_projector_type_is_refused(folder, tmp_path):
    path = tmp_path / "p"
    shutil.copytree(folder, path)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["mm_projector"]["mm_projector_type"] = "qformer"
    (path / "config.json").write_text(json.dumps(config))
    assert refused(path) == f"model.path={path}: mm_projector_type='qformer': must be linear, identity or mlp<N>x_gelu"


def test_weights_that_do_not_fit_the_config_name_the_first_tensor(folder, tmp_path):
    path = tmp_path / "w"
    shutil.copytree(folder, path)
    weights = load_file(path / "model.safetensors")
    key = "gpt_neox.layers.0.attention.dense.weight"
    weights[key] = torch.zeros(64, 32)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert refused(path).startswith(f"model.path={path}: weights do not fit its config.json: {key} is (64, 32) "
                                    "there, (64, 64) in the model")


def test_data_images_of_another_size_are_refused_with_both_sizes(folder):
    assert refused(folder, "model.config.vision_config.image_size=64") == (
        f"model.path={folder}: the checkpoint takes 32x32 images, model.config.vision_config.image_size=64")


def test_a_trained_head_of_other_dims_is_refused_with_both(folder, tmp_path):
    path = tmp_path / "policy"
    shutil.copytree(folder, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "action_head_type": "droid_diffusion", "action_dim": 10,
                                                  "state_dim": 7, "chunk_size": 16}))
    assert refused(path) == (f"model.path={path}: its trained head has action_dim=10, the data and model.config give "
                             "action_dim=2")


# ------------------------------------------------------------------------------------------------ saved back
def noise(policy, batch, tokenizer):
    from vla_exp.policy.diffusion import model_inputs
    with torch.no_grad():
        return policy.eval()(*model_inputs(batch, tokenizer), batch["actions"], torch.tensor([3] * len(batch["actions"])))


@pytest.mark.slow
@pytest.mark.parametrize("train", ["lora", "full"])
def test_a_trained_policy_saved_in_tinyvlas_layout_loads_back_equal(folder, tmp_path, train):
    from vla_exp.policy.llava_pythia import save_policy
    cfg = cfg_for(folder, "recipe=fixed", f"model.train={train}", "model.lora.r=4")
    one = ddp.OneProcess()
    p = build_parts(cfg, one, torch.device("cpu"), False, tmp_path)
    p.gen, state = torch.Generator().manual_seed(0), LoopState()
    batches = list(itertools.islice(torch.utils.data.DataLoader(p.train_set, 4), 3))
    for batch in batches[:2]:
        optimisation_step(p, batch, state, one, 1)
    expected = noise(p.policy, batches[2], p.tokenizer)  # LoRA not merged
    merged = save_policy(p.policy, p.tokenizer, folder, tmp_path / "policy")
    files = {f.name for f in (tmp_path / "policy").iterdir()}
    if train == "lora":
        assert {"config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin",
                "tokenizer.json", "preprocessor_config.json"} <= files and "model.safetensors" not in files
        extra = torch.load(tmp_path / "policy" / "non_lora_trainables.bin")
        assert extra and all(k.startswith("base_model.model.") for k in extra)
    else:
        assert {"config.json", "model.safetensors"} <= files
    saved = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert (saved["model_type"], saved["action_dim"], saved["state_dim"], saved["chunk_size"]) == \
        ("llava_pythia", 2, 2, 16)

    back, tokenizer, missing = load(tmp_path / "policy", f"model.train={train}")
    assert missing == []  # the trained head came back
    state = back.state_dict()
    assert state.keys() == merged.state_dict().keys()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in merged.state_dict().items())
    assert torch.allclose(noise(back, batches[2], tokenizer), expected, atol=1e-5)
    # training on from it: the init fix sets up new heads only, and leaves this trained one
    again = build_parts(cfg_for(tmp_path / "policy", "recipe=fixed", "model.train=full"), one, torch.device("cpu"),
                        False, tmp_path)
    head = again.policy.embed_out.state_dict()
    assert all(torch.allclose(head[k], v, atol=1e-6) for k, v in merged.embed_out.state_dict().items())


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded"])
def test_bin_and_sharded_weights_load_the_same(folder, tmp_path, layout):
    from vla_exp.policy.llava_pythia import LlavaPythiaForCausalLM
    path = tmp_path / layout
    shutil.copytree(folder, path)
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    if layout == "sharded":  # as save_pretrained shards a big checkpoint: model-0000N-of-0000M + an index
        vlm = LlavaPythiaForCausalLM.from_pretrained(folder)
        vlm.save_pretrained(path, max_shard_size="100KB")
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    else:
        torch.save(weights, path / "pytorch_model.bin")
    policy, _, missing = load(path)
    state = policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith("embed_out."))
    assert missing == sorted(k for k in state if k.startswith("embed_out."))


@pytest.mark.slow
def test_the_init_report_says_what_came_from_the_folder(folder, tmp_path):
    from vla_exp.training.loop import train
    s = train(cfg_for(folder, "recipe=fixed", "model.lora.r=4"), tmp_path)
    report = json.loads((tmp_path / "init_report.json").read_text())
    weights = load_file(folder / "model.safetensors")
    assert report["checkpoint"] == str(folder) and s["missing_head_params"] == len(report["missing_weights"]) > 50
    assert all(k.startswith("embed_out.") for k in report["missing_weights"])
    assert report["loaded_weights"] == len([k for k in weights if not k.startswith("embed_out.")])


# ------------------------------------------------------------------------------------------------ one line for each
@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    return write_random_folder(tmp_path_factory.mktemp("llava") / "base", TEXT, VISION, "linear", "patch")


def with_config(folder, tmp_path, edit):
    path = tmp_path / "edited"
    shutil.copytree(folder, path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads=0 must be an integer >= 1 that divides "
                                                "hidden_size=64"),
    (lambda c: c["vision_config"]["mm_projector"].pop("mm_hidden_size"),
     "vision_config.mm_projector.mm_hidden_size must be an integer >= 1 (here None)"),
    (lambda c: c["vision_config"].update(vision_tower=[1, 2]),
     "config.json's vision_config.vision_tower is a list, not a mapping (a LLaVA-Pythia config)"),
    (lambda c: c["vision_config"]["vision_tower"].update(mm_vision_select_layer=99),
     "mm_vision_select_layer=99: the tower has 3 layers, so it must be an integer from -4 to 3"),
    (lambda c: c["vision_config"]["vision_tower"].update(mm_vision_select_layer=-5),
     "mm_vision_select_layer=-5: the tower has 3 layers, so it must be an integer from -4 to 3"),
    (lambda c: c["vision_config"].pop("mm_projector"),
     "config.json's vision_config must hold vision_tower and mm_projector (a LLaVA-Pythia config)"),
    (lambda c: c["vision_config"]["mm_projector"].update(hidden_size=0),
     "vision_config.mm_projector.hidden_size must be an integer >= 1 (here 0)"),
    (lambda c: c.update(num_attention_heads=3), "num_attention_heads=3 must be an integer >= 1 that divides "
                                                "hidden_size=64"),
])
def test_a_config_json_that_cannot_build_the_model_is_one_line(linear, tmp_path, edit, message):
    path = with_config(linear, tmp_path, edit)
    assert refused(path) == f"model.path={path}: {message}"


def test_a_folder_without_its_tokenizer_is_refused_before_the_model_is_built(linear, tmp_path):
    path = tmp_path / "no-tokenizer"
    shutil.copytree(linear, path)
    for f in path.glob("*token*"):
        f.unlink()
    assert refused(path).startswith(f"model.path={path}: no tokenizer loads from it (tokenizer.json and ")


def test_base_weights_that_are_a_pickle_are_refused_in_one_line(linear, tmp_path):
    path = tmp_path / "pickled"
    shutil.copytree(linear, path)
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save({"weights": weights, "planted": print}, path / "pytorch_model.bin")  # loading it would run code
    assert refused(path) == (f"model.path={path}: refused: {path / 'pytorch_model.bin'} holds objects other than "
                             "tensors, which loading could run as code; save the weights as model.safetensors where "
                             "you trust their source")


@pytest.fixture(scope="module")
def lora_policy(linear, tmp_path_factory):
    """A LoRA policy folder in TinyVLA's layout (adapters over `linear`), saved untrained."""
    from vla_exp.policy.llava_pythia import save_policy
    cfg = cfg_for(linear, "recipe=fixed", "model.train=lora", "model.lora.r=4")
    tmp = tmp_path_factory.mktemp("lora")
    p = build_parts(cfg, ddp.OneProcess(), torch.device("cpu"), False, tmp)
    save_policy(p.policy, p.tokenizer, linear, tmp / "policy")
    return tmp / "policy"


def damaged_copy(folder, tmp_path, damage):
    path = tmp_path / "lora"
    shutil.copytree(folder, path)
    damage(path)
    return path


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "adapter_model.safetensors").unlink(),
     "adapter_config.json but no adapter_model.safetensors (peft's adapter weights)"),
    (lambda p: edit_json(p / "adapter_config.json", base_model_name_or_path=None),
     "adapter_config.json names no base model (base_model_name_or_path, the folder of the base weights the adapters "
     "were trained on)"),
    (lambda p: edit_json(p / "adapter_config.json", base_model_name_or_path=""),
     "adapter_config.json names no base model (base_model_name_or_path, the folder of the base weights the adapters "
     "were trained on)"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:200]),
     "its LoRA adapters do not load onto the base ("),
    (lambda p: edit_json(p / "adapter_config.json", r=8), "its LoRA adapters do not load onto the base ("),
])
def test_a_lora_folder_that_cannot_be_loaded_is_one_line(lora_policy, tmp_path, damage, message):
    path = damaged_copy(lora_policy, tmp_path, damage)
    got = refused(path, "model.train=lora")
    assert got.startswith(f"model.path={path}: {message}") and "\n" not in got


# ------------------------------------------------------------------------------------------------ as TinyVLA builds it
def test_projectors_are_tinyvlas(linear, tmp_path):
    from types import SimpleNamespace
    from torch import nn
    from vla_exp.policy.llava_pythia import projector
    built = lambda kind, d_in=8, d_out=16: projector(SimpleNamespace(vision_config={"mm_projector": {
        "mm_projector_type": kind, "mm_hidden_size": d_in, "hidden_size": d_out}}))
    assert isinstance(built("identity", 16, 16), nn.Identity)
    assert isinstance(built("linear"), nn.Linear) and built("linear").weight.shape == (16, 8)
    # builder.py: mlp<N>x_gelu is Linear(in, out), then (GELU, Linear(out, out)) N - 1 times
    assert [type(m).__name__ for m in built("mlp3x_gelu")] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [tuple(m.weight.shape) for m in built("mlp2x_gelu") if isinstance(m, nn.Linear)] == [(16, 8), (16, 16)]


def test_an_mlp2x_folder_holds_two_projector_layers(tmp_path):
    folder = write_random_folder(tmp_path / "mlp", TEXT, VISION, "mlp2x_gelu", "patch")
    shapes = {k.removeprefix("gpt_neox.mm_projector."): tuple(v.shape)
              for k, v in load_file(folder / "model.safetensors").items() if k.startswith("gpt_neox.mm_projector.")}
    assert shapes == {"0.weight": (64, 32), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)}


def test_the_image_std_is_the_folders(linear):
    policy = load(linear)[0]
    pre = json.loads((linear / "preprocessor_config.json").read_text())
    assert pre["image_std"] != pre["image_mean"]
    assert policy.pixel_std.flatten().tolist() == pytest.approx(pre["image_std"])


def test_a_trained_head_of_another_chunk_size_is_refused(linear, tmp_path):
    path = with_config(linear, tmp_path, lambda c: c.update(action_head_type="droid_diffusion", action_dim=2,
                                                              state_dim=2, chunk_size=8))
    assert refused(path) == (f"model.path={path}: its trained head has chunk_size=8, the data and model.config give "
                             "horizon=16")


def test_unknown_weights_in_non_lora_trainables_are_refused(lora_policy, tmp_path):
    def plant(p):
        extra = torch.load(p / "non_lora_trainables.bin")
        torch.save({**extra, "base_model.model.nonsense.weight": torch.zeros(2)}, p / "non_lora_trainables.bin")
    path = damaged_copy(lora_policy, tmp_path, plant)
    assert refused(path, "model.train=lora") == (f"model.path={path}: non_lora_trainables.bin holds weights the model "
                                                 "has not (first: nonsense.weight)")


# ------------------------------------------------------------------------------------------------ the folder decides
def test_the_checkpoint_decides_the_image_size_and_the_data_follow(linear):
    from vla_exp.policy.shape import adopt_checkpoint
    cfg = compose("debug=smoke", "model=llava_pythia", f"model.path={linear}")
    assert cfg.model.config.vision_config.image_size == 224  # the preset's
    assert adopt_checkpoint(cfg) is True
    assert cfg.model.config.vision_config.image_size == 32 and cfg.data.image_size == 32
    assert adopt_checkpoint(cfg) is False  # nothing left to take


def test_a_command_line_value_that_differs_from_the_checkpoint_is_refused(linear):
    from vla_exp.policy.shape import adopt_checkpoint
    given = ("model=llava_pythia", f"model.path={linear}", "model.config.vision_config.image_size=64")
    cfg = compose("debug=smoke", *given)
    with pytest.raises(UsageError) as e:
        adopt_checkpoint(cfg, given)
    assert str(e.value) == (f"model.path={linear}: the checkpoint states model.config.vision_config.image_size=32, "
                            "the command line sets model.config.vision_config.image_size=64: leave it out, the "
                            "checkpoint's value is taken")


def test_a_trained_heads_chunk_size_is_taken(linear, tmp_path):
    from vla_exp.policy.shape import adopt_checkpoint
    path = with_config(linear, tmp_path, lambda c: c.update(action_dim=2, state_dim=2, chunk_size=8))
    cfg = compose("debug=smoke", "model=llava_pythia", f"model.path={path}")
    adopt_checkpoint(cfg)
    assert cfg.model.config.horizon == 8


@pytest.mark.slow
def test_a_run_from_a_folder_takes_its_image_size_and_says_so(linear, tmp_path):
    import subprocess
    import sys
    from omegaconf import OmegaConf
    out = subprocess.run([sys.executable, "-m", "vla_exp.training.main", "debug=smoke", "logger=none", "progress=false",
                          "model=llava_pythia", f"model.path={linear}", "model.train=head",
                          "model.config.down_dims=[32,64]", "model.config.step_embed_dim=32",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.model.config.vision_config.image_size == 32  # what ran, not the preset's 224
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_one_attention_head_is_a_valid_config(linear, tmp_path):
    path = with_config(linear, tmp_path, lambda c: c.update(num_attention_heads=1))
    policy, _, _ = load(path)
    assert policy.config.num_attention_heads == 1


def test_pixels_are_scaled_to_0_1_then_normalised_with_the_folders_statistics(linear):
    policy = load(linear)[0]
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    expected = (1.0 - policy.pixel_mean) / policy.pixel_std
    assert torch.allclose(policy.pixels(white)[:, :, 0, 0], expected[:, :, 0, 0])


def test_a_one_layer_tower_takes_the_default_select_layer(tmp_path):
    folder = write_random_folder(tmp_path / "one", TEXT, {**VISION, "num_hidden_layers": 1}, "linear", "patch")
    tower = json.loads((folder / "config.json").read_text())["vision_config"]["vision_tower"]
    tower.pop("mm_vision_select_layer", None)
    assert isinstance(load(with_config(folder, tmp_path, lambda c: c["vision_config"].update(vision_tower=tower)))[0],
                      LlavaPythiaPolicy)
