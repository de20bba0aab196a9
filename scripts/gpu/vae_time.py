"""Times diffusers' AutoencoderKL decode (Flux VAE config, random weights, bf16) on the GPU, to set
beside `zimage bench --ops`'s VAE profile. Usage: python3 scripts/gpu/vae_time.py [latent_side ...]"""
import sys
import time

import torch
from diffusers import AutoencoderKL

vae = AutoencoderKL(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
).to("cuda", torch.bfloat16).eval()
for side in [int(a) for a in sys.argv[1:]] or [128]:
    z = torch.randn(1, 16, side, side, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            vae.decode(z)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            vae.decode(z)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    print(f"diffusers VAE decode {side * 8}x{side * 8} bf16: median {sorted(times)[2]:.1f} ms "
          f"(cudnn.benchmark={torch.backends.cudnn.benchmark})")
