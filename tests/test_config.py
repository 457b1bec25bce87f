import pytest

from catdog.config import RECIPES, TrainConfig


def test_recipe_overrides_and_json_roundtrip():
    cfg = TrainConfig.for_model("seed", epochs=3, lr=None)
    assert cfg.model == "seed" and cfg.epochs == 3 and cfg.lr == RECIPES["seed"]["lr"]
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(model="vgg"), dict(val_fraction=1.0), dict(lr=-1),
                                 dict(image_size=8), dict(schedule="step")])
def test_invalid_fields_are_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_dataclass_defaults_are_the_default_recipe():
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in RECIPES["resnet"]}
    assert defaults == RECIPES["resnet"]
