"""cmkernels <-> diffusers (UNet2DModel, ConsistencyModelPipeline): loading, export, sampling.

diffusers (and safetensors) are test-only dependencies: without them this file is skipped. Every
directory is built here with save_pretrained from small random-weight networks of the
consistency-model family (or from the shipped MNIST teacher); nothing is downloaded.
Run with -s to see the measured errors. (One file of ~670 lines: the format's tests share its
small-network fixtures and the diffusers imports that skip the whole file.)
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _tolerance import rel_err

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers import (  # noqa: E402
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    UNet2DModel,
)

from cmkernels import diffusers_format as dfm  # noqa: E402
from cmkernels import export, sample, sampling  # noqa: E402
from cmkernels.checkpoint import (  # noqa: E402
    build_unet_meta,
    load_denoiser,
    load_file,
    make_checkpoint,
    save_checkpoint,
)
from cmkernels.diffusion import Denoiser, c_noise  # noqa: E402
from cmkernels.noise_schedule import ts_to_sigmas  # noqa: E402
from cmkernels.unet import PRESETS, AttentionBlock, UNet, UNetConfig, get_preset  # noqa: E402

RTOL = 1e-5  # max |ours - diffusers| / max |diffusers| in fp32
SAMPLE_ATOL = 1e-5  # on the pipeline's [0, 1] output scale
ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "cmkernels" / "assets" / "teacher_mnist_edm.pt"
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():  # a checkout with shared/ inside it
    DATA = ROOT / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "official_unet_reference.pt").exists(), reason=f"no official data at {DATA}"
)


def family_config(widths, attention, resampling, scale_shift, head_dim, classes=None,
                  channels=3, layers=1) -> dict:  # fmt: skip
    """A small UNet2DModel config of the consistency-model family (ADM UNet in diffusers' names):
    attention per level, "resnet" or "conv" resampling, scale-shift norm or not (with it, the
    attention GroupNorm is given explicitly)."""
    plain_down = {"resnet": "ResnetDownsampleBlock2D", "conv": "DownBlock2D"}[resampling]
    plain_up = {"resnet": "ResnetUpsampleBlock2D", "conv": "UpBlock2D"}[resampling]
    config = dict(
        sample_size=16,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=layers,
        down_block_types=["AttnDownBlock2D" if a else plain_down for a in attention],
        up_block_types=["AttnUpBlock2D" if a else plain_up for a in reversed(attention)],
        downsample_type=resampling,
        upsample_type=resampling,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        attention_head_dim=head_dim,
        num_class_embeds=classes,
    )
    if scale_shift:
        config["attn_norm_num_groups"] = 32
    return config


FAMILY = {
    # ImageNet-64 style: class-conditional, scale-shift norm, ResBlock resampling.
    "imagenet-like": family_config([32, 64], [False, True], "resnet", True, 16, classes=10),
    # LSUN-256 style: unconditional, no scale-shift (the mid attention's GroupNorm by default).
    "lsun-like": family_config([32, 32, 64], [False, True, True], "resnet", False, 16),
    # Strided-conv / conv resampling, one attention head, gray, 3 classes, 2 ResBlocks per level.
    "conv-resample": family_config([32, 64, 64], [False, True, False], "conv", True, None,
                                   classes=3, channels=1, layers=2),  # fmt: skip
}
SIGMAS = torch.tensor([0.002, 0.8, 80.0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The networks here are tiny: a second OpenMP thread buys nothing, and on a loaded 2-core
    # machine its barriers made every forward ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_unet2d(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():  # perturb every tensor: no zero or unit GroupNorm weights left
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (UNet2DModel, pipeline directory with the default scheduler)."""
    out = {}
    for i, (name, config) in enumerate(FAMILY.items()):
        model = random_unet2d(config, seed=i)
        path = tmp_path_factory.mktemp(name)
        ConsistencyModelPipeline(
            unet=model, scheduler=CMStochasticIterativeScheduler()
        ).save_pretrained(path)
        out[name] = (model, path)
    return out


def inputs(model: UNet2DModel, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, generator=g)
    y = None
    if c.num_class_embeds:
        y = torch.randint(c.num_class_embeds, (3,), generator=g)
    return x, c_noise(SIGMAS), y


def per_sample_generators(seeds, num_classes=None):
    """The draws of cmkernels' PerSampleNoise as diffusers generators: (generators, labels)
    with the labels drawn first, as `python -m cmkernels.sample` does."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    labels = None
    if num_classes:
        labels = torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])
    return gens, labels


def run_cli(main, argv):
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e
    return None


# ----------------------------------------------------------------------------------------------
# The tables: every tensor mapped, both ways.


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_tensor_is_mapped(family, name):
    model, _ = family[name]
    cfg = dfm.unet_config_from_diffusers(dict(model.config))
    rules = dfm.tensor_rules(cfg)
    ours = {n: tuple(t.shape) for n, t in build_unet_meta(cfg).state_dict().items()}
    theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert {r.ours for r in rules} == set(ours)
    mapped = [n for r in rules for n in r.theirs]
    assert len(mapped) == len(set(mapped)) and set(mapped) == set(theirs)
    for r in rules:
        assert [theirs[n] for n in r.theirs] == dfm.their_shapes(r, ours[r.ours])
    # Our config written out and read back gives the same network (heads may be given per
    # width instead of as a count: the same split).
    again = dfm.unet_config_from_diffusers(dfm.diffusers_config_from_unet(cfg))
    same_heads = dict(num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels)
    assert dataclasses.replace(again, **same_heads) == cfg

    def heads(c):
        return [m.num_heads for m in build_unet_meta(c).modules() if isinstance(m, AttentionBlock)]

    assert heads(again) == heads(cfg)


def test_the_default_table_is_diffusers_own():
    """UNET2D_DEFAULTS (what a config.json without a key means) are UNet2DModel's defaults."""
    import inspect

    params = inspect.signature(UNet2DModel.__init__).parameters
    defaults = {
        k: list(p.default) if isinstance(p.default, tuple) else p.default
        for k, p in params.items()
        if k != "self"
    }
    assert defaults == dfm.UNET2D_DEFAULTS


@needs_data
@pytest.mark.parametrize("preset", ["imagenet64", "lsun256"])
def test_official_full_layouts_map_onto_unet2dmodel(preset):
    """The full official ImageNet-64 / LSUN-256 tensor layouts against diffusers' own
    UNet2DModel built (on the meta device) from the config we write for them."""
    layout = json.loads((DATA / "official_unet_layouts.json").read_text())[preset]["tensors"]
    cfg = PRESETS[preset]
    config = dfm.diffusers_config_from_unet(cfg)
    with torch.device("meta"):
        model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    rules = dfm.tensor_rules(cfg)
    assert {r.ours for r in rules} == set(layout)
    expected = {
        n: s for r in rules for n, s in zip(r.theirs, dfm.their_shapes(r, tuple(layout[r.ours])))
    }
    assert expected == theirs


# ----------------------------------------------------------------------------------------------
# Loading: the network equals diffusers' forward.


@pytest.mark.parametrize("name", list(FAMILY))
def test_forward_matches_diffusers(family, name):
    model, path = family[name]
    loaded = dfm.load_diffusers(path)
    assert loaded.scheduler == dfm.SchedulerSettings()
    net = loaded.denoiser.net
    x, t, y = inputs(model)
    with torch.no_grad():
        theirs = model(x, t, class_labels=y).sample
        errors = {}
        for ops in ("kernels", "reference"):
            errors[ops] = rel_err(net.set_ops(ops)(x, t, y), theirs)
    print(f"\n{name}: forward max rel. error vs diffusers {errors}")
    assert max(errors.values()) <= RTOL


def test_every_way_of_pointing_at_the_weights_loads_the_same(family, tmp_path):
    model, pipe_dir = family["imagenet-like"]
    want = dfm.load_diffusers(pipe_dir).denoiser.net.state_dict()
    unet_dir = pipe_dir / "unet"
    bin_dir = tmp_path / "bin"
    model.save_pretrained(bin_dir, safe_serialization=False)  # diffusion_pytorch_model.bin
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")  # *.index.json + shards
    assert (sharded / dfm.WEIGHTS_INDEX_NAME).is_file()
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(unet_dir / dfm.WEIGHTS_NAME, lone)
    config = json.loads((unet_dir / "config.json").read_text())
    sources = [
        dfm.load_diffusers(unet_dir).denoiser,  # finds ../scheduler/scheduler_config.json
        dfm.load_diffusers(unet_dir / dfm.WEIGHTS_NAME).denoiser,  # config.json beside it
        dfm.load_diffusers(lone, config=config).denoiser,  # weights file + config dict
        dfm.load_diffusers(bin_dir).denoiser,  # .bin via torch.load(weights_only=True)
        dfm.load_diffusers(sharded).denoiser,
        load_denoiser(pipe_dir),  # the generic loader dispatches directories
    ]
    for den in sources:
        got = den.net.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert den.parameterization == "cm" and den.c_noise_convention == "official"
    # An fp16 variant (diffusion_pytorch_model.fp16.safetensors) as the only weights file.
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(unet_dir / "config.json", half)
    state = {
        k: v.half() for k, v in safetensors_torch.load_file(unet_dir / dfm.WEIGHTS_NAME).items()
    }
    safetensors_torch.save_file(state, half / "diffusion_pytorch_model.fp16.safetensors")
    got = dfm.load_diffusers(half).denoiser.net.state_dict()
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)


# ----------------------------------------------------------------------------------------------
# Export: back to diffusers and to the official layout.


@pytest.mark.parametrize("name", list(FAMILY))
def test_export_round_trips(family, name, tmp_path):
    model, path = family[name]
    den = dfm.load_diffusers(path).denoiser
    out = tmp_path / "pipe"
    dfm.save_diffusers(den, out)
    back = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    bare = tmp_path / "bare"
    dfm.save_diffusers(den, bare, layout="unet")
    bare_model = UNet2DModel.from_pretrained(bare).eval()
    pipe = ConsistencyModelPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, CMStochasticIterativeScheduler)
    x, t, y = inputs(model, seed=2)
    with torch.no_grad():
        want = model(x, t, class_labels=y).sample
        errors = [rel_err(m(x, t, class_labels=y).sample, want) for m in (back, bare_model)]
    print(f"\n{name}: exported UNet2DModel max rel. error vs the original {errors}")
    assert max(errors) <= RTOL
    sd, orig = back.state_dict(), model.state_dict()
    assert sd.keys() == orig.keys() and all(torch.equal(sd[k], orig[k]) for k in orig)
    again = dfm.load_diffusers(out).denoiser.net.state_dict()
    assert all(torch.equal(again[k], v) for k, v in den.net.state_dict().items())
    # The official layout: a plain state_dict of our names.
    official = tmp_path / "official.pt"
    assert run_cli(export.main, [path, "--official", official]) is None
    net = UNet(den.net.config)
    net.load_state_dict(load_file(official), strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), den.net.state_dict().values())
    )


def test_export_cli_options(family, tmp_path):
    model, path = family["imagenet-like"]
    out = tmp_path / "bare"
    argv = [path, "--diffusers", out, "--unet-only", "--dtype", "fp16", "--steps", 18]
    assert run_cli(export.main, argv) is None
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "scheduler_config.json", dfm.WEIGHTS_NAME]
    )
    assert CMStochasticIterativeScheduler.from_pretrained(out).config.num_train_timesteps == 18
    stored = safetensors_torch.load_file(out / dfm.WEIGHTS_NAME)
    want = model.state_dict()
    assert stored.keys() == want.keys()
    assert all(
        v.dtype == torch.float16 and torch.equal(v, want[k].half()) for k, v in stored.items()
    )
    UNet2DModel.from_pretrained(out, torch_dtype=torch.float16)


@pytest.mark.parametrize("extra, message", [
    ([], "nothing to write"),
    (["--official", "x.pt", "--unet-only"], "--unet-only goes with --diffusers"),
    (["--official", "x.pt", "--preset", "imagenet64"], "diffusers layout"),
    (["--official", "x.pt", "--dtype", "fp64"], "invalid choice"),
])
def test_export_errors_are_one_line(family, capsys, extra, message):
    _, path = family["imagenet-like"]
    exit = run_cli(export.main, [path, *extra])
    err = capsys.readouterr().err.strip()
    assert exit is not None and exit.code == 2, err
    assert err.startswith("python -m cmkernels.export: error: ") and "\n" not in err, err
    assert message in err


def test_load_any_gives_the_scheduler_of_each_source(family, tmp_path):
    model, path = family["lsun-like"]
    den, settings = dfm.load_any(path)
    assert settings == dfm.load_diffusers(path).scheduler
    mine = tmp_path / "official.pt"
    assert run_cli(export.main, [path, "--official", mine]) is None
    cfg = dfm.unet_config_from_diffusers(dict(model.config))
    with pytest.raises(dfm.DiffusersFormatError, match="preset"):
        dfm.load_any(path, preset="lsun256")
    net = UNet(cfg)
    net.load_state_dict(load_file(mine))
    ours = tmp_path / "ours.pt"
    save_checkpoint(make_checkpoint(Denoiser(net, "cm", sigma_min=0.01, sigma_max=40.0), {}), ours)
    den, settings = dfm.load_any(ours)
    assert (den.sigma_min, den.sigma_max) == (0.01, 40.0)
    assert settings == dfm.SchedulerSettings(sigma_min=0.01, sigma_max=40.0)


# ----------------------------------------------------------------------------------------------
# Sampling: the same images as ConsistencyModelPipeline.


@pytest.mark.parametrize("name", ["imagenet-like", "lsun-like"])
def test_one_and_two_step_samples_match_the_pipeline(family, name):
    model, path = family[name]
    den = dfm.load_diffusers(path).denoiser
    pipe = ConsistencyModelPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    seeds = [11, 12]
    c = model.config
    labels = None if c.num_class_embeds is None else torch.tensor([3, 8])
    shape = (c.in_channels, c.sample_size, c.sample_size)
    cases = {
        "one-step": (dict(num_inference_steps=1), [80.0]),
        "two-step ts 0,22,39": (
            dict(
                num_inference_steps=None, timesteps=dfm.ts_to_diffusers_timesteps([0, 22, 39], 40)
            ),
            ts_to_sigmas([0, 22, 39], 40).tolist(),
        ),
        "num_inference_steps=2": (
            dict(num_inference_steps=2),
            ts_to_sigmas(dfm.num_inference_steps_timesteps(2, 40)[::-1], 40).tolist(),
        ),
    }
    for case, (kwargs, sigmas) in cases.items():
        noise = sampling.PerSampleNoise(seeds, shape)
        z = noise()
        with torch.no_grad():
            ours = sampling.sample_multistep(den, z, sigmas, noise, labels)
        gens, _ = per_sample_generators(seeds)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens])  # = z
        theirs = pipe(
            batch_size=2,
            class_labels=labels,
            generator=gens,
            latents=latents,
            output_type="pt",
            **kwargs,
        ).images
        err = (((ours + 1) / 2).clamp(0, 1) - theirs).abs().max().item()
        print(f"\n{name} {case}: max abs. error vs ConsistencyModelPipeline {err:.2g}")
        assert err <= SAMPLE_ATOL


def test_sample_cli_uses_the_scheduler_settings(family, tmp_path):
    """`python -m cmkernels.sample --checkpoint DIR` takes the grid size, rho, sigmas, sigma_data
    and clipping of DIR's scheduler_config.json and reproduces the pipeline's images."""
    model, _ = family["conv-resample"]
    sched = CMStochasticIterativeScheduler(
        num_train_timesteps=20,
        sigma_min=0.004,
        sigma_max=40.0,
        sigma_data=0.6,
        rho=6.0,
        clip_denoised=False,
    )
    path = tmp_path / "pipe"
    ConsistencyModelPipeline(unet=model, scheduler=sched).save_pretrained(path)
    loaded = dfm.load_diffusers(path)
    assert loaded.scheduler == dfm.SchedulerSettings(20, 0.004, 40.0, 0.6, 6.0, False, 1.0)
    den = loaded.denoiser
    assert (den.sigma_min, den.sigma_max, den.sigma_data) == (0.004, 40.0, 0.6)
    pipe = ConsistencyModelPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    seeds = [5, 6, 7]
    for extra, kwargs in [
        ([], dict(num_inference_steps=1)),
        (["--ts", "0,11,19"], dict(num_inference_steps=None, timesteps=[11, 0])),
    ]:
        out = tmp_path / f"cli{len(extra)}"
        argv = [
            "--checkpoint",
            path,
            "--num-samples",
            3,
            "--seed",
            5,
            "--device",
            "cpu",
            "--out",
            out,
            *extra,
        ]
        assert run_cli(sample.main, argv) is None
        ours = np.load(out / "samples.npz")
        gens, labels = per_sample_generators(seeds, model.config.num_class_embeds)
        np.testing.assert_array_equal(ours["labels"], labels.numpy())
        images = pipe(
            batch_size=3, class_labels=labels, generator=gens, output_type="pil", **kwargs
        ).images
        theirs = np.stack([np.asarray(im) for im in images])[..., None]  # (N, H, W, 1) uint8
        diff = np.abs(ours["images"].astype(int) - theirs.astype(int))
        print(
            f"\nCLI {extra or 'one-step'}: uint8 levels differing {int((diff > 0).sum())} "
            f"of {diff.size}, max {diff.max()}"
        )
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float rounding at .5 boundaries


# ----------------------------------------------------------------------------------------------
# Directories that are not a UNet2DModel of the family: one clear line, exit status 2.


def _edit_config(path: Path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _bad_dir(kind: str, unet_dir: Path, root: Path) -> Path:
    bad = root / kind
    if kind == "empty":
        bad.mkdir()
        return bad
    if kind == "training-run":  # config.json of the trainer beside last.pt
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"mode": "cd", "steps": 240}))
        (bad / "last.pt").write_bytes(b"")
        return bad
    shutil.copytree(unet_dir, bad)
    config, weights = bad / "config.json", bad / dfm.WEIGHTS_NAME
    if kind == "conditional-model":
        _edit_config(config, _class_name="UNet2DConditionModel")
    elif kind == "legacy-block-names":
        _edit_config(config, down_block_types=["ResnetDownsampleBlock2D", "AttnDownsampleBlock2D"])
    elif kind == "fourier-time":
        _edit_config(config, time_embedding_type="fourier")
    elif kind == "no-mid-attention-norm":
        _edit_config(config, attn_norm_num_groups=None)
    elif kind == "no-weights":
        weights.unlink()
    elif kind == "wrong-tensors":
        state = safetensors_torch.load_file(str(weights))
        del state["conv_in.bias"]
        state["extra.weight"] = torch.zeros(1)
        state["conv_out.weight"] = torch.zeros(1, 2, 3, 3)
        safetensors_torch.save_file(state, str(weights))
    elif kind == "other-scheduler":
        (bad / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000})
        )
    return bad


BAD = {
    "empty": ["without config.json"],
    "training-run": ["has no _class_name", "pass its last.pt"],
    "conditional-model": ["UNet2DConditionModel, not a UNet2DModel"],
    "legacy-block-names": ["'AttnDownsampleBlock2D'", "AttnDownBlock2D with downsample_type"],
    "fourier-time": ["time_embedding_type='fourier'"],
    "no-mid-attention-norm": ["attn_norm_num_groups=None", "mid-block attention has no GroupNorm"],
    "no-weights": ["no diffusion_pytorch_model.safetensors"],
    "wrong-tensors": [
        "missing: conv_in.bias",
        "unexpected: extra.weight",
        "conv_out.weight [1, 2, 3, 3] (expected [3, 32, 3, 3])",
    ],
    "other-scheduler": ["EulerDiscreteScheduler", "CMStochasticIterativeScheduler"],
}


@pytest.mark.parametrize("kind", list(BAD))
def test_not_of_the_family_is_one_clear_error(family, kind, tmp_path, capsys):
    bad = _bad_dir(kind, family["imagenet-like"][1] / "unet", tmp_path)
    with pytest.raises(dfm.DiffusersFormatError) as info:
        dfm.load_diffusers(bad)
    assert "\n" not in str(info.value)
    for phrase in BAD[kind]:
        assert phrase in str(info.value)
    exit = run_cli(sample.main, ["--checkpoint", bad, "--device", "cpu", "--out", tmp_path / "o"])
    assert exit is not None and exit.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last.startswith("python -m cmkernels.sample: error: cannot load") and BAD[kind][0] in last
    )


def test_scale_shift_without_mid_attention_norm_is_refused(tmp_path):
    """What diffusers builds when attn_norm_num_groups is left out under scale-shift (its
    converter's old config): the mid-block attention has no GroupNorm, unlike the ADM UNet."""
    config = dict(FAMILY["imagenet-like"], attn_norm_num_groups=None)
    random_unet2d(config).save_pretrained(tmp_path)
    with pytest.raises(dfm.DiffusersFormatError, match="attn_norm_num_groups=None"):
        dfm.load_diffusers(tmp_path)


def test_networks_diffusers_cannot_express_are_refused(tmp_path):
    # One head count over attention blocks of different widths: no single attention_head_dim.
    cfg = UNetConfig(
        image_size=16,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(16, 8),
        num_heads=4,
        num_head_channels=-1,
    )
    with pytest.raises(dfm.DiffusersFormatError, match="num_heads=4"):
        dfm.diffusers_config_from_unet(cfg)
    # The first level wider than model_channels: the time embedding widths differ.
    with pytest.raises(dfm.DiffusersFormatError, match="channel_mult"):
        dfm.diffusers_config_from_unet(get_preset("gray32", channel_mult=(2, 2, 2)))


# ----------------------------------------------------------------------------------------------
# The shipped MNIST teacher as a consistency model, and the official reference networks.


def test_teacher_exported_reproduces_one_step_samples(tmp_path, capsys):
    out = tmp_path / "mnist-cm"
    argv = [TEACHER, "--diffusers", out, "--official", tmp_path / "teacher.pt"]
    exit = run_cli(export.main, argv)  # an EDM network: ConsistencyModelPipeline would differ
    assert exit is not None and exit.code == 2
    assert "parameterization" in capsys.readouterr().err
    assert run_cli(export.main, [*argv, "--parameterization", "cm"]) is None
    cli = tmp_path / "cli"
    argv = [
        "--checkpoint",
        TEACHER,
        "--parameterization",
        "cm",
        "--num-samples",
        4,
        "--seed",
        3,
        "--device",
        "cpu",
        "--out",
        cli,
    ]
    assert run_cli(sample.main, argv) is None
    ours = np.load(cli / "samples.npz")["images"]  # (4, 32, 32, 1) uint8
    pipe = ConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    gens, _ = per_sample_generators([3, 4, 5, 6])
    result = pipe(batch_size=4, generator=gens, num_inference_steps=1, output_type="np").images
    theirs = np.round(result * 255).astype(np.uint8)  # what its PIL output holds
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    den = load_denoiser(TEACHER, parameterization="cm")
    with torch.no_grad():
        z = sampling.randn_per_sample([3, 4, 5, 6], (1, 32, 32))
        float_err = np.abs(
            (sampling.sample_onestep(den, z).numpy().transpose(0, 2, 3, 1) + 1) / 2 - result
        ).max()
    print(
        f"\nMNIST teacher as CM: one-step max abs. error vs the pipeline {float_err:.2g}; "
        f"uint8 levels differing {int((diff > 0).sum())} of {diff.size}"
    )
    assert float_err <= SAMPLE_ATOL and diff.max() <= 1 and (diff > 0).mean() < 0.01
    # The official-layout file is the teacher's UNet state_dict.
    net = UNet(get_preset("gray32"))
    net.load_state_dict(load_file(tmp_path / "teacher.pt"), strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), den.net.state_dict().values())
    )


@needs_data
def test_official_reference_three_ways(tmp_path):
    """The official network's stored outputs, diffusers (our export) and cmkernels agree."""
    ref = torch.load(DATA / "official_unet_reference.pt", weights_only=True)
    e = ref["imagenet64_mini"]
    net = UNet(UNetConfig.from_official(e["config"]))
    net.load_state_dict(e["state_dict"], strict=True)
    dfm.save_diffusers(Denoiser(net, "cm", c_noise="official"), tmp_path)
    model = UNet2DModel.from_pretrained(tmp_path, subfolder="unet").eval()
    with torch.no_grad():
        theirs = model(e["x"], e["rescaled_t"], class_labels=e["y"]).sample
        ours = net.eval()(e["x"], e["rescaled_t"], e["y"])
    errors = dict(
        diffusers_vs_official=rel_err(theirs, e["F"]),
        cmkernels_vs_official=rel_err(ours, e["F"]),
        cmkernels_vs_diffusers=rel_err(ours, theirs),
    )
    print(f"\nimagenet64_mini: {errors}")
    assert max(errors.values()) <= RTOL
    # lsun256_mini has 4 heads over widths 32 and 64: no single attention_head_dim.
    cfg = UNetConfig.from_official(ref["lsun256_mini"]["config"])
    with pytest.raises(dfm.DiffusersFormatError, match="num_heads=4"):
        dfm.diffusers_config_from_unet(cfg)


# ----------------------------------------------------------------------------------------------
# The README's table: official ts <-> diffusers timesteps.

OFFICIAL_TWO_STEP = [  # scripts/launch.sh of openai/consistency_models
    ([0, 22, 39], 40, [22, 0]),  # CD ImageNet-64 (l2, LPIPS)
    ([0, 106, 200], 201, [106, 0]),  # CT ImageNet-64
    ([0, 17, 39], 40, [17, 0]),  # CD LSUN bedroom (LPIPS)
    ([0, 18, 39], 40, [18, 0]),  # CD LSUN bedroom (l2)
    ([0, 67, 150], 151, [67, 0]),  # CT LSUN bedroom
    ([0, 62, 150], 151, [62, 0]),  # CT LSUN cat
]


@pytest.mark.parametrize("ts, steps, timesteps", OFFICIAL_TWO_STEP)
def test_official_ts_are_these_diffusers_timesteps(ts, steps, timesteps):
    assert dfm.ts_to_diffusers_timesteps(ts, steps) == timesteps
    assert dfm.diffusers_timesteps_to_ts(timesteps, steps) == ts
    sched = CMStochasticIterativeScheduler(num_train_timesteps=steps)
    sched.set_timesteps(timesteps=timesteps)
    want = ts_to_sigmas(ts, steps)  # the evaluated points, then sigma_min
    torch.testing.assert_close(sched.sigmas.double(), want, rtol=1e-6, atol=0)


def test_num_inference_steps_two_is_sigma_80_then_2_24():
    sched = CMStochasticIterativeScheduler()
    sched.set_timesteps(num_inference_steps=2)
    assert dfm.num_inference_steps_timesteps(2, 40) == [20, 0]
    torch.testing.assert_close(
        sched.sigmas.double(), ts_to_sigmas([0, 20, 39], 40), rtol=1e-6, atol=0
    )
    assert abs(sched.sigmas[1].item() - 2.2404) < 1e-4
