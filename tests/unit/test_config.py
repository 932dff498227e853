from __future__ import annotations

import pytest

from pipeline.config import JobSpec, load_spec, parse_overrides
from pipeline.errors import ConfigError


def test_toml_round_trip() -> None:
    spec = JobSpec(
        inputs=["s3://b/a.tar"], output="s3://b/out", storage={"endpoint_url": "http://127.0.0.1:9000", "key_env": "K"}
    )
    assert load_spec(spec.to_toml(), is_text=True) == spec


def test_every_repository_job_spec_loads() -> None:
    from pathlib import Path

    specs = sorted(Path(__file__).resolve().parents[2].joinpath("jobs").glob("*.toml"))
    assert specs
    import tomllib

    pipeline_specs = [p for p in specs if "inputs" in tomllib.loads(p.read_text())]  # others are training configs
    assert pipeline_specs
    for path in pipeline_specs:
        load_spec(str(path))


@pytest.mark.parametrize(
    "override,field",
    [
        ({"tiling.tile_core": 30}, "tiling.tile_core"),
        ({"tiling.halo": 3}, "tiling.halo"),
        ({"inference.precision": "fp8"}, "inference.precision"),
        ({"output_options.dtype": "int8"}, "output_options.dtype"),
        ({"ray.actors": 0}, "ray.actors"),
        ({"tiling.tile_core": 96}, "tiling.tile_core"),  # not a multiple of the 256 chunk
    ],
)
def test_invalid_values_name_the_field(override: dict, field: str) -> None:
    spec = JobSpec(inputs=["a"], output="o")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        spec.with_overrides(override)


def test_literal_secrets_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as info:
        JobSpec(inputs=["a"], output="o", storage={"secret": "hunter2"})
    assert "hunter2" not in str(info.value)


def test_unknown_keys_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        load_spec('inputs = ["a"]\noutput = "o"\n[tiling]\ncore = 3\n', is_text=True)


def test_overrides_parse_toml_scalars() -> None:
    assert parse_overrides(["ray.actors=2", "inference.channels_last=true", "output=s3://x/y"]) == {
        "ray.actors": 2,
        "inference.channels_last": True,
        "output": "s3://x/y",
    }


def test_fingerprint_changes_with_output_affecting_fields_only() -> None:
    spec = JobSpec(inputs=["a"], output="o")
    fp = spec.fingerprint("w")
    assert spec.with_overrides({"ray.actors": 3}).fingerprint("w") == fp
    assert spec.with_overrides({"inputs": ["b"]}).fingerprint("w") == fp
    assert spec.with_overrides({"tiling.halo": 16}).fingerprint("w") != fp
    assert spec.fingerprint("other-weights") != fp


def test_fingerprint_includes_the_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline

    spec = JobSpec.from_dict({"inputs": ["a"], "output": "o"})
    fp = spec.fingerprint("w")
    monkeypatch.setattr(pipeline, "__version__", "99.0.0")
    assert spec.fingerprint("w") != fp


def test_unset_halo_follows_the_weights() -> None:
    spec = JobSpec(inputs=["a"], output="o")
    assert spec.tiling.halo is None
    assert spec.with_halo_for({"n_blocks": 2}).tiling.halo == 32  # the default weights: radius 30
    assert spec.with_halo_for({"n_blocks": 3}).tiling.halo == 36  # radius 36
    assert spec.with_halo_for({"n_blocks": 10}).tiling.halo == 80  # NTIRE 100/10: radius 78
    assert spec.with_overrides({"tiling.statistics": "tile"}).with_halo_for({"n_blocks": 10}).tiling.halo == 32
    given = spec.with_overrides({"tiling.halo": 16})
    assert given.with_halo_for({"n_blocks": 10}).tiling.halo == 16
    assert load_spec(spec.to_toml(), is_text=True) == spec  # unset stays unset through TOML
    assert spec.with_halo_for({"n_blocks": 2}).fingerprint("w") != spec.with_halo_for({"n_blocks": 10}).fingerprint("w")


def test_actor_pool_size_from_actors_or_min_max() -> None:
    from pipeline.config import RaySpec

    assert RaySpec().pool_size == (1, 1)
    assert RaySpec(actors=3).pool_size == (3, 3)  # the shorthand: a fixed pool
    assert RaySpec(min_actors=1, max_actors=4).pool_size == (1, 4)
    assert RaySpec(max_actors=4).pool_size == (1, 4)
    assert RaySpec(actors=2, min_actors=3).pool_size == (3, 3)
    with pytest.raises(ConfigError, match=r"ray\.max_actors = 1: must be 0 .* >= the pool's minimum \(2\)"):
        RaySpec(min_actors=2, max_actors=1)
    with pytest.raises(ConfigError, match=r"ray\.min_actors"):
        RaySpec(min_actors=-1)
    with pytest.raises(ConfigError, match=r"ray\.gpu_wait_s"):
        RaySpec(gpu_wait_s=-1)
