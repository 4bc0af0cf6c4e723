from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf.errors import ReadonlyConfigError

from raddino.cli import main
from raddino.config import derive, load_config
from raddino.errors import ConfigError


def test_defaults_recipe_then_overrides_and_frozen():
    cfg = load_config("tiny_cpu", ["optim.base_lr=0.5", "model.num_registers=4"])
    assert cfg.model.arch == "tiny"  # from the recipe
    assert cfg.optim.base_lr == 0.5  # from the override
    assert cfg.model.num_registers == 4
    assert cfg.optim.layer_decay == 0.9  # from the defaults
    with pytest.raises(ReadonlyConfigError):
        cfg.optim.base_lr = 1.0  # frozen


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("optim.base_lr=abc", "optim.base_lr"),
        ("model.arch=huge", "model.arch"),
        ("train.epochs=1.5", "train.epochs"),
        ("crops.global_scale=[0.5,0.2]", "crops.global_scale"),
        ("crops.global_size=50", "crops.global_size"),
        ("head.nlayers=0", "head.nlayers"),
        ("head.out_dim=0", "head.out_dim"),
        ("crops.blur_sigma=[2.0,0.5]", "crops.blur_sigma"),
        ("crops.blur_sigma=[0,0.5]", "crops.blur_sigma"),
        ("crops.global_blur_p=[1.5]", "crops.global_blur_p"),
        ("crops.global_blur_p=[]", "crops.global_blur_p"),
        ("crops.local_blur_p=-0.1", "crops.local_blur_p"),
        ("crops.interpolation=lanczos", "crops.interpolation"),
        ("data.synthetic_finding=fibrosis", "data.synthetic_finding"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny_cpu", [override])


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  base_lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"optim\.base_lrr"):
        load_config(recipe)


def test_cli_config_error_exit_code_2_without_traceback(capsys):
    assert main(["pretrain", "--config", "tiny_cpu", "optim.nope=3"]) == 2
    err = capsys.readouterr().err
    assert "optim.nope" in err
    assert "Traceback" not in err


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found.*tiny_cpu"):
        load_config("does_not_exist")


def test_derived_values_sqrt_rule_not_written_back():
    cfg = load_config("configs/vitb14_cxr.yaml", ["data.batch_size=32"])
    d = derive(cfg, world_size=8)
    assert d.global_batch == 256
    assert d.lr == pytest.approx(4e-3 * math.sqrt(256 / 1024))
    assert d.total_steps == 100 * 1250
    assert d.warmup_steps == 10 * 1250
    assert d.freeze_last_layer_steps == 1250
    assert cfg.optim.base_lr == 4e-3  # the config keeps the base value


def test_vitb14_recipe_matches_dinov2_defaults():
    cfg = load_config("vitb14_cxr")
    assert (cfg.model.arch, cfg.model.patch_size, cfg.head.out_dim, cfg.head.bottleneck_dim, cfg.head.hidden_dim) == (
        "base",
        14,
        65536,
        256,
        2048,
    )
    assert (cfg.crops.n_global, cfg.crops.global_size, cfg.crops.n_local, cfg.crops.local_size) == (2, 224, 8, 98)
    assert list(cfg.crops.global_scale) == [0.32, 1.0] and list(cfg.crops.local_scale) == [0.05, 0.32]
    assert (cfg.mask.prob, cfg.mask.ratio_min, cfg.mask.ratio_max) == (0.5, 0.1, 0.5)
    assert (cfg.teacher.temp_start, cfg.teacher.temp_end, cfg.teacher.momentum_start) == (0.04, 0.07, 0.992)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.layer_decay) == (0.04, 0.4, 0.9)
    assert (cfg.optim.patch_embed_lr_mult, cfg.optim.clip_grad, cfg.loss.koleo_weight) == (0.2, 3.0, 0.1)


@pytest.mark.parametrize("command", ["pretrain", "demo", "shard", "eval", "export", "convert", "bench"])
def test_every_command_has_help(command, capsys):
    """Every sub-command is registered with the top-level parser and prints its own help."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: raddino {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert command in capsys.readouterr().out


def test_named_recipe_without_a_checkout_is_a_clear_error(monkeypatch, tmp_path):
    """A non-editable install has no configs/ beside the package: the error says so and how to fix it."""
    import raddino.config as config_module

    monkeypatch.setattr(config_module, "RECIPES_DIR", tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"pip install -c constraints.txt -e \."):
        load_config("tiny_cpu")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.crops.global_size % cfg.model.patch_size == 0


def test_pneumoniamnist_recipe_pretrains_on_train_images_only():
    """The recipe behind eval/pneumoniamnist_results.md never reads the val/test images it is evaluated on."""
    cfg = load_config("pneumoniamnist_tiny")
    assert (cfg.data.source, cfg.data.split) == ("npz", "train")
    # the bootstrap settings (docs/TRAINING.md): no brightness/contrast jitter, sharp constant teacher
    assert (cfg.crops.brightness, cfg.crops.contrast) == (0.0, 0.0)
    assert cfg.teacher.temp_start == cfg.teacher.temp_end == 0.04
    d = derive(cfg, world_size=1)
    assert d.total_steps == 300


def test_blur_settings_reach_the_augmentation():
    from raddino.build import augmentation_from_config

    aug = augmentation_from_config(
        load_config(
            "tiny_cpu", ["crops.blur_sigma=[0.05,0.5]", "crops.global_blur_p=[0.0,0.9]", "crops.local_blur_p=0.25"]
        ).crops
    )
    assert (aug.blur_sigma, aug.global_blur_p, aug.local_blur_p) == ((0.05, 0.5), (0.0, 0.9), 0.25)
    default = augmentation_from_config(load_config("tiny_cpu", []).crops)  # DINOv2's values unless a recipe says
    assert (default.blur_sigma, default.global_blur_p, default.local_blur_p) == ((0.1, 2.0), (1.0, 0.1), 0.5)
    assert default.interpolation == "pyramid"
    assert (
        augmentation_from_config(load_config("tiny_cpu", ["crops.interpolation=bicubic"]).crops).interpolation
        == "bicubic"
    )


def test_optim_implementation_is_validated_and_reaches_the_optimizer():
    from raddino.build import meta_arch_from_config, optimizer_from_config

    with pytest.raises(ConfigError, match="optim.implementation"):
        load_config("tiny_cpu", ["optim.implementation=cuda_graphs"])
    cfg = load_config("micro_cpu", ["optim.implementation=fused"])
    assert optimizer_from_config(cfg, meta_arch_from_config(cfg)).defaults["fused"] is True


def test_drop_path_mode_builds_subset_blocks():
    from raddino.build import backbone_from_config
    from raddino.config import _CHOICES
    from raddino.models.vit import DROP_PATH_MODES, SubsetDropPathBlock

    assert _CHOICES["model.drop_path_mode"] == DROP_PATH_MODES
    subset = backbone_from_config(load_config("micro_cpu", ["model.drop_path_mode=subset"]).model)
    assert all(isinstance(b, SubsetDropPathBlock) for b in subset.blocks)
    plain = backbone_from_config(load_config("micro_cpu").model)
    assert not any(isinstance(b, SubsetDropPathBlock) for b in plain.blocks)  # the default stays timm's DropPath
    with pytest.raises(ConfigError, match="model.drop_path_mode"):
        load_config("micro_cpu", ["model.drop_path_mode=fast"])


def test_interpolation_choices_are_the_augmentations():
    from raddino.config import _CHOICES
    from raddino.data.augment import INTERPOLATIONS

    assert _CHOICES["crops.interpolation"] == INTERPOLATIONS  # a new resampler must be selectable from config
