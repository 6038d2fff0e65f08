"""Training objective: v-prediction on a zero-terminal-SNR DDPM schedule (CogVideoX / the official code).

The noise schedule is diffusers' ``CogVideoXDDIMScheduler`` with the CogVideoX-5B settings (scaled-linear
betas 0.00085 -> 0.012, 1000 steps, SNR shift 1.0, rescaled to zero terminal SNR), which is the official
``ZeroSNRDDPMDiscretization`` (their "linear" schedule is linspace of sqrt(beta), squared). With
a_t = sqrt(alphas_cumprod[t]) and s_t = sqrt(1 - alphas_cumprod[t]):

    x_t = a_t * x0 + s_t * noise,       v = a_t * noise - s_t * x0,       loss = mean((v_pred - v)^2)

The official loss is the SAT one: the x0 error weighted by 1 / s_t^2, which equals the plain v-MSE because
x0_pred - x0 = -s_t (v_pred - v). Timesteps are drawn uniformly from [0, 1000).
"""

from __future__ import annotations

import contextlib
import functools

import torch

NUM_TRAIN_TIMESTEPS = 1000


@functools.lru_cache(maxsize=4)
def zero_snr_alphas_cumprod(snr_shift_scale: float = 1.0) -> torch.Tensor:
    """alphas_cumprod [1000] in float64 from diffusers' CogVideoX scheduler (zero terminal SNR)."""
    from diffusers import CogVideoXDDIMScheduler

    sched = CogVideoXDDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=snr_shift_scale,
        timestep_spacing="trailing",
    )
    acp = sched.alphas_cumprod.to(torch.float64).clone()
    # diffusers keeps a tiny positive value at the last step so that DDIM sampling can divide by it; for the
    # training target the terminal step must be pure noise (v = -x0), as in the official discretisation.
    acp[-1] = 0.0
    return acp


def noise_and_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """(x_t, v_target) for x0, noise [B, ...] and integer timesteps [B]; computed in float32."""
    acp = zero_snr_alphas_cumprod().to(device=x0.device)
    a = acp[timesteps].sqrt().to(torch.float32)
    s = (1.0 - acp[timesteps]).sqrt().to(torch.float32)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a, s = a.view(shape), s.view(shape)
    x0 = x0.float()
    noise = noise.float()
    return a * x0 + s * noise, a * noise - s * x0


def v_prediction_loss(model, latents, text, noise, timesteps, *, compute_dtype=torch.float32,
                      offload_activations: bool = False):
    """Mean squared v error of ``model`` (TTTDiT signature) on one micro-batch; returns a float32 scalar.

    latents [B, F, C, h, w] (already scaled by the VAE scaling factor), text [B, S, L, D], noise like
    latents, timesteps [B] int64.
    """
    x_t, v_target = noise_and_target(latents, noise, timesteps)
    ctx = torch.autograd.graph.save_on_cpu(pin_memory=latents.is_cuda) if offload_activations else contextlib.nullcontext()
    with ctx:
        v_pred = model(
            hidden_states=x_t.to(compute_dtype),
            encoder_hidden_states=text.to(compute_dtype),
            timestep=timesteps,
        )
    if v_pred.shape != v_target.shape:
        raise RuntimeError(f"model output {tuple(v_pred.shape)} does not match latents {tuple(v_target.shape)}")
    return (v_pred.float() - v_target).pow(2).mean()
