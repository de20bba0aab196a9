#!/usr/bin/env python3
"""Write small parity fixtures for the Rust Z-Image engine, computed with diffusers.

Usage (see engine/tests/fixtures/README.md):

    python -m venv venv && venv/bin/pip install -r scripts/requirements-fixtures.txt
    venv/bin/python scripts/make_fixtures.py --out engine/tests/fixtures

Everything runs on the CPU in float32 and is seeded (torch.manual_seed), so re-running writes
the same numbers (up to float32 summation-order noise between machines / thread counts).

Outputs (under --out):
  tiny_model/            a complete tiny ZImagePipeline in the real diffusers layout
                         (weights stored as float16; transformer sharded like the real model)
  expected.safetensors   reference tensors (float32 unless stated; token ids int64)
  expected.json          schedules, prompts, parameters, package versions
  i2i_init.png           64x48 RGB init image for the image-to-image case
  enhancer.json          greedy generation of the tiny text encoder run as a causal LM (tied
                         embeddings) with transformers' `generate`: the prompt enhancer's parity
                         (`--only-enhancer` rewrites just this file from the saved tiny_model)
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
from importlib.metadata import version as pkg_version

import numpy as np
import torch

torch.set_grad_enabled(False)

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model  # noqa: E402

import diffusers  # noqa: E402
import diffusers.pipelines.z_image.pipeline_z_image_img2img as z_img2img_module  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.pipelines.z_image.pipeline_z_image import (  # noqa: E402
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

SEED = 20250101

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258

# Qwen3-style template: with add_generation_prompt and enable_thinking=True it ends with
# "<|im_start|>assistant\n" (no think block), exactly like the real Qwen3 template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

TE_PROMPT = "a photo of a cat, studio light"
TE_LONG_PROMPT = (
    "A sweeping panoramic view of an ancient mountain monastery at dawn, perched on a jagged granite ridge "
    "above a sea of rolling clouds. Prayer flags in red, yellow, green, blue and white flutter along weathered "
    "ropes strung between carved stone towers. Monks in saffron robes walk slowly across a narrow wooden bridge "
    "while a lone snow leopard watches from a ledge below. Golden sunlight spills over distant snowy peaks, "
    "casting long violet shadows across terraced gardens of juniper and rhododendron. In the foreground, a "
    "bronze bell hangs beneath a tiled roof decorated with dragons, its surface engraved with faded scripture. "
    "Cinematic lighting, ultra sharp focus, 8k resolution."
)
T2I_PROMPT = "a red fox in the snow"
T2I_NEG = "blurry"
I2I_PROMPT = "an oil painting"
WIDTH, HEIGHT = 64, 48
STEPS = 4
SIGMA_NS = [1, 4, 8, 9, 16]
STRENGTHS = [0.3, 0.6, 1.0]


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2 byte -> printable unicode mapping (same as tokenizers' ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer():
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}  # ids 0..255 in byte-value order
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tk.token_to_id(t) == 256 + i
    tok = Qwen2TokenizerFast(
        tokenizer_object=tk,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
        padding_side="right",
    )
    assert len(tok) == 259, len(tok)
    return tok


# ----------------------------------------------------------------------------------------------
# weight init: every tensor random-looking, activations O(1)
# ----------------------------------------------------------------------------------------------
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def _is_norm_module(m):
    return isinstance(m, NORM_TYPES) or "RMSNorm" in type(m).__name__ or "Norm" in type(m).__name__


def randomize_(model: torch.nn.Module, gen: torch.Generator, overrides=None):
    """Re-initialise all parameters.

    - weights of norms (RMSNorm / GroupNorm / LayerNorm): 1 + N(0, 0.15); their biases N(0, 0.1)
    - matrices / conv kernels: N(0, gain^2 / fan_in) (gain 1 unless overridden)
    - other biases: N(0, 0.1)
    - embeddings: N(0, 1)
    - overrides: {name_substring: (kind, value)} with kind "std" (absolute std) or "gain"
    """
    overrides = overrides or {}
    norm_param_names = set()
    for mname, m in model.named_modules():
        if _is_norm_module(m):
            for pname, _ in m.named_parameters(recurse=False):
                norm_param_names.add(f"{mname}.{pname}" if mname else pname)
    emb_param_names = {
        f"{mname}.weight" for mname, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
    }
    for name, p in model.named_parameters():
        ov = None
        for key, val in overrides.items():
            if key in name:
                ov = val
        if ov is not None and ov[0] == "std":
            new = torch.randn(p.shape, generator=gen) * ov[1]
        elif name in norm_param_names:
            if name.endswith("weight"):
                new = 1.0 + 0.15 * torch.randn(p.shape, generator=gen)
            else:
                new = 0.1 * torch.randn(p.shape, generator=gen)
        elif name in emb_param_names:
            new = torch.randn(p.shape, generator=gen)
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            gain = ov[1] if ov is not None and ov[0] == "gain" else 1.0
            new = torch.randn(p.shape, generator=gen) * (gain / math.sqrt(fan_in))
        else:
            new = 0.1 * torch.randn(p.shape, generator=gen)
        p.data.copy_(new.to(p.dtype))


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------
def build_components(gen):
    tokenizer = build_tokenizer()

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=64,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=64,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 12, 12],
        axes_lens=[1024, 64, 64],
    )
    randomize_(
        transformer,
        gen,
        overrides={
            "x_pad_token": ("std", 0.5),
            "cap_pad_token": ("std", 0.5),
            "adaLN_modulation": ("gain", 0.5),
        },
    )

    te_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    text_encoder = Qwen3Model(te_config)
    randomize_(text_encoder, gen)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        act_fn="silu",
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
        mid_block_add_attention=True,
    )
    # decoder.conv_out gain 0.5 keeps decoded pixels mostly inside [-1, 1] (little clamping)
    randomize_(vae, gen, overrides={"decoder.conv_out.weight": ("gain", 0.5)})

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return dict(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def save_tiny_model(components, model_dir):
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    for name in ("transformer", "text_encoder", "vae"):
        components[name].to(torch.float16)
    pipe = ZImagePipeline(**components)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # transformer: sharded like the real model
    shutil.rmtree(os.path.join(model_dir, "transformer"))
    components["transformer"].save_pretrained(
        os.path.join(model_dir, "transformer"), safe_serialization=True, max_shard_size="400KB"
    )
    # tokenizer: chat template inside tokenizer_config.json (like the published repo), no .jinja file
    tok_dir = os.path.join(model_dir, "tokenizer")
    shutil.rmtree(tok_dir)
    components["tokenizer"].save_pretrained(tok_dir, save_jinja_files=False)
    cfg = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    assert cfg.get("chat_template") == CHAT_TEMPLATE, "chat_template missing from tokenizer_config.json"
    assert not os.path.exists(os.path.join(tok_dir, "chat_template.jinja"))
    files = sorted(os.listdir(os.path.join(model_dir, "transformer")))
    assert "diffusion_pytorch_model.safetensors.index.json" in files, files
    assert sum(f.startswith("diffusion_pytorch_model-0") for f in files) >= 2, files


def check_loaded(pipe, components_fp16):
    """The reloaded pipeline must hold exactly the fp16-rounded weights, as float32."""
    for name in ("transformer", "text_encoder", "vae"):
        ref = dict(components_fp16[name].named_parameters())
        got = dict(getattr(pipe, name).named_parameters())
        assert set(ref) == set(got), (name, set(ref) ^ set(got))
        for k, p in got.items():
            assert p.dtype == torch.float32, (name, k, p.dtype)
            assert torch.equal(p, ref[k].float()), (name, k)
            if p.numel() > 1:
                assert p.std() > 0, (name, k)  # nothing constant


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def smooth_field(gen, c, h, w, lo=4):
    """Smooth random pattern in (-1, 1): low-res noise, bicubic upsampling, tanh."""
    base = torch.randn((1, c, lo, lo + 1), generator=gen)
    up = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=True)
    return torch.tanh(up * 1.2)


def f32(x):
    return x.detach().to(torch.float32).contiguous().clone()


def stats(t):
    t = t.float()
    if t.numel() < 2:
        return f"shape={tuple(t.shape)} value={t.flatten().tolist()}"
    return f"shape={tuple(t.shape)} mean={t.mean():+.4f} std={t.std():.4f} min={t.min():+.4f} max={t.max():+.4f}"


def versions():
    out = {"python": platform.python_version()}
    for p in ["diffusers", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pillow", "huggingface_hub", "jinja2"]:
        out[p] = pkg_version(p)
    return out


def chat(tokenizer, prompt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


class TransformerRecorder:
    """Wraps the transformer forward to record the model outputs (for CFG diagnostics)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls = []
        self._orig = transformer.forward

    def __enter__(self):
        def fwd(*args, **kwargs):
            out = self._orig(*args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else out.sample
            self.calls.append([s.detach().clone() for s in sample])
            return out

        self.transformer.forward = fwd
        return self

    def __exit__(self, *exc):
        self.transformer.forward = self._orig


def cfg_diagnostics(calls, guidance, norm_cap):
    steps = []
    for outs in calls:
        if len(outs) == 1:
            steps.append({"cfg_applied": False, "renorm_applied": False})
            continue
        pos, neg = outs[0].float(), outs[1].float()
        pred = pos + guidance * (pos - neg)
        pn, nn_ = torch.linalg.vector_norm(pos), torch.linalg.vector_norm(pred)
        steps.append(
            {
                "cfg_applied": True,
                "renorm_applied": bool(nn_ > pn * norm_cap),
                "pos_norm": float(pn),
                "pred_norm_before_renorm": float(nn_),
            }
        )
    return steps


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# LoRA parity: three layouts diffusers reads, two LoRAs at a time with set_adapters (one negative)
# ----------------------------------------------------------------------------------------------
LORA_RANK = 4


def _lora_pair(g, out_f, in_f, rank=LORA_RANK):
    a = torch.randn((rank, in_f), generator=g) * 0.3
    b = torch.randn((out_f, rank), generator=g) * 0.3
    return a, b


def make_lora_fixtures(out_dir):
    """Writes lora/{diffusers,kohya,aitoolkit}.safetensors and lora/expected.safetensors: the tiny
    transformer's output on the dit.* inputs with each pair of LoRAs loaded by
    `load_lora_weights` and weighted by `set_adapters`."""
    model_dir = os.path.join(out_dir, "tiny_model")
    lora_dir = os.path.join(out_dir, "lora")
    os.makedirs(lora_dir, exist_ok=True)
    from safetensors.torch import load_file

    inputs = load_file(os.path.join(out_dir, "expected.safetensors"))
    x, t, cap = inputs["dit.x"], inputs["dit.t"], inputs["dit.cap"]
    pipe = ZImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
    shapes = {n: tuple(m.weight.shape) for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(SEED + 100)

    # diffusers / PEFT, written by diffusers itself (metadata: r, lora_alpha, alpha_pattern)
    diff_modules = ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v",
                    "layers.0.attention.to_out.0", "layers.1.feed_forward.w1", "layers.1.feed_forward.w2",
                    "layers.1.feed_forward.w3", "noise_refiner.0.attention.to_q", "context_refiner.0.feed_forward.w2"]
    sd = {}
    for m in diff_modules:
        a, b = _lora_pair(g, shapes[m][0], shapes[m][1])
        sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = a, b
    meta = {"r": LORA_RANK, "lora_alpha": 8, "alpha_pattern": {"layers.1.feed_forward.w2": 2},
            "target_modules": diff_modules, "use_rslora": False}
    ZImagePipeline.save_lora_weights(lora_dir, transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta,
                                     weight_name="diffusers.safetensors")

    # kohya / musubi: lora_down/up + alpha, fused attention_qkv (block-diagonal up) and attention_out
    sd = {}
    for m in ["layers.1.attention.to_q", "noise_refiner.0.feed_forward.w3", "context_refiner.0.attention.to_k",
              "layers.0.adaLN_modulation.0", "layers.0.feed_forward.w1"]:
        a, b = _lora_pair(g, shapes[m][0], shapes[m][1])
        k = "lora_unet_" + m.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = a, b
        sd[f"{k}.alpha"] = torch.tensor(2.0)
    out_q, dim = shapes["layers.1.attention.to_q"]
    downs, ups = zip(*[_lora_pair(g, out_q, dim) for _ in range(3)])
    up = torch.block_diag(*ups)
    k = "lora_unet_layers_0_attention_qkv"
    sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = torch.cat(downs, 0), up
    sd[f"{k}.alpha"] = torch.tensor(3.0 * 3)
    a, b = _lora_pair(g, *shapes["layers.1.attention.to_out.0"])
    sd["lora_unet_layers_1_attention_out.lora_down.weight"], sd["lora_unet_layers_1_attention_out.lora_up.weight"] = a, b
    sd["lora_unet_layers_1_attention_out.alpha"] = torch.tensor(1.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(lora_dir, "kohya.safetensors"))

    # ai-toolkit: diffusion_model. prefix, no alpha (alpha = rank), adaLN_modulation included
    sd = {}
    for m in ["layers.1.adaLN_modulation.0", "layers.0.attention.to_k", "layers.1.feed_forward.w3",
              "noise_refiner.0.attention.to_out.0"]:
        a, b = _lora_pair(g, shapes[m][0], shapes[m][1])
        sd[f"diffusion_model.{m}.lora_A.weight"], sd[f"diffusion_model.{m}.lora_B.weight"] = a, b
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(lora_dir, "aitoolkit.safetensors"))

    # LyCORIS LoHa and LoKr (diffusers cannot load them): the expected weight changes computed with
    # NumPy from the factors, delta = (alpha / rank) * product; the engine must match them exactly.
    rng = np.random.default_rng(SEED + 200)
    nrm = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    out_o, in_o = shapes["layers.1.attention.to_out.0"]
    w1a, w1b, w2a, w2b = nrm(out_o, 3), nrm(3, in_o), nrm(out_o, 3), nrm(3, in_o)
    loha = {"lycoris_layers_1_attention_to_out_0.hada_w1_a": w1a, "lycoris_layers_1_attention_to_out_0.hada_w1_b": w1b,
            "lycoris_layers_1_attention_to_out_0.hada_w2_a": w2a, "lycoris_layers_1_attention_to_out_0.hada_w2_b": w2b,
            "lycoris_layers_1_attention_to_out_0.alpha": np.array(1.5, dtype=np.float32)}
    out_v, in_v = shapes["noise_refiner.0.attention.to_v"]
    k1 = nrm(4, 8)
    k2a, k2b = nrm(out_v // 4, 2), nrm(2, in_v // 8)
    lokr = {"lycoris_noise_refiner_0_attention_to_v.lokr_w1": k1, "lycoris_noise_refiner_0_attention_to_v.lokr_w2_a": k2a,
            "lycoris_noise_refiner_0_attention_to_v.lokr_w2_b": k2b,
            "lycoris_noise_refiner_0_attention_to_v.alpha": np.array(1.0, dtype=np.float32)}
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in loha.items()}, os.path.join(lora_dir, "loha.safetensors"))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in lokr.items()}, os.path.join(lora_dir, "lokr.safetensors"))
    lyco = {"loha.layers.1.attention.to_out.0": (1.5 / 3) * ((w1a @ w1b) * (w2a @ w2b)),
            "lokr.noise_refiner.0.attention.to_v": (1.0 / 2) * np.kron(k1, k2a @ k2b)}
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in lyco.items()}, os.path.join(lora_dir, "lycoris_expected.safetensors"),
              metadata={"generator": "scripts/make_fixtures.py (NumPy)"})

    T, cases = {}, {"base": []}
    T["base.out"] = f32(pipe.transformer([x], t, [cap], return_dict=False)[0][0])
    for name, pair in {"diffusers+kohya": [("diffusers", 0.8), ("kohya", -0.6)],
                       "aitoolkit+kohya": [("aitoolkit", 1.0), ("kohya", 0.5)]}.items():
        pipe = ZImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
        for f, _ in pair:
            pipe.load_lora_weights(lora_dir, weight_name=f"{f}.safetensors", adapter_name=f)
        if name.startswith("diffusers"):
            # the metadata's alphas reached PEFT: 8 / 4, and the alpha_pattern's 2 / 4
            assert abs(pipe.transformer.layers[0].attention.to_q.scaling["diffusers"] - 2.0) < 1e-6
            assert abs(pipe.transformer.layers[1].feed_forward.w2.scaling["diffusers"] - 0.5) < 1e-6
        pipe.set_adapters([f for f, _ in pair], adapter_weights=[w for _, w in pair])
        out = pipe.transformer([x], t, [cap], return_dict=False)[0][0]
        T[f"{name}.out"] = f32(out)
        cases[name] = [{"file": f"{f}.safetensors", "scale": w} for f, w in pair]
        assert (T[f"{name}.out"] - T["base.out"]).abs().max() > 1e-3, f"{name}: the LoRAs changed nothing"
    save_file({k: v.contiguous() for k, v in T.items()}, os.path.join(lora_dir, "expected.safetensors"),
              metadata={"generator": "scripts/make_fixtures.py", "cases": json.dumps(cases)})
    for k, v in sorted(T.items()):
        print(f"lora {k:22s} {stats(v)}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# prompt enhancer: the tiny text encoder as a causal LM (Qwen3ForCausalLM, tied embeddings)
# ----------------------------------------------------------------------------------------------
ENHANCER_CASES = [
    # (name, system, prompt, max_new_tokens)
    ("system", "Rewrite the idea as a detailed image prompt.", "a red fox in the snow", 40),
    ("no_system", "", "Café à Noël 🐱", 32),
]


def write_enhancer_fixture(out_dir):
    """Greedy `generate` of the saved tiny text encoder, loaded as Qwen3ForCausalLM (its lm_head
    is the tied embedding), on the chat template with enable_thinking=False."""
    model_dir = os.path.join(out_dir, "tiny_model")
    te_dir = os.path.join(model_dir, "text_encoder")
    lm = Qwen3ForCausalLM.from_pretrained(te_dir, dtype=torch.float32)
    lm.eval()
    assert lm.config.tie_word_embeddings
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"
    # every weight of the base model was loaded (none left at its init)
    base = Qwen3Model.from_pretrained(te_dir, dtype=torch.float32)
    for k, v in base.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    tok = AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    cases = []
    for name, system, prompt, max_new in ENHANCER_CASES:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        chat_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        ids = tok(chat_text, add_special_tokens=False).input_ids
        inp = torch.tensor([ids])
        out = lm.generate(inp, max_new_tokens=max_new, do_sample=False, eos_token_id=stop, pad_token_id=stop[1],
                          output_scores=True, return_dict_in_generate=True)
        gen = out.sequences[0, len(ids):].tolist()
        # the greedy choice must not be a near tie, or float noise could flip it
        margins = [float((lambda t: t[0] - t[1])(torch.topk(sc[0], 2).values)) for sc in out.scores]
        assert min(margins) > 1e-3, (name, min(margins))
        first_logits = lm(inp).logits[0, -1]
        cases.append({"name": name, "system": system, "prompt": prompt, "chat": chat_text, "input_ids": ids,
                      "max_new_tokens": max_new, "generated_ids": gen, "generated_text": tok.decode(gen),
                      "min_top2_margin": min(margins), "first_logits": [float(x) for x in first_logits]})
    J = {"versions": versions(), "generator": "scripts/make_fixtures.py", "model": "tiny_model/text_encoder as Qwen3ForCausalLM",
         "stop_ids": stop, "decoding": "greedy (do_sample=False)", "cases": cases}
    with open(os.path.join(out_dir, "enhancer.json"), "w") as f:
        json.dump(J, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for c in cases:
        print(f"enhancer {c['name']}: {len(c['input_ids'])} prompt ids -> {len(c['generated_ids'])} new, "
              f"min margin {c['min_top2_margin']:.4f}", file=sys.stderr)


def main():
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engine/tests/fixtures")
    ap.add_argument("--only-lora", action="store_true", help="only the LoRA fixtures (needs the others)")
    ap.add_argument("--only-enhancer", action="store_true", help="rewrite only enhancer.json from the saved tiny_model")
    args = ap.parse_args()
    out_dir = args.out
    if args.only_lora:
        make_lora_fixtures(out_dir)
        return
    os.makedirs(out_dir, exist_ok=True)
    if args.only_enhancer:
        return write_enhancer_fixture(out_dir)
    model_dir = os.path.join(out_dir, "tiny_model")

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    # ---------------- build + save tiny model (fp16 on disk) ----------------
    components = build_components(gen)
    save_tiny_model(components, model_dir)

    # ---------------- reload: fp16 values upcast to float32 ----------------
    pipe = ZImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    check_loaded(pipe, components)
    for name in ("transformer", "text_encoder", "vae"):
        assert getattr(pipe, name).dtype == torch.float32
    tokenizer, text_encoder, transformer, vae = pipe.tokenizer, pipe.text_encoder, pipe.transformer, pipe.vae

    T = {}  # expected tensors
    J = {"versions": versions(), "seed": SEED, "device": "cpu", "compute_dtype": "float32",
         "weights_dtype_on_disk": "float16"}

    # ---------------- tokenizer / chat template ----------------
    for p in [TE_PROMPT, "x", T2I_PROMPT]:
        s = chat(tokenizer, p)
        assert s == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", repr(s)
    raw_tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer", "tokenizer.json"))

    def ids_of(text, max_len=None):
        ids = tokenizer(text, truncation=max_len is not None, max_length=max_len).input_ids
        raw = raw_tok.encode(text).ids
        if max_len is not None:
            raw = raw[:max_len]
        assert ids == raw, "transformers tokenizer and raw tokenizer.json disagree"
        return ids

    # ---------------- text encoder ----------------
    layer_out = {}
    hook = text_encoder.layers[-2].register_forward_hook(lambda m, i, o: layer_out.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    te_chat = chat(tokenizer, TE_PROMPT)
    te_ids = ids_of(te_chat)
    te_emb = pipe._encode_prompt(TE_PROMPT)[0]
    hook.remove()
    assert te_emb.shape == (len(te_ids), 64), te_emb.shape
    # hidden_states[-2] == output of decoder layer index n_layers-2 (no final norm)
    assert torch.allclose(layer_out["h"][0, : len(te_ids)], te_emb), "hidden_states[-2] is not layers[-2] output"
    # real tokens do not depend on the 512 padding (causal attention)
    direct = text_encoder(input_ids=torch.tensor([te_ids]), output_hidden_states=True).hidden_states[-2][0]
    J["te_unpadded_vs_padded_max_abs_diff"] = float((direct - te_emb).abs().max())
    T["te.input_ids"] = torch.tensor(te_ids, dtype=torch.int64)
    T["te.embeds"] = f32(te_emb)

    long_chat = chat(tokenizer, TE_LONG_PROMPT)
    long_full = ids_of(long_chat)
    long_ids = ids_of(long_chat, 512)
    assert len(long_full) > 512 and len(long_ids) == 512
    long_emb = pipe._encode_prompt(TE_LONG_PROMPT)[0]
    assert long_emb.shape == (512, 64)
    T["te_long.input_ids"] = torch.tensor(long_ids, dtype=torch.int64)
    T["te_long.embeds"] = f32(long_emb)
    J["te"] = {"prompt": TE_PROMPT, "chat": te_chat, "num_tokens": len(te_ids)}
    J["te_long"] = {
        "prompt": TE_LONG_PROMPT,
        "chat": long_chat,
        "num_tokens_before_truncation": len(long_full),
        "num_tokens": 512,
        "max_sequence_length": 512,
        "note": "truncation keeps the first 512 ids: the trailing <|im_end|>\\n<|im_start|>assistant\\n is cut off",
    }

    # ---------------- transformer: single item ----------------
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn((16, 1, 6, 10), generator=g)
    cap = torch.randn((13, 64), generator=g)
    t = torch.tensor([0.3], dtype=torch.float32)
    taps, handles = {}, []

    def tap_in(key):
        def hook(m, a, kw):
            taps.setdefault(key, (a[0] if a else kw["x"])[0].clone())

        return hook

    def tap_out(key):
        def hook(m, a, o):
            taps.setdefault(key, o[0].clone())

        return hook

    handles.append(transformer.t_embedder.register_forward_hook(tap_out("dit.dbg.adaln_input")))
    handles.append(transformer.noise_refiner[0].register_forward_pre_hook(tap_in("dit.dbg.x_embedded"), with_kwargs=True))
    handles.append(transformer.noise_refiner[-1].register_forward_hook(tap_out("dit.dbg.x_refined")))
    handles.append(transformer.context_refiner[0].register_forward_pre_hook(tap_in("dit.dbg.cap_embedded"), with_kwargs=True))
    handles.append(transformer.context_refiner[-1].register_forward_hook(tap_out("dit.dbg.cap_refined")))
    handles.append(transformer.layers[-1].register_forward_hook(tap_out("dit.dbg.unified_out")))
    handles.append(transformer.all_final_layer["2-1"].register_forward_hook(tap_out("dit.dbg.final_out")))
    out = transformer([x], t, [cap], return_dict=False)[0][0]
    for h in handles:
        h.remove()
    assert out.shape == x.shape
    T.update({"dit.x": x, "dit.t": t, "dit.cap": cap, "dit.out": f32(out)})
    for k, v in taps.items():
        T[k] = f32(v)
    assert T["dit.dbg.adaln_input"].shape == (64,) and T["dit.dbg.x_embedded"].shape == (32, 64)
    assert T["dit.dbg.cap_embedded"].shape == (32, 64) and T["dit.dbg.unified_out"].shape == (64, 64)

    # ---------------- transformer: batch of 2, different caption lengths (attention mask) ----------------
    x0 = torch.randn((16, 1, 6, 10), generator=g)
    x1 = torch.randn((16, 1, 6, 10), generator=g)
    cap0 = torch.randn((13, 64), generator=g)
    cap1 = torch.randn((40, 64), generator=g)
    tb = torch.tensor([0.3, 0.7], dtype=torch.float32)
    outs = transformer([x0, x1], tb, [cap0, cap1], return_dict=False)[0]
    T.update({"dit_batch.x0": x0, "dit_batch.x1": x1, "dit_batch.cap0": cap0, "dit_batch.cap1": cap1,
              "dit_batch.t": tb, "dit_batch.out0": f32(outs[0]), "dit_batch.out1": f32(outs[1])})
    # sanity: batching with a mask must match running items alone
    solo0 = transformer([x0], tb[:1], [cap0], return_dict=False)[0][0]
    solo1 = transformer([x1], tb[1:], [cap1], return_dict=False)[0][0]
    J["dit_batch_vs_single_max_abs_diff"] = [float((solo0 - outs[0]).abs().max()), float((solo1 - outs[1]).abs().max())]
    J["dit"] = {"x_shape": [16, 1, 6, 10], "t": 0.3, "cap_len": 13, "patch_size": 2, "f_patch_size": 1,
                "image_tokens": 15, "image_tokens_padded": 32, "cap_tokens_padded": 32}
    J["dit_batch"] = {"t": [0.3, 0.7], "cap_lens": [13, 40], "cap_tokens_padded": [32, 64],
                      "image_tokens_padded": [32, 32], "unified_lens": [64, 96]}

    # ---------------- VAE ----------------
    g = torch.Generator().manual_seed(SEED + 2)
    image = smooth_field(g, 3, 48, 64)
    mean = vae.encode(image).latent_dist.mean
    latent = torch.randn((1, 16, 6, 8), generator=g)
    decoded = vae.decode(latent).sample
    T.update({"vae.image": f32(image), "vae.mean": f32(mean), "vae.latent": latent, "vae.decoded": f32(decoded)})

    # ---------------- schedules ----------------
    i2i_pipe = ZImageImg2ImgPipeline(**{k: getattr(pipe, k) for k in
                                        ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")})
    i2i_pipe.set_progress_bar_config(disable=True)
    sched_json = {}
    for n in SIGMA_NS:
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        i2i_pipe.scheduler = sched
        mu = calculate_shift(((HEIGHT // 8) // 2) * ((WIDTH // 8) // 2))
        ts, _ = retrieve_timesteps(sched, n, "cpu", sigmas=get_default_z_image_sigmas(n), mu=mu)
        entry = {
            "input_sigmas": get_default_z_image_sigmas(n),
            "sigmas": sched.sigmas.tolist(),
            "timesteps": ts.tolist(),
            "model_t": ((1000 - ts.float()) / 1000).tolist(),
            "strength": {},
        }
        for s in STRENGTHS:
            sched.set_timesteps(sigmas=get_default_z_image_sigmas(n), mu=mu)
            sts, nsteps = i2i_pipe.get_timesteps(n, s, "cpu")
            entry["strength"][str(s)] = {
                "t_start": int(sched.begin_index),
                "timesteps": sts.tolist(),
                "num_steps": int(nsteps),
                "start_sigma": float(sched.sigmas[sched.begin_index]) if nsteps > 0 else None,
            }
        sched_json[str(n)] = entry
    J["sigmas"] = sched_json
    i2i_pipe.scheduler = pipe.scheduler

    # ---------------- text to image (Turbo: guidance 0) ----------------
    g = torch.Generator().manual_seed(SEED + 3)
    noise = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=g)
    steps = []

    def cb(p, i, tt, kw):
        steps.append(kw["latents"].detach().clone())
        return {}

    lat = pipe(prompt=T2I_PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, guidance_scale=0.0,
               latents=noise.clone(), output_type="latent", callback_on_step_end=cb).images
    assert len(steps) == STEPS
    img = pipe(prompt=T2I_PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, guidance_scale=0.0,
               latents=noise.clone(), output_type="np").images
    T["t2i.noise"] = noise
    T["t2i.latents"] = f32(lat[0:1])
    T["t2i.image"] = torch.from_numpy(np.asarray(img[0], dtype=np.float32))
    for i, s in enumerate(steps):
        T[f"t2i.step{i}"] = f32(s)
    assert torch.equal(T["t2i.step3"], T["t2i.latents"])
    J["t2i"] = {"prompt": T2I_PROMPT, "chat": chat(tokenizer, T2I_PROMPT), "width": WIDTH, "height": HEIGHT,
                "num_inference_steps": STEPS, "guidance_scale": 0.0, "output_type_image": "np"}

    # ---------------- text to image with CFG ----------------
    def run_cfg(prefix, trunc):
        g2 = torch.Generator().manual_seed(SEED + (4 if prefix == "t2i_cfg" else 5))
        nz = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=g2)
        kw = dict(prompt=T2I_PROMPT, negative_prompt=T2I_NEG, width=WIDTH, height=HEIGHT,
                  num_inference_steps=STEPS, guidance_scale=2.0, cfg_normalization=1.2, cfg_truncation=trunc)
        with TransformerRecorder(pipe.transformer) as rec:
            lat_c = pipe(latents=nz.clone(), output_type="latent", **kw).images
        img_c = pipe(latents=nz.clone(), output_type="np", **kw).images
        T[f"{prefix}.noise"] = nz
        T[f"{prefix}.latents"] = f32(lat_c[0:1])
        T[f"{prefix}.image"] = torch.from_numpy(np.asarray(img_c[0], dtype=np.float32))
        J[prefix] = {"prompt": T2I_PROMPT, "negative_prompt": T2I_NEG, "chat": chat(tokenizer, T2I_PROMPT),
                     "negative_chat": chat(tokenizer, T2I_NEG), "width": WIDTH, "height": HEIGHT,
                     "num_inference_steps": STEPS, "guidance_scale": 2.0, "cfg_normalization": 1.2,
                     "cfg_truncation": trunc, "per_step": cfg_diagnostics(rec.calls, 2.0, 1.2)}

    run_cfg("t2i_cfg", 0.9)
    # extra case (not in the original brief): a truncation that actually switches CFG off for late steps
    run_cfg("t2i_cfg_trunc", 0.2)

    # ---------------- image to image ----------------
    g = torch.Generator().manual_seed(SEED + 6)
    init = smooth_field(g, 3, HEIGHT, WIDTH)
    init_u8 = ((init[0].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    png_path = os.path.join(out_dir, "i2i_init.png")
    Image.fromarray(init_u8, mode="RGB").save(png_path)
    init_img = Image.open(png_path).convert("RGB")
    assert np.array_equal(np.asarray(init_img), init_u8)
    i2i_noise = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=g)

    orig_sample = DiagonalGaussianDistribution.sample
    orig_randn = z_img2img_module.randn_tensor
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    z_img2img_module.randn_tensor = lambda shape, **kw: i2i_noise.clone().to(kw.get("dtype") or torch.float32)
    try:
        kw = dict(prompt=I2I_PROMPT, image=init_img, strength=0.6, num_inference_steps=STEPS, guidance_scale=0.0)
        first_in, scaled = [], []
        orig_scale_noise = i2i_pipe.scheduler.scale_noise

        def scale_noise(sample, timestep, noise=None):
            res = orig_scale_noise(sample, timestep, noise)
            scaled.append((sample.clone(), res.clone()))
            return res

        i2i_pipe.scheduler.scale_noise = scale_noise
        h = transformer.register_forward_pre_hook(lambda m, a: first_in.append(a[0][0].clone()) and None)
        lat_i = i2i_pipe(output_type="latent", **kw).images
        h.remove()
        del i2i_pipe.scheduler.scale_noise
        img_i = i2i_pipe(output_type="np", **kw).images
    finally:
        DiagonalGaussianDistribution.sample = orig_sample
        z_img2img_module.randn_tensor = orig_randn
    # the loop's start latent: recorded from scheduler.scale_noise, checked against the formula
    # start = s0 * noise + (1 - s0) * (mean - shift) * scale  and against the transformer's first input
    image_latents, start = scaled[0]
    img_t = torch.from_numpy(np.asarray(init_img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
    ref_lat = (vae.encode(img_t).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(ref_lat, image_latents, atol=1e-5), float((ref_lat - image_latents).abs().max())
    s0 = i2i_pipe.scheduler.sigmas[J["sigmas"][str(STEPS)]["strength"]["0.6"]["t_start"]]
    assert torch.equal(s0 * i2i_noise + (1.0 - s0) * image_latents, start)
    assert torch.equal(first_in[0][:, 0][None], start)
    T["i2i.image_latents"] = f32(image_latents)
    T["i2i.start"] = f32(start)
    T["i2i.noise"] = i2i_noise
    T["i2i.latents"] = f32(lat_i[0:1])
    T["i2i.image"] = torch.from_numpy(np.asarray(img_i[0], dtype=np.float32))
    J["i2i"] = {"prompt": I2I_PROMPT, "chat": chat(tokenizer, I2I_PROMPT), "init_image": "i2i_init.png",
                "width": WIDTH, "height": HEIGHT, "num_inference_steps": STEPS, "strength": 0.6,
                "guidance_scale": 0.0, "vae_latent": "latent_dist.mean (sample() patched to return the mean)",
                "start_sigma": J["sigmas"][str(STEPS)]["strength"]["0.6"]["start_sigma"],
                "t_start": J["sigmas"][str(STEPS)]["strength"]["0.6"]["t_start"],
                "num_steps": J["sigmas"][str(STEPS)]["strength"]["0.6"]["num_steps"]}

    J["vae"] = {"image_shape": [1, 3, 48, 64], "latent_shape": [1, 16, 6, 8], "scaling_factor": 0.3611,
                "shift_factor": 0.1159, "mean_is": "first 16 of the 32 encoder output channels (raw, no shift/scale)"}
    def clean(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")
                and isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))}

    J["model"] = {"dir": "tiny_model", "transformer": clean(transformer.config),
                  "text_encoder": clean(text_encoder.config.to_dict()),
                  "vae": clean(vae.config), "scheduler": clean(pipe.scheduler.config)}

    # ---------------- write ----------------
    T = {k: v.contiguous() for k, v in T.items()}
    for k, v in T.items():
        if k.endswith("input_ids"):
            assert v.dtype == torch.int64
        else:
            assert v.dtype == torch.float32, (k, v.dtype)
            assert torch.isfinite(v).all(), k
    J["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sorted(T.items())}
    save_file(T, os.path.join(out_dir, "expected.safetensors"), metadata={"generator": "scripts/make_fixtures.py"})
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(J, f, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
        f.write("\n")

    make_lora_fixtures(out_dir)
    for k, v in sorted(T.items()):
        print(f"{k:22s} {stats(v) if v.is_floating_point() else str(v.tolist()[:12]) + ' ...'}", file=sys.stderr)
    print(json.dumps({k: J[k] for k in ("t2i_cfg", "t2i_cfg_trunc")}, indent=1), file=sys.stderr)
    print(f"batch-vs-single: {J['dit_batch_vs_single_max_abs_diff']}  te unpadded-vs-padded: "
          f"{J['te_unpadded_vs_padded_max_abs_diff']}", file=sys.stderr)
    write_enhancer_fixture(out_dir)


if __name__ == "__main__":
    main()
