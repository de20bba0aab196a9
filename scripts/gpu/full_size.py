#!/usr/bin/env python3
"""Full-size Z-Image on the GPU machine, with random weights at the real shapes.

  make-model: build the real architecture (6.15 B transformer, Qwen3-4B text encoder, Flux VAE)
              with random weights on the GPU, save it in the diffusers layout (bf16), and run the
              diffusers reference on fixed inputs, saving every stage for `zimage parity`.
  compare:    relative L2 error of each stage between the reference and `zimage parity`'s output.
  bench:      diffusers' own speed on the same card (eager bf16, torch.compile, compile + torchao
              FP8), from prompt embeddings to image, the baseline beside `zimage bench`.
  sensitivity: how far diffusers' own bf16 transformer output moves at each step when its caption
              embeddings are perturbed below bf16's resolution: the floor under any per-step
              comparison of two bf16 implementations that do not round bit for bit alike.

Needs torch, transformers (already on the GPU machine) and diffusers==0.42.1 (+ torchao for the
FP8 baseline) carried as wheels. The tokenizer is the byte-level one of scripts/make_fixtures.py
(the real Qwen tokenizer cannot be downloaded here); the text encoder keeps its full vocabulary.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

torch.set_grad_enabled(False)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline  # noqa: E402
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel  # noqa: E402
from transformers import Qwen3Config, Qwen3Model  # noqa: E402

from make_fixtures import build_tokenizer  # noqa: E402

# ZIMAGE_SMOKE=1: tiny shapes on the CPU in f32, to check this script before spending GPU time;
# with ZIMAGE_SMOKE_DTYPE=bf16 the tiny run is in bf16 (CPU bf16 parity: `zimage parity --dtype bf16`).
SMOKE = os.environ.get("ZIMAGE_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
DT = torch.bfloat16 if not SMOKE or os.environ.get("ZIMAGE_SMOKE_DTYPE") == "bf16" else torch.float32
PROMPT = "a red fox in fresh snow at golden hour, 85mm photo, shallow depth of field"

TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                   n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                   cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                   axes_lens=[1536, 512, 512])
TEXT = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
            rope_theta=1_000_000.0, tie_word_embeddings=True, max_position_embeddings=40960)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024)


if SMOKE and DT == torch.bfloat16:
    # Head dim 128 and a few layers, so bf16 rounding compounds somewhat as at full size.
    TRANSFORMER.update(dim=256, n_layers=6, n_heads=2, n_kv_heads=2, cap_feat_dim=64)
elif SMOKE:
    TRANSFORMER.update(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[8, 12, 12])
if SMOKE:
    TEXT.update(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    VAE.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)


def randomize_(model, gen):
    """Random weights on the GPU: norms 1 + N(0, .1), matrices N(0, 1/fan_in), vectors N(0, .05),
    pad tokens N(0, 1): every tensor random, activations O(1)."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight" and p.ndim == 1:
            p.data.normal_(1.0, 0.1, generator=gen)
        elif "pad_token" in name or "embed_tokens" in name:
            p.data.normal_(0.0, 1.0, generator=gen)
        elif p.ndim >= 2:
            p.data.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        else:
            p.data.normal_(0.0, 0.05, generator=gen)


def build(seed=0):
    gen = torch.Generator(DEV).manual_seed(seed)
    with torch.device(DEV):
        transformer = ZImageTransformer2DModel(**TRANSFORMER).to(DT)
        text_encoder = Qwen3Model(Qwen3Config(**TEXT)).to(DT)
        vae = AutoencoderKL(**VAE).to(DT)
    for m in (transformer, text_encoder, vae):
        randomize_(m, gen)
        m.eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(),
                          transformer=transformer)


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def make_model(a):
    t0 = time.time()
    pipe = build()
    sync()
    print(f"built random full-size model in {time.time() - t0:.1f}s", flush=True)
    t0 = time.time()
    pipe.save_pretrained(a.model_dir, safe_serialization=True, max_shard_size="5GB")
    print(f"saved to {a.model_dir} in {time.time() - t0:.1f}s", flush=True)

    size, steps = a.size, a.steps
    gen = torch.Generator("cpu").manual_seed(1234)
    noise = torch.randn((1, 16, size // 8, size // 8), generator=gen, dtype=torch.float32)
    chat = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    ids = pipe.tokenizer(chat, return_tensors="pt").input_ids[0]
    embeds = pipe._encode_prompt(PROMPT, device=DEV)[0]

    outs, ins, times = [], [], []

    def hook(_m, args, out):
        ins.append(args[0][0].detach().float().cpu())
        times.append(args[1].detach().float().cpu())
        outs.append(out[0][0].detach().float().cpu())

    h = pipe.transformer.register_forward_hook(hook)
    latents = pipe(prompt_embeds=[embeds], height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                   latents=noise.to(DEV), output_type="latent").images
    h.remove()
    lat = latents.float()
    z = (lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).to(DT)
    image = (pipe.vae.decode(z).sample.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    tensors = {"prompt_ids": ids.to(torch.int64), "te_embeds": embeds.float().cpu(), "noise": noise,
               "latents": lat.cpu(), "image": image.cpu()}
    for i, (x, v) in enumerate(zip(ins, outs)):
        tensors[f"x.{i}"] = x.squeeze(1).unsqueeze(0)  # (16,1,h,w) -> (1,16,h,w)
        tensors[f"v.{i}"] = v.squeeze(1).unsqueeze(0)
        tensors[f"t.{i}"] = times[i]
    # The same stages in float32 (upcast weights): the truth both bf16 implementations are judged by.
    pipe.transformer.float()
    pipe.text_encoder.float()
    pipe.vae.float()
    tensors["te_embeds_f32"] = pipe._encode_prompt(PROMPT, device=DEV)[0].float().cpu()
    emb32 = embeds.float()
    for i, (x, t) in enumerate(zip(ins, times)):
        o = pipe.transformer([x.to(DEV)], t.to(DEV), [emb32], return_dict=False)[0][0]
        tensors[f"v32.{i}"] = o.float().cpu().squeeze(1).unsqueeze(0)
    z32 = lat.to(DEV) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    tensors["image_f32"] = (pipe.vae.decode(z32).sample.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    from safetensors.torch import save_file
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, a.ref)
    with open(a.ref + ".prompt.txt", "w") as f:
        f.write(PROMPT)
    print(f"reference saved to {a.ref} ({len(ins)} steps)", flush=True)


def rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float(-10 * math.log10(mse + 1e-30))


def compare(a):
    from safetensors.torch import load_file
    ref, ours = load_file(a.ref), load_file(a.ours)
    steps = sorted(int(k.split(".")[1]) for k in ref if k.startswith("v."))
    rep = {"vs_diffusers_bf16": {
        "text_encoder_hidden_states[-2]": rel(ours["te_embeds"], ref["te_embeds"]),
        "transformer_per_step": [rel(ours[f"out.{i}"], ref[f"v.{i}"]) for i in steps],
        "final_latents_end_to_end": rel(ours["latents"], ref["latents"]),
        "vae_decode_image": rel(ours["image_from_ref_latents"], ref["image"]),
        "psnr_vae_decode_db": psnr(ours["image_from_ref_latents"], ref["image"]),
    }}
    if "v32.0" in ref:
        rep["ours_bf16_vs_f32"] = {
            "text_encoder_hidden_states[-2]": rel(ours["te_embeds"], ref["te_embeds_f32"]),
            "transformer_per_step": [rel(ours[f"out.{i}"], ref[f"v32.{i}"]) for i in steps],
            "vae_decode_image": rel(ours["image_from_ref_latents"], ref["image_f32"]),
        }
        rep["diffusers_bf16_vs_f32"] = {
            "text_encoder_hidden_states[-2]": rel(ref["te_embeds"], ref["te_embeds_f32"]),
            "transformer_per_step": [rel(ref[f"v.{i}"], ref[f"v32.{i}"]) for i in steps],
            "vae_decode_image": rel(ref["image"], ref["image_f32"]),
        }
    print(json.dumps(rep, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)


def sensitivity(a):
    from safetensors.torch import load_file
    ref = load_file(a.ref)
    transformer = ZImageTransformer2DModel.from_pretrained(os.path.join(a.model_dir, "transformer"), torch_dtype=DT)
    transformer = transformer.to(DEV).eval()
    emb = ref["te_embeds"].to(DEV, DT)
    gen = torch.Generator("cpu").manual_seed(5)
    noise = torch.randn(emb.shape, generator=gen).to(DEV)
    perturbed = (emb.float() * (1 + a.eps * noise)).to(DT)
    steps = sorted(int(k.split(".")[1]) for k in ref if k.startswith("t."))
    rep = {"eps": a.eps, "embeds_changed_relative_l2": rel(perturbed.cpu(), emb.cpu()), "steps": []}
    for i in steps:
        x, t = ref[f"x.{i}"][0].unsqueeze(1).to(DEV, DT), ref[f"t.{i}"].to(DEV)
        base = transformer([x], t, [emb], return_dict=False)[0][0].float().cpu()
        moved = transformer([x], t, [perturbed], return_dict=False)[0][0].float().cpu()
        rep["steps"].append({"reproduces_reference": rel(base, ref[f"v.{i}"][0].unsqueeze(1)),
                             "perturbed_vs_unperturbed": rel(moved, base)})
    print(json.dumps(rep, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)


def compile_transformer(pipe):
    """torch.compile the transformer's repeated blocks (diffusers' regional compilation: minutes
    instead of a whole-model compile), or the whole module where that is unavailable. Compiling an
    already compiled transformer again recompiles it (after FP8 quantization)."""
    torch._dynamo.config.cache_size_limit = 64
    tr = pipe.transformer
    if hasattr(tr, "compile_repeated_blocks") and getattr(tr, "_repeated_blocks", None):
        tr.compile_repeated_blocks(fullgraph=True)
    else:
        pipe.transformer = torch.compile(getattr(tr, "_orig_mod", tr))


def bench(a):
    pipe = build()
    sync()
    gen = torch.Generator("cpu").manual_seed(1)
    embeds = pipe._encode_prompt(PROMPT, device=DEV)[0]
    report = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "steps": a.steps, "modes": {}}

    def timed(label, size, runs):
        noise = torch.randn((1, 16, size // 8, size // 8), generator=gen).to(DEV)
        times = []
        for i in range(runs + 1):
            if not SMOKE:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            img = pipe(prompt_embeds=[embeds], height=size, width=size, num_inference_steps=a.steps,
                       guidance_scale=0.0, latents=noise, output_type="pil").images[0]
            sync()
            dt = time.perf_counter() - t0
            print(f"{label} {size}: run {i} {dt * 1e3:.1f} ms", flush=True)
            if i:
                times.append(dt * 1e3)
        report["modes"].setdefault(label, {})[f"{size}x{size}"] = {
            "median_ms": statistics.median(times), "runs_ms": times,
            "peak_mem_gib": 0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30}
        del img

    for mode in a.modes.split(","):
        if mode == "eager_bf16":
            pass
        elif mode == "compile_bf16":
            compile_transformer(pipe)
        elif mode == "compile_fp8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
            # Per-tensor scales, as ours (and as the perf anchors' profile measured it).
            quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig())
            compile_transformer(pipe)
        for size in [int(s) for s in a.sizes.split(",")]:
            timed(mode, size, a.runs)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--model-dir", required=True)
    m.add_argument("--ref", required=True)
    m.add_argument("--size", type=int, default=1024)
    m.add_argument("--steps", type=int, default=8)
    c = sub.add_parser("compare")
    c.add_argument("--ref", required=True)
    c.add_argument("--ours", required=True)
    c.add_argument("--json")
    b = sub.add_parser("bench")
    b.add_argument("--modes", default="eager_bf16,compile_bf16,compile_fp8")
    b.add_argument("--sizes", default="1024")
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--json", required=True)
    e = sub.add_parser("sensitivity")
    e.add_argument("--model-dir", required=True)
    e.add_argument("--ref", required=True)
    e.add_argument("--eps", type=float, default=1e-3)
    e.add_argument("--json")
    a = p.parse_args()
    {"make-model": make_model, "compare": compare, "bench": bench, "sensitivity": sensitivity}[a.cmd](a)


if __name__ == "__main__":
    main()
