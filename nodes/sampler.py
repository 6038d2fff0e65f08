"""One-Minute Sampler node: TTT_MODEL + TTT_STORYBOARD -> TTT_LATENTS (the whole video's latents)."""

from __future__ import annotations

import hashlib
import json
import os

from . import _comfy

log = _comfy.log


def _parse_segment_seeds(text: str) -> dict[int, int] | None:
    from ..ttt_core.sampling import parse_segment_seeds

    return parse_segment_seeds(text) if text.strip() else None


def _parse_segments(text: str) -> list[int]:
    from ..ttt_core.sampling import parse_segment_list

    return parse_segment_list(text) if text.strip() else []


class TTTOneMinuteSampler:
    """Denoises every segment of the storyboard together (the TTT layers see the whole video)."""

    CATEGORY = "TTT Video"
    FUNCTION = "sample"
    RETURN_TYPES = ("TTT_LATENTS", "STRING")
    RETURN_NAMES = ("latents", "info")
    OUTPUT_TOOLTIPS = ("latents of the whole video (13 + 12 x (segments - 1) latent frames)",
                       "seeds, steps and timing")
    DESCRIPTION = ("Samples the whole video (v-prediction, CogVideoX zero-SNR schedule). Cancel stops within one step "
                   "and keeps the state: queue the same settings again to continue where it stopped.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..ttt_core.sampling import CFG_MODES, DEFAULT_GUIDANCE, DEFAULT_STEPS, GUIDANCE_MODES, SCHEDULERS

        return {
            "required": {
                "model": ("TTT_MODEL", {"tooltip": "from TTT-DiT Model Loader"}),
                "storyboard": ("TTT_STORYBOARD", {"tooltip": "from Storyboard Loader"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "the same seed gives the same video on the same machine"}),
                "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 1000,
                                  "tooltip": "denoising steps (50 in the paper)"}),
                "guidance": ("FLOAT", {"default": DEFAULT_GUIDANCE, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                       "tooltip": "classifier-free guidance strength s (6 in the official code)"}),
                "guidance_mode": (list(GUIDANCE_MODES), {
                    "default": "dynamic",
                    "tooltip": "dynamic: w = 1 + s(1 - cos(pi (step/steps)^5))/2, ramping from 1 to 1+s; constant: w = s; "
                               "official: the official code's formula on the DDPM timestep (a quirk, for reproduction)"}),
                "scheduler": (list(SCHEDULERS), {
                    "default": "dpmpp_2m",
                    "tooltip": "dpmpp_2m: the official code's stochastic DPM++ 2M; ddim: the paper's deterministic DDIM"}),
                "use_negative": ("BOOLEAN", {"default": True,
                                             "tooltip": "use the storyboard's negative prompts and guidance (off: half the work)"}),
            },
            "optional": {
                "segment_seeds": ("STRING", {"default": "", "multiline": False,
                                             "tooltip": "per-segment seeds: '3=123,5=77' (segment=seed, 1-based) or one per "
                                                        "segment '11,12,13'; empty: all derived from seed"}),
                "regenerate_segments": ("STRING", {"default": "", "multiline": False,
                                                   "tooltip": "re-roll only these segments' noise, e.g. '3,5-7'; the others keep "
                                                              "theirs. The model is global, so kept segments may still shift "
                                                              "slightly."}),
                "variation_seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                           "tooltip": "seed for the re-rolled segments"}),
                "cfg_mode": (list(CFG_MODES), {"default": "auto",
                                               "tooltip": "prompt + negative passes batched (fast) or one after another "
                                                          "(less memory); auto falls back when GPU memory runs out"}),
                "resume": ("BOOLEAN", {"default": True,
                                       "tooltip": "after a cancel, queueing the same settings continues from the saved state "
                                                  "(same result as an uninterrupted run)"}),
            },
        }

    def sample(self, model, storyboard, seed, steps, guidance, guidance_mode, scheduler, use_negative,
               segment_seeds="", regenerate_segments="", variation_seed=1, cfg_mode="auto", resume=True):
        from ..ttt_core import pipeline, sampling

        bundle = model
        sb = storyboard
        seeds = pipeline.resolve_seeds_for(sb.num_segments, seed, _parse_segment_seeds(segment_seeds),
                                           _parse_segments(regenerate_segments), variation_seed)
        cond, uncond, warnings = pipeline.encode_storyboard(bundle, sb, use_negative=use_negative)
        for w in warnings:
            log.warning("%s", w)
        if bundle.is_embedded_default:
            log.warning("%s", pipeline.EMBEDDED_DEFAULT_NOTE)

        # The checkpoint name is a hash of everything that determines the result, so re-queueing the same
        # settings after a cancel finds it.
        key_src = json.dumps({"model": bundle.name, "weights": sampling.model_fingerprint(bundle.transformer),
                              "emb": sampling.tensor_fingerprint(cond, uncond), "seeds": seeds,
                              "steps": steps, "guidance": guidance, "mode": guidance_mode, "scheduler": scheduler,
                              "cfg": cfg_mode}, sort_keys=True)
        folder = _comfy.output_directory() / "ttt_video_resume"
        ckpt = str(folder / f"{hashlib.sha256(key_src.encode()).hexdigest()[:20]}.safetensors")
        resume_from = ckpt if resume and os.path.isfile(ckpt) else None
        if resume_from:
            log.info("resuming from %s", ckpt)

        bar = _comfy.progress_bar(steps)

        def on_step(info: sampling.StepInfo):
            if bar is not None:
                bar.update_absolute(info.step, info.total, _comfy.preview_image(info.preview()))

        latents = pipeline.run_sampler(
            bundle, cond, uncond, steps=steps, seed=seed, scheduler=scheduler, guidance=guidance,
            guidance_mode=guidance_mode, segment_seeds=seeds, cfg_mode=cfg_mode, callback=on_step,
            cancel=_comfy.interrupt_check(), checkpoint_path=ckpt, resume_from=resume_from,
        )
        if os.path.isfile(ckpt):
            os.remove(ckpt)  # finished: the saved state is stale
        info = (f"{sb.num_segments} segment(s), {latents.shape[1]} latent frames, {steps} {scheduler} steps, "
                f"guidance {guidance:g} ({guidance_mode}), seed {seed}, segment seeds {seeds}")
        return ({"latents": latents.float().cpu(), "num_segments": sb.num_segments, "segment_seeds": seeds,
                 "storyboard": sb}, info)
